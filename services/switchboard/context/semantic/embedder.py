"""Embeddings through an OpenAI-compatible endpoint (``ports.Embedder``).

``POST {url}/embeddings`` with ``{"model", "input": [...], "encoding_format":
"float"}`` (and ``dimensions`` when the model's are asked for, > 0), through
the egress policy's HTTP client, with the bearer key in a header (never
logged). Texts go in batches of ``batch`` texts and at most ``max_batch_chars``
characters, at most ``concurrency`` requests in flight in this process; every
request has a timeout. A 429, a 5xx, a timeout or a connection failure is
retried up to ``attempts`` times with full-jitter backoff, never sooner than
the endpoint's ``Retry-After`` (capped at ``retry_after_cap_s``). A circuit
breaker per endpoint opens after ``breaker_failures`` failed requests in a
row, so an endpoint that is down costs one refusal, not a timeout per batch.

The answer is checked before anything is returned: one vector per input, every
index present once, every vector of the expected length (asked dimensions, or
the first answer's length for a model asked for its own) and every number
finite. Any failure is ``EmbeddingsUnavailable`` with a short reason (the
status and the problem; never the body or the key).

Budgets: a ``Charger`` (given by the composition root) reserves a batch's
worst case before it is sent and settles it with the answer's
``usage.prompt_tokens`` (or releases it on failure); its refusal is
``EmbeddingsBudgetExhausted``. Only ``workspaces/{w}`` owners are charged;
``users/{u}`` (a user's own memory) has no workspace budget. Every settled
batch is recorded: the ``switchboard.context.embeddings`` log line with the
owner, model, texts and tokens.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from array import array
from collections.abc import Sequence
from typing import Any, Final, Protocol

import httpx

from switchboard.platform.errors import DestinationBlocked, ResolutionFailed
from switchboard.platform.resilience import backoff
from switchboard.platform.resilience.breaker import CircuitBreaker
from switchboard.platform.security.egress import EgressPolicy, http_client
from switchboard.platform.values.jsonbounds import loads_fast
from switchboard.platform.values.resources import WorkspaceName

from .ports import Embedded, EmbeddingModel, EmbeddingsBudgetExhausted, EmbeddingsUnavailable

__all__ = [
    "Charger",
    "NoCharge",
    "OpenAIEmbedder",
    "estimate_tokens",
]

log = logging.getLogger("switchboard.context.embeddings")

#: Characters per token when estimating a batch's worst case before sending it
#: (English averages about four; three over-reserves, which settling gives back).
CHARS_PER_TOKEN: Final = 3
#: An answer larger than this is refused (2048 vectors of 3072 floats as JSON fit).
MAX_ANSWER_BYTES: Final = 256 * 1024 * 1024
MAX_REASON_CHARS: Final = 200
_RETRIED: Final = frozenset({408, 409, 429, 500, 502, 503, 504})


def estimate_tokens(text: str) -> int:
    """An upper estimate of ``text``'s tokens, for reserving before the answer."""
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


class Charger(Protocol):
    """Charges a workspace's embedding calls to its budgets: the composition
    root's adapter over the budget ledger (``dispatcher/budgets/embeddings.py``).
    Plain values only, so neither side imports the other's types."""

    async def reserve(self, workspace_id: str, *, model: str, input_tokens: int) -> object | None:
        """Hold the worst case of one request in every budget of the whole
        workspace, or in none: the hold, or None when a budget has no room."""
        ...

    async def settle(self, hold: object, *, model: str, input_tokens: int) -> None:
        """Charge the tokens the endpoint counted and free the rest of the hold."""
        ...

    async def release(self, hold: object) -> None:
        """Free the hold: the request failed, nothing is charged."""
        ...


class NoCharge:
    """No budgets: nothing held, nothing charged (usage is still logged)."""

    async def reserve(self, workspace_id: str, *, model: str, input_tokens: int) -> object | None:
        return ()

    async def settle(self, hold: object, *, model: str, input_tokens: int) -> None:
        return None

    async def release(self, hold: object) -> None:
        return None


class _Retry(Exception):
    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


def _workspace_of(owner: str) -> str | None:
    workspace = WorkspaceName.parse_or_none(owner)
    return workspace.workspace if workspace is not None else None


class OpenAIEmbedder:
    """``Embedder`` over an OpenAI-compatible ``/embeddings`` endpoint at ``url``
    (its base, ``.../v1``); ``url`` empty: not configured, ``embed`` refuses."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str,
        policy: EgressPolicy,
        charger: Charger | None = None,
        batch: int = 64,
        max_batch_chars: int = 400_000,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        attempts: int = 3,
        concurrency: int = 2,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        retry_after_cap_s: float = 30.0,
        breaker_failures: int = 5,
        breaker_reset_s: float = 30.0,
    ) -> None:
        self._url = url.rstrip("/") + "/embeddings" if url else ""
        self._charger: Charger = charger or NoCharge()
        self._batch = batch
        self._max_batch_chars = max_batch_chars
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._backoff = (backoff_base_s, backoff_max_s)
        self._retry_after_cap_s = retry_after_cap_s
        self._slots = asyncio.Semaphore(concurrency)
        self._rng = random.Random()  # noqa: S311 - retry jitter, not a secret
        self._breaker = CircuitBreaker(
            failures=breaker_failures,
            reset_s=breaker_reset_s,
            clock=time.monotonic,
        )
        #: Dimensions learned from a model's first answer, when none were asked.
        self._learned: dict[str, int] = {}
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = http_client(
            policy,
            timeout_s=connect_timeout_s,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        )

    @property
    def configured(self) -> bool:
        return bool(self._url)

    @property
    def breaker_state(self) -> str:
        return self._breaker.state

    def dimensions(self, model: EmbeddingModel) -> int:
        return model.dimensions or self._learned.get(model.name, 0)

    async def close(self) -> None:
        await self._client.aclose()

    def batches(self, texts: Sequence[str]) -> list[list[str]]:
        """``texts`` cut into requests: ``batch`` texts and ``max_batch_chars`` at most each."""
        out: list[list[str]] = []
        current: list[str] = []
        chars = 0
        for text in texts:
            if current and (
                len(current) >= self._batch or chars + len(text) > self._max_batch_chars
            ):
                out.append(current)
                current, chars = [], 0
            current.append(text)
            chars += len(text)
        if current:
            out.append(current)
        return out

    async def embed(self, owner: str, texts: Sequence[str], model: EmbeddingModel) -> Embedded:
        if not self._url:
            raise EmbeddingsUnavailable("no embeddings endpoint is configured")
        if not texts:
            return Embedded([], 0)
        if any(not text for text in texts):
            raise EmbeddingsUnavailable("an empty text cannot be embedded")
        results = await asyncio.gather(
            *(self._embed_batch(owner, batch, model) for batch in self.batches(texts))
        )
        vectors = [vector for result in results for vector in result.vectors]
        return Embedded(vectors, sum(result.input_tokens for result in results))

    async def _embed_batch(self, owner: str, texts: list[str], model: EmbeddingModel) -> Embedded:
        workspace = _workspace_of(owner)
        hold: object = None
        if workspace is not None:
            hold = await self._charger.reserve(
                workspace,
                model=model.name,
                input_tokens=sum(estimate_tokens(text) for text in texts),
            )
            if hold is None:
                raise EmbeddingsBudgetExhausted(
                    f"a budget of workspace {workspace} has no room for embedding "
                    f"{len(texts)} texts"
                )
        try:
            async with self._slots:
                embedded = await self._with_retries(texts, model)
        except BaseException:
            if workspace is not None:
                await asyncio.shield(self._charger.release(hold))
            raise
        if workspace is not None:
            await self._charger.settle(hold, model=model.name, input_tokens=embedded.input_tokens)
        log.info(
            "embedded",
            extra={
                "owner": owner,
                "model": model.name,
                "texts": len(texts),
                "input_tokens": embedded.input_tokens,
                "charged": workspace is not None,
            },
        )
        return embedded

    async def _with_retries(self, texts: list[str], model: EmbeddingModel) -> Embedded:
        attempt = 0
        while True:
            if not self._breaker.allow():
                raise EmbeddingsUnavailable(
                    "the embeddings endpoint's circuit is open after repeated failures"
                )
            try:
                embedded = await self._once(texts, model)
            except _Retry as retry:
                self._breaker.failed()
                attempt += 1
                if attempt >= self._attempts:
                    tries = f" after {attempt} attempts" if attempt > 1 else ""
                    raise EmbeddingsUnavailable(
                        f"the embeddings endpoint {retry.reason}{tries}"
                    ) from None
                delay = backoff.full_jitter(
                    attempt - 1, base_s=self._backoff[0], max_s=self._backoff[1], rng=self._rng
                )
                if retry.retry_after_s is not None:
                    # The endpoint's own word, capped on its own (not at the backoff's
                    # ceiling): a rate limit's reset is often longer than our backoff.
                    delay = max(delay, min(retry.retry_after_s, self._retry_after_cap_s))
                log.warning(
                    "embeddings attempt failed; retrying",
                    extra={"reason": retry.reason, "attempt": attempt, "delay_s": delay},
                )
                await asyncio.sleep(delay)  # retry backoff, not synchronization
                continue
            except EmbeddingsUnavailable:
                # A refusal or a malformed answer: the endpoint is reachable but wrong.
                self._breaker.failed()
                raise
            except BaseException:
                self._breaker.released()
                raise
            self._breaker.succeeded()
            return embedded

    async def _once(self, texts: list[str], model: EmbeddingModel) -> Embedded:
        payload: dict[str, Any] = {
            "model": model.name,
            "input": texts,
            "encoding_format": "float",
        }
        if model.dimensions > 0:
            payload["dimensions"] = model.dimensions
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.post(self._url, json=payload)
                body = response.content
        except DestinationBlocked:
            raise EmbeddingsUnavailable(
                "the embeddings endpoint's address is refused by the egress policy"
            ) from None
        except ResolutionFailed:
            raise _Retry("could not be resolved") from None
        except (TimeoutError, httpx.TimeoutException):
            raise _Retry(f"did not answer within {self._timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise _Retry(f"could not be reached ({type(exc).__name__})") from None
        status = response.status_code
        if status in _RETRIED or status >= 500:
            raise _Retry(f"answered HTTP {status}", backoff.retry_after(response.headers))
        if status in (401, 403):
            raise EmbeddingsUnavailable(
                f"the embeddings endpoint refused the API key (HTTP {status}); check "
                "SWITCHBOARD_CONTEXT_EMBEDDINGS_API_KEY"
            )
        if status != 200:
            raise EmbeddingsUnavailable(
                f"the embeddings endpoint refused the request (HTTP {status}{_code(body)})"
            )
        if len(body) > MAX_ANSWER_BYTES:
            raise EmbeddingsUnavailable("the embeddings endpoint's answer is too large")
        return self._checked(body, texts, model)

    def _checked(self, body: bytes, texts: list[str], model: EmbeddingModel) -> Embedded:
        count = len(texts)
        try:
            # orjson: an answer is thousands of floats, which json's decoder reads
            # several times slower (this is most of the indexer's CPU per passage).
            answer = loads_fast(body, max_bytes=MAX_ANSWER_BYTES)
        except ValueError:
            raise EmbeddingsUnavailable("the embeddings endpoint's answer is not JSON") from None
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise EmbeddingsUnavailable("the embeddings endpoint's answer has no data list")
        if len(data) != count:
            raise EmbeddingsUnavailable(
                f"the embeddings endpoint answered {len(data)} vectors for {count} texts"
            )
        expected = model.dimensions or self._learned.get(model.name, 0)
        vectors: list[list[float] | None] = [None] * count
        for position, item in enumerate(data):
            index = item.get("index", position) if isinstance(item, dict) else None
            vector = item.get("embedding") if isinstance(item, dict) else None
            if type(index) is not int or not 0 <= index < count or vectors[index] is not None:
                raise EmbeddingsUnavailable(
                    "the embeddings endpoint's answer has a missing or repeated index"
                )
            if not isinstance(vector, list) or not vector:
                raise EmbeddingsUnavailable(
                    "the embeddings endpoint's answer has an embedding that is not a list "
                    "of numbers"
                )
            if expected == 0:
                expected = len(vector)
            if len(vector) != expected:
                raise EmbeddingsUnavailable(
                    f"the embeddings endpoint answered a vector of {len(vector)} dimensions, "
                    f"not the expected {expected}"
                )
            # array() refuses anything but numbers at C speed; a NaN or an infinity
            # anywhere makes the sum one too (the vectors are short and near unit length,
            # so a finite sum never overflows).
            try:
                values = array("d", vector)
            except TypeError:
                values = None
            if values is None or not math.isfinite(sum(values)):
                raise EmbeddingsUnavailable(
                    "the embeddings endpoint answered a vector with a value that is not a "
                    "finite number"
                )
            vectors[index] = values.tolist()
        if model.dimensions == 0:
            self._learned.setdefault(model.name, expected)
        usage = answer.get("usage")
        tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if type(tokens) is not int or tokens < 0:
            # An endpoint that reports no usage is charged the estimate.
            tokens = sum(estimate_tokens(text) for text in texts)
        return Embedded([vector for vector in vectors if vector is not None], tokens)


def _code(body: bytes) -> str:
    """The API's ``error.code`` or ``error.param``, short: never its message or the body."""
    try:
        found = httpx.Response(200, content=body).json()
    except ValueError:
        return ""
    error = found.get("error") if isinstance(found, dict) else None
    if not isinstance(error, dict):
        return ""
    for key in ("code", "param"):
        value = error.get(key)
        if isinstance(value, str) and value:
            return f", {key} {value[:60]!r}"
    return ""
