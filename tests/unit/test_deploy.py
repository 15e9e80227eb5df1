"""deploy/: the Compose file validated by the real Compose binary, consistent with pipeline.toml."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import compose
import pytest

from orchestrator.core.config import ConfigError, load_config
from orchestrator.core.graph import CALLEE, STAGES

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
            assert env[f"ORCH_{callee.upper()}_ENDPOINTS"] == f"{callee}:{cfg.stage(callee).port}"
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


K8S = DEPLOY / "k8s"


def k8s_documents() -> list[dict]:  # type: ignore[type-arg]
    import yaml

    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests_validate_against_the_1_32_schemas() -> None:
    files = [str(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
    done = subprocess.run(
        [str(Path(sys.executable).with_name("kubernetes-validate")), "--strict", "-k", "1.32.0", *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == 16


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the kustomization offline")
def test_kustomization_renders() -> None:
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("kind: StatefulSet") == 5


def test_kubernetes_stages_are_wired_probed_and_locked_down() -> None:
    cfg = load_config(ROOT / "pipeline.toml", env={})
    sets = {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] == "StatefulSet"}
    assert set(sets) == set(STAGES)
    for stage, sts in sets.items():
        pod = sts["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        port = cfg.stage(stage).port
        assert container["args"] == ["stage", stage]
        health = int(env[f"ORCH_{stage.upper()}_HEALTH_PORT"])  # plaintext health only: the kubelet has no TLS
        assert health != port
        assert container["readinessProbe"]["grpc"] == {"port": health}
        assert container["livenessProbe"]["grpc"] == {"port": health, "service": "orchestrator.liveness"}
        # Mutual TLS from the stage's own Secret, mounted read-only; the config these settings make is valid.
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"]}
        assert secrets == {"tls": f"orchestrator-{stage}-tls", "keys": "orchestrator-keys"}
        assert all(m["readOnly"] is True for m in mounts.values())
        assert all(env[f"ORCH_TLS_{k}_FILE"].startswith(mounts["tls"]["mountPath"]) for k in ("CERT", "KEY", "CA"))
        # AdminService on the pod's loopback only: not a container port, so no Service can expose it.
        admin = int(env[f"ORCH_{stage.upper()}_ADMIN_PORT"])
        assert admin not in {p["containerPort"] for p in container["ports"]} | {port, health}
        services = [d for d in k8s_documents() if d["kind"] == "Service"]
        assert all(admin not in {p["port"] for p in svc["spec"]["ports"]} for svc in services)
        # API keys on every stage: the edge authenticates clients, and every admin service needs an admin key.
        assert env["ORCH_AUTH_KEYS_FILE"].startswith(mounts["keys"]["mountPath"])
        with pytest.raises(ConfigError) as info:  # only because the Secret's files are not on this machine
            load_config(ROOT / "pipeline.toml", env=env)
        assert all("no such file" in p for p in info.value.problems), info.value.problems
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert "limits" in container["resources"] and "requests" in container["resources"]
        if stage in CALLEE:
            callee = CALLEE[stage]
            assert env[f"ORCH_{callee.upper()}_ENDPOINTS"] == f"{callee}-0.{callee}:{cfg.stage(callee).port}"
        assert pod["terminationGracePeriodSeconds"] > cfg.server.drain_grace_s


def test_network_policies_admit_only_the_chain() -> None:
    policies = {d["metadata"]["name"]: d["spec"] for d in k8s_documents() if d["kind"] == "NetworkPolicy"}
    assert set(policies) == set(STAGES)
    callers = {callee: caller for caller, callee in CALLEE.items()}
    for stage, spec in policies.items():
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == stage
        grpc_rules = [r for r in spec["ingress"] if {"port": "grpc"} in r.get("ports", [])]
        (rule,) = grpc_rules
        if stage in callers:  # from the stage that calls it, and nothing else
            (peer,) = rule["from"]
            assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == callers[stage]
        else:  # the edge: clients from anywhere
            assert "from" not in rule
        metrics = [r for r in spec["ingress"] if {"port": "metrics"} in r.get("ports", [])]
        assert metrics and all("from" in r for r in metrics)
