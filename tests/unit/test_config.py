"""Config: defaults, TOML, ORCH_* overrides, and clear errors."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from orchestrator.core.config import ConfigError, load_config, settings
from orchestrator.runtime.server import settle_gc


def test_defaults_are_the_documented_capacities() -> None:
    cfg = load_config(env={})
    assert [cfg.stage(s).queue_capacity for s in ("rag", "assemble", "inference", "post", "stream")] == [
        512,
        512,
        1024,
        512,
        256,
    ]


def test_toml_then_env_override(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[inference]\nqueue_capacity = 8\n[inference.worker.echo]\nttft_ms = 5\n[rag]\nendpoints = ["a:1"]\n'
    )
    cfg = load_config(path, env={"ORCH_INFERENCE_QUEUE_CAPACITY": "16", "ORCH_STREAM_LOG_SINK": "true"})
    assert cfg.inference.queue_capacity == 16
    assert cfg.inference.worker.echo.ttft_ms == 5.0
    assert cfg.rag.addresses() == ("a:1",)
    assert cfg.stream.log_sink is True


def test_config_path_from_env(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[post]\nconcurrency = 3\n")
    assert load_config(env={"ORCH_CONFIG": str(path)}).post.concurrency == 3


def test_endpoints_from_env_are_comma_separated() -> None:
    cfg = load_config(env={"ORCH_POST_ENDPOINTS": "h1:1, h2:2"})
    assert cfg.post.addresses() == ("h1:1", "h2:2")


def test_wildcard_host_is_reached_on_loopback() -> None:
    cfg = load_config(env={"ORCH_RAG_HOST": "0.0.0.0", "ORCH_RAG_PORT": "7000", "ORCH_TLS_ALLOW_INSECURE": "true"})
    assert cfg.rag.addresses() == ("127.0.0.1:7000",)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"ORCH_RAG_TOPK": "3"}, "unknown variable ORCH_RAG_TOPK (did you mean ORCH_RAG_TOP_K?)"),
        ({"ORCH_RAG_TOP_K": "three"}, "ORCH_RAG_TOP_K: expected an integer, got 'three'"),
        ({"ORCH_STREAM_LOG_SINK": "maybe"}, "expected true or false"),
        ({"ORCH_POST_ENDPOINTS": "nohostport"}, "post.endpoints entry 'nohostport' is not host:port or dns:NAME:PORT"),
        ({"ORCH_INFERENCE_COALESCE_TOKENS": "0"}, "inference.coalesce_tokens must be >= 1"),
        ({"ORCH_LIMITS_DEFAULT_MAX_TOKENS": "9000"}, "limits.default_max_tokens must be <= limits.max_tokens_limit"),
        ({"ORCH_SERVER_LOG_LEVEL": "LOUD"}, "server.log_level 'LOUD'"),
        ({"ORCH_SERVER_GC_FULL_EVERY": "0"}, "server.gc_full_every must be >= 1"),
        ({"ORCH_POST_HOST": "0.0.0.0"}, "post.host '0.0.0.0' is not loopback and TLS is off"),
        ({"ORCH_POST_HOST": "10.1.2.3"}, "set tls.cert_file, tls.key_file and tls.ca_file, or tls.allow_insecure"),
        ({"ORCH_TLS_CERT_FILE": "c.pem"}, "tls.cert_file and tls.key_file must be set together"),
        ({"ORCH_TLS_CERT_FILE": "c.pem", "ORCH_TLS_KEY_FILE": "k.pem"}, "tls.ca_file must be set with tls.cert_file"),
        ({"ORCH_TLS_CLIENT_CA_FILE": "/nonexistent/ca.pem"}, "tls.client_ca_file needs tls.cert_file"),
        ({"ORCH_TLS_CA_FILE": "/nonexistent/ca.pem"}, "tls.ca_file: no such file '/nonexistent/ca.pem'"),
    ],
)
def test_bad_values_are_reported(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env=env)
    assert any(problem in p for p in info.value.problems), info.value.problems


def test_plaintext_off_loopback_needs_an_explicit_allow_insecure() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        load_config(env={"ORCH_POST_HOST": host})
    assert load_config(env={"ORCH_POST_HOST": "0.0.0.0", "ORCH_TLS_ALLOW_INSECURE": "1"}).post.host == "0.0.0.0"


def test_a_stage_name_in_tls_file_names_is_its_own() -> None:
    env = {"ORCH_TLS_CERT_FILE": "/certs/{stage}.pem", "ORCH_TLS_KEY_FILE": "/keys/{stage}.key"}
    tls = load_config(env=env | {"ORCH_TLS_CA_FILE": __file__}).tls
    assert tls.enabled and tls.files("post") == ("/certs/post.pem", "/keys/post.key")


def test_bad_toml_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[rag\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml", env={})


def test_every_setting_has_help_and_a_unique_env_name() -> None:
    all_settings = list(settings())
    assert all(s.help for s in all_settings)
    assert len({s.env for s in all_settings}) == len(all_settings)


def test_settled_collector_freezes_start_up_objects_and_makes_full_collections_rare() -> None:
    before = gc.get_threshold()
    try:
        settle_gc(1000)
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (before[0], before[1], 1000)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_input_text_goes_on_a_span_only_at_the_edge_and_only_when_asked() -> None:
    from orchestrator.core.telemetry import Telemetry
    from orchestrator.stages import runtime_of

    off, on = load_config(env={}), load_config(env={"ORCH_SERVER_TRACE_TEXT": "true"})
    assert [runtime_of(s, off, Telemetry()).record_input for s in ("stream", "post")] == [False, False]
    assert [runtime_of(s, on, Telemetry()).record_input for s in ("stream", "post")] == [True, False]


def test_the_status_command_reaches_an_admin_listener_on_loopback_in_plaintext() -> None:
    from orchestrator.cli import admin_listener

    cfg = load_config(env={"ORCH_RAG_ADMIN_PORT": "8081", "ORCH_TLS_ALLOW_INSECURE": "1"})
    assert admin_listener(cfg, "127.0.0.1:8081")
    assert not admin_listener(cfg, "127.0.0.1:50051")  # the stage's own port: as the stages are reached
    assert not admin_listener(cfg, "10.0.0.5:8081")  # another machine's: never plaintext by this rule
