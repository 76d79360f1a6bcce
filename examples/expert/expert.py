"""A remote domain expert: a standalone server of ``switchboard.api.handler.v1.HandlerService``.

    python examples/expert/expert.py --port 0 [--id weather] [--side-effects FILE] [--interactive]

It answers deterministically, so tests can run it as a real process behind
the dispatcher, and it is a minimal example of what an expert implements. Its
first line on stdout is ``LISTENING <port>`` once it serves; logs go to
stderr. SIGTERM (or SIGINT) marks it NOT_SERVING, lets calls in flight finish
for ``--grace`` seconds, cancels the rest and exits 0.

``Handle`` parameters:

- ``interval_ms`` (0-60000, default 0): the pause between two answer words
  and between two ticks;
- ``ticks`` (default 0): units of work done before answering, each a pause of
  ``interval_ms``, a ``tick <run> <i>`` line in the side-effects file and a
  progress frame;
- ``fail`` (a string): after the first word, end the call with
  FAILED_PRECONDITION and that message.

With ``--interactive`` its capabilities say ``interactive``, so the
dispatcher calls ``HandleInteractive`` instead: the first request frame is
the HandleRequest, and with the parameter ``tool`` (the function name of a
tool the run offers in ``HandleRequest.tools``) it sends one ``tool_call``
frame for that tool with the parameter ``arguments`` (an object), waits for
the ``tool_result`` frame with its id, and appends ``; <tool> <OUTCOME>:
<result text>`` to the usual answer. Without ``tool`` it answers as
``Handle`` does.

The side-effects file is how a test sees what the expert did, from outside
its process: ``deadline <run> <seconds>`` when a call starts (``inf``
without a deadline), ``tick <run> <i>``, ``tool_call <run> <tool>`` and
``tool_result <run> <OUTCOME>``, then ``done <run>``, ``failed <run>`` or
``cancelled <run>``. Each line is flushed as it is written.

It depends only on the generated contract (``gen/``), not on Switchboard's
services: an expert is a separate program that speaks the contract.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import re
import signal
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import grpc
from google.protobuf import struct_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from switchboard.api.context.v1 import context_pb2
from switchboard.api.handler.v1 import handler_pb2, handler_pb2_grpc

SERVICE_NAME: Final = handler_pb2.DESCRIPTOR.services_by_name["HandlerService"].full_name
MAX_INTERVAL_MS: Final = 60_000.0
MAX_TICKS: Final = 1_000_000
HANDLER_ID: Final = re.compile(r"[a-z][a-z0-9-]{1,62}")
#: How long a call whose requests ended waits for its cancellation to arrive.
REQUESTS_ENDED_GRACE_S: Final = 10.0

Context = aio.ServicerContext[handler_pb2.HandleRequest, handler_pb2.HandleResponse]
InteractiveContext = aio.ServicerContext[
    handler_pb2.HandleInteractiveRequest, handler_pb2.HandleInteractiveResponse
]

log = logging.getLogger("expert")


class SideEffects:
    """The side-effects file: one flushed line per event (nothing without a file)."""

    def __init__(self, path: Path | None) -> None:
        self._file: TextIO | None = path.open("a", encoding="utf-8") if path else None

    def write(self, line: str) -> None:
        if self._file is not None:
            self._file.write(line + "\n")
            # Flushed at once: the reader is another process, and a line that
            # is still buffered when this one is killed would never be seen.
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class BadParameter(Exception):
    pass


def _number(params: struct_pb2.Struct, key: str, default: float, high: float) -> float:
    if key not in params.fields:
        return default
    value = params.fields[key]
    if value.WhichOneof("kind") != "number_value" or not math.isfinite(value.number_value):
        raise BadParameter(f"parameter {key!r} must be a finite number")
    return min(max(value.number_value, 0.0), high)


def _text_of(message: context_pb2.Message) -> str:
    return "\n\n".join(part.text for part in message.parts if part.WhichOneof("part") == "text")


def _pieces(answer: str) -> list[str]:
    # Word by word, each but the first with the space before it, so the
    # deltas concatenate to exactly the answer.
    words = answer.split(" ")
    return words[:1] + [" " + word for word in words[1:]]


def _progress(stage: str, fraction: float) -> handler_pb2.HandleResponse:
    return handler_pb2.HandleResponse(progress=handler_pb2.Progress(stage=stage, fraction=fraction))


class Expert(handler_pb2_grpc.HandlerServiceServicer):
    def __init__(
        self, capabilities: handler_pb2.HandlerCapabilities, side_effects: SideEffects
    ) -> None:
        self._capabilities = capabilities
        self._effects = side_effects

    async def GetCapabilities(
        self,
        request: handler_pb2.GetCapabilitiesRequest,
        context: aio.ServicerContext[
            handler_pb2.GetCapabilitiesRequest, handler_pb2.GetCapabilitiesResponse
        ],
    ) -> handler_pb2.GetCapabilitiesResponse:
        return handler_pb2.GetCapabilitiesResponse(capabilities=self._capabilities)

    async def Handle(
        self, request: handler_pb2.HandleRequest, context: Context
    ) -> AsyncIterator[handler_pb2.HandleResponse]:
        run = self._started(request, context)
        # Closed with this generator: a cancelled call stops the answer too.
        async with contextlib.aclosing(self._answer(request, context, run)) as frames:
            async for frame in frames:
                yield frame

    async def HandleInteractive(
        self,
        request_iterator: AsyncIterator[handler_pb2.HandleInteractiveRequest],
        context: InteractiveContext,
    ) -> AsyncIterator[handler_pb2.HandleInteractiveResponse]:
        # The first frame is the request; later ones are results of the tool
        # calls this expert asks for (with the id it gave each call).
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("frame") != "start":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be start")
        request = first.start
        run = self._started(request, context)
        fields = request.parameters.fields
        wanted = fields["tool"].string_value if "tool" in fields else ""
        said = ""
        if wanted:
            # The run offers its tools by the names a model would call them.
            offered = next((tool for tool in request.tools if tool.function_name == wanted), None)
            if offered is None:
                self._effects.write(f"failed {run}")
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"the run offers no tool {wanted!r}"
                )
            integration, _, tool = offered.tool.rpartition("/tools/")
            call = handler_pb2.ToolCall(id="call-1", integration=integration, tool=tool)
            if "arguments" in fields:
                call.arguments.CopyFrom(fields["arguments"].struct_value)
            ended = asyncio.Event()
            # grpc-stubs declares the callback as a class of its own, not a callable.
            context.add_done_callback(lambda _: ended.set())  # type: ignore[arg-type]
            try:
                self._effects.write(f"tool_call {run} {wanted}")
                yield handler_pb2.HandleInteractiveResponse(
                    frame=handler_pb2.HandleResponse(tool_call=call)
                )
                frame = await anext(requests, None)
                if frame is None:
                    # The dispatcher never ends its requests first: it went
                    # away, and the cancellation of this call follows.
                    try:
                        await asyncio.wait_for(ended.wait(), REQUESTS_ENDED_GRACE_S)
                    except TimeoutError:
                        self._effects.write(f"failed {run}")
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "the requests ended before the tool result",
                        )
                    self._effects.write(f"cancelled {run}")
                    return
            except (asyncio.CancelledError, GeneratorExit):
                self._effects.write(f"cancelled {run}")
                raise
            if frame.WhichOneof("frame") != "tool_result" or frame.tool_result.id != call.id:
                self._effects.write(f"failed {run}")
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected the tool's result")
            result = frame.tool_result
            outcome = handler_pb2.ToolOutcome.Name(result.outcome).removeprefix("TOOL_OUTCOME_")
            self._effects.write(f"tool_result {run} {outcome}")
            said = f"; {wanted} {outcome}: {result.text}"
        async with contextlib.aclosing(self._answer(request, context, run, said)) as frames:
            async for answer in frames:
                yield handler_pb2.HandleInteractiveResponse(frame=answer)

    def _started(
        self, request: handler_pb2.HandleRequest, context: aio.ServicerContext[Any, Any]
    ) -> str:
        # Run names are resource names; anything else must not split a line.
        run = "_".join(request.run.split()) or "-"
        remaining = context.time_remaining()
        self._effects.write(f"deadline {run} {remaining if remaining is not None else math.inf}")
        return run

    async def _answer(
        self,
        request: handler_pb2.HandleRequest,
        context: aio.ServicerContext[Any, Any],
        run: str,
        said: str = "",
    ) -> AsyncGenerator[handler_pb2.HandleResponse, None]:
        """The answer to ``request``, after its ticks; ``said`` is appended to it."""
        try:
            interval = _number(request.parameters, "interval_ms", 0.0, MAX_INTERVAL_MS) / 1000
            ticks = int(_number(request.parameters, "ticks", 0.0, MAX_TICKS))
        except BadParameter as error:
            self._effects.write(f"failed {run}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        fields = request.parameters.fields
        fail = fields["fail"].string_value if "fail" in fields else ""
        text = _text_of(request.message)
        answer = (
            f"expert {self._capabilities.id} heard: {text}"
            f" (context items: {len(request.context.included)}){said}"
        )
        pieces = _pieces(answer)
        try:
            yield _progress("thinking", 0.0)
            for tick in range(1, ticks + 1):
                await asyncio.sleep(interval)
                self._effects.write(f"tick {run} {tick}")
                yield _progress("working", tick / ticks)
            for index, piece in enumerate(pieces):
                if index and interval:
                    await asyncio.sleep(interval)
                yield handler_pb2.HandleResponse(delta=handler_pb2.TextDelta(text=piece))
                if fail:
                    self._effects.write(f"failed {run}")
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, fail)
        except (asyncio.CancelledError, GeneratorExit):
            # CancelledError arrives at an await of ours; GeneratorExit when the
            # call is cancelled while gRPC is sending what we yielded and the
            # abandoned generator is closed.
            self._effects.write(f"cancelled {run}")
            raise
        self._effects.write(f"done {run}")
        yield handler_pb2.HandleResponse(
            result=handler_pb2.HandleResult(
                parts=[context_pb2.ContentPart(text=answer)],
                usage=handler_pb2.Usage(
                    input_tokens=len(text.split()),
                    output_tokens=len(pieces),
                    model=f"expert/{self._capabilities.id}",
                    estimated=True,
                ),
                finish_reason="stop",
            )
        )


def capabilities(
    handler_id: str, topics: Sequence[str], *, interactive: bool = False
) -> handler_pb2.HandlerCapabilities:
    properties: dict[str, Any] = {
        "interval_ms": {"type": "number", "minimum": 0, "maximum": MAX_INTERVAL_MS},
        "ticks": {"type": "integer", "minimum": 0, "maximum": MAX_TICKS},
        "fail": {"type": "string"},
    }
    if interactive:
        properties["tool"] = {"type": "string", "description": "function name of a run's tool"}
        properties["arguments"] = {"type": "object", "description": "the tool's arguments"}
    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": properties})
    return handler_pb2.HandlerCapabilities(
        id=handler_id,
        display_name=f"{handler_id.capitalize()} expert",
        description=f"A remote domain expert on {', '.join(topics) or handler_id}"
        " that answers deterministically (an example and a test double).",
        topics=list(topics),
        streaming=True,
        max_context_tokens=2000,
        parameters_schema=schema,
        interactive=interactive,
    )


async def serve(args: argparse.Namespace, effects: SideEffects) -> None:
    server = aio.server()
    expert = Expert(capabilities(args.id, args.topics, interactive=args.interactive), effects)
    handler_pb2_grpc.add_HandlerServiceServicer_to_server(expert, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    print(f"LISTENING {port}", flush=True)
    log.info("expert %s listening on %s:%d", args.id, args.host, port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: %.1fs for calls in flight", args.grace)
    await health.enter_graceful_shutdown()
    await server.stop(args.grace)
    log.info("stopped")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--id", default="weather", help="handler id, [a-z][a-z0-9-]{1,62}")
    parser.add_argument(
        "--topics",
        type=lambda value: [topic.strip() for topic in value.split(",") if topic.strip()],
        default=["weather"],
        help="comma-separated topics it claims (default: weather)",
    )
    parser.add_argument("--side-effects", type=Path, default=None, metavar="FILE")
    parser.add_argument(
        "--interactive",
        action="store_true",
        help="say so in its capabilities: the dispatcher then calls HandleInteractive",
    )
    parser.add_argument(
        "--grace", type=float, default=5.0, help="seconds calls in flight get on SIGTERM"
    )
    args = parser.parse_args(argv)
    if not HANDLER_ID.fullmatch(args.id):
        parser.error(f"--id must match {HANDLER_ID.pattern}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    effects = SideEffects(args.side_effects)
    try:
        asyncio.run(serve(args, effects))
    finally:
        # Only now: the server's stop does not wait for the handlers it
        # cancels, and asyncio.run finishes them (and closes abandoned
        # generators) after serve returns; they still write ``cancelled``.
        effects.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
