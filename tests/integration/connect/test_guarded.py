"""Every way a connector call can end has a verdict for the breaker and a status for the caller.

``Connections.guarded`` with in-memory breakers on a clock the test moves (the
same set-up as tests/integration/test_integration_domain.py): a malformed answer
(``Malformed``, or a ``JsonRejected`` a connector let through) and anything
nobody foresaw count against the integration until its circuit opens, and come
out UNAVAILABLE without the exception's text; cancellation and refusals on our
side say nothing about the integration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from switchboard.integration.connect.connections import Connections, Limits
from switchboard.integration.ports.connectors import Malformed
from switchboard.platform.errors import CircuitOpen, Code, DependencyUnavailable, InvalidArgument
from switchboard.platform.resilience.breaker import Breakers, BreakerState
from switchboard.platform.values.jsonbounds import JsonRejected, too_deep
from tests.infra.clock import FakeClock
from tests.integration import test_integration_domain as domain
from tests.integration.test_integration_domain import NAME, SECRETS, Built, record

pytestmark = pytest.mark.unit

SECRET_TEXT = "token=s3cr3t from the server's answer"


# The domain tests' clock and breakers, bound under the names the tests here take.
clock, breakers = domain.clock, domain.breakers


@pytest.fixture
async def connections(breakers: Breakers) -> AsyncIterator[Connections]:
    made = Connections(Built(), SECRETS, breakers, Limits())
    yield made
    await made.close()


def raising(error: BaseException) -> object:
    async def call() -> None:
        raise error

    return call


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (Malformed("the agent card at '10.0.0.1' is nested deeper than 24 levels"), "nested"),
        (too_deep(24), "a message nested deeper than 24 levels"),
        (JsonRejected("syntax", "not valid JSON (line 1 column 2)"), "not valid JSON"),
    ],
)
async def test_a_malformed_answer_counts_until_the_circuit_opens(
    connections: Connections, breakers: Breakers, clock: FakeClock, error: Exception, words: str
) -> None:
    for _ in range(2):
        with pytest.raises(DependencyUnavailable) as failed:
            await connections.guarded(record(), raising(error), 5)  # type: ignore[arg-type]
        assert failed.value.code == Code.UNAVAILABLE
        assert failed.value.message.startswith(f"{NAME} gave a malformed answer: ")
        assert words in failed.value.message
    assert breakers.state(NAME) == BreakerState("open", 2, clock.now + 10)
    with pytest.raises(CircuitOpen):
        await connections.guarded(record(), raising(error), 5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(SECRET_TEXT),
        KeyError(SECRET_TEXT),
        RecursionError(SECRET_TEXT),
        ExceptionGroup("group", [ValueError(SECRET_TEXT)]),
    ],
)
async def test_an_unforeseen_exception_counts_is_logged_and_says_nothing(
    connections: Connections,
    breakers: Breakers,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:
    caplog.set_level(logging.ERROR, logger="switchboard.integration")
    for _ in range(2):
        with pytest.raises(DependencyUnavailable) as failed:
            await connections.guarded(record(), raising(error), 5)  # type: ignore[arg-type]
        assert failed.value.code == Code.UNAVAILABLE
        assert SECRET_TEXT not in failed.value.message
        assert "failed unexpectedly" in failed.value.message
    assert breakers.state(NAME).state == "open"
    logged = [r for r in caplog.records if r.getMessage() == "integration call failed unexpectedly"]
    assert len(logged) == 2
    assert logged[0].exc_info is not None
    assert logged[0].exc_info[1] is error
    assert logged[0].__dict__["integration"] == NAME


async def test_cancellation_and_our_own_refusals_say_nothing_about_the_integration(
    connections: Connections, breakers: Breakers
) -> None:
    refusal = InvalidArgument("endpoint must be a URL")
    for _ in range(3):
        with pytest.raises(InvalidArgument) as refused:
            await connections.guarded(record(), raising(refusal), 5)  # type: ignore[arg-type]
        assert refused.value is refusal
    started = asyncio.Event()

    async def held() -> None:
        started.set()
        await asyncio.Event().wait()

    for _ in range(3):
        call = asyncio.create_task(connections.guarded(record(), held, 5))
        await started.wait()
        started.clear()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    assert breakers.state(NAME) == BreakerState("closed", 0, None)
