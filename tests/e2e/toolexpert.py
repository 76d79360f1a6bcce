"""A domain expert that requests tool calls (``HandleInteractive``), for tests.

An in-process ``grpc.aio`` server of HandlerService on a free loopback port,
in the test's own event loop, so a test waits for what the expert saw with
asyncio events instead of polling a file::

    async with ToolExpert("calc") as expert:
        remote = RemoteHandler("calc", expert.address, timeout_s=10)
        ...
        seen = await expert.call("runs/r1")      # the call the expert got for that run
        result = await seen.result("add-1")      # the tool result it got for a call id

What it does is decided by the user message's text (its first word):

- ``add A B``: one tool call ``add-1`` of ``add`` with ``{"a": A, "b": B}``;
- ``both A B C D``: two calls sent together, ``add-1`` (A, B) and ``add-2``
  (C, D), before it reads any result;
- ``many N``: N calls of ``add`` sent together (``add-1`` ... ``add-N``, 1-64);
- ``wait``: one call ``wait-1`` of ``wait`` (``{}``), then it waits for the
  result (a test keeps the tool runner blocked to have a call in flight);
- ``call NAME {json}``: one call ``NAME-1`` of ``NAME`` with those arguments;
- ``drop``: one call ``wait-1`` of ``wait``, then it ends its stream without
  a result;
- ``flaky``: the run's first call fails ``UNAVAILABLE`` before it answers
  anything (gRPC's "not processed", which the dispatcher retries once); a
  later one answers as with no tool calls;
- anything else: no tool calls.

A call names its tool by the ``HandleRequest.tools`` definition whose
``function_name`` is the tool's name (integration and tool from its
``tool`` resource name), else ``integration`` of the constructor and the
name. Once every result is in (in any order, each recorded as it arrives),
it answers with one delta and a result whose text is one line per call, in
call order: ``<tool> <OUTCOME>: <result text>`` (``add SUCCEEDED: 5``), or
``heard: <text>`` without calls. A request whose last ``steps`` entry has
fewer results than calls (a resumed run) first waits for the missing
results, and they are in the answer too.

With ``interactive=False`` its capabilities say so, and on ``Handle`` it
yields its tool calls as reports (frames of what it did) and answers
``reported N tool calls``; both RPCs are served either way, and each call
records which one it came on (``ExpertCall.method``).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from google.protobuf import struct_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2
from switchboard.api.handler.v1 import handler_pb2, handler_pb2_grpc
from tests.conftest import CALL_DEADLINE_S

MAX_CALLS: Final = 64

Request = handler_pb2.HandleInteractiveRequest
Response = handler_pb2.HandleInteractiveResponse
Frame = handler_pb2.HandleResponse


@dataclass
class ExpertCall:
    """One call the expert got, and what happened on it."""

    #: ``"Handle"`` or ``"HandleInteractive"``.
    method: str
    #: The HandleRequest (the ``start`` frame of HandleInteractive).
    request: handler_pb2.HandleRequest
    #: The call's metadata (lower-case keys).
    metadata: dict[str, str]
    #: Seconds to the call's deadline when it started (None without one).
    time_remaining: float | None
    #: The tool calls it sent, in order.
    sent: list[handler_pb2.ToolCall] = field(default_factory=list)
    #: The tool results it got, in arrival order.
    results: list[handler_pb2.ToolResult] = field(default_factory=list)
    #: Set when its call was cancelled (by the client, or its deadline).
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when it sent its result.
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: defaultdict[str, asyncio.Event] = field(
        default_factory=lambda: defaultdict(asyncio.Event)
    )

    async def result(
        self,
        call_id: str,
        timeout: float = CALL_DEADLINE_S,  # noqa: ASYNC109
    ) -> handler_pb2.ToolResult:
        """The result it got for ``call_id``, once it arrives."""
        async with asyncio.timeout(timeout):
            await self._arrived[call_id].wait()
        return next(result for result in self.results if result.id == call_id)

    async def was_cancelled(self, timeout: float = CALL_DEADLINE_S) -> None:  # noqa: ASYNC109
        """Return once the expert saw its call cancelled (TimeoutError if it did not)."""
        async with asyncio.timeout(timeout):
            await self.cancelled.wait()

    def _got(self, result: handler_pb2.ToolResult) -> None:
        self.results.append(result)
        self._arrived[result.id].set()


def _text_of(message: context_pb2.Message) -> str:
    return "\n\n".join(part.text for part in message.parts if part.WhichOneof("part") == "text")


def _arguments(values: dict[str, Any]) -> struct_pb2.Struct:
    arguments = struct_pb2.Struct()
    arguments.update(values)
    return arguments


class ToolExpert(handler_pb2_grpc.HandlerServiceServicer):
    """The expert and its server: ``start()``/``stop()`` or ``async with``.

    ``handler_id`` is the id its capabilities give; ``integration`` names the
    integration of a tool the request does not define. ``cost_micros``: what each
    answer reports it spent (``HandleResult.usage.cost_micros``), never more than
    the ``cost_micros`` of the budget it was handed (``x-switchboard-budget``), as an
    expert that honours it does.
    """

    def __init__(
        self,
        handler_id: str = "calc",
        *,
        interactive: bool = True,
        integration: str = "workspaces/test/integrations/calc",
        cost_micros: int = 0,
    ) -> None:
        self.cost_micros = cost_micros
        self.capabilities = handler_pb2.HandlerCapabilities(
            id=handler_id,
            display_name="Calculator expert",
            description="Asks the dispatcher to run tools and answers with their results.",
            topics=["math"],
            streaming=True,
            max_context_tokens=2000,
            interactive=interactive,
        )
        self.integration = integration
        #: Every call, in arrival order.
        self.calls: list[ExpertCall] = []
        self._by_run: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._server: aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> ToolExpert:
        self._server = aio.server()
        handler_pb2_grpc.add_HandlerServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None

    async def __aenter__(self) -> ToolExpert:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def call(self, run: str, timeout: float = CALL_DEADLINE_S) -> ExpertCall:  # noqa: ASYNC109
        """The (latest) call for ``run``, once it started."""
        async with asyncio.timeout(timeout):
            await self._by_run[run].wait()
        return next(call for call in reversed(self.calls) if call.request.run == run)

    def _record(
        self,
        method: str,
        request: handler_pb2.HandleRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> ExpertCall:
        metadata = {key: str(value) for key, value in context.invocation_metadata() or ()}
        seen = ExpertCall(method, request, metadata, context.time_remaining())
        self.calls.append(seen)
        self._by_run[request.run].set()
        return seen

    def _plan(self, request: handler_pb2.HandleRequest) -> tuple[list[handler_pb2.ToolCall], bool]:
        """The tool calls the message asks for, and whether to end without a result."""
        verb, _, rest = _text_of(request.message).strip().partition(" ")
        numbers = [float(word) for word in rest.split()] if verb in ("add", "both") else []
        if verb == "add" and len(numbers) == 2:
            return [self._tool_call(request, "add-1", "add", a=numbers[0], b=numbers[1])], False
        if verb == "both" and len(numbers) == 4:
            return [
                self._tool_call(request, "add-1", "add", a=numbers[0], b=numbers[1]),
                self._tool_call(request, "add-2", "add", a=numbers[2], b=numbers[3]),
            ], False
        if verb == "many" and rest.strip().isdigit():
            count = min(max(int(rest), 1), MAX_CALLS)
            return [
                self._tool_call(request, f"add-{i}", "add", a=i, b=i) for i in range(1, count + 1)
            ], False
        if verb in ("wait", "drop"):
            return [self._tool_call(request, "wait-1", "wait")], verb == "drop"
        if verb == "call":
            name, _, arguments = rest.strip().partition(" ")
            values = json.loads(arguments) if arguments.strip() else {}
            return [self._tool_call(request, f"{name}-1", name, **values)], False
        return [], False

    def _tool_call(
        self, request: handler_pb2.HandleRequest, call_id: str, name: str, **arguments: Any
    ) -> handler_pb2.ToolCall:
        integration, tool = self.integration, name
        for definition in request.tools:
            if definition.function_name == name:
                integration, _, tool = definition.tool.rpartition("/tools/")
                break
        return handler_pb2.ToolCall(
            id=call_id, integration=integration, tool=tool, arguments=_arguments(arguments)
        )

    async def _flaky(
        self, request: handler_pb2.HandleRequest, context: aio.ServicerContext[Any, Any]
    ) -> None:
        """Fail the run's first call of ``flaky`` UNAVAILABLE, before any answer."""
        if _text_of(request.message).strip() != "flaky":
            return
        if sum(1 for call in self.calls if call.request.run == request.run) == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")

    async def GetCapabilities(
        self,
        request: handler_pb2.GetCapabilitiesRequest,
        context: aio.ServicerContext[Any, Any],
    ) -> handler_pb2.GetCapabilitiesResponse:
        return handler_pb2.GetCapabilitiesResponse(capabilities=self.capabilities)

    async def Handle(
        self, request: handler_pb2.HandleRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Frame]:
        seen = self._record("Handle", request, context)
        await self._flaky(request, context)
        try:
            calls, _ = self._plan(request)
            for tool_call in calls:
                seen.sent.append(tool_call)
                yield Frame(tool_call=tool_call)
            answer = f"reported {len(calls)} tool calls"
            yield Frame(delta=handler_pb2.TextDelta(text=answer))
        except (asyncio.CancelledError, GeneratorExit):
            seen.cancelled.set()
            raise
        seen.answered.set()
        yield _result(answer, self._spent(seen))

    async def HandleInteractive(
        self, request_iterator: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Response]:
        requests: AsyncIterator[Request] = aiter(request_iterator)
        first = await anext(requests)
        if first.WhichOneof("frame") != "start":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be start")
        request = first.start
        seen = self._record("HandleInteractive", request, context)
        await self._flaky(request, context)
        ended = asyncio.Event()
        # grpc-stubs declares the callback as a class of its own, not a callable.
        context.add_done_callback(lambda _: ended.set())  # type: ignore[arg-type]
        try:
            expected: list[handler_pb2.ToolCall] = []
            if request.steps:
                last = request.steps[-1]
                expected.extend(last.calls[len(last.results) :])
            calls, drop = self._plan(request)
            for tool_call in calls:
                seen.sent.append(tool_call)
                yield Response(frame=Frame(tool_call=tool_call))
            if drop:
                return
            expected.extend(calls)
            results: dict[str, handler_pb2.ToolResult] = {}
            while len(results) < len(expected):
                frame = await anext(requests, None)
                if frame is None:
                    # The dispatcher never half-closes: an early end is its call
                    # going away, and the cancellation of this task follows.
                    async with asyncio.timeout(CALL_DEADLINE_S):
                        await ended.wait()
                    if context.cancelled():
                        seen.cancelled.set()
                        return
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "the requests ended before the results"
                    )
                if frame.WhichOneof("frame") != "tool_result":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected a tool_result")
                seen._got(frame.tool_result)
                results[frame.tool_result.id] = frame.tool_result
            lines = []
            for tool_call in expected:
                result = results.get(tool_call.id)
                if result is None:
                    lines.append(f"{tool_call.tool} MISSING")
                    continue
                outcome = handler_pb2.ToolOutcome.Name(result.outcome).removeprefix("TOOL_OUTCOME_")
                lines.append(f"{tool_call.tool} {outcome}: {result.text}")
            answer = "\n".join(lines) or f"heard: {_text_of(request.message)}"
            yield Response(frame=Frame(delta=handler_pb2.TextDelta(text=answer)))
        except (asyncio.CancelledError, GeneratorExit):
            # CancelledError at an await of ours; GeneratorExit when gRPC closes
            # the abandoned generator of a cancelled call.
            seen.cancelled.set()
            raise
        seen.answered.set()
        yield Response(frame=_result(answer, self._spent(seen)))

    def _spent(self, seen: ExpertCall) -> int:
        """What the call reports it spent: ``cost_micros``, within what it was handed."""
        for item in seen.metadata.get("x-switchboard-budget", "").split(";"):
            name, _, value = item.partition("=")
            if name == "cost_micros":
                return min(self.cost_micros, int(value))
        return self.cost_micros


def _result(answer: str, cost_micros: int = 0) -> Frame:
    return Frame(
        result=handler_pb2.HandleResult(
            parts=[context_pb2.ContentPart(text=answer)],
            usage=handler_pb2.Usage(
                output_tokens=len(answer.split()), estimated=True, cost_micros=cost_micros
            ),
            finish_reason="stop",
        )
    )
