"""Assemble stage logic: the prompt template (context + input) within a size limit."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from orchestrator.core.config import DEFAULT_PROMPT_TEMPLATE, NO_CONTEXT
from orchestrator.core.errors import InvalidRequest, OtherError
from orchestrator.core.scope import Scope
from orchestrator.v1 import types_pb2


def render_prompt(
    user_input: str,
    documents: Sequence[types_pb2.Document],
    max_chars: int,
    template: str = DEFAULT_PROMPT_TEMPLATE,
) -> tuple[str, list[str]]:
    """The prompt and the ids of the documents in it; the least relevant documents go first to fit."""
    docs = sorted(documents, key=lambda d: d.score, reverse=True)
    while True:
        context = "\n".join(f"[{d.id}] {d.title}: {d.text}" for d in docs) or NO_CONTEXT
        prompt = template.format(context=context, input=user_input)
        if len(prompt) <= max_chars:
            return prompt, [d.id for d in docs]
        if not docs:
            raise InvalidRequest(
                f"input does not fit the prompt limit of {max_chars} characters (prompt would be {len(prompt)})"
            )
        docs.pop()


async def assemble(
    request: types_pb2.PromptRequest,
    upstream: AsyncIterator[types_pb2.RagOutput],
    max_chars: int,
    template: str,
    scope: Scope,
) -> AsyncIterator[types_pb2.AssembleOutput]:
    """Collect the retrieved documents and yield one AssembleOutput."""
    documents: list[types_pb2.Document] = []
    timings: list[types_pb2.StageTiming] = []
    received = False
    async for rag in upstream:
        received = True
        documents.extend(rag.documents)
        timings.extend(rag.timings)
    if not received:
        raise OtherError("rag stage returned no output", stage=scope.stage)
    prompt, ids = render_prompt(request.input, documents, max_chars, template)
    out = types_pb2.AssembleOutput(prompt=prompt, document_ids=ids, timings=timings)
    out.timings.append(scope.timing())
    yield out
