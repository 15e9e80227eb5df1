"""deploy/: the Compose file validated by the real Compose binary, consistent with pipeline.toml."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import compose
import pytest

from orchestrator.config import STAGES, load_config
from orchestrator.launcher import CALLEE

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = str(Path(compose.__file__).with_name("docker-compose"))  # the binary; its Python wrapper always exits 0


def compose_config() -> dict:  # type: ignore[type-arg]
    done = subprocess.run(
        [COMPOSE, "-f", str(DEPLOY / "compose.yaml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_compose_file_is_valid() -> None:
    done = subprocess.run(
        [COMPOSE, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_compose_wires_every_stage_to_its_callee_with_tracing() -> None:
    services = compose_config()["services"]
    assert {*STAGES, "jaeger", "prometheus"} <= set(services)
    cfg = load_config(ROOT / "pipeline.toml", env={})
    for stage in STAGES:
        svc = services[stage]
        assert svc["command"] == ["stage", stage]
        env = svc["environment"]
        assert env[f"ORCH_{stage.upper()}_HOST"] == "0.0.0.0"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        if stage in CALLEE:
            callee = CALLEE[stage]
            assert env[f"ORCH_{callee.upper()}_REPLICAS"] == f"{callee}:{cfg.stage(callee).port}"
        assert svc["healthcheck"]["test"][-1] == f"127.0.0.1:{cfg.stage(stage).port}"
        assert svc.get("read_only") is True


def test_prometheus_scrapes_every_stage_metrics_port() -> None:
    cfg = load_config(ROOT / "pipeline.toml", env={})
    text = (DEPLOY / "prometheus.yml").read_text()
    for stage in STAGES:
        assert f"{stage}:{cfg.stage(stage).metrics_port}" in text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus package")
def test_prometheus_config_is_valid() -> None:
    done = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
