"""Client interceptors: the bearer on every call, deadlines, safe retries, typed errors.

One policy, applied by an interceptor for each of the four call shapes. Every
call that needs a credential gets ``authorization: Bearer ...`` from the token
keeper (renewed first when due). Every call whose request names a conversation
(or a run of it) gets the routing header (``affinity``); a bidirectional call's
requests come later, so whoever opens one adds it. Unary calls additionally get:

- a deadline (the client's default when the caller gave none), which bounds
  all attempts together, waits included;
- one retry after UNAUTHENTICATED, once the keeper renewed the session (or
  another caller did);
- retries after UNAVAILABLE, or RESOURCE_EXHAUSTED with a ``RetryInfo``, only
  when repeating the request cannot do anything twice (``methods.safe_to_repeat``),
  with capped exponential backoff and never sooner than the server's
  ``RetryInfo`` asks;
- errors raised as the typed classes of ``errors`` (still ``AioRpcError``\\ s).

Streams only get the bearer: a stream that breaks is resumed by the code that
knows its position (``events.Follower``, ``runs.RunWatch``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio

from switchboard.client.backoff import Backoff
from switchboard.client.errors import (
    DeadlineExceeded,
    SwitchboardError,
    Unauthenticated,
    from_rpc_error,
)
from switchboard.client.session import TokenKeeper
from switchboard.client.transport.affinity import AFFINITY_HEADER, affinity
from switchboard.client.transport.methods import Method, method_of, safe_to_repeat

log = logging.getLogger("switchboard.client")

AUTHORIZATION = "authorization"


@dataclass(frozen=True)
class RetryPolicy:
    """How unary calls are retried (only those safe to repeat).

    By default a call is retried until its deadline, however many attempts
    that takes: the deadline is what the caller chose to wait, and a server
    restarting takes a few seconds. ``max_attempts`` caps them as well.
    """

    #: Attempts in all, the first included; None: as many as the deadline allows.
    max_attempts: int | None = None
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")


def retryable(error: SwitchboardError) -> bool:
    """Whether ``error`` says "try again later" (the request's safety is asked separately)."""
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_delay_s is not None


def _has(metadata: Iterable[tuple[str, Any]] | None, name: str) -> bool:
    return any(key == name for key, _ in metadata or ())


class CallPolicy:
    """The bearer, deadlines, retries and typed errors of one client's channel.

    gRPC takes one interceptor object per call shape (an object that is several
    is registered for the first only), so ``interceptors()`` hands out one of
    each, all applying this policy.
    """

    def __init__(
        self, keeper: TokenKeeper, *, default_timeout_s: float, retry: RetryPolicy
    ) -> None:
        self._keeper = keeper
        self._timeout_s = default_timeout_s
        self._retry = retry

    def interceptors(self) -> list[Any]:
        return [_UnaryUnary(self), _UnaryStream(self), _StreamUnary(self), _StreamStream(self)]

    async def prepare(
        self,
        details: aio.ClientCallDetails,
        method: Method,
        call_timeout: float | None,
        request: object = None,
    ) -> tuple[aio.ClientCallDetails, str]:
        """``details`` with the bearer, the routing header for ``request`` and
        ``call_timeout``; and the bearer added ('' if none).

        A caller's own ``authorization`` metadata wins: such a call presents what
        it was given, and is never refreshed for. So does its own routing header.
        """
        metadata = aio.Metadata()
        for key, value in details.metadata or ():
            metadata.add(key, value)
        key = affinity(request)
        if key and not _has(details.metadata, AFFINITY_HEADER):
            metadata.add(AFFINITY_HEADER, key)
        bearer = ""
        if not method.public and not _has(details.metadata, AUTHORIZATION):
            bearer = await self._keeper.bearer()
            if bearer:
                metadata.add(AUTHORIZATION, f"Bearer {bearer}")
        prepared = aio.ClientCallDetails(
            details.method, call_timeout, metadata, details.credentials, details.wait_for_ready
        )
        return prepared, bearer

    async def unary(self, continuation: Any, details: aio.ClientCallDetails, request: Any) -> Any:
        method = method_of(details.method)
        budget = details.timeout if details.timeout is not None else self._timeout_s
        deadline = time.monotonic() + budget
        attempt, reauthenticated = 0, False
        while True:
            try:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    prepared, used = await self.prepare(
                        details, method, max(deadline - time.monotonic(), 0.001), request
                    )
                    call = await continuation(prepared, request)
                    try:
                        await call
                        return call
                    except aio.AioRpcError as raw:
                        error = from_rpc_error(raw)
                    if isinstance(error, Unauthenticated) and used:
                        if not reauthenticated:
                            reauthenticated = True
                            await self._keeper.rejected(used, error)
                            continue
                        raise await self._keeper.refused_again(used, error)
            except TimeoutError:
                raise DeadlineExceeded(f"{method.path}: no answer within {budget:g} s") from None
            if not self._retry_later(error, method, request, attempt, deadline):
                raise error
            delay = self._retry.backoff.delay(attempt, at_least_s=error.retry_delay_s)
            attempt += 1
            log.info(
                "retrying %s in %.2f s (attempt %d): %s", method.path, delay, attempt + 1, error
            )
            await asyncio.sleep(delay)

    def _retry_later(
        self,
        error: SwitchboardError,
        method: Method,
        request: object,
        attempt: int,
        deadline: float,
    ) -> bool:
        limit = self._retry.max_attempts
        if limit is not None and attempt + 1 >= limit:
            return False
        if not retryable(error) or not safe_to_repeat(method, request):
            return False
        # The wait never shorter than RetryInfo asks: if that does not fit in
        # the deadline, the caller hears the server's answer now.
        soonest = self._retry.backoff.delay(attempt, at_least_s=error.retry_delay_s)
        return time.monotonic() + soonest < deadline

    async def stream(self, continuation: Any, details: aio.ClientCallDetails, request: Any) -> Any:
        method = method_of(details.method)
        prepared, _ = await self.prepare(details, method, details.timeout, request)
        return await continuation(prepared, request)


class _UnaryUnary(aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, policy: CallPolicy) -> None:
        self._policy = policy

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._policy.unary(continuation, client_call_details, request)


class _UnaryStream(aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, policy: CallPolicy) -> None:
        self._policy = policy

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await self._policy.stream(continuation, client_call_details, request)


class _StreamUnary(aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, policy: CallPolicy) -> None:
        self._policy = policy

    async def intercept_stream_unary(
        self,
        continuation: Any,
        client_call_details: aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await self._policy.stream(continuation, client_call_details, request_iterator)


class _StreamStream(aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, policy: CallPolicy) -> None:
        self._policy = policy

    async def intercept_stream_stream(
        self,
        continuation: Any,
        client_call_details: aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await self._policy.stream(continuation, client_call_details, request_iterator)


def _loop_time(monotonic_deadline: float) -> float:
    """A ``time.monotonic`` instant on the running loop's clock."""
    return asyncio.get_running_loop().time() + (monotonic_deadline - time.monotonic())
