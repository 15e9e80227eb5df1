"""Stage links: many calls to the next stage over one long-lived bidirectional stream.

A gRPC call costs far more CPU than a message on a stream that is already open (the bench's
bare chain floor shows the call shape alone missing the latency and throughput targets). A
link keeps one ``LinkService/Open`` stream per caller process and callee replica and carries
every call to that replica on it as frames (see ``protos/orchestrator/v1/link.proto``).

A link call behaves like the callee's own RPC, on both sides:

- the callee runs the stage's usual handler with a :class:`LinkContext` that answers what the
  handler and the runtime ask of a ``grpc.aio.ServicerContext`` (metadata, remaining deadline,
  the status to end with), so admission, spans, metrics and error mapping are the same code;
- the caller gets a :class:`LinkCall` with the ``read()``/``cancel()`` of a ``grpc.aio`` call,
  which fails with a ``grpc.aio.AioRpcError`` carrying the callee's status and details, so
  replica fallback and error pass-through are the same code too.

Deadlines travel with the call and are enforced by the callee; a cancel frame stops the call at
once; each call has its own credit-based flow control, so a slow reader holds back its own call
and never the link. Frames that queue while a write is in flight go out together as one message.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import grpc

from orchestrator.core.calls import Handler
from orchestrator.core.errors import InvalidRequest, to_status
from orchestrator.core.telemetry import Telemetry
from orchestrator.runtime.server import Service
from orchestrator.v1 import link_pb2, types_pb2
from orchestrator.v1.status import STATUS_DETAILS_KEY

log = logging.getLogger(__name__)

T = TypeVar("T")

LINK_SERVICE = link_pb2.DESCRIPTOR.services_by_name["LinkService"].full_name
# Messages a callee may send on one call before the caller grants more; the caller grants
# half a window at a time as it reads, so a reader that keeps up never makes the callee wait.
WINDOW = 64
# Frames per LinkFrames message: bounds one write while a backlog drains.
MAX_BATCH = 512
# Loop rounds a write waits for more frames while other calls are in flight (none for a lone call).
# Measured at 64 concurrent one-token requests: 1 round averages 2.3 frames per write, 6 rounds 5-6
# frames and 1.5x the requests/s for 0.6x the CPU per request; more rounds gain nothing.
GATHER_ROUNDS = 6
# gRPC's own limit on one message, which both ends of a link must respect (server.max_message_bytes).
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# What a frame adds to its payload on the wire (call id, field tags, lengths), generously.
FRAME_OVERHEAD = 32
# Room kept in every LinkFrames message below the limit.
_MESSAGE_MARGIN = 1024


class _Outbox:
    """Frames waiting to be written on one side of a link; whatever queued during a write goes out as
    the next message, split so that no message is larger than the peer accepts. ``calls`` are that
    side's calls in flight: while there is more than one, a write waits a few loop rounds for more."""

    def __init__(self, calls: Mapping[int, object], side: str, telemetry: Telemetry, max_message_bytes: int) -> None:
        self._calls = calls
        self._side = side
        self._telemetry = telemetry
        self._frames: collections.deque[tuple[link_pb2.LinkFrame, int]] = collections.deque()
        self._ready = asyncio.Event()
        self.closed = False
        # The largest frame that can travel: one frame alone in a message.
        self.budget = max_message_bytes - _MESSAGE_MARGIN

    def put(self, frame: link_pb2.LinkFrame, size: int = FRAME_OVERHEAD) -> None:
        """Queue ``frame``, whose encoded size is about ``size`` bytes (at most ``budget``)."""
        if not self.closed:
            self._frames.append((frame, size))
            self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def batches(self) -> AsyncIterator[link_pb2.LinkFrames]:
        while True:
            await self._ready.wait()
            if len(self._calls) > 1:
                # Other calls are in flight: let the loop run a few rounds first, so the frames their
                # ready work produces join this write. Fewer, larger writes are what a link saves;
                # a lone call never waits.
                for _ in range(GATHER_ROUNDS):
                    await asyncio.sleep(0)
            self._ready.clear()
            while self._frames:
                batch = self._take()
                self._telemetry.record_link_write(self._side, len(batch))
                yield link_pb2.LinkFrames(frames=batch)
            if self.closed:
                return

    def _take(self) -> list[link_pb2.LinkFrame]:
        """The next message's frames: as many as fit under the peer's limit (always at least one)."""
        frames = self._frames
        frame, size = frames.popleft()
        batch = [frame]
        while frames and len(batch) < MAX_BATCH and size + frames[0][1] <= self.budget:
            frame, n = frames.popleft()
            batch.append(frame)
            size += n
        return batch


# -- callee side ---------------------------------------------------------------------------------


class LinkContext:
    """What a stage handler may ask of its context, for a call that arrived over a link."""

    def __init__(
        self,
        metadata: tuple[tuple[str, str], ...],
        timeout_s: float | None,
        auth: Mapping[str, Sequence[bytes]] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._metadata = metadata
        self._auth = auth or {}
        # Set for an in-process call: its request was validated by the stage that made it (the same object).
        self.validated = False
        self._deadline = None if timeout_s is None else self._loop.time() + timeout_s
        self.code = grpc.StatusCode.OK
        self.details = ""
        self.trailing_metadata: Sequence[tuple[str, str | bytes]] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        """The link's: every call on a link comes from the peer that opened it."""
        return self._auth

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - self._loop.time())

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self.trailing_metadata = trailing_metadata

    def status(self) -> link_pb2.LinkStatus:
        """The call's end, as the status frame carries it."""
        status = link_pb2.LinkStatus(code=self.code.value[0], message=self.details)
        for key, value in self.trailing_metadata:
            if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
                status.details = value
        return status


class _ServedCall:
    """One call a callee is running for a link."""

    def __init__(self, call_id: int) -> None:
        self.call_id = call_id
        self.credit = WINDOW
        self.credit_granted = asyncio.Event()
        self.deadline_passed = False
        self.task: asyncio.Task[None] | None = None


class _TooLarge(Exception):
    """A message bigger than any link message can be: the call ends, the link carries on."""


def _status(code: grpc.StatusCode, message: str) -> link_pb2.LinkStatus:
    return link_pb2.LinkStatus(code=code.value[0], message=message)


def _decode_frames(data: bytes) -> link_pb2.LinkFrames | None:
    """The link's request deserializer: None for bytes that are not LinkFrames (gRPC would answer UNKNOWN)."""
    try:
        return link_pb2.LinkFrames.FromString(data)
    except Exception:  # DecodeError, and whatever else a hostile body can make a parser raise
        return None


class LinkServicer:
    """Serves ``LinkService/Open`` by running ``handler`` (the stage's RPC method) for each call."""

    def __init__(
        self,
        handler: Handler,
        telemetry: Telemetry | None = None,
        *,
        stage: str = "",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._handler = handler
        self._telemetry = telemetry or Telemetry()
        self._stage = stage
        self._max_message_bytes = max_message_bytes

    async def Open(
        self, request_iterator: AsyncIterator[link_pb2.LinkFrames | None], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[link_pb2.LinkFrames]:
        calls: dict[int, _ServedCall] = {}
        outbox = _Outbox(calls, "callee", self._telemetry, self._max_message_bytes)
        auth = context.auth_context()
        corrupt = False

        async def read() -> None:
            nonlocal corrupt
            try:
                async for frames in request_iterator:
                    if frames is None:
                        corrupt = True
                        return
                    for frame in frames.frames:
                        self._on_frame(frame, calls, outbox, auth)
            finally:
                # The caller closed its side, went away or sent garbage: nothing more will arrive for any
                # call, so the batches end and the calls still running are cancelled below.
                outbox.close()

        reader = asyncio.create_task(read())
        try:
            async for batch in outbox.batches():
                yield batch
        finally:
            reader.cancel()
            tasks = [c.task for c in calls.values() if c.task is not None]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
        if corrupt:
            self._refuse(context)

    def _refuse(self, context: grpc.aio.ServicerContext) -> None:
        """End a link whose frames did not decode: INVALID_ARGUMENT naming the stage, counted and logged."""
        err = InvalidRequest("stage link frames did not decode", stage=self._stage)
        log.warning("stage=%s link refused: its frames did not decode", self._stage or "-")
        if self._stage:
            self._telemetry.record_stage_latency(self._stage, 0.0, "invalid")
        to_status(err).set_on(context)

    def _on_frame(
        self,
        frame: link_pb2.LinkFrame,
        calls: dict[int, _ServedCall],
        outbox: _Outbox,
        auth: Mapping[str, Sequence[bytes]],
    ) -> None:
        kind = frame.WhichOneof("kind")
        call = calls.get(frame.call_id)
        if kind == "call":
            if call is not None:
                log.warning("link: call id %d reused while in flight; ignored", frame.call_id)
                return
            call = calls[frame.call_id] = _ServedCall(frame.call_id)
            call.task = asyncio.create_task(self._run(call, frame.call, calls, outbox, auth))
        elif call is None:
            return  # the call already ended; its cancel or credit crossed the status
        elif kind == "cancel":
            if call.task is not None:
                call.task.cancel()
        elif kind == "credit":
            call.credit += frame.credit.messages
            call.credit_granted.set()

    async def _run(
        self,
        call: _ServedCall,
        start: link_pb2.LinkCall,
        calls: dict[int, _ServedCall],
        outbox: _Outbox,
        auth: Mapping[str, Sequence[bytes]],
    ) -> None:
        timeout_s = start.timeout_us / 1e6 if start.timeout_us else None
        context = LinkContext(tuple(start.metadata.items()), timeout_s, auth)
        timer = None
        if timeout_s is not None:
            timer = asyncio.get_running_loop().call_later(timeout_s, self._deadline, call)
        try:
            await self._relay(call, self._handler(start.request, context), outbox)
            status = context.status()
        except asyncio.CancelledError:
            if not call.deadline_passed:
                return  # cancelled by the caller or the link closing: nobody is waiting for a status
            status = _status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        except _TooLarge as exc:
            # What gRPC answers for a message over its limit, for this call alone.
            log.warning("stage=%s link call %d ended: %s", self._stage or "-", call.call_id, exc)
            status = _status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Exception:
            log.exception("link: call %d failed", call.call_id)
            status = _status(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            if timer is not None:
                timer.cancel()
            calls.pop(call.call_id, None)
        outbox.put(link_pb2.LinkFrame(call_id=call.call_id, status=status), len(status.details) + 256)

    @staticmethod
    async def _relay(call: _ServedCall, messages: AsyncIterator[Any], outbox: _Outbox) -> None:
        """The handler's messages onto the link, as the caller's credit allows."""
        try:
            async for message in messages:
                while call.credit <= 0:
                    call.credit_granted.clear()
                    await call.credit_granted.wait()
                call.credit -= 1
                payload = message.SerializeToString()
                if len(payload) + FRAME_OVERHEAD > outbox.budget:
                    raise _TooLarge(f"a message of {len(payload)} bytes is over the link's limit of {outbox.budget}")
                outbox.put(link_pb2.LinkFrame(call_id=call.call_id, message=payload), len(payload) + FRAME_OVERHEAD)
        finally:
            await messages.aclose()  # type: ignore[attr-defined]

    @staticmethod
    def _deadline(call: _ServedCall) -> None:
        call.deadline_passed = True
        if call.task is not None:
            call.task.cancel()


def link_service(
    handler: Handler,
    telemetry: Telemetry | None = None,
    *,
    stage: str = "",
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Service:
    """``LinkService`` running ``handler`` (the stage's RPC method) for calls that arrive over links. An
    internal service: not listed in reflection or health. Its frames decode without raising, so bytes that
    are not frames end the link with INVALID_ARGUMENT rather than UNKNOWN."""
    servicer = LinkServicer(handler, telemetry, stage=stage, max_message_bytes=max_message_bytes)
    method = grpc.stream_stream_rpc_method_handler(
        servicer.Open, request_deserializer=_decode_frames, response_serializer=link_pb2.LinkFrames.SerializeToString
    )
    rpcs = grpc.method_handlers_generic_handler(LINK_SERVICE, {"Open": method})
    return Service(LINK_SERVICE, lambda server: server.add_generic_rpc_handlers((rpcs,)), public=False)


# -- caller side ---------------------------------------------------------------------------------


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _rpc_error(code: grpc.StatusCode, message: str, details: bytes = b"") -> grpc.aio.AioRpcError:
    trailers = grpc.aio.Metadata((STATUS_DETAILS_KEY, details)) if details else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details=message)


class LinkCall(Generic[T]):
    """The caller's end of one link call, read like a ``grpc.aio`` server-streaming call."""

    def __init__(
        self,
        link: _Link[T],
        call_id: int,
        request: types_pb2.PromptRequest,
        deadline: float | None,
        metadata: Sequence[tuple[str, str]],
    ) -> None:
        self._link = link
        self.call_id = call_id
        self._messages: collections.deque[bytes] = collections.deque()
        self._arrived = asyncio.Event()
        self._status: tuple[grpc.StatusCode, str, bytes] | None = None
        self._ended = False
        self._read_since_credit = 0
        # Nothing has arrived yet: if the link is lost now, the call is made again elsewhere.
        self.received = False
        self.moved = False
        # Kept until the call ends, to make it again: on a new link, or as a plain call if the callee has no
        # LinkService.
        self._request = request
        self._deadline = deadline
        self._metadata = metadata
        self._plain: Any = None

    def timeout(self) -> float | None:
        """What is left of the call's deadline."""
        return None if self._deadline is None else max(0.0, self._deadline - asyncio.get_running_loop().time())

    def _reissue(self) -> None:
        """The callee does not serve links (an older version, mid-upgrade): make this call directly."""
        self._plain = self._link.fallback(self._request, timeout=self.timeout(), metadata=tuple(self._metadata) or None)
        self._arrived.set()

    def _push(self, message: bytes) -> None:
        self.received = True
        self._messages.append(message)
        self._arrived.set()

    def _end(self, status: tuple[grpc.StatusCode, str, bytes] | None) -> None:
        """The call ended: OK (None) or with ``(code, message, details)``."""
        self._ended = True
        self._status = status
        self._arrived.set()

    async def read(self) -> Any:
        """The next message, ``grpc.aio.EOF`` after an OK status, or raises the status as an AioRpcError."""
        while not self._messages:
            if self._plain is not None:
                return await self._plain.read()
            if self._ended:
                if self._status is not None:
                    # A new error each time: one kept here would hold, in its traceback, this frame
                    # and so this call, a reference cycle per failed call.
                    raise _rpc_error(*self._status)
                return grpc.aio.EOF
            self._arrived.clear()
            await self._arrived.wait()
        message = self._link.decode(self._messages.popleft())
        if not self._ended:
            self._read_since_credit += 1
            if self._read_since_credit >= WINDOW // 2:
                self._link.send(
                    link_pb2.LinkFrame(
                        call_id=self.call_id, credit=link_pb2.LinkCredit(messages=self._read_since_credit)
                    )
                )
                self._read_since_credit = 0
        return message

    def cancel(self) -> bool:
        """Stop the call at the callee; False if it had already ended."""
        if self._plain is not None:
            return bool(self._plain.cancel())
        if self._ended:
            return False
        self._end((grpc.StatusCode.CANCELLED, "Locally cancelled by application!", b""))
        self._link.forget(self.call_id)
        self._link.send(link_pb2.LinkFrame(call_id=self.call_id, cancel=link_pb2.LinkCancel()))
        return True


class _Link(Generic[T]):
    """One open ``LinkService/Open`` stream and the calls in flight on it."""

    def __init__(
        self,
        open_stream: Callable[[], Any],
        callee: str,
        decode: Callable[[bytes], T],
        fallback: Callable[..., Any],
        telemetry: Telemetry,
        max_message_bytes: int,
        on_lost: Callable[[list[LinkCall[T]]], None],
    ) -> None:
        self.callee = callee
        self._telemetry = telemetry
        telemetry.record_link_open(callee)
        self.decode = decode
        self.fallback = fallback
        self.closed = False
        self.unsupported = False
        self._on_lost = on_lost
        self._stream = open_stream()
        self._calls: dict[int, LinkCall[T]] = {}
        self._next_id = 0
        self._outbox = _Outbox(self._calls, "caller", telemetry, max_message_bytes)
        self._tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]

    def start(
        self, request: types_pb2.PromptRequest, timeout: float | None, metadata: Sequence[tuple[str, str]]
    ) -> LinkCall[T]:
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        call = LinkCall(self, 0, request, deadline, metadata)
        self.adopt(call)
        return call

    def adopt(self, call: LinkCall[T]) -> None:
        """Send ``call`` on this link: a new call, or one whose link was lost before it received anything."""
        self._next_id += 1
        call._link, call.call_id = self, self._next_id
        frame = link_pb2.LinkFrame(call_id=call.call_id)
        frame.call.request.CopyFrom(call._request)  # one copy; building a LinkCall first would copy twice
        frame.call.metadata.update(call._metadata)
        timeout = call.timeout()
        if timeout is not None:
            frame.call.timeout_us = max(1, round(timeout * 1e6))
        size = frame.ByteSize() + FRAME_OVERHEAD
        if size > self._outbox.budget:
            # Larger than the callee accepts (the edge's limits keep requests far below this): this call
            # fails alone instead of breaking the link for everyone on it.
            message = f"a request of {size} bytes is over the {self.callee} stage link's limit of {self._outbox.budget}"
            call._end((grpc.StatusCode.RESOURCE_EXHAUSTED, message, b""))
            return
        self._calls[call.call_id] = call
        self._outbox.put(frame, size)

    def send(self, frame: link_pb2.LinkFrame) -> None:
        self._outbox.put(frame)

    def forget(self, call_id: int) -> None:
        self._calls.pop(call_id, None)

    async def _write(self) -> None:
        try:
            async for batch in self._outbox.batches():
                await self._stream.write(batch)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            self._fail(f"writing: {type(exc).__name__}")

    async def _read(self) -> None:
        reason = "the callee closed the link"
        try:
            while (frames := await self._stream.read()) is not grpc.aio.EOF:
                for frame in frames.frames:
                    self._on_frame(frame)
        except grpc.aio.AioRpcError as err:
            reason = f"{err.code().name}: {err.details()}"
            self.unsupported = err.code() == grpc.StatusCode.UNIMPLEMENTED
        except asyncio.CancelledError:
            reason = "the link was closed"
            raise
        finally:
            self._fail(reason)

    def _on_frame(self, frame: link_pb2.LinkFrame) -> None:
        call = self._calls.get(frame.call_id)
        if call is None:
            return  # cancelled here already
        if frame.HasField("message"):
            call._push(frame.message)
        elif frame.HasField("status"):
            del self._calls[frame.call_id]
            s = frame.status
            code = _CODES.get(s.code, grpc.StatusCode.UNKNOWN)
            call._end((code, s.message, s.details) if s.code else None)

    def _fail(self, reason: str, *, move: bool = True) -> None:
        """The stream is gone, and the link is not used again. Calls that received nothing are made again (on a
        new link, once; they are safe to repeat: the callee cancels what it ran for a lost link); calls under
        way end UNAVAILABLE naming the callee."""
        if self.closed:
            return
        self.closed = True
        calls = list(self._calls.values())
        self._calls.clear()  # in place: the outbox counts the same dict
        if self.unsupported:
            log.warning("the %s stage does not serve stage links; calling its RPC directly", self.callee)
            for call in calls:
                call._reissue()
        else:
            moved: list[LinkCall[T]] = []
            ended: list[LinkCall[T]] = []
            for call in calls:
                (moved if move and not call.received and not call.moved else ended).append(call)
            if calls:
                self._telemetry.record_link_loss(self.callee)
                log.warning(
                    "link to the %s stage lost with %d calls in flight, %d of them not started and made again (%s)",
                    self.callee,
                    len(calls),
                    len(moved),
                    reason,
                )
            for call in ended:
                call._end((grpc.StatusCode.UNAVAILABLE, f"link to the {self.callee} stage lost", b""))
            if moved:
                self._on_lost(moved)
        self._outbox.close()
        self._stream.cancel()

    async def close(self) -> None:
        self._fail("closing", move=False)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class LinkClient(Generic[T]):
    """Calls to one callee replica over a link, opened on first use and again after it is lost.

    A callee that answers ``UNIMPLEMENTED`` (a version without links, e.g. during a rolling
    upgrade) is called with ``fallback``, its plain RPC, from then on; calls already on the
    failed link are made again that way.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        callee: str,
        decode: Callable[[bytes], T],
        fallback: Callable[..., Any],
        telemetry: Telemetry | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._open = channel.stream_stream(
            f"/{LINK_SERVICE}/Open",
            request_serializer=link_pb2.LinkFrames.SerializeToString,
            response_deserializer=link_pb2.LinkFrames.FromString,
        )
        self._telemetry = telemetry or Telemetry()
        self._callee = callee
        self._decode = decode
        self._fallback = fallback
        self._max_message_bytes = max_message_bytes
        self._link: _Link[T] | None = None
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Calls started on the current link that have not ended."""
        return 0 if self._link is None else len(self._link._calls)

    @property
    def direct(self) -> bool:
        """True once the callee has refused links: its RPC is called instead, for good."""
        return self._link is not None and self._link.unsupported

    def _current(self) -> _Link[T]:
        if self._link is None or self._link.closed:
            self._link = _Link(
                self._open,
                self._callee,
                self._decode,
                self._fallback,
                self._telemetry,
                self._max_message_bytes,
                self._moved,
            )
        return self._link

    def _moved(self, calls: list[LinkCall[T]]) -> None:
        """Calls a lost link had not started: onto a new link, once (if that one is lost too, they end)."""
        if self._closed:
            for call in calls:
                call._end((grpc.StatusCode.UNAVAILABLE, f"link to the {self._callee} stage closed", b""))
            return
        link = self._current()
        for call in calls:
            call.moved = True
            link.adopt(call)

    def __call__(
        self,
        request: types_pb2.PromptRequest,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> LinkCall[T] | Any:
        if self.direct:
            return self._fallback(request, timeout=timeout, metadata=metadata)
        return self._current().start(request, timeout, metadata or ())

    async def close(self) -> None:
        self._closed = True
        if self._link is not None:
            await self._link.close()
