"""A real nats-server (JetStream on, storage in a folder of the test's), on a free loopback port."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import start_on_free_port, stop_process

NATS_SERVER = Path(sys.executable).with_name("nats-server")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def nats_server(storage: Path) -> Iterator[str]:
    """The server's URL while the block runs; the process is stopped afterwards, however the block ends."""
    storage.mkdir(parents=True, exist_ok=True)
    proc, port = start_on_free_port(
        lambda port: [str(NATS_SERVER), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(storage)],
        _listening,
        storage / "nats-server.log",
    )
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        stop_process(proc)
