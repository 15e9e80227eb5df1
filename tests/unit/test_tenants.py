"""API keys (a file of hashes) and each tenant's share of the edge, without a mesh."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from orchestrator.core.config import TenantsConfig
from orchestrator.core.errors import PermissionDenied, RateLimited, Unauthenticated
from orchestrator.runtime import tenants
from orchestrator.runtime.server import _local
from orchestrator.runtime.tenants import Key, KeyRing, TenantLimits, key_line, new_key, parse_keys


def keyring(tmp_path: Path, *lines: str) -> KeyRing:
    path = tmp_path / "keys.jsonl"
    path.write_text("".join(f"{line}\n" for line in lines))
    return KeyRing(str(path))


def test_the_file_holds_hashes_and_a_key_finds_its_tenant(tmp_path: Path) -> None:
    key = new_key()
    assert key.startswith("orch_") and len(key) > 40
    line = key_line(key, "acme", rate=5, burst=None)
    assert key not in line and hashlib.sha256(key.encode()).hexdigest() in line
    ring = keyring(tmp_path, "# a comment", line, "")
    found = ring.authenticate((("authorization", f"Bearer {key}"),), "stream")
    assert (found.tenant, found.role, found.rate, found.burst) == ("acme", "client", 5.0, None)


@pytest.mark.parametrize(
    ("metadata", "error"),
    [
        ((), Unauthenticated),
        ((("authorization", "Bearer nope"),), Unauthenticated),
        ((("authorization", "Basic abc"),), Unauthenticated),
        ((("authorization", "Bearer"),), Unauthenticated),
    ],
)
def test_missing_or_unknown_keys_are_unauthenticated(
    tmp_path: Path, metadata: tuple[tuple[str, str], ...], error: type[Exception]
) -> None:
    ring = keyring(tmp_path, key_line(new_key(), "acme"))
    with pytest.raises(error):
        ring.authenticate(metadata, "stream")


def test_a_client_key_is_denied_the_admin_service(tmp_path: Path) -> None:
    client, admin = new_key(), new_key()
    ring = keyring(tmp_path, key_line(client, "acme"), key_line(admin, "ops", "admin"))
    with pytest.raises(PermissionDenied):
        ring.authenticate((("authorization", f"Bearer {client}"),), "rag", admin=True)
    assert ring.authenticate((("authorization", f"Bearer {admin}"),), "rag", admin=True).tenant == "ops"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json", "keys:1"),
        ('{"tenant": "a", "sha256": "00"}', "64 hex digits"),
        ('{"tenant": "", "sha256": "' + "0" * 64 + '"}', "tenant must be"),
        ('{"tenant": "a", "sha256": "' + "0" * 64 + '", "role": "root"}', "role must be"),
        ('{"tenant": "a", "sha256": "' + "0" * 64 + '", "rate": -1}', "rate must be"),
        ('{"tenant": "a", "sha256": "' + "0" * 64 + '", "colour": "red"}', "unknown field"),
    ],
)
def test_bad_lines_are_named(line: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_keys(line, "keys")


def test_a_changed_file_is_reread_and_a_broken_one_keeps_the_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tenants, "RELOAD_CHECK_S", 0.0)
    first, second = new_key(), new_key()
    ring = keyring(tmp_path, key_line(first, "a"))
    path = Path(ring.path)
    path.write_text(key_line(second, "b") + "\n")
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    assert ring.lookup(first) is None and ring.lookup(second) is not None
    path.write_text("{ broken\n")
    os.utime(path, ns=(2, 2))
    assert ring.lookup(second) is not None  # kept, and logged


def key(**limits: float) -> Key:
    return Key("t", b"\0" * 32, **limits)  # type: ignore[arg-type]


def test_a_token_bucket_gives_a_burst_then_the_rate_with_a_retry_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("orchestrator.runtime.tenants.time.monotonic", lambda: now[0])
    limits = TenantLimits(TenantsConfig())
    k = key(rate=10.0, burst=3)
    for _ in range(3):
        limits.admit("t", k, "stream")
        limits.release("t")
    with pytest.raises(RateLimited) as info:
        limits.admit("t", k, "stream")
    assert info.value.retry_after_s == pytest.approx(0.1)
    now[0] += 0.1  # one token back
    limits.admit("t", k, "stream")
    with pytest.raises(RateLimited):
        limits.admit("t", k, "stream")


def test_open_streams_are_capped_and_given_back() -> None:
    limits = TenantLimits(TenantsConfig(max_streams=2))
    limits.admit("t", None, "stream")
    limits.admit("t", None, "stream")
    with pytest.raises(RateLimited, match="2 streams open"):
        limits.admit("t", None, "stream")
    limits.admit("u", None, "stream")  # another tenant's share is its own
    limits.release("t")
    limits.admit("t", None, "stream")


def test_tenants_beyond_the_tracked_bound_forget_the_idlest() -> None:
    limits = TenantLimits(TenantsConfig(max_streams=5, max_tracked=2))
    limits.admit("busy", None, "stream")  # holds a stream: never forgotten
    limits.admit("idle", None, "stream")
    limits.release("idle")
    limits.admit("new", None, "stream")
    assert set(limits._shares) == {"busy", "new"}


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.3.2.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("unix:/tmp/s", True),
        ("ipv4:10.0.0.2:5000", False),
        ("ipv6:[fe80::1]:5000", False),
    ],
)
def test_local_peers(peer: str, local: bool) -> None:
    assert _local(peer) is local
