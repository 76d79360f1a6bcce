"""The embeddings client against the local OpenAI-compatible server over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from switchboard.context.semantic.embedder import OpenAIEmbedder
from switchboard.context.semantic.ports import (
    EmbeddingModel,
    EmbeddingsUnavailable,
)
from switchboard.platform.security.egress import EgressPolicy
from tests.fakes.embeddings_server import CONCEPT_MODEL, HASH_MODEL, MINILM_MODEL, FakeEmbeddings

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

LOOPBACK = EgressPolicy(allow_loopback=True)
HASH = EmbeddingModel(HASH_MODEL, 0)
OWNER = "workspaces/w1"


@pytest.fixture
async def server() -> AsyncIterator[FakeEmbeddings]:
    async with FakeEmbeddings(api_key="sk-test-secret") as fake:
        yield fake


def _embedder(server: FakeEmbeddings, **kwargs: object) -> OpenAIEmbedder:
    options: dict[str, object] = {
        "api_key": "sk-test-secret",
        "policy": LOOPBACK,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
    }
    options.update(kwargs)
    return OpenAIEmbedder(server.url, **options)  # type: ignore[arg-type]


@asynccontextmanager
async def _opened(server: FakeEmbeddings, **kwargs: object) -> AsyncIterator[OpenAIEmbedder]:
    embedder = _embedder(server, **kwargs)
    try:
        yield embedder
    finally:
        await embedder.close()


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_batches_and_order(server: FakeEmbeddings) -> None:
    async with _opened(server, batch=4) as embedder:
        texts = [f"note number {i} about topic {i % 3}" for i in range(10)]
        embedded = await embedder.embed(OWNER, texts, HASH)
    assert [len(batch) for batch in server.batches] == [4, 4, 2]
    assert sorted(text for batch in server.batches for text in batch) == sorted(texts)
    assert len(embedded.vectors) == 10
    assert all(len(vector) == 384 for vector in embedded.vectors)
    # In the order of the texts: each vector is its own text's.
    for text, vector in zip(texts, embedded.vectors, strict=True):
        assert math.isclose(_cosine(vector, _single(text)), 1.0, rel_tol=1e-6)
    assert embedded.input_tokens == sum(len(text.split()) for text in texts)
    assert all(r.headers["authorization"] == "Bearer sk-test-secret" for r in server.requests)
    assert all("dimensions" not in r.body for r in server.requests)


def _single(text: str) -> list[float]:
    from tests.fakes.embeddings_server import embed

    return embed(HASH_MODEL, text, 384)


async def test_dimensions_sent_when_asked(server: FakeEmbeddings) -> None:
    async with _opened(server) as embedder:
        embedded = await embedder.embed(OWNER, ["a text"], EmbeddingModel(HASH_MODEL, 64))
    assert server.requests[0].body["dimensions"] == 64
    assert len(embedded.vectors[0]) == 64


async def test_retry_then_success(server: FakeEmbeddings) -> None:
    async with _opened(server, attempts=3) as embedder:
        server.fail_next(500)
        server.fail_next(503)
        embedded = await embedder.embed(OWNER, ["hello world"], HASH)
    assert len(server.requests) == 3
    assert len(embedded.vectors) == 1


async def test_attempts_spent(server: FakeEmbeddings) -> None:
    async with _opened(server, attempts=2) as embedder:
        server.fail_next(500, 5)
        with pytest.raises(EmbeddingsUnavailable, match="HTTP 500 after 2 attempts"):
            await embedder.embed(OWNER, ["hello world"], HASH)
    assert len(server.requests) == 2


async def test_retry_after_honoured(server: FakeEmbeddings) -> None:
    async with _opened(server, attempts=2) as embedder:
        server.fail_next(429, retry_after="0.3")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await embedder.embed(OWNER, ["hello world"], HASH)
    # The backoff alone is under 0.05 s: the wait is the server's Retry-After.
    assert loop.time() - started >= 0.3
    assert len(server.requests) == 2


async def test_retry_after_capped(server: FakeEmbeddings) -> None:
    async with _opened(server, attempts=2, retry_after_cap_s=0.1) as embedder:
        server.fail_next(429, retry_after="3600")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await embedder.embed(OWNER, ["hello world"], HASH)
    assert loop.time() - started < 5


async def test_timeout_is_retryable_then_unavailable(server: FakeEmbeddings) -> None:
    async with _opened(server, attempts=2, timeout_s=0.2) as embedder:
        server.delay_s = 2.0
        with pytest.raises(EmbeddingsUnavailable, match=r"did not answer within 0\.2 s"):
            await embedder.embed(OWNER, ["hello world"], HASH)


async def test_down_opens_the_breaker(server: FakeEmbeddings) -> None:
    async with _opened(server, attempts=2, breaker_failures=2, breaker_reset_s=60) as embedder:
        await server.close()
        with pytest.raises(EmbeddingsUnavailable, match="could not be reached"):
            await embedder.embed(OWNER, ["hello"], HASH)
        assert embedder.breaker_state == "open"
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(EmbeddingsUnavailable, match="circuit is open"):
            await embedder.embed(OWNER, ["hello"], HASH)
        assert loop.time() - started < 0.05


async def test_wrong_dimension(server: FakeEmbeddings) -> None:
    async with _opened(server) as embedder:
        server.corrupt_next("dimension")
        with pytest.raises(EmbeddingsUnavailable, match="63 dimensions, not the expected 64"):
            await embedder.embed(OWNER, ["a", "b"], EmbeddingModel(HASH_MODEL, 64))


async def test_learned_dimension_then_wrong(server: FakeEmbeddings) -> None:
    async with _opened(server) as embedder:
        await embedder.embed(OWNER, ["a"], HASH)
        server.corrupt_next("dimension")
        with pytest.raises(EmbeddingsUnavailable, match="383 dimensions, not the expected 384"):
            await embedder.embed(OWNER, ["b"], HASH)


async def test_wrong_count(server: FakeEmbeddings) -> None:
    async with _opened(server) as embedder:
        server.corrupt_next("count")
        with pytest.raises(EmbeddingsUnavailable, match="1 vectors for 2 texts"):
            await embedder.embed(OWNER, ["a", "b"], HASH)


async def test_a_value_that_is_not_a_number(server: FakeEmbeddings) -> None:
    async with _opened(server) as embedder:
        server.corrupt_next("nan")
        # NaN is not JSON (platform/values/jsonbounds.py): the answer is refused as it is read.
        with pytest.raises(EmbeddingsUnavailable, match="answer is not JSON"):
            await embedder.embed(OWNER, ["a", "b"], HASH)


async def test_refusal_names_no_secret(server: FakeEmbeddings) -> None:
    async with _opened(server, api_key="sk-wrong-key-123456") as embedder:
        with pytest.raises(EmbeddingsUnavailable) as caught:
            await embedder.embed(OWNER, ["a"], HASH)
    assert "HTTP 401" in str(caught.value)
    assert "sk-wrong" not in str(caught.value)
    assert "123456" not in str(caught.value)


async def test_unknown_model(server: FakeEmbeddings) -> None:
    async with _opened(server) as embedder:
        with pytest.raises(EmbeddingsUnavailable, match="HTTP 404, code 'model_not_found'"):
            await embedder.embed(OWNER, ["a"], EmbeddingModel("no-such-model"))
    assert len(server.requests) == 1


async def test_egress_refuses_loopback(server: FakeEmbeddings) -> None:
    async with _opened(server, policy=EgressPolicy()) as embedder:
        with pytest.raises(EmbeddingsUnavailable, match="refused by the egress policy"):
            await embedder.embed(OWNER, ["a"], HASH)
    assert server.requests == []


async def test_not_configured() -> None:
    embedder = OpenAIEmbedder("", api_key="", policy=LOOPBACK)
    try:
        assert not embedder.configured
        with pytest.raises(EmbeddingsUnavailable, match="no embeddings endpoint"):
            await embedder.embed(OWNER, ["a"], HASH)
    finally:
        await embedder.close()


async def test_concept_model_finds_the_paraphrase(server: FakeEmbeddings) -> None:
    async with _opened(server) as embedder:
        note = "The user prefers tea over coffee"
        query = "What drink does the user like?"
        other = "The deploy failed on Tuesday"
        embedded = await embedder.embed(OWNER, [note, query, other], EmbeddingModel(CONCEPT_MODEL))
    note_v, query_v, other_v = embedded.vectors
    # The query shares no word with the note but "user"; full-text would not match it.
    assert _cosine(query_v, note_v) > 0.8
    assert _cosine(query_v, other_v) < 0.3


async def test_the_sentence_model_finds_the_paraphrase(server: FakeEmbeddings) -> None:
    async with _opened(server) as embedder:
        note = "The user prefers tea over coffee"
        query = "What drink does the user like?"
        other = "The deploy failed on Tuesday"
        embedded = await embedder.embed(OWNER, [note, query, other], EmbeddingModel(MINILM_MODEL))
    note_v, query_v, other_v = embedded.vectors
    assert len(note_v) == 384
    # all-MiniLM-L6-v2's own judgement (0.53 against -0.11 when measured), not a lexicon's.
    assert _cosine(query_v, note_v) > 0.4
    assert _cosine(query_v, other_v) < 0.1
    assert _cosine(query_v, note_v) - _cosine(query_v, other_v) > 0.3


async def test_the_server_speaks_the_api(server: FakeEmbeddings) -> None:
    """The fake's answers as the API shapes them: base64 floats, usage, error bodies."""
    auth = {"authorization": "Bearer sk-test-secret"}
    async with httpx.AsyncClient(base_url=server.url, headers=auth) as client:
        as_floats = await client.post(
            "/embeddings", json={"model": HASH_MODEL, "input": "tea time", "dimensions": 16}
        )
        as_base64 = await client.post(
            "/embeddings",
            json={"model": HASH_MODEL, "input": ["tea time"], "encoding_format": "base64"},
        )
        unknown = await client.post("/embeddings", json={"model": "nope", "input": "x"})
        too_wide = await client.post(
            "/embeddings", json={"model": HASH_MODEL, "input": "x", "dimensions": 385}
        )
        empty = await client.post("/embeddings", json={"model": HASH_MODEL, "input": []})
        no_key = await client.post(
            "/embeddings",
            json={"model": HASH_MODEL, "input": "x"},
            headers={"authorization": ""},
        )
    body = as_floats.json()
    assert body["object"] == "list"
    assert body["model"] == HASH_MODEL
    assert body["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert body["data"][0]["object"] == "embedding"
    assert body["data"][0]["index"] == 0
    assert len(body["data"][0]["embedding"]) == 16
    packed = base64.b64decode(as_base64.json()["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(packed) // 4}f", packed)
    assert len(decoded) == 384
    assert math.isclose(sum(x * x for x in decoded), 1.0, rel_tol=1e-5)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert too_wide.status_code == 400
    assert too_wide.json()["error"]["param"] == "dimensions"
    assert empty.status_code == 400
    assert empty.json()["error"]["param"] == "input"
    assert no_key.status_code == 401
    assert no_key.json()["error"]["code"] == "invalid_api_key"
