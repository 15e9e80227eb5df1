"""The stage graph, defined once: the stages in data-flow order, who calls whom, and each stage's RPC.

Config sections, the launcher's start order, the stage registry, the tests and the README's stage table
all read it from here. The chain is linear: each stage calls the one before it (its callee) and the
client calls the last one, the edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from google.protobuf.message import Message

from orchestrator.v1 import stages_pb2, types_pb2


@dataclass(frozen=True)
class Stage:
    """One stage: its name (config section, ``service.name``, metric label) and its streaming RPC."""

    name: str
    service: str  # the service's name in stages.proto
    method: str  # its one server-streaming method
    does: str  # one line, for docs and help
    # What LLM trace viewers call the stage's span (OpenInference span kinds: RETRIEVER, CHAIN, LLM).
    span_kind: str = "CHAIN"

    @property
    def full_service(self) -> str:
        """``package.Service``, from the descriptor rather than a string literal."""
        return str(stages_pb2.DESCRIPTOR.services_by_name[self.service].full_name)

    @property
    def rpc(self) -> str:
        """``package.Service/Method``: the span name of the stage's RPC."""
        return f"{self.full_service}/{self.method}"

    @property
    def output(self) -> type[Message]:
        """The message type the stage streams."""
        method = stages_pb2.DESCRIPTOR.services_by_name[self.service].methods_by_name[self.method]
        cls: type[Message] = getattr(types_pb2, method.output_type.name)
        return cls


GRAPH: tuple[Stage, ...] = (
    Stage("rag", "RagService", "Retrieve", "BM25, dense or hybrid retrieval over an index", "RETRIEVER"),
    Stage("assemble", "AssembleService", "Assemble", "the prompt template within a size limit"),
    Stage("inference", "InferenceService", "Infer", "the model worker's tokens, coalesced", "LLM"),
    Stage("post", "PostService", "Process", "stop sequences and max_tokens"),
    Stage("stream", "StreamService", "Submit", "the edge: numbered chunks, usage and timings"),
)
STAGES: tuple[str, ...] = tuple(s.name for s in GRAPH)
EDGE: str = GRAPH[-1].name
# Which stage each stage calls: the one before it in the data flow.
CALLEE: dict[str, str] = {caller.name: callee.name for callee, caller in pairwise(GRAPH)}
_BY_NAME = {s.name: s for s in GRAPH}


def stage(name: str) -> Stage:
    """The stage called ``name``; KeyError names the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no stage {name!r}; the stages are {', '.join(STAGES)}") from None


def describe_graph() -> str:
    """A Markdown table of the stages in data-flow order (the README shows it)."""
    rows = ["| stage | RPC | streams | calls | what it does |", "|---|---|---|---|---|"]
    for s in GRAPH:
        callee = CALLEE.get(s.name, "")
        rows.append(f"| {s.name} | `{s.service}/{s.method}` | `{s.output.__name__}` | {callee or '-'} | {s.does} |")
    return "\n".join(rows)
