"""Dead letters in NATS JetStream: one store that every edge replica writes to, on any host.

A stream keeps one message per letter (subject ``orch.dlq.<id>``, at most one message per subject, so recording a
replay replaces the letter), bounded by count (the oldest go first) and age. The edge publishes off the hot path, as
with SQLite; a server that is down fails the write, which is counted and logged.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any

import nats
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from orchestrator.runtime.deadletters import DeadLetter, Filter

SUBJECT = "orch.dlq"


class NatsStore:
    def __init__(self, url: str, stream: str, max_letters: int, max_age_s: float) -> None:
        self.url = url
        self.stream = stream
        self.max_letters = max_letters
        self.max_age_s = max_age_s
        self.dropped = 0
        self._nc: Any = None
        self._js: Any = None

    async def _connect(self) -> Any:
        if self._js is None:
            self._nc = await nats.connect(self.url, connect_timeout=2, max_reconnect_attempts=1, allow_reconnect=False)
            self._js = self._nc.jetstream()
            config = StreamConfig(
                name=self.stream,
                subjects=[f"{SUBJECT}.>"],
                max_msgs=self.max_letters,
                max_msgs_per_subject=1,
                max_age=self.max_age_s,
                discard=DiscardPolicy.OLD,
                storage=StorageType.FILE,
            )
            try:
                await self._js.add_stream(config)
            except Exception:  # it exists (another edge made it): bring its limits to ours
                await self._js.update_stream(config)
        return self._js

    async def _count(self, js: Any) -> int:
        info = await js.stream_info(self.stream)
        return int(info.state.messages)

    async def put(self, letters: Sequence[DeadLetter]) -> None:
        js = await self._connect()
        before = await self._count(js)
        for letter in letters:
            await js.publish(f"{SUBJECT}.{letter.id}", json.dumps(letter.to_json()).encode(), stream=self.stream)
        self.dropped += max(0, before + len(letters) - await self._count(js))

    async def _all(self) -> list[DeadLetter]:
        js = await self._connect()
        info = await js.stream_info(self.stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(Exception):  # deleted or replaced: not there any more
                msg = await js.get_msg(self.stream, seq)
                out.append(DeadLetter.from_json(json.loads(msg.data)))
        return sorted(out, key=lambda x: x.at)

    async def list(self, where: Filter) -> list[DeadLetter]:
        return [x for x in await self._all() if where.matches(x)]

    async def record_replay(self, letter_id: str, replay: dict[str, Any]) -> None:
        js = await self._connect()
        msg = await js.get_last_msg(self.stream, f"{SUBJECT}.{letter_id}")
        letter = DeadLetter.from_json(json.loads(msg.data))
        letter.replays.append(replay)
        await js.publish(f"{SUBJECT}.{letter_id}", json.dumps(letter.to_json()).encode(), stream=self.stream)

    async def purge(self, where: Filter) -> int:
        js = await self._connect()
        letters = await self.list(where)
        for letter in letters:
            await js.purge_stream(self.stream, subject=f"{SUBJECT}.{letter.id}")
        return len(letters)

    async def size(self) -> int:
        return await self._count(await self._connect())

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        self._nc = self._js = None
