"""Load generator bookkeeping: blocks measured in turns joined into one run."""

from __future__ import annotations

import pytest

from bench.loadgen import RunResult, Sample, joined


def sample(started: float, total: float = 0.002) -> Sample:
    return Sample(started=started, ttfc_s=total / 2, total_s=total, tokens=1, outcome="ok")


def test_blocks_join_end_to_end_with_only_the_requests_inside_each_window() -> None:
    first = RunResult([sample(9.9), sample(10.0), sample(10.5), sample(10.999)], window_start=10.0, window_end=11.0)
    second = RunResult([sample(50.2), sample(50.3, total=0.5)], window_start=50.0, window_end=50.5)
    run = joined([first, second])
    assert run.window_s == pytest.approx(1.5)
    # Warm-up (9.9) and requests still running at a window's end (10.999, 50.3) are left out.
    assert [round(s.started, 3) for s in run.started_in_window()] == [0.0, 0.5, 1.2]
    assert len(run.completed_in_window()) == 3
