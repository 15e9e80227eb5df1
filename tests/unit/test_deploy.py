"""deploy/: the Compose file validated by the real Compose binary, consistent with pipeline.toml."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import compose
import pytest

from orchestrator.core.config import ConfigError, MeshConfig, load_config
from orchestrator.core.graph import CALLEE, STAGES
from orchestrator.core.telemetry import METRICS

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
BASE = K8S / "base"
OVERLAYS = {"dev": 5, "prod": 5, "colocated": 1}  # overlay: its StatefulSets
KUBECTL = shutil.which("kubectl")


def manifests() -> list[Path]:
    """Every Kubernetes object file: what the base and the overlays list as resources (not patches)."""
    import yaml

    files = []
    for kustomization in sorted(K8S.rglob("kustomization.yaml")):
        for resource in yaml.safe_load(kustomization.read_text()).get("resources", []):
            path = kustomization.parent / resource
            if path.is_file():
                files.append(path)
    return files


def k8s_documents() -> list[dict]:  # type: ignore[type-arg]
    import yaml

    docs = []
    for path in sorted(BASE.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def render(overlay: str) -> str:
    done = subprocess.run(
        [str(KUBECTL), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def validate(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("kubernetes-validate")), "--strict", "-k", "1.32.0", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_kubernetes_manifests_validate_against_the_1_32_schemas() -> None:
    out = validate(*(str(p) for p in manifests()))
    assert out.count("passed") == 28  # every object of every file, base (25), overlays (2), components (1)


@pytest.mark.skipif(KUBECTL is None, reason="kubectl renders the kustomizations offline")
@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_every_rendered_overlay_validates(overlay: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(render(overlay))
    out = validate(str(rendered))
    assert out.count("passed") == rendered.read_text().count("\nkind: ") + rendered.read_text().startswith("kind:")
    assert len(re.findall(r"^kind: StatefulSet$", rendered.read_text(), re.MULTILINE)) == OVERLAYS[overlay]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl renders the kustomizations offline")
def test_the_index_component_mounts_one_claim_read_only_in_every_rag_pod(tmp_path: Path) -> None:
    import yaml

    k8s = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {k8s}/overlays/prod\ncomponents:\n  - {k8s}/components/rag-index\n"
    )
    done = subprocess.run([str(KUBECTL), "kustomize", str(tmp_path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    (tmp_path / "out.yaml").write_text(done.stdout)
    validate(str(tmp_path / "out.yaml"))
    objects = [d for d in yaml.safe_load_all(done.stdout) if d]
    claim = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    rag = next(o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "rag")
    assert rag["spec"]["replicas"] == 2  # the overlay's replicas all mount it
    pod = rag["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "index")
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "index")
    assert mount["readOnly"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ORCH_RAG_INDEX"] == mount["mountPath"]
    others = [o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] != "rag"]
    assert all("index" not in str(o["spec"]["template"]["spec"].get("volumes")) for o in others)


def k8s_config(env: dict[str, str]) -> MeshConfig:
    """The pods' config (base/pipeline.toml, the ConfigMap) with a container's variables; only the Secrets' files,
    absent on this machine, are missing."""
    with pytest.raises(ConfigError) as info:
        load_config(BASE / "pipeline.toml", env=env)
    assert all("no such file" in p for p in info.value.problems), info.value.problems
    with_files = {
        "ORCH_TLS_CA_FILE": str(BASE / "pipeline.toml"),
        "ORCH_AUTH_KEYS_FILE": str(BASE / "pipeline.toml"),
    }
    return load_config(BASE / "pipeline.toml", env=env | with_files)


def test_kubernetes_stages_are_wired_probed_and_locked_down() -> None:
    docs = k8s_documents()
    sets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert set(sets) == set(STAGES)
    for stage, sts in sets.items():
        pod = sts["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e["value"] for e in container["env"] if e["name"] != "ORCH_CONFIG"}
        cfg = k8s_config(env)
        own = cfg.stage(stage)
        assert container["args"] == ["stage", stage]
        assert own.host == "0.0.0.0" and cfg.tls.enabled and cfg.auth.keys_file
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": own.port, "health": own.health_port, "metrics": own.metrics_port}
        # Plaintext health only for the kubelet, which has no TLS.
        assert container["readinessProbe"]["grpc"] == {"port": own.health_port}
        assert container["livenessProbe"]["grpc"] == {"port": own.health_port, "service": "orchestrator.liveness"}
        # AdminService on the pod's loopback only: not a container port, so no Service can expose it.
        assert cfg.server.admin_host == "127.0.0.1" and own.admin_port not in ports.values()
        assert all(own.admin_port not in {p["port"] for p in svc["spec"]["ports"]} for svc in services.values())
        # The config, mutual TLS from the stage's own Secret and the API keys, all mounted read-only.
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == f"orchestrator-{stage}-tls"
        assert volumes["keys"]["secret"]["secretName"] == "orchestrator-keys"
        assert volumes["config"]["configMap"]["name"] == "orchestrator-config"
        assert all(m["readOnly"] is True for m in container["volumeMounts"])
        assert all(Path(f).parent == Path(mounts["tls"]) for f in cfg.tls.files(stage))
        assert Path(tomllib.loads((BASE / "pipeline.toml").read_text())["tls"]["ca_file"]).parent == Path(mounts["tls"])
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert "limits" in container["resources"] and "requests" in container["resources"]
        assert pod["terminationGracePeriodSeconds"] > cfg.server.drain_grace_s


def test_scaling_any_stage_needs_nothing_but_its_replica_count() -> None:
    """Callers find a stage's replicas by DNS: its headless Service's name, which answers with every ready pod of
    its StatefulSet, however many there are. No manifest names a pod, and nothing else counts replicas."""
    docs = k8s_documents()
    sets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}
    services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    cfg = k8s_config({})
    for stage, sts in sets.items():
        if stage not in CALLEE.values():
            continue  # the edge: clients reach it through its own Service
        pods = sts["spec"]["template"]["metadata"]["labels"]
        (endpoint,) = cfg.stage(stage).endpoints
        assert endpoint == f"dns:{stage}:{cfg.stage(stage).port}"
        service = services[stage]
        assert service["clusterIP"] == "None" and sts["spec"]["serviceName"] == stage  # one DNS answer per pod
        assert service["selector"].items() <= pods.items()
        assert not service.get("publishNotReadyAddresses")  # a draining pod leaves the answers
    everything = "\n".join(p.read_text() for p in [*K8S.rglob("*.yaml"), BASE / "pipeline.toml"])
    for stage in STAGES:
        assert f"{stage}-0" not in everything and f"{stage}-1" not in everything


def test_the_autoscaler_scales_inference_on_a_metric_the_stages_export() -> None:
    import yaml

    hpa = yaml.safe_load((K8S / "overlays" / "prod" / "autoscaler.yaml").read_text())
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "inference"}
    (metric,) = hpa["spec"]["metrics"]
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    served = {rule["name"]["as"] for rule in values["rules"]["custom"]}
    assert metric["pods"]["metric"]["name"] in served
    assert {name.removeprefix("orchestrator_") for name in served} <= {m.name for m in METRICS}


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


def test_the_colocated_overlay_runs_every_stage_in_one_process_with_ports_of_their_own() -> None:
    import yaml

    overlay = K8S / "overlays" / "colocated"
    env = {"ORCH_TLS_CA_FILE": str(BASE / "pipeline.toml"), "ORCH_AUTH_KEYS_FILE": str(BASE / "pipeline.toml")}
    with pytest.raises(ConfigError) as info:  # only the Secrets' files are missing here
        load_config(overlay / "pipeline.toml", env={k: v for k, v in env.items() if "CA" not in k})
    assert all("no such file" in p for p in info.value.problems), info.value.problems
    cfg = load_config(overlay / "pipeline.toml", env=env)
    assert cfg.groups() == [tuple(STAGES)]
    for attr in ("port", "metrics_port", "health_port", "admin_port"):  # one pod: no two stages on one port
        assert len({getattr(cfg.stage(name), attr) for name in STAGES}) == len(STAGES), attr
    (patch,) = [d for d in yaml.safe_load_all((overlay / "mesh.yaml").read_text())]
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["stage", "+".join(STAGES)]
    ports = {p["containerPort"] for p in container["ports"]}
    assert {cfg.stage(name).port for name in STAGES} <= ports and cfg.stream.health_port in ports


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus package")
def test_alert_rules_check_and_fire_on_synthetic_series() -> None:
    for args in (["check", "rules", "rules.yml"], ["test", "rules", "rules_test.yml"]):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, check=False, cwd=DEPLOY)
        assert done.returncode == 0, done.stdout + done.stderr


def test_every_dashboard_query_names_a_metric_the_mesh_exports() -> None:
    import yaml

    dashboard = json.loads((DEPLOY / "grafana" / "orchestrator.json").read_text())
    recorded = {
        rule["record"]
        for group in yaml.safe_load((DEPLOY / "rules.yml").read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    exported = {f"orchestrator_{m.name}" for m in METRICS} | {"process_resident_memory_bytes"}
    suffixes = ("_bucket", "_count", "_sum")
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = re.findall(r"\b(?:orchestrator[_:][a-z0-9_:]+|process_[a-z_]+)\b", target["expr"])
            assert names, target
            for name in names:
                base = next((name.removesuffix(s) for s in suffixes if name.endswith(s)), name)
                assert name in recorded or base in exported, (panel["title"], name)


def test_the_production_overlay_ships_the_same_rules_and_dashboard() -> None:
    monitoring = K8S / "overlays" / "prod" / "monitoring"
    assert (monitoring / "rules.yml").read_text() == (DEPLOY / "rules.yml").read_text()
    assert (monitoring / "orchestrator.json").read_text() == (DEPLOY / "grafana" / "orchestrator.json").read_text()
