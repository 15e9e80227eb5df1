"""Session affinity: a stable session hash and rendezvous (highest-random-weight) replica choice."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def stable_hash(key: str) -> int:
    """A 64-bit hash that is the same in every process (unlike the salted built-in ``hash``)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


def shard_session(session: str, shards: int) -> int:
    """The shard in ``range(shards)`` that owns ``session``."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    return stable_hash(session) % shards


def rendezvous_order(session: str, replicas: Sequence[str]) -> list[str]:
    """Replicas in the order a session should try them: its owner first, then the fallbacks.

    Each (replica, session) pair gets a score and the highest wins, so adding or removing
    one of n replicas moves only the ~1/n of sessions that replica wins or owned.
    """
    if len(replicas) <= 1:
        return list(replicas)
    return sorted(replicas, key=lambda replica: stable_hash(f"{replica}\x00{session}"), reverse=True)
