"""What the semantic parts share: the embedder's port, the parsed filter and the
chunk records, so the indexer, the stores and search meet on plain values.

Nothing here imports grpc, SQL or HTTP.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

#: What a chunk was cut from.
SourceKind = Literal["memory", "message", "document"]
SOURCE_KINDS: tuple[SourceKind, ...] = ("memory", "message", "document")


@dataclass(frozen=True)
class EmbeddingModel:
    """A model and the dimensions asked of it (0: the model's own)."""

    name: str
    dimensions: int = 0

    def key(self, generation: int) -> str:
        """What ``semantic_chunks.embedding`` holds for a chunk embedded with it."""
        return f"{self.name}/{self.dimensions}/{generation}"


@dataclass(frozen=True)
class Embedded:
    """The vectors of a batch, in the order of its texts, and what they cost."""

    vectors: list[list[float]]
    input_tokens: int


class EmbeddingsUnavailable(Exception):
    """The endpoint could not embed: down, timed out, its circuit open, refused
    the request, or answered with vectors of the wrong dimension or number.
    ``str()`` is a short reason fit for people (never a secret or a body)."""


class EmbeddingsBudgetExhausted(Exception):
    """A budget of the owner's workspace has no room for the embedding call."""


class Embedder(Protocol):
    """Embeds texts through an OpenAI-compatible endpoint, charging the owner."""

    @property
    def configured(self) -> bool:
        """Whether an endpoint is configured at all."""
        ...

    async def embed(self, owner: str, texts: Sequence[str], model: EmbeddingModel) -> Embedded:
        """The embeddings of ``texts`` (batched, retried, budgeted, usage recorded).

        ``owner`` is `workspaces/{w}` (its budgets apply) or `users/{u}`. Raises
        EmbeddingsUnavailable or EmbeddingsBudgetExhausted.
        """
        ...

    def dimensions(self, model: EmbeddingModel) -> int:
        """How many numbers ``model``'s vectors have: those asked, else those its
        first answer in this process had (0 while it has not answered)."""
        ...


@dataclass(frozen=True)
class ChunkRecord:
    """One passage of a source, as the indexer cuts it and the chunk store keeps it."""

    owner: str
    source_kind: SourceKind
    #: The source's resource name (memory item, message or file).
    source: str
    chunk_index: int
    start_offset: int
    end_offset: int
    text: str
    created_at: dt.datetime
    #: A memory item's kind, a message's role, a document's media type.
    label: str = ""
    conversation_id: str | None = None
    #: The source's metadata, a JSON object.
    meta: str = "{}"
    workspace_id: str | None = None
    user_id: str | None = None


@dataclass(frozen=True)
class Comparison:
    """``metadata.KEY op value`` (op ``=`` or ``!=``)."""

    key: str
    op: Literal["=", "!="]
    value: str | float | bool


@dataclass(frozen=True)
class SearchFilter:
    """A parsed search filter: every set condition must hold (AND).

    ``None`` or empty means "no condition". Sets are "one of"; ``exclude_*``
    sets are "none of".
    """

    sources: frozenset[SourceKind] | None = None
    exclude_sources: frozenset[SourceKind] = frozenset()
    #: Memory kinds or message roles (a chunk's label).
    labels: frozenset[str] | None = None
    exclude_labels: frozenset[str] = frozenset()
    conversation_ids: frozenset[str] | None = None
    exclude_conversation_ids: frozenset[str] = frozenset()
    #: Only passages of no conversation (a workspace's own memory, its documents).
    without_conversation: bool = False
    #: Files (their resource names) a document chunk must come from.
    files: frozenset[str] | None = None
    exclude_files: frozenset[str] = frozenset()
    created_after: dt.datetime | None = None
    created_after_inclusive: bool = False
    created_before: dt.datetime | None = None
    created_before_inclusive: bool = False
    metadata: tuple[Comparison, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Hit:
    """A chunk a ranked list found: its id, the source, and its list's score."""

    chunk_id: int
    source_kind: SourceKind
    source: str
    score: float
