"""``make traces``: a local trace viewer (Arize Phoenix, from its own virtualenv), the demo's traces sent to it, and
each answer's trace URL printed; the viewer keeps running until Ctrl-C.

    python deploy/phoenix/traces.py [--port 6006] [--grpc-port 4317] [demo options...]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PHOENIX = ROOT / ".venv-phoenix" / "bin" / "phoenix"
# The default project's id in Phoenix's UI routes (its GraphQL global id, base64 of "Project:1").
DEFAULT_PROJECT = "UHJvamVjdDox"


def start_viewer(port: int, grpc_port: int, workdir: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {
        "PHOENIX_PORT": str(port),
        "PHOENIX_GRPC_PORT": str(grpc_port),
        "PHOENIX_HOST": "127.0.0.1",  # it binds every interface otherwise
        "PHOENIX_WORKING_DIR": str(workdir),
    }
    log = open(workdir / "phoenix.log", "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen([str(PHOENIX), "serve"], env=env, stdout=log, stderr=log)


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the trace viewer exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the trace viewer did not answer within {timeout_s:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=6006, help="the viewer's web UI and API (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=4317, help="its OTLP/gRPC port (default: %(default)s)")
    args, demo_args = parser.parse_known_args()
    if not PHOENIX.exists():
        print("the trace viewer is not installed: run `make phoenix-deps` (make traces does)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="orchestrator-traces-"))
    viewer = start_viewer(args.port, args.grpc_port, workdir)
    try:
        wait_ready(args.port, viewer)
        print(f"trace viewer on http://127.0.0.1:{args.port} (data in {workdir})", flush=True)
        env = os.environ | {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{args.grpc_port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        }
        url = f"http://127.0.0.1:{args.port}/projects/{DEFAULT_PROJECT}/traces/{{trace_id}}"
        done = subprocess.run(
            [str(Path(sys.executable).with_name("orchestrator")), "demo", "--trace-url", url, *demo_args],
            env=env,
            check=False,
        )
        if done.returncode != 0:
            return done.returncode
        print("the viewer keeps running: open the URLs above; Ctrl-C stops it", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        viewer.terminate()
        viewer.wait(10)


if __name__ == "__main__":
    sys.exit(main())
