"""Tenants at the edge: API keys that name them (a file of hashes, re-read when it changes), and each tenant's share
of the edge (a request rate and a number of open streams).

A key is never stored: the file holds the SHA-256 of each key, and a request's key is hashed and looked up. The
lookup is by digest, so its timing depends on the digest of what the caller sent, which tells nothing about any key;
the entry found is then compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.core.config import TenantsConfig
from orchestrator.core.errors import PermissionDenied, RateLimited, Unauthenticated
from orchestrator.runtime.security import files_stamp

log = logging.getLogger(__name__)

ROLES = ("client", "admin")
KEY_PREFIX = "orch_"
# How often a stage looks at the keys file's modification time (a stat): a removed key stops working this soon.
RELOAD_CHECK_S = 1.0


@dataclass(frozen=True)
class Key:
    """One API key's entry: whose it is, what it may do, and its tenant's limits (None: the configured default)."""

    tenant: str
    digest: bytes
    role: str = "client"
    rate: float | None = None
    burst: int | None = None
    max_streams: int | None = None


def new_key() -> str:
    """A fresh API key: 256 random bits, with a prefix that makes it recognisable in a leaked file."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_line(key: str, tenant: str, role: str = "client", **limits: float | None) -> str:
    """The keys-file line for ``key`` (its hash, never the key)."""
    entry: dict[str, object] = {"tenant": tenant, "sha256": hashlib.sha256(key.encode()).hexdigest(), "role": role}
    entry.update({k: v for k, v in limits.items() if v is not None})
    return json.dumps(entry)


def parse_keys(text: str, source: str = "keys file") -> dict[bytes, Key]:
    """The keys in a keys file, by digest; ValueError naming every bad line."""
    keys: dict[bytes, Key] = {}
    problems = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = _parse_line(line)
        except (ValueError, TypeError, KeyError) as exc:
            problems.append(f"{source}:{n}: {exc}")
            continue
        keys[key.digest] = key
    if problems:
        raise ValueError("; ".join(problems))
    return keys


def _parse_line(line: str) -> Key:
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise ValueError("expected a JSON object")
    unknown = set(entry) - {"tenant", "sha256", "role", "rate", "burst", "max_streams"}
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
    tenant, digest, role = entry["tenant"], bytes.fromhex(entry["sha256"]), entry.get("role", "client")
    if not isinstance(tenant, str) or not tenant or len(tenant) > 64:
        raise ValueError("tenant must be a name of 1-64 characters")
    if len(digest) != 32:
        raise ValueError("sha256 must be 64 hex digits")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    limits = {k: entry[k] for k in ("rate", "burst", "max_streams") if k in entry}
    for name, value in limits.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a number >= 0")
    return Key(
        tenant,
        digest,
        role,
        rate=float(limits["rate"]) if "rate" in limits else None,
        burst=int(limits["burst"]) if "burst" in limits else None,
        max_streams=int(limits["max_streams"]) if "max_streams" in limits else None,
    )


class KeyRing:
    """The keys in ``path``, read again when the file changes (checked at most once a second, and on SIGHUP).
    A file that no longer parses keeps the keys in force, loudly: a typo must not lock everyone out."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp = files_stamp((path,))
        self._keys = parse_keys(Path(path).read_text(encoding="utf-8"), path)  # at start, a bad file is fatal
        self._checked_at = time.monotonic()
        self.reloads = 0

    @property
    def tenants(self) -> list[str]:
        return sorted({k.tenant for k in self._keys.values()})

    def reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < RELOAD_CHECK_S:
            return
        self._checked_at = now
        stamp = files_stamp((self.path,))
        if stamp == self._stamp and not force:
            return
        try:
            keys = parse_keys(Path(self.path).read_text(encoding="utf-8"), self.path)
        except (OSError, ValueError) as exc:
            log.error("keys file not reloaded, keeping the %d keys in force: %s", len(self._keys), exc)
            self._stamp = stamp  # not again until it changes
            return
        self._stamp, self._keys = stamp, keys
        self.reloads += 1
        log.info("keys file reloaded: %d keys, %d tenants", len(keys), len(self.tenants))

    def lookup(self, token: str) -> Key | None:
        self.reload()
        digest = hashlib.sha256(token.encode()).digest()
        key = self._keys.get(digest)
        if key is None or not hmac.compare_digest(key.digest, digest):
            return None
        return key

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]], stage: str, admin: bool = False) -> Key:
        """The key a call carries in ``authorization: Bearer``; UNAUTHENTICATED without a known one,
        PERMISSION_DENIED when ``admin`` is needed and the key is a client's."""
        token = bearer(metadata)
        if token is None:
            raise Unauthenticated("an API key is required (authorization: Bearer <key>)", stage=stage)
        key = self.lookup(token)
        if key is None:
            raise Unauthenticated("the API key is not valid", stage=stage)
        if admin and key.role != "admin":
            raise PermissionDenied(f"tenant {key.tenant!r}: this key may not use the admin service", stage=stage)
        return key


def bearer(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    for name, value in metadata:
        if name == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


@dataclass
class _Share:
    """One tenant's bucket and open streams."""

    tokens: float
    stamp: float
    streams: int = 0


class TenantLimits:
    """Each tenant's request rate (a token bucket) and open streams at this edge process. An edge with N replicas
    gives a tenant N shares: divide the limits by the number of edge replicas to bound the whole mesh."""

    def __init__(self, cfg: TenantsConfig) -> None:
        self._cfg = cfg
        self._shares: OrderedDict[str, _Share] = OrderedDict()

    def _limits(self, key: Key | None) -> tuple[float, float, int]:
        rate = key.rate if key is not None and key.rate is not None else self._cfg.rate
        burst = key.burst if key is not None and key.burst is not None else self._cfg.burst
        streams = key.max_streams if key is not None and key.max_streams is not None else self._cfg.max_streams
        return rate, float(burst or max(1.0, rate)), streams

    def active(self, key: Key | None) -> bool:
        rate, _, streams = self._limits(key)
        return rate > 0 or streams > 0

    def admit(self, tenant: str, key: Key | None, stage: str) -> None:
        """Take one request of ``tenant``'s share, or raise RATE_LIMITED with when to retry."""
        rate, burst, max_streams = self._limits(key)
        now = time.monotonic()
        share = self._shares.get(tenant)
        if share is None:
            share = self._shares[tenant] = _Share(burst, now)
            if len(self._shares) > self._cfg.max_tracked:
                self._forget_one()
        else:
            self._shares.move_to_end(tenant)
        if rate > 0:
            share.tokens = min(burst, share.tokens + (now - share.stamp) * rate)
            share.stamp = now
            if share.tokens < 1.0 - 1e-9:  # float sums of elapsed time fall a hair short of whole tokens
                wait = (1.0 - share.tokens) / rate
                raise RateLimited(
                    f"tenant {tenant!r} is over its rate of {rate:g} requests/s", stage=stage, retry_after_s=wait
                )
        if max_streams > 0 and share.streams >= max_streams:
            raise RateLimited(
                f"tenant {tenant!r} has its {max_streams} streams open",
                stage=stage,
                retry_after_s=1.0 / rate if rate > 0 else 0.1,
            )
        if rate > 0:
            share.tokens -= 1.0
        share.streams += 1

    def release(self, tenant: str) -> None:
        share = self._shares.get(tenant)
        if share is not None and share.streams > 0:
            share.streams -= 1

    def _forget_one(self) -> None:
        """Forget the least recently seen tenant with no stream open (its bucket refills to full anyway)."""
        for tenant, share in self._shares.items():
            if share.streams == 0:
                del self._shares[tenant]
                return


class EdgeGate:
    """What the edge checks before admission: the API key (when there are keys) and the tenant's share."""

    def __init__(self, stage: str, keys: KeyRing | None, limits: TenantLimits) -> None:
        self.stage = stage
        self.keys = keys
        self.limits = limits

    def enter(self, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[str, bool]:
        """The caller's tenant ("" without keys), and whether a stream of its share is held (``leave`` gives it
        back). Raises UNAUTHENTICATED or RATE_LIMITED."""
        key = self.keys.authenticate(metadata, self.stage) if self.keys is not None else None
        tenant = key.tenant if key is not None else ""
        if not self.limits.active(key):
            return tenant, False
        self.limits.admit(tenant, key, self.stage)
        return tenant, True

    def leave(self, tenant: str) -> None:
        self.limits.release(tenant)
