"""The built-in ``echo`` handler.

Deterministic answers for tests, demos and the embedded default.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.base import (
    Frame,
    HandleCall,
    HandlerFailure,
    capabilities,
    text_of,
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
