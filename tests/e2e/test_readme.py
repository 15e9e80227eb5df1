"""README's examples run: every Python and shell block, against a mesh on free ports, unless it says why not."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from orchestrator.core.config import load_config
from orchestrator.core.graph import STAGES
from orchestrator.launcher import Mesh
from tests.conftest import BIN, ROOT, clean_env

pytestmark = pytest.mark.mesh

_BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^>]+?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    not_run: str


def blocks() -> list[Block]:
    text = (ROOT / "README.md").read_text()
    return [
        Block(text.count("\n", 0, m.start("lang")) + 1, m["lang"], m["code"], m["why"] or "")
        for m in _BLOCK.finditer(text)
        if m["lang"] in ("python", "sh")
    ]


RUN = [b for b in blocks() if not b.not_run]


def test_every_example_runs_or_says_why_not() -> None:
    assert len(RUN) >= 4, [b.line for b in RUN]  # the parser found the examples
    assert all(len(b.not_run) > 10 for b in blocks() if b.not_run)


def against(mesh: Mesh, code: str) -> str:
    """``code`` pointed at ``mesh``: the default addresses become the mesh's, ``.venv/bin`` this environment's."""
    cfg = load_config(ROOT / "pipeline.toml", env={})
    for stage in STAGES:
        code = code.replace(f"127.0.0.1:{cfg.stage(stage).port}", mesh.address(stage))
    return code.replace(".venv/bin/", f"{BIN}/")


@pytest.mark.parametrize("block", RUN, ids=[f"README.md:{b.line}" for b in RUN])
def test_readme_example(block: Block, mesh: Mesh) -> None:
    env = clean_env(ORCH_TARGET=mesh.entry, PATH=f"{BIN}:{clean_env().get('PATH', '')}")
    code = against(mesh, block.code)
    argv = [sys.executable, "-c", code] if block.lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, env=env, cwd=ROOT)
    assert done.returncode == 0, f"README.md:{block.line}\n{code}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert done.stdout.strip(), "the example printed nothing"
