"""The ``llm`` handler against a local fake of the Chat Completions HTTP API.

Retries, fallback and the circuit breaker run against real sockets; backoff
sleeps are recorded instead of slept and the breaker's clock is moved by hand,
so no test waits for time to pass except the ones about the run's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import ModuleType
from typing import Any

import httpx
import pytest
from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.base import Frame, HandleCall, Handler
from switchboard.dispatcher.llm.handler import (
    LlmConfig,
    LlmHandler,
    Price,
    Provider,
    build_messages,
    parse_prices,
    parse_providers,
)
from switchboard.platform import imports
from tests.conftest import CALL_DEADLINE_S
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.clock import FakeClock
from tests.kits.llmkit import Sleeps, fail, run

pytestmark = pytest.mark.unit

KEY = "sk-test-9f8e7d6c5b4a39281706"
MODEL = "gpt-fake"
BACKUP_MODEL = "gpt-backup"
# Bounds waits on the fake's events, so a broken test fails instead of hanging.


class CeilingRandom(random.Random):
    """Jitter that always picks the top of its range, and records each range."""

    def __init__(self) -> None:
        super().__init__(0)
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return b


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


Make = Callable[..., LlmHandler]


@pytest.fixture
async def make(sleeps: Sleeps, clock: FakeClock) -> AsyncIterator[Make]:
    """Builds handlers over providers (fakes or ``Provider``s); closes them afterwards."""
    built: list[LlmHandler] = []

    def build(
        *providers: FakeOpenAI | Provider,
        count: Callable[[str], int] | None = None,
        rng: random.Random | None = None,
        sleep: Any = None,
        **config: Any,
    ) -> LlmHandler:
        chain = tuple(
            item if isinstance(item, Provider) else provider(("primary", "backup")[index], item)
            for index, item in enumerate(providers)
        )
        config.setdefault("backoff_base_s", 0.05)
        options: dict[str, Any] = {"clock": clock, "sleep": sleep or sleeps, "rng": rng}
        if count is not None:
            options["count"] = count
        handler = LlmHandler(LlmConfig(providers=chain, **config), **options)
        built.append(handler)
        return handler

    yield build
    for handler in built:
        await handler.aclose()


def provider(name: str, fake: FakeOpenAI, key: str = "") -> Provider:
    return Provider(name, fake.url, key, MODEL if name == "primary" else BACKUP_MODEL)


def text_part(text: str) -> context_pb2.ContentPart:
    return context_pb2.ContentPart(text=text)


def make_call(
    text: str = "Hello?",
    *,
    deadline_s: float = CALL_DEADLINE_S,
    parameters: dict[str, Any] | None = None,
    context: context_pb2.ContextWindow | None = None,
    name: str = "",
) -> HandleCall:
    params = struct_pb2.Struct()
    params.update(parameters or {})
    request = handler_pb2.HandleRequest(
        run="workspaces/w/conversations/c/runs/r",
        message=context_pb2.Message(
            name=name, role=context_pb2.MESSAGE_ROLE_USER, parts=[text_part(text)]
        ),
        context=context,
        parameters=params,
    )
    return HandleCall(request=request, deadline=time.monotonic() + deadline_s)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- streaming and the result ---------------------------------------------


async def test_streams_each_delta_then_one_result(primary: FakeOpenAI, make: Make) -> None:
    primary.script(Reply.text("Hello brave new world"))
    handler = make(primary)

    deltas, result = await run(handler, make_call("Hello?"))

    assert deltas == ["Hello", " brave", " new", " world"]
    assert [part.text for part in result.parts] == ["Hello brave new world"]
    assert result.finish_reason == "stop"
    # The fake counts words plus 4 per message: "Hello?" is 1 + 4. No price table: unpriced.
    assert result.usage == handler_pb2.Usage(
        input_tokens=5, output_tokens=4, model=f"primary/{MODEL}", estimated=False, unpriced_calls=1
    )
    [request] = primary.requests
    assert request.path == "/v1/chat/completions"
    assert request.body == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello?"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 1024,
    }
    assert "authorization" not in request.headers


async def test_several_words_to_a_chunk(primary: FakeOpenAI, make: Make) -> None:
    primary.script(Reply.text("one two three four five", chunk_words=2))

    deltas, result = await run(make(primary), make_call())

    assert deltas == ["one two", " three four", " five"]
    assert result.parts[0].text == "one two three four five"


async def test_connection_is_reused_between_calls(primary: FakeOpenAI, make: Make) -> None:
    primary.script(Reply.text("first"), Reply.text("second"))
    handler = make(primary)

    await run(handler, make_call())
    await run(handler, make_call())

    assert primary.connections == 1


def test_context_window_becomes_chat_messages() -> None:
    current = context_pb2.Message(
        name="workspaces/w/conversations/c/messages/9",
        role=context_pb2.MESSAGE_ROLE_USER,
        parts=[text_part("And now?")],
    )
    window = context_pb2.ContextWindow(
        included=[
            context_pb2.ContextItem(
                memory_item=context_pb2.MemoryItem(
                    kind=context_pb2.MEMORY_KIND_PREFERENCE, content="Prefers short answers."
                )
            ),
            context_pb2.ContextItem(
                memory_item=context_pb2.MemoryItem(
                    kind=context_pb2.MEMORY_KIND_SUMMARY, content="They planned a trip."
                )
            ),
            context_pb2.ContextItem(
                message=context_pb2.Message(
                    role=context_pb2.MESSAGE_ROLE_SYSTEM, parts=[text_part("Be kind.")]
                )
            ),
            context_pb2.ContextItem(
                message=context_pb2.Message(
                    role=context_pb2.MESSAGE_ROLE_USER,
                    parts=[text_part("Where to?"), context_pb2.ContentPart()],
                )
            ),
            context_pb2.ContextItem(
                message=context_pb2.Message(
                    role=context_pb2.MESSAGE_ROLE_ASSISTANT, parts=[text_part("Lisbon.")]
                )
            ),
            context_pb2.ContextItem(
                message=context_pb2.Message(
                    role=context_pb2.MESSAGE_ROLE_TOOL,
                    parts=[context_pb2.ContentPart(data=struct_pb2.Struct())],
                )
            ),
            # The window already holds the message being answered: it is sent once.
            context_pb2.ContextItem(message=current),
        ],
        excluded=[
            context_pb2.ContextItem(
                message=context_pb2.Message(
                    role=context_pb2.MESSAGE_ROLE_USER, parts=[text_part("left out")]
                )
            )
        ],
    )
    request = handler_pb2.HandleRequest(message=current, context=window)

    assert build_messages(request) == [
        {
            "role": "system",
            "content": "Summary of the earlier conversation:\nThey planned a trip.\n\n"
            "Remembered about this user and conversation:\n- Prefers short answers.",
        },
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Where to?"},
        {"role": "assistant", "content": "Lisbon."},
        {"role": "user", "content": "Tool output:\n{}"},
        {"role": "user", "content": "And now?"},
    ]


async def test_parameters_set_temperature_and_max_tokens_within_the_ceiling(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.text("a b c"), Reply.text("one two three four five"))
    handler = make(primary, max_output_tokens=50)

    await run(handler, make_call(parameters={"temperature": 0.3, "max_tokens": 5000}))
    _, result = await run(handler, make_call(parameters={"max_tokens": 3}))

    assert primary.requests[0].body["temperature"] == 0.3
    assert primary.requests[0].body["max_tokens"] == 50
    assert primary.requests[1].body["max_tokens"] == 3
    # The fake, like the API, stops at max_tokens and says why.
    assert result.parts[0].text == "one two three"
    assert result.finish_reason == "length"


@pytest.mark.parametrize(
    ("parameters", "complaint"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
    ],
)
async def test_bad_parameters_fail_before_any_request(
    primary: FakeOpenAI, make: Make, parameters: dict[str, Any], complaint: str
) -> None:
    _, failure = await fail(make(primary), make_call(parameters=parameters))

    assert complaint in failure.message
    assert primary.requests == []


async def test_usage_is_estimated_when_the_provider_sends_none(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.text("one two three", usage=False))
    handler = make(primary, count=lambda text: len(text.split()))

    _, result = await run(handler, make_call("What is it?"))

    # Three words of prompt plus 4 for the message's framing; three of answer.
    assert result.usage == handler_pb2.Usage(
        input_tokens=7, output_tokens=3, model=f"primary/{MODEL}", estimated=True, unpriced_calls=1
    )
    assert primary.requests[0].body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("prices", "expected"),
    [
        ({f"primary/{MODEL}": Price(2.0, 8.0), MODEL: Price(100.0, 100.0)}, 0.006),
        ({MODEL: Price(2.0, 8.0)}, 0.006),
        ({f"backup/{MODEL}": Price(2.0, 8.0)}, 0.0),
        ({}, 0.0),
    ],
)
async def test_cost_comes_from_the_price_table(
    primary: FakeOpenAI, make: Make, prices: dict[str, Price], expected: float
) -> None:
    primary.script(Reply.text("priced", usage=(1000, 500)))

    _, result = await run(make(primary, prices=prices), make_call())

    assert (result.usage.input_tokens, result.usage.output_tokens) == (1000, 500)
    assert result.usage.estimated_cost_usd == pytest.approx(expected)


async def test_a_server_that_ignores_stream_is_understood(primary: FakeOpenAI, make: Make) -> None:
    primary.script(Reply.text("all at once", ignore_stream=True, usage=(7, 3)))

    deltas, result = await run(make(primary), make_call())

    assert deltas == ["all at once"]
    assert result.parts[0].text == "all at once"
    assert (result.usage.input_tokens, result.usage.output_tokens) == (7, 3)


# -- retries ----------------------------------------------------------------


async def test_429_is_retried_then_succeeds(
    primary: FakeOpenAI, make: Make, sleeps: Sleeps
) -> None:
    primary.script(Reply.error(429, retry_after=0), Reply.text("ok"))

    deltas, _ = await run(make(primary), make_call())

    assert deltas == ["ok"]
    assert len(primary.requests) == 2
    assert sleeps.delays == []


async def test_5xx_is_retried_with_capped_exponential_full_jitter(
    primary: FakeOpenAI, make: Make, sleeps: Sleeps
) -> None:
    primary.script(
        Reply.error(500), Reply.error(503), Reply.error(502), Reply.error(500), Reply.text("ok")
    )
    jitter = CeilingRandom()
    handler = make(primary, max_retries=4, backoff_base_s=0.1, backoff_max_s=0.5, rng=jitter)

    _, result = await run(handler, make_call())

    assert result.parts[0].text == "ok"
    assert len(primary.requests) == 5
    assert jitter.ranges == [(0.0, 0.1), (0.0, 0.2), (0.0, 0.4), (0.0, 0.5)]
    assert sleeps.delays == [0.1, 0.2, 0.4, 0.5]
    assert handler.breaker_state("primary") == "closed"


async def test_retry_after_is_honoured_up_to_the_backoff_ceiling(
    primary: FakeOpenAI, make: Make, sleeps: Sleeps
) -> None:
    primary.script(
        Reply.error(429, retry_after=2), Reply.error(503, retry_after=100), Reply.text("ok")
    )

    await run(make(primary, backoff_max_s=5.0), make_call())

    assert sleeps.delays == [2.0, 5.0]


async def test_retry_after_beyond_the_deadline_fails_at_once(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.error(429, retry_after=60))
    # A real sleep: waiting out the Retry-After would take a minute.
    handler = make(primary, backoff_max_s=120.0, sleep=asyncio.sleep)

    started = time.monotonic()
    _, failure = await fail(handler, make_call(deadline_s=2.0))

    assert time.monotonic() - started < 1.0
    assert "HTTP 429" in failure.message
    assert "no time left to retry" in failure.message
    assert len(primary.requests) == 1


async def test_exhausted_retries_fail_with_a_summary(primary: FakeOpenAI, make: Make) -> None:
    primary.script(*[Reply.error(500, message="upstream exploded")] * 3)

    _, failure = await fail(make(primary, max_retries=2), make_call())

    assert failure.message == (
        "all LLM providers failed: primary: HTTP 500 (upstream exploded) after 3 attempts"
    )
    assert failure.retryable
    assert len(primary.requests) == 3


# -- fallback -----------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_client_errors_are_not_retried_but_fall_back(
    primary: FakeOpenAI, backup: FakeOpenAI, make: Make, status: int
) -> None:
    primary.script(Reply.error(status))
    backup.script(Reply.text("from backup"))

    deltas, result = await run(make(primary, backup), make_call())

    assert deltas == ["from", " backup"]
    assert result.usage.model == f"backup/{BACKUP_MODEL}"
    assert len(primary.requests) == 1
    assert backup.requests[0].body["model"] == BACKUP_MODEL


async def test_spent_quota_is_not_retried(
    primary: FakeOpenAI, backup: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.error(429, code="insufficient_quota", error_type="insufficient_quota"))
    backup.script(Reply.text("ok"))

    _, result = await run(make(primary, backup), make_call())

    assert result.usage.model == f"backup/{BACKUP_MODEL}"
    assert len(primary.requests) == 1


async def test_falls_back_along_the_chain_when_the_primary_keeps_failing(
    primary: FakeOpenAI, backup: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.error(500), Reply.error(502))
    backup.script(Reply.error(503), Reply.text("second time lucky"))

    _, result = await run(make(primary, backup, max_retries=1), make_call())

    assert result.parts[0].text == "second time lucky"
    assert result.usage.model == f"backup/{BACKUP_MODEL}"
    assert (len(primary.requests), len(backup.requests)) == (2, 2)


async def test_connection_errors_are_retried_then_fall_back(
    backup: FakeOpenAI, make: Make, sleeps: Sleeps
) -> None:
    gone = Provider("primary", f"http://127.0.0.1:{closed_port()}/v1", "", MODEL)
    backup.script(Reply.text("ok"))

    _, result = await run(make(gone, backup, max_retries=1), make_call())

    assert result.usage.model == f"backup/{BACKUP_MODEL}"
    assert len(sleeps.delays) == 1


async def test_when_every_provider_fails_each_is_named(
    primary: FakeOpenAI, backup: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.error(401, message="bad key"))
    backup.script(Reply.error(503, message="overloaded"))

    _, failure = await fail(make(primary, backup, max_retries=0), make_call())

    assert failure.message == (
        "all LLM providers failed: primary: HTTP 401 (bad key); backup: HTTP 503 (overloaded)"
    )


# -- circuit breaker ----------------------------------------------------------


async def test_breaker_opens_half_opens_closes_and_reopens(
    primary: FakeOpenAI, backup: FakeOpenAI, make: Make, clock: FakeClock
) -> None:
    backup.default = Reply.text("backup")
    handler = make(primary, backup, max_retries=0, breaker_failures=2, breaker_reset_s=30.0)

    primary.script(Reply.error(500), Reply.error(500))
    await run(handler, make_call())
    assert handler.breaker_state("primary") == "closed"
    await run(handler, make_call())
    assert handler.breaker_state("primary") == "open"

    # While open, nothing reaches the primary.
    _, result = await run(handler, make_call())
    assert result.usage.model == f"backup/{BACKUP_MODEL}"
    assert len(primary.requests) == 2

    clock.advance(29.9)
    assert handler.breaker_state("primary") == "open"
    clock.advance(0.2)
    assert handler.breaker_state("primary") == "half-open"

    # The trial call succeeds: closed again.
    primary.script(Reply.text("primary is back"))
    _, result = await run(handler, make_call())
    assert result.usage.model == f"primary/{MODEL}"
    assert handler.breaker_state("primary") == "closed"

    # Open it again; this time the trial fails and it reopens at once.
    primary.script(Reply.error(500), Reply.error(500))
    await run(handler, make_call())
    await run(handler, make_call())
    assert handler.breaker_state("primary") == "open"
    clock.advance(30.0)
    primary.script(Reply.error(503))
    _, result = await run(handler, make_call())
    assert result.usage.model == f"backup/{BACKUP_MODEL}"
    assert handler.breaker_state("primary") == "open"
    assert len(primary.requests) == 6
    clock.advance(29.0)
    assert handler.breaker_state("primary") == "open"


async def test_half_open_lets_one_trial_call_through(
    primary: FakeOpenAI, backup: FakeOpenAI, make: Make, clock: FakeClock
) -> None:
    backup.default = Reply.text("backup")
    handler = make(primary, backup, max_retries=0, breaker_failures=1, breaker_reset_s=10.0)
    primary.script(Reply.error(500))
    await run(handler, make_call())
    clock.advance(10.0)

    gate = asyncio.Event()
    primary.script(Reply.slow("trial answer", gate=gate))
    trial = asyncio.create_task(run(handler, make_call()))
    await asyncio.wait_for(primary.wait_requests(2), CALL_DEADLINE_S)

    # The trial is in flight: another call goes straight to the backup.
    _, other = await run(handler, make_call())
    assert other.usage.model == f"backup/{BACKUP_MODEL}"
    assert len(primary.requests) == 2
    assert handler.breaker_state("primary") == "half-open"

    gate.set()
    _, result = await trial
    assert result.parts[0].text == "trial answer"
    assert handler.breaker_state("primary") == "closed"


async def test_a_cancelled_trial_lets_the_next_call_try(
    primary: FakeOpenAI, backup: FakeOpenAI, make: Make, clock: FakeClock
) -> None:
    handler = make(primary, backup, max_retries=0, breaker_failures=1, breaker_reset_s=10.0)
    primary.script(Reply.error(500))
    backup.script(Reply.text("backup"))
    await run(handler, make_call())
    clock.advance(10.0)

    primary.script(Reply.slow(gate=asyncio.Event()), Reply.text("second trial"))
    trial = asyncio.create_task(run(handler, make_call()))
    await asyncio.wait_for(primary.wait_requests(2), CALL_DEADLINE_S)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial

    _, result = await run(handler, make_call())
    assert result.parts[0].text == "second trial"
    assert handler.breaker_state("primary") == "closed"


async def test_unavailable_only_while_every_breaker_is_open(
    primary: FakeOpenAI, backup: FakeOpenAI, make: Make, clock: FakeClock
) -> None:
    handler = make(primary, backup, max_retries=0, breaker_failures=1, breaker_reset_s=5.0)
    primary.script(Reply.error(500))
    backup.script(Reply.error(500))

    assert handler.available()
    _, failure = await fail(handler, make_call())
    assert not handler.available()

    _, failure = await fail(handler, make_call())
    assert failure.message == (
        "all LLM providers failed: primary: circuit open; backup: circuit open"
    )
    assert (len(primary.requests), len(backup.requests)) == (1, 1)
    clock.advance(5.0)
    assert handler.available()


async def test_a_rejected_request_does_not_count_against_the_provider(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.error(400), Reply.error(400))
    handler = make(primary, breaker_failures=1)

    await fail(handler, make_call())
    await fail(handler, make_call())

    assert handler.breaker_state("primary") == "closed"


# -- broken streams -------------------------------------------------------------


async def test_a_drop_before_any_delta_is_retried(primary: FakeOpenAI, make: Make) -> None:
    primary.script(Reply.drop_after(0), Reply.text("whole answer"))

    deltas, result = await run(make(primary), make_call())

    assert deltas == ["whole", " answer"]
    assert result.parts[0].text == "whole answer"
    assert len(primary.requests) == 2


async def test_a_drop_after_a_delta_fails_without_retry_or_fallback(
    primary: FakeOpenAI, backup: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.drop_after(2, text="one two three four"))
    backup.default = Reply.text("never")

    deltas, failure = await fail(make(primary, backup), make_call())

    assert deltas == ["one", " two"]
    assert failure.message.startswith("the LLM answer was cut off (primary: connection dropped")
    assert len(primary.requests) == 1
    assert backup.requests == []


async def test_a_malformed_chunk_before_any_delta_is_retried(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.malformed_after(0), Reply.text("fine"))

    _, result = await run(make(primary), make_call())

    assert result.parts[0].text == "fine"
    assert len(primary.requests) == 2


async def test_a_malformed_chunk_after_a_delta_fails(primary: FakeOpenAI, make: Make) -> None:
    primary.script(Reply.malformed_after(1, text="one two three"))

    deltas, failure = await fail(make(primary), make_call())

    assert deltas == ["one"]
    assert "cut off" in failure.message
    assert "malformed stream" in failure.message
    assert len(primary.requests) == 1


async def test_an_oversized_response_is_refused(primary: FakeOpenAI, make: Make) -> None:
    primary.script(Reply.text("x" * 5000))

    _, failure = await fail(make(primary, max_retries=0, max_response_bytes=1000), make_call())

    assert "larger than 1000 bytes" in failure.message


# -- deadline and cancellation --------------------------------------------------


async def test_the_deadline_bounds_the_wait_for_the_response(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.slow(gate=asyncio.Event()))

    started = time.monotonic()
    _, failure = await fail(make(primary), make_call(deadline_s=0.3))

    assert 0.25 < time.monotonic() - started < 2.0
    assert failure.message == "all LLM providers failed: primary: run deadline reached"
    await asyncio.wait_for(primary.wait_client_closed(), CALL_DEADLINE_S)


async def test_the_deadline_bounds_the_first_calls_import_of_its_http_client(
    primary: FakeOpenAI, make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process's first model call imports aiohttp in a worker thread; under load that
    # took seconds, past a run's deadline. The import here never ends on its own.
    gate = threading.Event()

    def slow_import(name: str) -> ModuleType:
        gate.wait(CALL_DEADLINE_S)
        return ModuleType(name)

    monkeypatch.setattr(imports, "_DONE", set())
    monkeypatch.setattr(imports, "_import_module", slow_import)
    try:
        started = time.monotonic()
        _, failure = await fail(make(primary), make_call(deadline_s=0.3))
        assert time.monotonic() - started < 2.0
    finally:
        gate.set()
    assert failure.message == "all LLM providers failed: primary: run deadline reached"
    assert primary.requests == []


async def test_the_deadline_bounds_the_wait_between_chunks(primary: FakeOpenAI, make: Make) -> None:
    primary.script(Reply.text("one two three", hold_after_chunks=1, hold=asyncio.Event()))

    started = time.monotonic()
    deltas, failure = await fail(make(primary), make_call(deadline_s=0.3))

    assert time.monotonic() - started < 2.0
    assert deltas == ["one"]
    assert failure.message == "the LLM answer was cut off (primary: run deadline reached)"


async def test_a_consumer_that_stops_reading_closes_the_connection(
    primary: FakeOpenAI, make: Make
) -> None:
    primary.script(Reply.text("one two three", hold_after_chunks=1, hold=asyncio.Event()))
    handler = make(primary)

    async with contextlib.aclosing(handler.handle(make_call())) as stream:
        first = await anext(stream)

    assert first.delta.text == "one"
    await asyncio.wait_for(primary.wait_client_closed(), CALL_DEADLINE_S)
    assert primary.client_closed_mid_response == 1
    assert handler.breaker_state("primary") == "closed"


@pytest.mark.parametrize("where", ["before the head", "mid-stream"])
async def test_cancelling_closes_the_connection(
    primary: FakeOpenAI, make: Make, where: str
) -> None:
    held = asyncio.Event()
    if where == "mid-stream":
        primary.script(Reply.text("one two three", hold_after_chunks=1, hold=held))
    else:
        primary.script(Reply.slow(gate=held))
    handler = make(primary)
    frames: list[Frame] = []
    first = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(handler.handle(make_call())) as stream:
            async for frame in stream:
                frames.append(frame)
                first.set()

    task = asyncio.create_task(consume())
    if where == "mid-stream":
        await asyncio.wait_for(first.wait(), CALL_DEADLINE_S)
    else:
        await asyncio.wait_for(primary.wait_requests(1), CALL_DEADLINE_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await asyncio.wait_for(primary.wait_client_closed(), CALL_DEADLINE_S)
    assert primary.client_closed_mid_response == 1
    assert [frame.delta.text for frame in frames] == (["one"] if where == "mid-stream" else [])
    # Cancelling says nothing about the provider.
    assert handler.breaker_state("primary") == "closed"


# -- secrets --------------------------------------------------------------------


async def test_the_key_is_sent_as_a_bearer_token_and_never_shown(
    backup: FakeOpenAI, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeOpenAI(api_key=KEY) as keyed:
        keyed.script(Reply.text("authorized"))
        # A provider that echoes the key back in full, and then some.
        backup.script(Reply.error(500, message=f"Incorrect API key provided: {KEY}. " + "x" * 500))
        handler = make(
            Provider("primary", keyed.url, KEY, MODEL),
            Provider("backup", backup.url, KEY, BACKUP_MODEL),
            max_retries=0,
        )

        await run(handler, make_call())
        assert keyed.requests[0].headers["authorization"] == f"Bearer {KEY}"

        keyed.script(Reply.error(401, message=f"Incorrect API key provided: {KEY}"))
        _, failure = await fail(handler, make_call())

    assert KEY not in failure.message
    assert "[redacted]" in failure.message
    assert len(failure.message) < 600
    assert caplog.records
    for record in caplog.records:
        assert KEY not in record.getMessage()
        assert KEY not in json.dumps(record.__dict__, default=str)
    assert KEY not in caplog.text
    assert KEY not in repr(handler.config)


# -- configuration ---------------------------------------------------------------


def test_parse_providers() -> None:
    text = json.dumps(
        [
            {"name": "openai", "base_url": "https://api.openai.com/v1/", "api_key": KEY,
             "model": "gpt-4o-mini"},
            {"name": "local", "base_url": "http://127.0.0.1:8000/v1", "model": "llama"},
        ]
    )  # fmt: skip

    providers = parse_providers(text)

    assert providers == (
        Provider("openai", "https://api.openai.com/v1", KEY, "gpt-4o-mini"),
        Provider("local", "http://127.0.0.1:8000/v1", "", "llama"),
    )
    assert parse_providers("  ") == ()
    assert KEY not in repr(providers)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (f'[{{"name": "a", "api_key": "{KEY}"', "not valid JSON"),
        ('{"name": "a"}', "expected a JSON list"),
        ('["a"]', "item 0: expected an object"),
        ('[{"name": "a", "base_url": "http://x", "model": "m", "apikey": "k"}]', "'apikey'"),
        ('[{"name": "a", "base_url": "http://x"}]', "'model' must be a string"),
        ('[{"name": "a", "base_url": "ftp://x", "model": "m"}]', "http(s)://"),
        ('[{"name": "a/b", "base_url": "http://x", "model": "m"}]', "without '/'"),
        (
            '[{"name": "a", "base_url": "http://x", "model": "m"},'
            ' {"name": "a", "base_url": "http://y", "model": "n"}]',
            "unique",
        ),
    ],
)
def test_parse_providers_refuses_bad_input(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match="LLM providers") as caught:
        parse_providers(text)
    assert complaint in str(caught.value)
    assert KEY not in str(caught.value)


def test_parse_prices() -> None:
    assert parse_prices(
        '{"gpt-4o-mini": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},'
        ' "local/llama": {"input_per_mtok": 0, "output_per_mtok": 0}}'
    ) == {"gpt-4o-mini": Price(0.15, 0.6), "local/llama": Price(0.0, 0.0)}
    assert parse_prices("") == {}


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("[1]", "expected a JSON object"),
        ('{"m": {"input_per_mtok": 1}}', "exactly"),
        ('{"m": {"input_per_mtok": true, "output_per_mtok": 1}}', "numbers"),
        ('{"m": {"input_per_mtok": -1, "output_per_mtok": 1}}', "not negative"),
        ("{", "not valid JSON"),
    ],
)
def test_parse_prices_refuses_bad_input(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match="LLM prices") as caught:
        parse_prices(text)
    assert complaint in str(caught.value)


def test_config_refuses_an_empty_or_ambiguous_chain() -> None:
    with pytest.raises(ValueError, match="at least one"):
        LlmConfig(providers=())
    same = Provider("a", "http://x", "", "m")
    with pytest.raises(ValueError, match="unique"):
        LlmConfig(providers=(same, same))


# -- the handler's shape ---------------------------------------------------------


async def test_is_a_handler_named_llm(primary: FakeOpenAI, make: Make) -> None:
    handler = make(primary)

    assert isinstance(handler, Handler)
    assert handler.kind == dispatcher_pb2.HANDLER_KIND_LLM
    assert handler.capabilities.id == "llm"
    assert handler.capabilities.streaming
    schema = handler.capabilities.parameters_schema
    assert schema.fields["properties"].struct_value.fields["max_tokens"].struct_value.fields[
        "maximum"
    ].number_value == pytest.approx(1024)


async def test_after_aclose_calls_fail(primary: FakeOpenAI, make: Make) -> None:
    primary.script(Reply.text("before"))
    handler = make(primary)
    await run(handler, make_call())

    await handler.aclose()
    _, failure = await fail(handler, make_call())

    assert "shut down" in failure.message
    assert len(primary.requests) == 1


def test_the_module_does_not_import_grpc() -> None:
    probe = "import sys, switchboard.dispatcher.llm.handler; print('grpc' in sys.modules)"
    output = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "False"


# -- the fake itself ---------------------------------------------------------------


def sse_events(body: str) -> Iterator[str]:
    for block in body.split("\n\n"):
        if block:
            assert block.startswith("data: ")
            yield block.removeprefix("data: ")


async def test_the_fake_speaks_the_api_protocol(primary: FakeOpenAI) -> None:
    primary.script(Reply.text("hi there"), Reply.text("no usage"))
    request = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    async with httpx.AsyncClient(base_url=primary.url) as client:
        streamed = await client.post(
            "/chat/completions", json={**request, "stream_options": {"include_usage": True}}
        )
        plain = await client.post("/chat/completions", json=request)
        unknown = await client.get("/models/nope")
        invalid = await client.post("/chat/completions", json={"model": MODEL, "messages": []})

    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.headers["transfer-encoding"] == "chunked"
    events = list(sse_events(streamed.text))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["hi", " there"]
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert chunks[4]["choices"] == []
    assert chunks[4]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}

    assert all("usage" not in json.loads(event) for event in list(sse_events(plain.text))[:-1])
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_url"
    assert invalid.status_code == 400
    assert set(invalid.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_from_the_provider_is_its_answer_never_followed(
    status: int, primary: FakeOpenAI, make: Make
) -> None:
    """The 3xx is the provider's answer (a failure naming it); the place it points to,
    another server that would answer, is never asked, and the key goes nowhere else."""
    primary.default = Reply.text("followed")
    asked: list[bytes] = []

    async def redirecting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(await reader.readuntil(b"\r\n\r\n"))
        location = f"{primary.url}/chat/completions"
        writer.write(
            f"HTTP/1.1 {status} Moved\r\nLocation: {location}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(redirecting, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        handler = make(Provider("primary", f"http://127.0.0.1:{port}/v1", KEY, MODEL))
        deltas, failure = await fail(handler, make_call())
    finally:
        server.close()
        await server.wait_closed()

    assert deltas == []
    assert f"HTTP {status}" in failure.message
    assert KEY not in failure.message
    assert len(asked) >= 1
    assert asked[0].startswith(b"POST /v1/chat/completions ")
    assert primary.requests == []
