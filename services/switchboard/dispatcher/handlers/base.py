"""What a handler is, as the dispatcher sees it (the built-in ``echo`` is ``echo.py``).

A handler is an object with ``capabilities`` and an async generator
``handle(request)`` that yields ``HandleResponse`` frames (progress, deltas,
tool calls) and ends with exactly one ``result``. In-process handlers, the
LLM handler and remote domain experts (``remote.py``, ``remote_a2a.py``) all have this shape, so
the run loop treats them alike.

Cancellation is the asyncio kind: cancelling the run's task raises
``CancelledError`` at the handler's current ``await``; a handler must let it
propagate (``finally`` may clean up) and must not start new work after it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.handed import Handed

Frame = handler_pb2.HandleResponse


class ToolRunner(Protocol):
    """Runs a handler's tool calls for its run (``dispatcher/tools/runner.py``).

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


@dataclass(frozen=True)
class CallHold:
    """A model call's reservation (``StepBudget.reserve_call``)."""

    #: The hold's id, to settle or release.
    hold: str
    #: The answer tokens held: the call's ``max_tokens``, lower than it asked when
    #: only that much fitted in its budgets.
    max_tokens: int
    #: Why it is lower, in words ("" when the call holds all it asked).
    note: str = ""


class StepBudget(Protocol):
    """What a run may spend (``dispatcher/budgets/spending.py``): a handler reserves
    each step's worst case before it and settles what it used after.

    ``reserve`` returns the hold's id once the step fits in every budget that
    applies; when one has no room the run pauses there (REQUIRES_ACTION) until
    the cap is raised or an owner decides, and ``reserve`` raises
    ``BudgetExhausted`` if the run must end instead. A hold neither settled nor
    released is released when the run ends.
    """

    @property
    def caps_cost(self) -> bool:
        """Whether a cost cap applies (then a step without a price cannot run)."""
        ...

    async def reserve(self, cost_micros: int, input_tokens: int, output_tokens: int) -> str: ...

    async def reserve_call(
        self,
        prompt_tokens: int,
        max_tokens: int,
        min_tokens: int,
        cost: Callable[[int, int], int],
    ) -> CallHold:
        """Hold a model call: its prompt and ``max_tokens`` of answer when that fits;
        else its prompt and as many answer tokens as fit, if at least ``min_tokens``;
        else it waits or raises as ``reserve`` does. ``cost(input, output)`` prices
        the call in micro-units."""
        ...

    async def reserve_rest(self, *, hold: bool = True) -> tuple[str, Handed]:
        """Hold what is left of every cap for a hop to another agent: the hold's id
        and the caps to hand over (``handlers/handed.py``). Waits or raises as
        ``reserve`` does when nothing is left. ``hold`` False holds nothing (the
        callee has the run make priced calls, which reserve as they go)."""
        ...

    async def settle(
        self, hold: str, cost_micros: int, input_tokens: int, output_tokens: int
    ) -> None: ...

    async def release(self, hold: str) -> None: ...


class Steers(Protocol):
    """The messages people steer a run with (``dispatcher/runs/steering.py``), for a
    handler with step boundaries (the ``llm`` handler: before each model call).

    ``journaled`` is what an earlier attempt of the run took, ``(step, message)`` in
    order: a resumed run gives each to its model again before the same step.
    ``take(step)`` takes the steers waiting now, in order, before model call
    ``step`` (from 1), and returns their messages once the run's journal holds
    them (each is then the run's for good: never answered on its own).
    """

    def journaled(self) -> Sequence[tuple[int, context_pb2.Message]]: ...

    async def take(self, step: int) -> list[context_pb2.Message]: ...

    @property
    def restart(self) -> bool:
        """The run asked for STEER_MODE_RESTART_STREAM: a steer cuts the model call in
        progress (``arrival``, ``cut``), which is then made again with it."""
        ...

    async def arrival(self) -> None:
        """Return once a steer waits for the run (at once if one already does)."""
        ...

    def cut(self) -> None:
        """The model call in progress was cut for a steer: what it streamed is void."""
        ...


#: Reads a stored file the run's window names, as the run's user:
#: ``await files(name, limit)`` is its whole content (RequestTooLarge past
#: ``limit`` bytes, NotFound once deleted).
FileReader = Callable[[str, int], Awaitable[bytes]]


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
    #: The run's budgets; ``None`` when none applies (then nothing is reserved).
    budget: StepBudget | None = None
    #: Reads the files the window names (images for a vision model); ``None``
    #: where files cannot be read (a handler then describes them in text).
    files: FileReader | None = None
    #: Told of each model call the handler completed, before it acts on it: the
    #: call's usage and the provider's response id. The run's journal keeps
    #: them with the tool step or the answer the call made ("Durable runs").
    model_call: Callable[[handler_pb2.Usage, str], None] | None = None
    #: Steers of the run, for a handler with step boundaries; ``None``: none are taken.
    steers: Steers | None = None

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


class HandlerFailure(Exception):
    """A handler reports that it cannot answer; the message is shown to the client.

    Anything else a handler raises is logged and shown only as a generic failure.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
