"""The handler's frames relayed into the run's updates.

A handler yields deltas, progress, tool calls and, last, its result. Deltas it
yields without waiting in between go out as one (up to ``_MAX_MERGED_DELTA_CHARS``),
flushed once the handler waits; each piece of text also goes to the run's tool
runner (the text said before a step's calls) and, when the run speaks, to its
speaker (``voice/speaking.py`` wraps the relay and hands it the speaker's feed).

Why a module of its own: the relay is the run's hot loop, one pass per frame on
the path of every token; kept apart, its merging and its bounds read as one
piece, without the stage's setup around it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.base import HandleCall, HandlerFailure
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.active.live import MAX_UPDATES, SEQUENCE_BLOCK
from switchboard.dispatcher.tools.runner import RunTools

#: Largest delta made of merged ones (a bigger one goes out as it is).
_MAX_MERGED_DELTA_CHARS: Final = 16 * 1024


async def relay(
    active: Active,
    call: HandleCall,
    emit: Callable[[pb.RunUpdate], None],
    feed: Callable[[str], None] | None,
) -> handler_pb2.HandleResult:
    """The handler's frames into the run's updates (``emit``); returns its result.
    ``feed``: the speaker's, when the run speaks."""
    frames = active.handler.handle(call)
    # Deltas the handler yields without waiting in between (a fast model,
    # several chunks in one network read, a busy server) go out as one
    # delta, flushed once the handler waits: each update costs a feed
    # entry, a frame per watcher and an event, however little text it holds.
    pending: list[str] = []
    pending_chars = 0
    loop = asyncio.get_running_loop()

    def flush() -> None:
        nonlocal pending_chars
        if pending:
            update = pb.RunUpdate()
            update.delta.text = "".join(pending)
            pending.clear()
            pending_chars = 0
            emit(update)

    runner = active.tools
    saw_text = _text_sink(runner, feed)
    if runner is not None:
        runner.flush = flush  # a tool update goes after the text before it
    try:
        async for frame in frames:
            if active.feed.last % SEQUENCE_BLOCK >= MAX_UPDATES:
                raise HandlerFailure("the handler sent more updates than a run may have")
            kind = frame.WhichOneof("frame")
            if kind == "delta":
                if not pending:
                    loop.call_soon(flush)
                pending.append(frame.delta.text)
                pending_chars += len(frame.delta.text)
                saw_text(frame.delta.text)
                if pending_chars >= _MAX_MERGED_DELTA_CHARS:
                    flush()
                continue
            flush()
            update = pb.RunUpdate()
            if kind == "progress":
                active.run.progress.CopyFrom(frame.progress)
                update.progress.CopyFrom(frame.progress)
            elif kind == "tool_call":
                update.tool_call.CopyFrom(frame.tool_call)
            elif kind == "result":
                return frame.result
            else:
                continue
            emit(update)
        flush()
    finally:
        # Cancelled or failed: text not yet out stays out, after the end.
        pending.clear()
        # An unfinished generator is closed now, not at garbage collection:
        # a remote call or an HTTP response ends with the run.
        close = getattr(frames, "aclose", None)
        if close is not None:
            await close()
    raise HandlerFailure("the handler ended without a result")


def _ignore(_text: str) -> None:
    pass


def _text_sink(
    runner: RunTools | None, feed: Callable[[str], None] | None
) -> Callable[[str], None]:
    """What sees each piece of the answer's text as the handler yields it: the tool
    runner (the text said before a step's calls) and the speaker's ``feed``."""
    if feed is None:
        return runner.saw_text if runner is not None else _ignore
    if runner is None:
        return feed
    saw = runner.saw_text

    def both(text: str) -> None:
        saw(text)
        feed(text)

    return both
