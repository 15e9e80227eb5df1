"""The benchmark tool runs end to end and writes its results (speed itself is never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, clean_env

pytestmark = pytest.mark.mesh


def test_bench_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = clean_env()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--scenarios",
            "latency,cancel",
            "--scale",
            "0.25",
            "--out",
            str(out),
            "--publish",
            str(tmp_path / "published"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert {"latency_ttfc_n1", "idle_rss", "cancel_p99"} <= set(results["targets"])
    runs = {(r["target"], r["tokens"]) for r in results["runs"]}
    floors = ("single-hop floor", "bare chain floor", "link chain floor")
    assert runs == {(t, n) for t in ("mesh", *floors) for n in (1, 128)}
    assert set(results["extra"]["shape"]["ttfc_n1"]) >= {"chain_over_hop", "link_chain_over_hop", "mesh_over_chain"}
    for run in results["runs"]:
        assert run["ok"] > 0 and run["errors"] == 0
        assert run["ttfc_ms"]["50"] is not None
    assert results["extra"]["cancel_stop_ms"]["trials"] >= 5
    assert (out / "latency_cdf.png").stat().st_size > 1000
    published = (tmp_path / "published" / "results.md").read_text()
    assert "| time to first chunk p50" in published
    assert "## What the call shape costs" in published
    assert "[####################]" in done.stderr  # the progress display


def test_unknown_scenario_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--scenarios", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert "unknown scenario(s) nope" in done.stderr
