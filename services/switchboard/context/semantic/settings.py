"""Semantic memory's section: the embeddings endpoint and its model, prices and pace,
and how documents are chunked, indexed and searched."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from switchboard.context.settings import api_base
from switchboard.platform.config import Section


class SemanticSettings(Section):
    """What the indexer and search read (``context/build.py``)."""

    # Semantic memory (context/semantic/): off unless a URL and a model are set.
    context_embeddings_url: str = Field(
        default="",
        max_length=512,
        description="OpenAI-compatible API base for embeddings, e.g. `https://api.openai.com/v1` "
        "(requests go to `{url}/embeddings`, through the egress policy); empty: search is "
        "full-text only (said once at start)",
    )
    context_embeddings_api_key: SecretStr = Field(
        default=SecretStr(""),
        description="the embeddings endpoint's bearer key (a secret: never logged)",
    )
    context_embeddings_model: str = Field(
        default="",
        max_length=128,
        description="the default embedding model of a workspace that names none; empty: "
        "only workspaces that name a model are indexed",
    )
    context_embeddings_dimensions: int = Field(
        default=0,
        ge=0,
        le=2000,
        description="the default embeddings' dimensions (sent as `dimensions`); 0: the "
        "model's own, learned from its first answer",
    )
    context_embeddings_prices: str = Field(
        default="",
        max_length=4096,
        description="JSON prices of embedding models in USD per million input tokens, e.g. "
        '`{"text-embedding-3-small": 0.02}`: a workspace\'s embedding calls are held and '
        "charged to its whole-workspace budgets at that price (tokens are always counted)",
    )
    context_embeddings_batch: int = Field(
        default=64,
        ge=1,
        le=2048,
        description="texts sent in one embeddings request",
    )
    context_embeddings_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="time one embeddings request may take",
    )
    context_embeddings_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="attempts per embeddings request on a retryable failure (429, 5xx, "
        "timeout), with jittered backoff",
    )
    context_embeddings_concurrency: int = Field(
        default=2,
        ge=1,
        le=64,
        description="embeddings requests this process has in flight at once",
    )
    context_semantic_chunk_chars: int = Field(
        default=1500,
        ge=200,
        le=20_000,
        description="characters in one indexed chunk of a document or a long item",
    )
    context_semantic_chunk_overlap: int = Field(
        default=200,
        ge=0,
        le=5_000,
        description="characters two neighbouring chunks share",
    )
    context_semantic_max_chunks: int = Field(
        default=512,
        ge=1,
        le=100_000,
        description="chunks indexed per item (the rest of a longer document is not embedded)",
    )
    context_semantic_poll_s: float = Field(
        default=2.0,
        gt=0,
        le=300,
        description="how often the indexer checks the event log and its queue when no live "
        "event woke it (its queue up to four times less often while it finds no job)",
    )
    context_semantic_lease_s: float = Field(
        default=15.0,
        ge=1,
        le=600,
        description="how long the replica reading the event log for the indexer holds it "
        "without renewing before another takes over",
    )
    context_semantic_candidates: int = Field(
        default=100,
        ge=10,
        le=1000,
        description="results each ranked list (full-text, semantic) contributes before fusion",
    )
    context_semantic_ef_search: int = Field(
        default=100,
        ge=10,
        le=1000,
        description="pgvector `hnsw.ef_search` for semantic queries (higher: better recall, "
        "slower)",
    )

    @field_validator("context_embeddings_url")
    @classmethod
    def _embeddings_url(cls, value: str) -> str:
        return api_base(value)
