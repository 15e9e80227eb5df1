# Front door: `make run-mesh` runs the demo, `make test` runs the tests.
# Both create the virtualenv and install pinned dependencies on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
NODE_STAMP := tests/node/node_modules/.installed
LLAMA_STAMP := $(VENV)/.llama-installed
# The trace viewer (Arize Phoenix) in a virtualenv of its own: its pins never meet the project's.
PHOENIX_VENV := .venv-phoenix
PHOENIX_STAMP := $(PHOENIX_VENV)/.installed
# llama.cpp build flags that cut the compile from ~9 to ~1 min on 2 cores: no llava, no llama-common
# library (the server needs only libllama), no -O3. The wheel is built for this machine only.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE_BEFORE=$(CURDIR)/tests/tools/llama_no_common.cmake -DCMAKE_C_FLAGS_RELEASE=-DNDEBUG -DCMAKE_CXX_FLAGS_RELEASE=-DNDEBUG
PROTO_FILES := $(wildcard protos/orchestrator/v1/*.proto)
# The generated Python lives beside the .proto files: protos/ is also the prompt-orchestrator-protos package.
GEN_DIR := protos
GEN_PKG := $(GEN_DIR)/orchestrator/v1
GENERATED := '$(GEN_PKG)/*_pb2*'

.PHONY: bench bench-full docs llama-deps phoenix-deps traces help venv protos check-protos buf-lint lint fmt test test-quick run-mesh mesh validate clean node-deps up down

help:
	@echo "make run-mesh     start the five stages, send 10 demo requests, stop (exit 0)"
	@echo "make mesh         start the five stages and keep them in the foreground (Ctrl-C stops)"
	@echo "make test         lint, proto checks and the whole test suite"
	@echo "make test-quick   unit and in-process tests only"
	@echo "make protos       regenerate the Python code beside the .proto files in protos/"
	@echo "make check-protos fail if the committed generated code drifted"
	@echo "make lint         ruff + mypy + the layer contract (import-linter)"
	@echo "make validate     check pipeline.toml (and ORCH_* overrides)"
	@echo "make bench        benchmark the mesh against its floors (a few minutes); bench-full: longer"
	@echo "make traces       the demo with a local trace viewer (Phoenix, no Docker); prints each trace's URL"
	@echo "make up / down    the mesh + Jaeger + Prometheus + Grafana with Docker Compose (deploy/compose.yaml)"

# Three distributions from this repository: the protocol (protos/), the client (orchestrator_client/) and the
# server (.), which depends on both.
$(STAMP): pyproject.toml protos/pyproject.toml orchestrator_client/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3
	$(BIN)/pip install --quiet -c constraints.txt -e ./protos -e ./orchestrator_client -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --silent --no-audit --no-fund
	touch $(NODE_STAMP)

node-deps: $(NODE_STAMP)

$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -c constraints.txt -e ./protos -e ./orchestrator_client -e '.[dev,llama]'
	touch $(LLAMA_STAMP)

llama-deps: $(LLAMA_STAMP)

$(PHOENIX_STAMP): deploy/phoenix/requirements.txt deploy/phoenix/constraints.txt
	$(PYTHON) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/pip install --quiet -c deploy/phoenix/constraints.txt -r deploy/phoenix/requirements.txt
	touch $(PHOENIX_STAMP)

phoenix-deps: $(PHOENIX_STAMP)

traces: $(STAMP) $(PHOENIX_STAMP)
	$(PY) deploy/phoenix/traces.py $(ARGS)

# The one pinned command that produces the generated code (grpcio-tools is pinned in constraints.txt).
protos: $(STAMP)
	rm -f $(GEN_PKG)/*_pb2*.py $(GEN_PKG)/*_pb2*.pyi
	$(PY) -m grpc_tools.protoc -I protos \
		--python_out=$(GEN_DIR) --pyi_out=$(GEN_DIR) --grpc_python_out=$(GEN_DIR) $(PROTO_FILES)

check-protos: protos
	@git diff --exit-code --stat -- $(GENERATED) \
		|| (echo "generated code drifted from protos/: run 'make protos' and commit" >&2; exit 1)
	@test -z "$$(git status --porcelain -- $(GENERATED))" \
		|| (echo "untracked generated files: run 'make protos' and commit" >&2; git status --short -- $(GENERATED); exit 1)

buf-lint: $(STAMP)
	BUF_CACHE_DIR=$${BUF_CACHE_DIR:-$$(mktemp -d)} $(BIN)/buf lint

# ruff, mypy, and the layer contract in pyproject.toml (import-linter; drawn at the top of ARCHITECTURE.md).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The suite, then the tests of the client-facing paths again: with TLS at the edge and mutual TLS between stages,
# and with all five stages in one process (calls between them in memory).
MESH_SUITE = tests/e2e/test_mesh.py tests/e2e/test_failures.py tests/e2e/test_backends.py tests/e2e/test_metrics.py \
	tests/e2e/test_tracing.py tests/e2e/test_peers.py

test: $(STAMP) $(NODE_STAMP) $(LLAMA_STAMP) $(PHOENIX_STAMP) check-protos buf-lint lint
	$(BIN)/pytest
	$(BIN)/pytest --tls $(MESH_SUITE)
	$(BIN)/pytest --layout rag+assemble+inference+post+stream $(MESH_SUITE)

# Unit and in-process tests: no subprocess meshes, no peers, no llama.cpp build.
test-quick: $(STAMP)
	$(BIN)/pytest -m "not mesh and not peer and not llama and not multihost"

run-mesh: $(STAMP)
	$(BIN)/orchestrator demo $(if $(LAYOUT),--layout $(LAYOUT))

mesh: $(STAMP)
	$(BIN)/orchestrator up

validate: $(STAMP)
	$(BIN)/orchestrator validate

# README's settings and metrics tables are generated from the code.
docs: $(STAMP)
	$(PY) tests/tools/readme_tables.py

# Benchmarks: results (JSON, Markdown, PNG) land in bench-results/ (git-ignored).
bench: $(STAMP)
	$(PY) -m bench --out bench-results/latest $(ARGS)

bench-full: $(STAMP)
	$(PY) -m bench --full --out bench-results/full $(ARGS)

# The mesh with Jaeger and Prometheus on a Docker host (needs Docker with the compose plugin).
up:
	docker compose -f deploy/compose.yaml up --build -d
	@echo "Stream stage: 127.0.0.1:50055  Jaeger: http://127.0.0.1:16686  Prometheus: http://127.0.0.1:9090"

down:
	docker compose -f deploy/compose.yaml down

clean:
	rm -rf $(VENV) tests/node/node_modules .pytest_cache .mypy_cache .ruff_cache build */build *.egg-info */*.egg-info
