"""The ``llm`` handler's provider client: one model call, retried and failed over.

A model call is one streamed ``POST {base_url}/chat/completions``, sent to
the providers of a chain in order. Failures are absorbed only while they are
invisible: until the first text of the run has reached the caller, a 429, a
5xx, a dropped connection or a garbled stream is retried with backoff on the
same provider and then handed to the next provider in the chain. Once text
has been shown, a failure ends the run with a ``HandlerFailure``: silently
starting the answer again would show the user a different answer spliced onto
the first. A circuit breaker per provider keeps a provider that keeps failing
from costing every run its retries.

Every wait is bounded by the run's deadline, every message and log line is
free of API keys, and cancelling the run closes the provider's connection, so
the provider stops generating (and billing for) an answer nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import httpx

from switchboard.dispatcher.handlers.base import HandlerFailure
from switchboard.dispatcher.llm.config import LlmConfig, Provider
from switchboard.dispatcher.llm.conversation.images import for_model
from switchboard.dispatcher.llm.stream import (
    AttemptFailed,
    Outcome,
    check_calls,
    deadline_failure,
    error_detail,
    events,
    parse_chunk,
    parse_completion,
    scrub,
)
from switchboard.platform.imports import imported
from switchboard.platform.observe.telemetry import http_request_span
from switchboard.platform.resilience.backoff import retry_after
from switchboard.platform.resilience.breaker import CircuitBreaker

# aiohttp is imported with the connection pool (``ProviderClient._http``), at the first
# model call: a process whose runs never reach a model does not load it.
if TYPE_CHECKING:
    import aiohttp

# The handler's logger: one name for every part of it, as before it was split.
log = logging.getLogger("switchboard.dispatcher.llm")

# Enough for any JSON error body; the rest of a non-2xx body is not read.
MAX_ERROR_BODY_BYTES: Final = 16 * 1024
_LINGER_S: Final = 0.5
# Request-specific rejections: the provider is up and answering, the request is
# what it refuses, so they say nothing about the provider's health.
_REQUEST_REJECTIONS: Final = frozenset({400, 413, 422})


def _all_failed(failures: list[tuple[str, bool]]) -> HandlerFailure:
    """The run's failure once no provider is left; retryable if any failure was passing."""
    return HandlerFailure(
        "all LLM providers failed: " + "; ".join(summary for summary, _ in failures),
        retryable=any(passing for _, passing in failures),
    )


def _unforeseen(provider: Provider, exc: Exception) -> AttemptFailed:
    """An attempt that failed in a way nobody foresaw (a bug, or an answer that broke
    the client): a failure of the attempt like any other, with its traceback logged
    (not in the run's status: it may quote the provider's answer)."""
    log.error(
        "LLM provider %s: the attempt failed unexpectedly",
        provider.name,
        exc_info=(type(exc), exc, exc.__traceback__),
        extra={"provider": provider.name},
    )
    return AttemptFailed(f"the answer could not be read ({type(exc).__name__})", retryable=True)


class _Deadline:
    """The run's deadline over one response's body: reached, it closes the response."""

    __slots__ = ("_response", "reached")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.reached = False

    def reach(self) -> None:
        self.reached = True
        self._response.close()


@dataclass
class Answer:
    """One model call's answer, and whether the run has shown text so far.

    ``shown`` comes in true when an earlier pass (or an attempt before a
    restart) showed text, and turns true as this call's first text is relayed.
    """

    shown: bool = False
    outcome: Outcome = field(default_factory=Outcome)
    #: The provider that gave the answer; ``None`` until one did.
    provider: Provider | None = None


class ProviderClient:
    """Sends model calls along a chain of providers; owns the connection pool
    and a circuit breaker per provider.

    The HTTP client is aiohttp, not httpx as elsewhere: a streamed answer costs a read
    per token, and httpx's (over httpcore and anyio, h11 in Python) took about six
    times aiohttp's CPU per chunk, whose parser is C (decisions 44).

    ``clock``, ``sleep`` and ``rng`` exist so tests can drive time and jitter.
    """

    def __init__(
        self,
        config: LlmConfig,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        rng: random.Random | None,
    ) -> None:
        self._config = config
        self._sleep = sleep
        # Jitter spreads retries out; it has nothing to do with security.
        self._rng = rng or random.Random()  # noqa: S311
        self._breakers = {
            provider.name: CircuitBreaker(
                failures=config.breaker_failures, reset_s=config.breaker_reset_s, clock=clock
            )
            for provider in config.providers
        }
        self._secrets = tuple(p.api_key for p in config.providers if p.api_key)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def available(self) -> bool:
        """Whether any provider's circuit lets a call through."""
        return any(breaker.state != "open" for breaker in self._breakers.values())

    def breaker_state(self, provider_name: str) -> str:
        """``closed``, ``open`` or ``half-open``; ``KeyError`` for an unknown provider."""
        return self._breakers[provider_name].state

    async def aclose(self) -> None:
        """Close the connection pool; later calls fail."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        """The connection pool, made on first use (it belongs to the running loop)."""
        import aiohttp

        if self._closed:
            raise HandlerFailure("the LLM handler is shut down", retryable=True)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._config.max_connections,
                    limit_per_host=0,
                    # The trust store httpx used here before (certifi, SSL_CERT_FILE).
                    ssl=httpx.create_ssl_context(),
                ),
                headers={"User-Agent": "switchboard-llm/1"},
                # Proxies from the environment apply to the provider, as they did.
                trust_env=True,
                # Every request sets its own timeouts from the run's deadline.
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self._config.backoff_max_s)
        ceiling = min(self._config.backoff_max_s, self._config.backoff_base_s * 2**retry)
        return self._rng.uniform(0.0, ceiling)

    async def ask(
        self,
        chain: tuple[Provider, ...],
        request: dict[str, Any],
        remaining: Callable[[], float],
        answer: Answer,
    ) -> AsyncGenerator[str, None]:
        """One model call: yields its text as it streams and sets ``answer``;
        retries and falls back along ``chain`` as long as nothing of the run
        was shown.

        ``request`` is the request body without ``model`` (each provider of
        the chain is asked for its own); ``remaining`` says the seconds left
        before the run's deadline. Raises ``HandlerFailure`` once no attempt
        may follow.
        """
        failures: list[tuple[str, bool]] = []
        for provider in chain:
            breaker = self._breakers[provider.name]
            body: dict[str, Any] = {"model": provider.model, **request}
            # Image parts for a model with vision, their notes for one without.
            if "messages" in request:
                body["messages"] = for_model(request["messages"], provider.vision)
            retry = 0
            while True:
                if remaining() <= 0:
                    if answer.shown:
                        raise HandlerFailure(
                            f"the LLM answer was cut off ({provider.name}: run deadline reached)",
                            retryable=True,
                        )
                    failures.append((f"{provider.name}: run deadline reached", True))
                    raise _all_failed(failures)
                if not breaker.allow():
                    failures.append((f"{provider.name}: circuit open", True))
                    break
                outcome = Outcome()
                try:
                    async with contextlib.aclosing(
                        self._attempt(provider, body, remaining, outcome)
                    ) as texts:
                        async for text in texts:
                            answer.shown = True
                            yield text
                except HandlerFailure:
                    breaker.released()  # the handler is shut down: nothing was asked
                    raise
                except Exception as exc:  # noqa: BLE001 - each is an attempt's failure
                    failed = exc if isinstance(exc, AttemptFailed) else _unforeseen(provider, exc)
                    delay = self._after_failure(
                        provider, failed, retry, remaining, failures, shown=answer.shown
                    )
                    if delay is None:
                        break
                    if delay > 0:
                        await self._sleep(delay)
                    retry += 1
                    continue
                except BaseException:
                    # Cancelled, or closed by the consumer: no verdict on the provider.
                    breaker.released()
                    raise
                breaker.succeeded()
                answer.outcome, answer.provider = outcome, provider
                return
        raise _all_failed(failures)

    def _after_failure(
        self,
        provider: Provider,
        exc: AttemptFailed,
        retry: int,
        remaining: Callable[[], float],
        failures: list[tuple[str, bool]],
        *,
        shown: bool,
    ) -> float | None:
        """Account for a failed attempt: the delay before the next one on this
        provider, or ``None`` to move on; raises when no attempt may follow."""
        breaker = self._breakers[provider.name]
        if exc.counts:
            breaker.failed()
        else:
            breaker.released()
        log.warning(
            "LLM provider %s failed (attempt %d): %s",
            provider.name,
            retry + 1,
            exc.summary,
            extra={
                "provider": provider.name,
                "attempt": retry + 1,
                "detail": exc.summary,
                "streamed": shown,
                "breaker": breaker.state,
            },
        )
        if shown:
            # Text of this run was shown (maybe in an earlier pass): another
            # attempt would splice a different answer onto it.
            raise HandlerFailure(
                f"the LLM answer was cut off ({provider.name}: {exc.summary})", retryable=True
            )
        if exc.deadline:
            failures.append((f"{provider.name}: {exc.summary}", True))
            raise _all_failed(failures)
        tries = f" after {retry + 1} attempts" if retry else ""
        if not exc.retryable or retry >= self._config.max_retries:
            note = ""
        elif breaker.state != "closed":
            note = ", circuit opened"
        else:
            delay = self._backoff(retry, exc.retry_after)
            # Sleeping into the deadline would only turn this failure into a later one.
            if delay < remaining():
                return delay
            note = ", no time left to retry"
        failures.append((f"{provider.name}: {exc.summary}{tries}{note}", exc.retryable))
        return None

    async def _attempt(
        self,
        provider: Provider,
        body: dict[str, Any],
        remaining: Callable[[], float],
        outcome: Outcome,
    ) -> AsyncGenerator[str, None]:
        """One POST; yields the answer's text pieces, raises ``AttemptFailed``."""
        # The process's first model call imports aiohttp in a worker thread, not on
        # the loop every other call shares; within the run's deadline like the rest
        # (the import goes on in its thread, for the next call).
        try:
            async with asyncio.timeout(max(remaining(), 0.0)):
                await imported("aiohttp")
        except TimeoutError:
            raise deadline_failure() from None
        response = await self._open(self._http(), provider, body, remaining)
        # One timer for the whole body rather than a timeout per read (a read per token):
        # at the deadline the response is closed, which ends the read waiting on it.
        deadline = _Deadline(response)
        timer = asyncio.get_running_loop().call_later(max(remaining(), 0.0), deadline.reach)
        try:
            if response.status != 200:
                raise self._status_failure(response, await self._read_error(response, deadline))
            if response.headers.get("content-type", "").startswith("application/json"):
                # A server that ignores ``stream`` answers in one piece.
                text = await self._read_whole(response, deadline, outcome)
                if text:
                    outcome.pieces.append(text)
                    yield text
                return
            chunks = response.content.iter_any()
            limit = self._config.max_response_bytes
            async with contextlib.aclosing(
                events(functools.partial(self._next, chunks, deadline), limit)
            ) as datas:
                async for data in datas:
                    if data == b"[DONE]":
                        outcome.done = True
                        break
                    for text in parse_chunk(data, outcome, limit, self._secrets):
                        outcome.pieces.append(text)
                        yield text
                if outcome.done:
                    await self._linger(datas, remaining)
            if not outcome.done and not outcome.finish_reason:
                raise AttemptFailed("stream ended before the answer was complete", retryable=True)
            check_calls(outcome)
        finally:
            timer.cancel()
            if response.content.at_eof() and not deadline.reached:
                response.release()  # read to its end: the connection is reused
            else:
                # Cancelled or failed mid-answer: the provider stops generating it.
                response.close()

    async def _open(
        self,
        session: aiohttp.ClientSession,
        provider: Provider,
        body: dict[str, Any],
        remaining: Callable[[], float],
    ) -> aiohttp.ClientResponse:
        """Send the request and wait for the response's head, within the deadline."""
        import aiohttp

        left = remaining()
        if left <= 0:
            raise deadline_failure()
        headers = {"Accept": "text/event-stream"}
        if provider.api_key:
            headers["Authorization"] = f"Bearer {provider.api_key}"
        url = f"{provider.base_url}/chat/completions"
        # No sock_read: the body's reads are bounded by the run's deadline (``_Deadline``),
        # and the head's by the timeout below.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(self._config.connect_timeout_s, left)
        )
        try:
            with http_request_span("POST", url, headers) as answered:
                # The socket timeouts bound each step; this bounds them all together.
                async with asyncio.timeout(left):
                    response = await session.post(
                        url, json=body, headers=headers, timeout=timeout, allow_redirects=False
                    )
                answered(response.status)
                return response
        except aiohttp.ConnectionTimeoutError:
            raise AttemptFailed("connect timed out", retryable=True) from None
        except TimeoutError:
            raise deadline_failure() from None
        except aiohttp.ClientError as exc:
            raise self._transport_failure("connection failed", exc) from None

    async def _linger(
        self, datas: AsyncGenerator[bytes, None], remaining: Callable[[], float]
    ) -> None:
        """Read the body's end after ``[DONE]``, briefly, so the connection can be reused.

        Closing a response before its last chunk has been read closes the
        connection; a server that keeps the stream open after ``[DONE]`` is
        only given a moment, since the answer is already complete.
        """
        with contextlib.suppress(TimeoutError, AttemptFailed):
            async with asyncio.timeout(min(remaining(), _LINGER_S)):
                async for _ in datas:
                    pass

    def _transport_failure(self, what: str, exc: Exception) -> AttemptFailed:
        detail = scrub(str(exc), self._secrets)
        summary = f"{what} ({type(exc).__name__}{': ' + detail if detail else ''})"
        return AttemptFailed(summary, retryable=True)

    def _status_failure(self, response: aiohttp.ClientResponse, body: bytes) -> AttemptFailed:
        status = response.status
        message, code = error_detail(body)
        detail = scrub(message, self._secrets)
        summary = f"HTTP {status}" + (f" ({detail})" if detail else "")
        if status == 429:
            # A spent quota is not a rate limit: waiting does not bring it back.
            quota = code == "insufficient_quota"
            return AttemptFailed(
                summary, retryable=not quota, retry_after=retry_after(response.headers)
            )
        if status >= 500:
            return AttemptFailed(summary, retryable=True, retry_after=retry_after(response.headers))
        return AttemptFailed(summary, retryable=False, counts=status not in _REQUEST_REJECTIONS)

    async def _next(self, chunks: AsyncIterator[bytes], deadline: _Deadline) -> bytes | None:
        try:
            chunk = await anext(chunks, None)
        except Exception as exc:
            # aiohttp is looked up only when a read fails, not on every chunk (a chunk per
            # token): ``_http`` has imported it by now.
            import aiohttp

            if not isinstance(exc, aiohttp.ClientError):
                raise
            if deadline.reached:
                raise deadline_failure() from None
            raise self._transport_failure("connection dropped", exc) from None
        if deadline.reached:
            raise deadline_failure()
        return chunk

    async def _read_error(self, response: aiohttp.ClientResponse, deadline: _Deadline) -> bytes:
        body = bytearray()
        chunks = response.content.iter_any()
        with contextlib.suppress(AttemptFailed):
            while len(body) < MAX_ERROR_BODY_BYTES:
                chunk = await self._next(chunks, deadline)
                if chunk is None:
                    break
                body += chunk
        return bytes(body[:MAX_ERROR_BODY_BYTES])

    async def _read_whole(
        self, response: aiohttp.ClientResponse, deadline: _Deadline, outcome: Outcome
    ) -> str:
        body = bytearray()
        chunks = response.content.iter_any()
        while (chunk := await self._next(chunks, deadline)) is not None:
            body += chunk
            if len(body) > self._config.max_response_bytes:
                raise AttemptFailed(
                    f"response larger than {self._config.max_response_bytes} bytes",
                    retryable=True,
                )
        return parse_completion(bytes(body), outcome, self._config.max_response_bytes)
