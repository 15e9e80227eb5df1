"""Every stage's /metrics scraped by a real Prometheus server; queries return what the test caused."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from orchestrator.launcher import Mesh
from orchestrator_client import OrchestratorRpcError
from tests.conftest import colocated, http_ok, mesh_client, poll, stage_status, start_on_free_port, stop_process

pytestmark = pytest.mark.mesh

PROMETHEUS = shutil.which("prometheus")


class Prometheus:
    def __init__(self, run_dir: Path, targets: list[str]) -> None:
        self.run_dir = run_dir
        config = run_dir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
            "scrape_configs:\n  - job_name: orchestrator\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.proc, port = start_on_free_port(
            lambda port: [
                PROMETHEUS or "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={run_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            lambda port: http_ok(f"http://127.0.0.1:{port}/-/ready"),
            run_dir / "prometheus.log",
        )
        self.url = f"http://127.0.0.1:{port}"

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            data = json.loads(reply.read())
        return [(r["metric"], float(r["value"][1])) for r in data["data"]["result"]]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return result[0][1] if len(result) == 1 else None

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    started: list[Prometheus] = []

    def _start(targets: list[str]) -> Prometheus:
        p = Prometheus(tmp_path, targets)
        started.append(p)
        return p

    yield _start
    for p in started:
        p.stop()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (the CI script installs it)")
async def test_prometheus_scrapes_queue_depth_sheds_and_latency(
    fresh_mesh: Callable[..., Mesh], prometheus: Callable[[list[str]], Prometheus], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    m = fresh_mesh(
        ORCH_INFERENCE_QUEUE_CAPACITY="2",
        ORCH_INFERENCE_CONCURRENCY="1",
        ORCH_INFERENCE_WORKER_ECHO_GATE_FILE=str(gate),
        # The test holds requests in the queue on purpose: no bound on how long they may wait there.
        ORCH_INFERENCE_MAX_QUEUE_WAIT_MS="600000",
    )
    targets = [proc.metrics_address for proc in m.stages.values()]
    assert all(targets)
    prom = prometheus(targets)
    poll(
        lambda: prom.value('count(up{job="orchestrator"} == 1)') == 5,
        timeout_s=30,
        interval_s=0.2,
        what="all five stages to be scraped",
    )

    async with mesh_client(m.entry) as client:

        async def one(i: int) -> str:
            try:
                await client.complete(f"metrics {i}", session=f"m{i}", max_tokens=3, timeout=60)
                return "ok"
            except OrchestratorRpcError as err:
                assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                return "shed"

        tasks = [asyncio.create_task(one(i)) for i in range(8)]
        await asyncio.to_thread(
            poll, lambda: stage_status(m.address("inference")).counters.shed == 5, what="5 sheds at inference"
        )
        # 1 generating, 2 waiting, 5 shed: Prometheus must see exactly that.
        await asyncio.to_thread(
            poll,
            lambda: prom.value('orchestrator_queue_depth{stage="inference"}') == 2,
            timeout_s=30,
            interval_s=0.2,
            what="queue depth 2",
        )
        assert prom.value('orchestrator_queue_capacity{stage="inference"}') == 2
        await asyncio.to_thread(
            poll,
            lambda: prom.value('orchestrator_shed_total{stage="inference",reason="queue_full"}') == 5,
            timeout_s=30,
            interval_s=0.2,
            what="5 sheds",
        )
        gate.touch()
        outcomes = await asyncio.gather(*tasks)
    assert sorted(outcomes) == ["ok"] * 3 + ["shed"] * 5

    def settled() -> bool:
        return (
            prom.value('orchestrator_stage_latency_seconds_count{stage="inference",outcome="ok"}') == 3
            and prom.value('orchestrator_requests_total{stage="inference",outcome="shed"}') == 5
            and prom.value('orchestrator_queue_depth{stage="inference"}') == 0
        )

    poll(settled, timeout_s=30, interval_s=0.2, what="latency histogram and counters after the release")
    # The shed happened at inference only; stages above saw it pass but did not shed themselves.
    assert prom.value('sum(orchestrator_shed_total{stage!="inference"})') in (None, 0.0)
    # Only the stage that shed counts "shed"; the stages a shed passed through count it as "shed_below".
    assert prom.value('orchestrator_requests_total{stage="stream",outcome="shed_below"}') == 5
    assert prom.value('orchestrator_requests_total{stage="stream",outcome="shed"}') == 0  # exists, at zero
    assert prom.value('orchestrator_tokens_total{stage="inference"}') == 9
    assert prom.value('orchestrator_time_to_first_token_seconds_count{stage="inference",model="echo"}') == 3
    if colocated(m, "post", "stream"):  # the edge calls post in memory: no link
        assert prom.value('orchestrator_link_opens_total{callee="post"}') in (None, 0.0)
        return
    # Each caller opened one stage link to its callee and sent its calls' frames on it.
    assert prom.value('orchestrator_link_opens_total{callee="post"}') == 1
    assert prom.value('orchestrator_link_losses_total{callee="post"}') in (None, 0.0)
    writes = prom.value('sum(orchestrator_link_writes_total{side="caller"})')
    frames = prom.value('sum(orchestrator_link_frames_total{side="caller"})')
    assert writes is not None and frames is not None and frames >= writes >= 4  # at least a call frame per hop
    bucket = prom.value('orchestrator_stage_latency_seconds_bucket{stage="inference",outcome="ok",le="+Inf"}')
    assert bucket == 3
