"""What a handler is, as the dispatcher sees it, and the built-in ``echo``.

A handler is an object with ``capabilities`` and an async generator
``handle(request)`` that yields ``HandleResponse`` frames (progress, deltas,
tool calls) and ends with exactly one ``result``. In-process handlers, the
LLM handler and remote domain experts (``remote.py``) all have this shape, so
the run loop treats them alike.

Cancellation is the asyncio kind: cancelling the run's task raises
``CancelledError`` at the handler's current ``await``; a handler must let it
propagate (``finally`` may clean up) and must not start new work after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.handler.v1 import handler_pb2

Frame = handler_pb2.HandleResponse


class ToolRunner(Protocol):
    """Runs a handler's tool calls for its run (``dispatcher/toolrunner.py``).

    ``run`` takes the calls a handler makes together (one model answer, or one
    request of an interactive expert), shows each as a run update, waits for a
    person's approval where the run's assistant asks for it (the run is then
    REQUIRES_ACTION), calls the approved ones concurrently through the
    integration hub and returns one ``ToolResult`` per call, in call order. A
    tool that fails, is denied, unknown or unavailable is a result (FAILED,
    DENIED, ERROR), never an exception: the handler gives it to its model.
    Cancellation, the run's deadline and an expired approval do raise.
    """

    async def run(self, calls: Sequence[handler_pb2.ToolCall]) -> list[handler_pb2.ToolResult]: ...


@dataclass
class HandleCall:
    """One invocation of a handler: the request and the run's deadline."""

    request: handler_pb2.HandleRequest
    #: ``time.monotonic()`` by which the handler must finish.
    deadline: float
    #: Metadata for the handler's own use (never shown to clients).
    attributes: dict[str, str] = field(default_factory=dict)
    #: Runs tool calls; ``None`` when the run may call no tools.
    tools: ToolRunner | None = None

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - time.monotonic())


@runtime_checkable
class Handler(Protocol):
    """A handler the router can pick."""

    @property
    def capabilities(self) -> handler_pb2.HandlerCapabilities: ...

    @property
    def kind(self) -> dispatcher_pb2.HandlerKind.ValueType: ...

    def available(self) -> bool:
        """Whether the router may pick it now (healthy, circuit closed)."""
        ...

    def handle(self, call: HandleCall) -> AsyncIterator[Frame]:
        """Answer ``call.request``; the last frame is the one ``result``."""
        ...


def text_of(message: context_pb2.Message) -> str:
    """The message's text parts joined by blank lines."""
    return "\n\n".join(part.text for part in message.parts if part.WhichOneof("part") == "text")


def capabilities(
    handler_id: str,
    display_name: str,
    description: str,
    *,
    topics: tuple[str, ...] = (),
    streaming: bool = True,
    max_context_tokens: int = 4000,
) -> handler_pb2.HandlerCapabilities:
    return handler_pb2.HandlerCapabilities(
        id=handler_id,
        display_name=display_name,
        description=description,
        topics=list(topics),
        streaming=streaming,
        max_context_tokens=max_context_tokens,
    )


class EchoHandler:
    """Deterministic: repeats the message word by word and says it was the echo handler.

    Parameters: ``delay_ms`` (0-60000) waits between words (the first comes at
    once), which tests and demos use to have a run that is still going;
    ``fail`` (a string) makes it fail with that message after the first word.
    """

    kind = dispatcher_pb2.HANDLER_KIND_BUILTIN

    def __init__(self, *, note: str = "") -> None:
        # ``note`` is appended to every answer: on the embedded default it says
        # how to configure a model, so a first user learns why they got an echo.
        self._note = note
        self._capabilities = capabilities(
            "echo",
            "Echo",
            "Repeats the message back; deterministic, for tests and demos.",
            topics=("echo", "test"),
            max_context_tokens=1000,
        )

    @property
    def capabilities(self) -> handler_pb2.HandlerCapabilities:
        return self._capabilities

    def available(self) -> bool:
        return True

    async def handle(self, call: HandleCall) -> AsyncIterator[Frame]:
        text = text_of(call.request.message)
        params = call.request.parameters.fields
        delay = 0.0
        if "delay_ms" in params:
            delay = min(max(params["delay_ms"].number_value, 0.0), 60_000.0) / 1000.0
        fail = params["fail"].string_value if "fail" in params else ""
        words = text.split() or ["(empty", "message)"]
        answer: list[str] = []
        total = len(words)
        for index, word in enumerate(words):
            if delay and index:
                await asyncio.sleep(delay)
            piece = word if index == 0 else " " + word
            answer.append(piece)
            yield Frame(delta=handler_pb2.TextDelta(text=piece))
            if fail:
                raise HandlerFailure(fail)
            if total > 1 and index % 16 == 15:
                yield Frame(
                    progress=handler_pb2.Progress(stage="echoing", fraction=(index + 1) / total)
                )
        trailer = f"\n\n(answered by handlers/echo{': ' + self._note if self._note else ''})"
        yield Frame(delta=handler_pb2.TextDelta(text=trailer))
        answer.append(trailer)
        words_in = len(text.split())
        yield Frame(
            result=handler_pb2.HandleResult(
                parts=[context_pb2.ContentPart(text="".join(answer))],
                usage=handler_pb2.Usage(
                    input_tokens=words_in, output_tokens=len(answer), estimated=True
                ),
                finish_reason="stop",
            )
        )


class HandlerFailure(Exception):
    """A handler reports that it cannot answer; the message is shown to the client.

    Anything else a handler raises is logged and shown only as a generic failure.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
