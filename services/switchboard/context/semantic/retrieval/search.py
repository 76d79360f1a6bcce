"""Search by words and by meaning: SearchContext, SearchMemoryItems' modes, and the
retrieval of a context window (docs/semantic.md, "Searching").

A search builds up to two ranked lists of sources: the full-text list (memory
items and messages through their own full-text indexes, written with them, so
immediate; document chunks through the chunk store's) and the semantic list (the chunk store's
nearest neighbours of the query's embedding under the current model). A source
with several chunks counts once, at its best chunk. FULL_TEXT and SEMANTIC use
one list, HYBRID fuses both by reciprocal rank (``fusion.py``).

Every ranked source is then read from its own table (``retrieval/store.py``): one
that is gone, expired or outside the searched scope is left out, whatever the
chunk index still holds (the indexer removes its chunks later). The store only
ever ranks the searched owner's chunks; the access rule checked READ on
``parent`` before.

Semantic search never fails a request: without an endpoint, a model or a vector
engine, or when the query cannot be embedded, the search runs in FULL_TEXT and
says why (``fallback_reason``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Final, Protocol, TypeAlias

from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.common import Common, check_text, stored
from switchboard.context.mapping import memory_name, memory_proto, message_proto
from switchboard.context.records import MemoryRecord, Scope, Unsearchable
from switchboard.context.semantic.indexing.indexer import Indexer
from switchboard.context.semantic.ports import (
    Comparison,
    Embedder,
    EmbeddingModel,
    EmbeddingsBudgetExhausted,
    EmbeddingsUnavailable,
    Hit,
    SearchFilter,
    SourceKind,
)
from switchboard.context.semantic.retrieval.filters import (
    ParsedFilter,
    parse_filter,
    restrict_sources,
)
from switchboard.context.semantic.retrieval.fusion import Fused, fuse, single
from switchboard.context.semantic.retrieval.store import SearchStore, Sources
from switchboard.context.text.fulltext import query_terms
from switchboard.platform.background import cancel_all
from switchboard.platform.errors import FieldViolation, InvalidArgument, Violations
from switchboard.platform.store import pagination
from switchboard.platform.values.resources import (
    ConversationName,
    FileName,
    MessageName,
    UserName,
    WorkspaceName,
)
from switchboard.platform.values.wording import counted

log = logging.getLogger("switchboard.context.text.fulltext")

#: Ranked results page by position, and only this deep.
MAX_SEARCH_RESULTS: Final = 500
#: The fewest passages a search by meaning asks the index for (a source may have several).
MIN_SEMANTIC_DEPTH: Final = 20
#: Longest a search waits for its query's embedding before falling back to full-text.
SEARCH_EMBED_TIMEOUT_S: Final = 10.0

FULL_TEXT: Final = pb.SEARCH_MODE_FULL_TEXT
SEMANTIC: Final = pb.SEARCH_MODE_SEMANTIC
HYBRID: Final = pb.SEARCH_MODE_HYBRID
_MODES: Final = frozenset(pb.SearchMode.values())
Mode: TypeAlias = pb.SearchMode.ValueType
Reason: TypeAlias = pb.SearchFallbackReason.ValueType
#: A ranked source: its kind and resource name.
Key: TypeAlias = tuple[SourceKind, str]


class IndexSettings(Protocol):
    """Which model a search embeds its query with (the indexer's settings), and how far
    the owner's index is behind."""

    async def effective(self, owner: str) -> tuple[EmbeddingModel, int] | None:
        """The owner's model and generation; None when no model is configured."""
        ...

    async def pending(self, owner: str) -> int:
        """Sources of the owner's index waiting to be embedded (its pending jobs)."""
        ...


class ChunkIndex(Protocol):
    """The chunk store's ranked lists (``chunkstore.ChunkStore``)."""

    async def fulltext(
        self, owners: Sequence[str], terms: Sequence[str], filter: SearchFilter, limit: int
    ) -> list[Hit]: ...

    async def nearest(
        self,
        owners: Sequence[str],
        query: Sequence[float],
        dims: int,
        embedding_key: str,
        k: int,
        filter: SearchFilter,
        ef_search: int = 40,
    ) -> list[Hit]: ...


class IndexerSettings:
    """The model a workspace's passages are embedded with, as the indexer decides it
    (its settings row, else the server's default; a user's memory: the default)."""

    def __init__(self, indexer: Indexer) -> None:
        self._indexer = indexer

    async def effective(self, owner: str) -> tuple[EmbeddingModel, int] | None:
        workspace = WorkspaceName.parse_or_none(owner)
        index = None
        if workspace is not None:
            found = await self._indexer.store.settings([workspace.workspace])
            index = found.get(workspace.workspace)
        model, generation = self._indexer.model_of(index)
        return (model, generation) if model.name else None

    async def pending(self, owner: str) -> int:
        return await self._indexer.store.pending(owner)


@dataclass(frozen=True)
class SearchParts:
    """What semantic search needs beyond the database; none of it: full-text only."""

    embedder: Embedder | None = None
    settings: IndexSettings | None = None
    chunks: ChunkIndex | None = None
    #: Whether the database has a vector engine (pgvector, sqlite-vec).
    vectors: bool = False
    #: pgvector's ``hnsw.ef_search`` for the semantic list.
    ef_search: int = 100
    #: Results each ranked list contributes before fusion.
    candidates: int = 100
    #: Most time a query's embedding may take before the search falls back.
    embed_timeout_s: float = SEARCH_EMBED_TIMEOUT_S


@dataclass(frozen=True)
class Ranking:
    """How a search ran, and its results, best first."""

    mode: Mode
    fallback: Reason = pb.SEARCH_FALLBACK_REASON_UNSPECIFIED
    detail: str = ""
    results: tuple[pb.SearchResult, ...] = ()
    #: Sources the index had waiting when a search by meaning ran (0 by words).
    pending: int = 0

    @property
    def lag_detail(self) -> str:
        """``pending`` in words, for people; empty when nothing waits."""
        return f"{counted(self.pending, 'item')} not yet indexed" if self.pending else ""


@dataclass(frozen=True)
class _Plan:
    mode: Mode
    fallback: Reason = pb.SEARCH_FALLBACK_REASON_UNSPECIFIED
    detail: str = ""
    model: EmbeddingModel | None = None
    generation: int = 0
    vector: tuple[float, ...] | None = None
    #: Sources of the owner's index waiting to be embedded (a plan by meaning's).
    pending: int = 0


@dataclass(frozen=True)
class _Where:
    """The searched scope: a workspace, one of its conversations, or a user's memory."""

    owner: str
    workspace_id: str | None
    conversation_id: str | None = None
    #: SearchMemoryItems: exactly this memory scope.
    memory_scope: Scope | None = None
    #: Of a user's items, only those formed in this workspace or people's (a
    #: window's or a search's workspace).
    origin_workspace_id: str | None = None


def _scores(fused: Fused[Key]) -> pb.SearchScores:
    scores = pb.SearchScores()
    if fused.full_text_rank is not None:
        scores.full_text_rank = fused.full_text_rank
    if fused.semantic_rank is not None:
        scores.semantic_rank = fused.semantic_rank
    if fused.similarity is not None:
        scores.similarity = fused.similarity
    return scores


def check_mode(mode: int, field: str, violations: Violations) -> None:
    if mode not in _MODES:
        violations.add(field, "is not a search mode")


def _value_matches(found: object, wanted: str | float | bool) -> bool:
    if isinstance(wanted, bool) or isinstance(found, bool):
        return isinstance(wanted, bool) and isinstance(found, bool) and found == wanted
    if isinstance(wanted, float):
        return isinstance(found, float | int) and float(found) == wanted
    return isinstance(found, str) and found == wanted


def metadata_matches(comparisons: Sequence[Comparison], meta: bytes) -> bool:
    """Whether a serialized ``Struct`` holds every comparison (``!=``: absent or other)."""
    if not comparisons:
        return True
    values: dict[str, object] = {}
    if meta:
        struct = struct_pb2.Struct()
        struct.ParseFromString(meta)
        values = dict(struct.items())
    for comparison in comparisons:
        found = values.get(comparison.key, _ABSENT)
        equal = found is not _ABSENT and _value_matches(found, comparison.value)
        if equal != (comparison.op == "="):
            return False
    return True


_ABSENT: Final = object()


def memory_matches(conditions: SearchFilter, record: MemoryRecord) -> bool:
    """A hydrated memory item against the filter (a chunk's copy may be older)."""
    if conditions.files is not None:
        return False
    if conditions.labels is not None and record.kind not in conditions.labels:
        return False
    if record.kind in conditions.exclude_labels:
        return False
    conversation = record.conversation_id
    if conditions.conversation_ids is not None and conversation not in conditions.conversation_ids:
        return False
    if conversation is not None and conversation in conditions.exclude_conversation_ids:
        return False
    created = record.created_at
    if conditions.created_after is not None and (
        created < conditions.created_after
        or (created == conditions.created_after and not conditions.created_after_inclusive)
    ):
        return False
    if conditions.created_before is not None and (
        created > conditions.created_before
        or (created == conditions.created_before and not conditions.created_before_inclusive)
    ):
        return False
    return metadata_matches(conditions.metadata, record.meta)


def _message_keeper(conditions: SearchFilter) -> Callable[[bytes], bool] | None:
    """Whether a stored message holds the filter's metadata comparisons (None: no such
    comparison, every message the SQL found holds the filter)."""
    if not conditions.metadata:
        return None
    comparisons = conditions.metadata

    def keep(data: bytes) -> bool:
        message = pb.Message.FromString(data)
        meta = message.metadata.SerializeToString() if message.HasField("metadata") else b""
        return metadata_matches(comparisons, meta)

    return keep


def _merge(lists: Sequence[Sequence[Hit]]) -> list[Hit]:
    """Several lists of one measure as one, best score first (stable)."""
    merged = [hit for hits in lists for hit in hits]
    return sorted(merged, key=lambda hit: -hit.score)


def _best_chunks(hits: Sequence[Hit]) -> tuple[list[tuple[Key, float]], dict[Key, int]]:
    """One entry per source (its best chunk), in order, and that chunk's id."""
    ranked: list[tuple[Key, float]] = []
    chunk: dict[Key, int] = {}
    for hit in hits:
        key = (hit.source_kind, hit.source)
        if key not in chunk:
            chunk[key] = hit.chunk_id
            ranked.append((key, hit.score))
    return ranked, chunk


class Search:
    def __init__(
        self, common: Common, store: SearchStore, parts: SearchParts | None = None
    ) -> None:
        parts = parts or SearchParts()
        self.common = common
        self._store = store
        self._embedder = parts.embedder
        self._settings = parts.settings
        self._chunks = parts.chunks
        self._vectors = parts.vectors
        self._ef_search = parts.ef_search
        self._candidates = parts.candidates
        self._embed_timeout_s = parts.embed_timeout_s

    # -- requests ------------------------------------------------------------------------

    async def search_context(self, request: pb.SearchContextRequest) -> pb.SearchContextResponse:
        where = _context_scope(request.parent)
        violations = Violations()
        self._check_query(request.query, violations)
        check_mode(request.mode, "mode", violations)
        violations.check()
        parsed = parse_filter(request.filter, workspace_id=where.workspace_id)
        size = pagination.page_size(request.page_size, default=10, maximum=50)
        token = pagination.fingerprint(
            "searchctx", request.parent, request.query, int(request.mode), request.filter
        )
        offset = self._offset(request.page_token, token)
        if offset >= MAX_SEARCH_RESULTS:
            return pb.SearchContextResponse()
        ranking = await self.rank(
            where, request.query, request.mode, parsed, wanted=offset + size + 1
        )
        return pb.SearchContextResponse(
            results=ranking.results[offset : offset + size],
            next_page_token=self._next_page(len(ranking.results), offset + size, token),
            mode=ranking.mode,
            fallback_reason=ranking.fallback,
            fallback_detail=ranking.detail,
            pending_index_count=ranking.pending,
            index_lag_detail=ranking.lag_detail,
        )

    async def search_memory(
        self,
        request: pb.SearchMemoryItemsRequest,
        scope: Scope,
        kinds: Sequence[str],
        origin_workspace_id: str | None = None,
    ) -> pb.SearchMemoryItemsResponse:
        """SearchMemoryItems once ``memory/catalog.py`` checked the scope, query and kinds."""
        violations = Violations()
        check_mode(request.mode, "mode", violations)
        violations.check()
        parsed = parse_filter(request.filter, workspace_id=scope.workspace_id)
        for name in ("role", "file"):
            if name in parsed.fields:
                raise InvalidArgument(
                    f"filter: `{name}` does not apply to memory items",
                    [FieldViolation("filter", f"`{name}` does not apply to memory items")],
                )
        parsed = restrict_sources(parsed, ["memory"])
        if kinds:
            labels = frozenset(kinds)
            current = parsed.filter.labels
            chosen = labels if current is None else current & labels
            parsed = replace(
                parsed,
                filter=replace(parsed.filter, labels=chosen),
                impossible=parsed.impossible or not chosen,
            )
        size = pagination.page_size(request.page_size, default=10, maximum=50)
        parts: list[object] = ["search", request.parent, request.query, sorted(kinds)]
        if request.mode or request.filter:
            # Tokens of a search without either stay as they were before modes.
            parts += [int(request.mode), request.filter]
        if request.workspace:
            parts.append(request.workspace)
        token = pagination.fingerprint(*parts)
        offset = self._offset(request.page_token, token)
        if offset >= MAX_SEARCH_RESULTS:
            return pb.SearchMemoryItemsResponse()
        owner = _owner(scope)
        plan = await self._plan(request.mode, owner, request.query, embed=not parsed.impossible)
        if plan.mode == FULL_TEXT and not parsed.filter.metadata and not parsed.impossible:
            # Checks the scope itself, in the search's transaction.
            return await self._memory_full_text(
                request, scope, parsed, plan, size, offset, token, origin_workspace_id
            )
        await stored(self._store.check_live(scope))
        where = _Where(
            owner,
            scope.workspace_id,
            scope.conversation_id,
            memory_scope=scope,
            origin_workspace_id=origin_workspace_id,
        )
        ranking = await self._ranked(where, request.query, plan, parsed, wanted=offset + size + 1)
        return pb.SearchMemoryItemsResponse(
            results=[
                pb.ScoredMemoryItem(memory_item=r.memory_item, score=r.score, scores=r.scores)
                for r in ranking.results[offset : offset + size]
            ],
            next_page_token=self._next_page(len(ranking.results), offset + size, token),
            mode=ranking.mode,
            fallback_reason=ranking.fallback,
            fallback_detail=ranking.detail,
            pending_index_count=ranking.pending,
            index_lag_detail=ranking.lag_detail,
        )

    async def _memory_full_text(
        self,
        request: pb.SearchMemoryItemsRequest,
        scope: Scope,
        parsed: ParsedFilter,
        plan: _Plan,
        size: int,
        offset: int,
        token: str,
        origin_workspace_id: str | None,
    ) -> pb.SearchMemoryItemsResponse:
        """Today's memory search, the filter's conditions in its SQL, paged in SQL."""
        rows = await self._memory_rows(
            scope,
            request.query,
            parsed.filter,
            limit=size + 1,
            offset=offset,
            origin_workspace_id=origin_workspace_id,
        )
        return pb.SearchMemoryItemsResponse(
            results=[
                pb.ScoredMemoryItem(
                    memory_item=memory_proto(row),
                    score=score,
                    scores=pb.SearchScores(full_text_rank=offset + index + 1),
                )
                for index, (row, score) in enumerate(rows[:size])
            ],
            next_page_token=self._next_page(offset + len(rows), offset + size, token),
            mode=FULL_TEXT,
            fallback_reason=plan.fallback,
            fallback_detail=plan.detail,
        )

    async def _memory_rows(
        self,
        scope: Scope,
        query: str,
        conditions: SearchFilter,
        *,
        limit: int,
        offset: int = 0,
        origin_workspace_id: str | None = None,
    ) -> list[tuple[MemoryRecord, float]]:
        try:
            return await stored(
                self._store.search_memory_scope(
                    scope,
                    query,
                    conditions=conditions,
                    limit=limit,
                    offset=offset,
                    origin_workspace_id=origin_workspace_id,
                )
            )
        except Unsearchable:
            raise _unsearchable() from None

    async def retrieve(
        self,
        workspace_id: str,
        conversation_id: str,
        query: str,
        options: pb.RetrievalOptions,
        parsed: ParsedFilter,
    ) -> Ranking:
        """A window's retrieval: SearchContext in the conversation, its top_k results."""
        where = _Where(str(WorkspaceName(workspace_id)), workspace_id, conversation_id)
        ranking = await self.rank(where, query, options.mode, parsed, wanted=options.top_k)
        return replace(ranking, results=ranking.results[: options.top_k])

    # -- ranking ---------------------------------------------------------------------------

    async def rank(
        self,
        where: _Where,
        query: str,
        asked: Mode,
        parsed: ParsedFilter,
        *,
        wanted: int = MAX_SEARCH_RESULTS,
    ) -> Ranking:
        """The results of a search, best first: at least its first ``wanted`` where
        there are that many, and at most ``MAX_SEARCH_RESULTS``."""
        if where.workspace_id is not None:
            await stored(
                self._store.check_live(
                    Scope(
                        "", workspace_id=where.workspace_id, conversation_id=where.conversation_id
                    )
                )
            )
        plan = await self._plan(asked, where.owner, query, embed=not parsed.impossible)
        return await self._ranked(where, query, plan, parsed, wanted=wanted)

    async def _ranked(
        self,
        where: _Where,
        query: str,
        plan: _Plan,
        parsed: ParsedFilter,
        *,
        wanted: int = MAX_SEARCH_RESULTS,
    ) -> Ranking:
        """``wanted``: how many of the best results the caller reads (a page's end and
        one more)."""
        ranking = Ranking(plan.mode, plan.fallback, plan.detail, pending=plan.pending)
        if parsed.impossible:
            return ranking
        conditions = parsed.filter
        if plan.mode == SEMANTIC:
            results = await self._by_meaning(where, plan, conditions, wanted)
        else:
            full_text, chunks = await self._full_text(where, query, conditions)
            if plan.mode == HYBRID:
                # Fusion reads both lists whole: a page's ranks hold only at full depth.
                semantic, meaning_chunks, _ = await self._semantic(
                    where, plan, conditions, self._candidates
                )
                fused = fuse([key for key, _ in full_text], semantic)
                chunks = {**chunks, **meaning_chunks}
            else:
                fused = single(full_text, semantic=False)
            results = await self._hydrate(where, conditions, fused, chunks)
        return replace(ranking, results=tuple(results[:MAX_SEARCH_RESULTS]))

    async def _by_meaning(
        self, where: _Where, plan: _Plan, conditions: SearchFilter, wanted: int
    ) -> list[pb.SearchResult]:
        """A search by meaning alone asks the index only as deep as the caller reads
        first: the best results do not depend on the depth, and a shallow list costs
        far less (pgvector's k=10 took a third of k=100's time at 100k passages). If too
        few of them are still there to show, it asks again at the full depth."""
        depth = min(self._candidates, max(2 * wanted, MIN_SEMANTIC_DEPTH))
        while True:
            semantic, chunks, truncated = await self._semantic(where, plan, conditions, depth)
            fused = single(semantic, semantic=True)
            results = await self._hydrate(where, conditions, fused, chunks)
            if len(results) >= wanted or not truncated or depth >= self._candidates:
                return results
            depth = self._candidates

    async def _plan(self, asked: Mode, owner: str, query: str, *, embed: bool = True) -> _Plan:
        """The mode a search runs in, with the query's vector when it needs one
        (``embed`` False: a search that cannot match anything is not charged for one)."""
        if asked == FULL_TEXT:
            return _Plan(FULL_TEXT)
        settled = None
        if self._embedder is not None and self._embedder.configured and self._settings:
            settled = await self._settings.effective(owner)
        if settled is None:
            if asked == pb.SEARCH_MODE_UNSPECIFIED:
                return _Plan(FULL_TEXT)
            return _Plan(
                FULL_TEXT,
                pb.SEARCH_FALLBACK_REASON_NOT_CONFIGURED,
                "no embedding endpoint or model is configured for this workspace",
            )
        if self._chunks is None or not self._vectors:
            if asked == pb.SEARCH_MODE_UNSPECIFIED:
                return _Plan(FULL_TEXT)
            return _Plan(
                FULL_TEXT,
                pb.SEARCH_FALLBACK_REASON_NO_VECTOR_ENGINE,
                "the database has no vector engine (pgvector or sqlite-vec)",
            )
        model, generation = settled
        mode = HYBRID if asked == pb.SEARCH_MODE_UNSPECIFIED else asked
        settings = self._settings
        assert settings is not None  # noqa: S101 (settled came from it)
        if not embed:
            return _Plan(mode, pending=await settings.pending(owner))
        # The index's lag is counted while the query is embedded: it costs the search
        # no time of its own (a count of the waiting jobs against an HTTP round trip).
        counting = asyncio.get_running_loop().create_task(settings.pending(owner))
        try:
            vector = await self._query_vector(owner, query, model)
            if isinstance(vector, _Plan):
                return vector
            return _Plan(
                mode, model=model, generation=generation, vector=vector, pending=await counting
            )
        finally:
            await _settle(counting)

    async def _query_vector(
        self, owner: str, query: str, model: EmbeddingModel
    ) -> tuple[float, ...] | _Plan:
        """The query's embedding, or the full-text plan that says why there is none."""
        assert self._embedder is not None  # noqa: S101 (a model is in effect)
        try:
            async with asyncio.timeout(self._embed_timeout_s):
                embedded = await self._embedder.embed(owner, [query], model)
        except EmbeddingsBudgetExhausted:
            return _Plan(
                FULL_TEXT,
                pb.SEARCH_FALLBACK_REASON_BUDGET_EXHAUSTED,
                "a budget of the workspace has no room for the query's embedding",
            )
        except (EmbeddingsUnavailable, TimeoutError) as exc:
            reason = str(exc) if isinstance(exc, EmbeddingsUnavailable) else "timed out"
            return _Plan(
                FULL_TEXT,
                pb.SEARCH_FALLBACK_REASON_EMBEDDINGS_UNAVAILABLE,
                f"the query could not be embedded: {reason or 'the endpoint failed'}"[:200],
            )
        if (
            len(embedded.vectors) != 1
            or not embedded.vectors[0]
            or model.dimensions not in (0, len(embedded.vectors[0]))
        ):
            return _Plan(
                FULL_TEXT,
                pb.SEARCH_FALLBACK_REASON_EMBEDDINGS_UNAVAILABLE,
                "the query could not be embedded: the endpoint answered no vector of the "
                "model's dimensions",
            )
        return tuple(embedded.vectors[0])

    async def _full_text(
        self, where: _Where, query: str, conditions: SearchFilter
    ) -> tuple[list[tuple[Key, float]], dict[Key, int]]:
        """The full-text list: memory items (their own index) and message and
        document chunks (the chunk store's), merged by score."""
        limit = self._candidates
        entries: list[tuple[Key, float, int | None]] = []
        memory_wanted = (
            conditions.sources is None or "memory" in conditions.sources
        ) and "memory" not in conditions.exclude_sources
        # A `file` condition holds only for document passages.
        if memory_wanted and conditions.files is None:
            if where.memory_scope is not None:
                rows = await self._memory_rows(where.memory_scope, query, conditions, limit=limit)
            else:
                assert where.workspace_id is not None  # noqa: S101 (a context search's)
                try:
                    rows = await stored(
                        self._store.context_memory(
                            where.workspace_id,
                            where.conversation_id,
                            query,
                            conditions,
                            limit=limit,
                        )
                    )
                except Unsearchable:
                    raise _unsearchable() from None
            for row, score in rows:
                entries.append((("memory", str(memory_name(row))), score, None))
        if where.memory_scope is None:
            assert where.workspace_id is not None  # noqa: S101 (a context search's)
            # Messages through their own index, written with the message: found by their
            # words at once, whatever the semantic index holds (its passages of messages
            # serve the list by meaning).
            try:
                messages = await stored(
                    self._store.context_messages(
                        where.workspace_id,
                        where.conversation_id,
                        query,
                        conditions,
                        limit=limit,
                        keep=_message_keeper(conditions),
                    )
                )
            except Unsearchable:
                raise _unsearchable() from None
            for hit in messages:
                name = MessageName(where.workspace_id, hit.conversation_id, hit.message_id)
                entries.append((("message", str(name)), hit.score, None))
        if where.memory_scope is None and self._chunks is not None:
            hits, _ = await self._chunk_lists(where, conditions, ("document",), query=query)
            entries += [((hit.source_kind, hit.source), hit.score, hit.chunk_id) for hit in hits]
        entries.sort(key=lambda entry: -entry[1])
        ranked: list[tuple[Key, float]] = []
        chunk: dict[Key, int] = {}
        seen: set[Key] = set()
        for key, score, chunk_id in entries:
            if key in seen:
                continue
            seen.add(key)
            ranked.append((key, score))
            if chunk_id is not None:
                chunk[key] = chunk_id
        return ranked, chunk

    async def _semantic(
        self, where: _Where, plan: _Plan, conditions: SearchFilter, depth: int
    ) -> tuple[list[tuple[Key, float]], dict[Key, int], bool]:
        """The list by meaning from ``depth`` passages, and whether more were left."""
        kinds: tuple[SourceKind, ...] = (
            ("memory",) if where.memory_scope is not None else ("memory", "message", "document")
        )
        hits, truncated = await self._chunk_lists(where, conditions, kinds, plan=plan, limit=depth)
        ranked, chunks = _best_chunks(hits)
        return ranked, chunks, truncated

    async def _chunk_lists(
        self,
        where: _Where,
        conditions: SearchFilter,
        kinds: tuple[SourceKind, ...],
        *,
        query: str = "",
        plan: _Plan | None = None,
        limit: int | None = None,
    ) -> tuple[list[Hit], bool]:
        """The chunk store's list for the scope, best first, and whether a list was cut
        at ``limit`` (default: the candidates setting). A conversation's search asks once
        for that conversation's sources and once for the workspace's documents and
        memory (other conversations' memory is left out when hydrated). When a list was
        cut, only the first ``limit`` hits are kept: those are the same whatever the depth
        (each is in its own list's first ``limit``)."""
        chunks = self._chunks
        if chunks is None:
            return [], False
        limit = self._candidates if limit is None else limit
        asks: list[SearchFilter] = []
        if where.memory_scope is not None and where.conversation_id is None and where.workspace_id:
            # A workspace's own memory (SearchMemoryItems on `workspaces/{w}`) shares its
            # index with every conversation's memory: asked without those.
            asks.append(
                dataclasses.replace(_narrowed(conditions, kinds, None), without_conversation=True)
            )
        elif where.conversation_id is None:
            asks.append(_narrowed(conditions, kinds, None))
        else:
            asks.append(
                _narrowed(
                    conditions,
                    tuple(k for k in kinds if k != "document"),
                    frozenset({where.conversation_id}),
                )
            )
            if where.memory_scope is None:
                asks.append(_narrowed(conditions, tuple(k for k in kinds if k != "message"), None))
        lists = []
        for ask in asks:
            if ask.sources is not None and not ask.sources:
                continue
            if ask.conversation_ids is not None and not ask.conversation_ids:
                continue
            try:
                if plan is None:
                    hits = await chunks.fulltext([where.owner], query_terms(query), ask, limit)
                else:
                    assert plan.model is not None  # noqa: S101 (a semantic plan has both)
                    assert plan.vector is not None  # noqa: S101
                    hits = await chunks.nearest(
                        [where.owner],
                        plan.vector,
                        len(plan.vector),
                        plan.model.key(plan.generation),
                        limit,
                        ask,
                        self._ef_search,
                    )
            except Unsearchable:
                raise _unsearchable() from None
            lists.append(hits)
        merged = _merge(lists)
        truncated = any(len(hits) >= limit for hits in lists)
        return (merged[:limit] if truncated else merged), truncated

    async def _hydrate(
        self,
        where: _Where,
        conditions: SearchFilter,
        fused: list[Fused[Key]],
        chunks: dict[Key, int],
    ) -> list[pb.SearchResult]:
        """The results of the sources still there and visible, in ``fused``'s order."""
        memory_ids, message_ids, file_ids = set(), set(), set()
        for item in fused:
            kind, name = item.key
            last = name.rsplit("/", 1)[-1]
            if kind == "memory":
                memory_ids.add(last)
            elif kind == "message":
                message_ids.add(last)
            else:
                file_ids.add(last)
        # Memory the full-text list found is read again with the rest: one path
        # decides visibility for every list.
        sources = await stored(
            self._store.sources(
                memory_ids=memory_ids,
                message_ids=message_ids,
                file_ids=file_ids,
                chunk_ids={chunks[item.key] for item in fused if item.key[0] == "document"},
            )
        )
        results = []
        for item in fused:
            result = self._result(where, conditions, item, chunks.get(item.key), sources)
            if result is not None:
                results.append(result)
        return results

    def _result(
        self,
        where: _Where,
        conditions: SearchFilter,
        item: Fused[Key],
        chunk_id: int | None,
        sources: Sources,
    ) -> pb.SearchResult | None:
        kind, name = item.key
        last = name.rsplit("/", 1)[-1]
        result = pb.SearchResult(score=item.score, scores=_scores(item))
        if kind == "memory":
            record = sources.memory.get(last)
            if record is None or str(memory_name(record)) != name:
                return None
            if not self._memory_visible(where, record) or not memory_matches(conditions, record):
                return None
            result.memory_item.CopyFrom(memory_proto(record))
            return result
        if kind == "message":
            found = sources.messages.get(last)
            if found is None:
                return None
            message, workspace = found
            expected = MessageName(workspace, message.conversation_id, message.id)
            if workspace != where.workspace_id or name != str(expected):
                return None
            if where.conversation_id not in (None, message.conversation_id):
                return None
            result.message.CopyFrom(message_proto(message, workspace))
            return result
        info = sources.files.get(last)
        chunk = sources.chunks.get(chunk_id) if chunk_id is not None else None
        if info is None or chunk is None or chunk.source != name:
            return None
        if info.workspace_id != where.workspace_id or name != str(
            FileName(info.workspace_id, last)
        ):
            return None
        result.document_chunk.CopyFrom(
            pb.DocumentChunk(
                file=name,
                display_name=info.display_name,
                chunk_index=chunk.chunk_index,
                start_offset=chunk.start_offset,
                end_offset=chunk.end_offset,
                text=chunk.text,
            )
        )
        return result

    @staticmethod
    def _memory_visible(where: _Where, record: MemoryRecord) -> bool:
        if (
            where.origin_workspace_id is not None
            and record.origin_workspace_id is not None
            and record.origin_workspace_id != where.origin_workspace_id
        ):
            return False
        if where.memory_scope is not None:
            return record.scope == where.memory_scope.scope
        if record.workspace_id is None or record.workspace_id != where.workspace_id:
            return False
        return where.conversation_id is None or record.conversation_id in (
            None,
            where.conversation_id,
        )

    # -- checks ------------------------------------------------------------------------------

    def _check_query(self, query: str, violations: Violations) -> None:
        if not query.strip():
            violations.add("query", "is required")
        check_text(query, "query", self.common.limits.max_query_chars, violations)

    def _next_page(self, found: int, end: int, token: str) -> str:
        """The next page's token: results go on past ``end`` (``found`` of them
        known), and the next page is not past ``MAX_SEARCH_RESULTS``."""
        if found > end and end < MAX_SEARCH_RESULTS:
            return self.common.pages.encode([end], token)
        return ""

    def _offset(self, page_token: str, token: str) -> int:
        if not page_token:
            return 0
        position = (pagination.Int(0, MAX_SEARCH_RESULTS),)
        return int(self.common.pages.decode(page_token, token, position)[0])


async def _settle(task: asyncio.Task[int]) -> None:
    """A count no longer wanted (the search fell back, or was cancelled) ends here, its
    failure read: a fallback does not wait on the database, nor leaves a task behind.
    Ended by ``cancel_all``, not awaited: awaiting it would raise its CancelledError,
    and suppressing that would swallow a cancel of the search too."""
    await cancel_all([task])
    if not task.cancelled():
        task.exception()


def _unsearchable() -> InvalidArgument:
    return InvalidArgument(
        "the query cannot be searched", [FieldViolation("query", "cannot be searched")]
    )


def _narrowed(
    conditions: SearchFilter,
    kinds: tuple[SourceKind, ...],
    conversations: frozenset[str] | None,
) -> SearchFilter:
    """``conditions`` for one ask of the chunk store: its sources and conversations
    within the filter's (an empty set: the ask can match nothing)."""
    current = conditions.sources
    sources = frozenset(k for k in kinds if (current is None or k in current))
    sources -= conditions.exclude_sources
    wanted = conditions.conversation_ids
    if conversations is not None:
        wanted = conversations if wanted is None else wanted & conversations
    return replace(
        conditions, sources=sources, exclude_sources=frozenset(), conversation_ids=wanted
    )


def _owner(scope: Scope) -> str:
    if scope.workspace_id is not None:
        return str(WorkspaceName(scope.workspace_id))
    return str(UserName(str(scope.user_id)))  # a user's scope has one


def _context_scope(parent: str) -> _Where:
    conversation = ConversationName.parse_or_none(parent)
    if conversation is not None:
        owner = conversation.parent
        return _Where(str(owner), owner.workspace, conversation.conversation)
    workspace = WorkspaceName.parse_or_none(parent)
    if workspace is not None:
        return _Where(str(workspace), workspace.workspace)
    raise InvalidArgument(
        "parent must be workspaces/{workspace} or a conversation",
        [FieldViolation("parent", "must be workspaces/{workspace} or a conversation's name")],
    )
