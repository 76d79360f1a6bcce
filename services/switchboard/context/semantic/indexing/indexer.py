"""The semantic indexer: the event log, read in the background, made into indexed
passages (docs/semantic.md, Indexing).

Two loops per process serving ContextService, over ``indexstore.py``:

* **The feeder** (a leased feeder, ``platform/events/feeder.py``, with the
  indexer as its consumer: one replica at a time, the lease in
  ``semantic_cursor``) turns the events that change what is indexed into jobs,
  one per source, written in the transaction that advances the cursor
  (compare-and-set on holder and old cursor): memory items
  (``MEMORY_CHANGED``), messages of workspaces that index them
  (``MESSAGE_CREATED``), files (``FILE_CHANGED``), and a deleted or restored
  conversation's sources (``CONVERSATION_CHANGED``). A purged workspace's rows
  go by the database's cascade. It wakes on live events and catches up every
  ``poll_s``. A new deployment starts at the head its replica started at; a
  cursor behind the log's horizon enqueues every source there is (a rescan),
  since the events in between are gone and any of them may have changed
  anything. Taking the lease also reconciles: passages under another model key,
  of conversations gone, and memory items and documents never indexed are
  enqueued.
* **The workers** (every replica) claim due jobs with an expiry, load each
  source's *current* text from its table (so an out-of-order or repeated event
  cannot index stale text), cut it into passages, embed what changed, and
  write the source's passages in one transaction (the chunk store's
  ``replace_source``). The job is then deleted unless it was enqueued again
  meanwhile. A source already indexed with the same passages under the same
  model key is not embedded again. An endpoint down, a budget exhausted or
  vectors of the wrong size keep the job with a capped backoff and the reason
  (the index is WAITING) until it succeeds.

This module does not import grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from switchboard.api.events.v1 import events_pb2
from switchboard.context.semantic.indexing.chunking import chunk_text
from switchboard.context.semantic.indexing.indexstore import (
    IndexSettings,
    IndexStore,
    Job,
    NewJob,
    Source,
    Stored,
    memory_owner,
    owner_ids,
    stale,
)
from switchboard.context.semantic.ports import (
    ChunkRecord,
    Embedder,
    EmbeddingModel,
    EmbeddingsBudgetExhausted,
    EmbeddingsUnavailable,
    SourceKind,
)
from switchboard.platform.background import cancel_within
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import Logged
from switchboard.platform.events.feeder import FeedSettings, LeasedFeeder
from switchboard.platform.events.feedstore import Work
from switchboard.platform.events.workers import work_rounds
from switchboard.platform.store.db import Database, log_failure
from switchboard.platform.store.models import SemanticCursorRow
from switchboard.platform.values.names import now
from switchboard.platform.values.resources import (
    ConversationName,
    FileName,
    MemoryName,
    MessageName,
    WorkspaceName,
)

if TYPE_CHECKING:
    from switchboard.context.semantic.settings import SemanticSettings

log = logging.getLogger("switchboard.context.semantic")

#: Events read from the log per feeder transaction.
FEED_BATCH: Final = 500
#: How often the replica feeding looks for passages of purged conversations.
SWEEP_EVERY_S: Final = 300.0
CLOSE_TIMEOUT_S: Final = 5.0

_MEMORY: Final = events_pb2.EVENT_TYPE_MEMORY_CHANGED
_MESSAGE: Final = events_pb2.EVENT_TYPE_MESSAGE_CREATED
_FILE: Final = events_pb2.EVENT_TYPE_FILE_CHANGED
_CONVERSATION: Final = events_pb2.EVENT_TYPE_CONVERSATION_CHANGED
_DELETED: Final = events_pb2.EVENT_TYPE_MESSAGE_DELETED
_WANTED: Final = frozenset({_MEMORY, _MESSAGE, _DELETED, _FILE, _CONVERSATION})


class ChunkWriter(Protocol):
    """What the indexer needs of the chunk store (``chunkstore.ChunkStore``)."""

    async def replace_source(
        self,
        source_kind: SourceKind,
        source: str,
        chunks: Sequence[ChunkRecord],
        vectors: Sequence[Sequence[float]] | None,
        embedding_key: str,
        dims: int,
    ) -> list[int]:
        """Make ``chunks`` (with ``vectors`` of ``dims``, or none) the source's
        passages, in one transaction."""
        ...

    async def replace_sources(
        self,
        replacements: Sequence[tuple[SourceKind, str, Sequence[ChunkRecord]]],
        vectors: Sequence[Sequence[Sequence[float]]],
        embedding_key: str,
        dims: int,
    ) -> None:
        """``replace_source`` for several sources embedded with one model, in one
        transaction."""
        ...

    async def delete_source(self, source_kind: SourceKind, source: str) -> int:
        """Remove every passage of the source (nothing if it has none)."""
        ...

    async def dimensions_of(self, owner: str, embedding_key: str) -> int:
        """The dimension count of ``owner``'s vectors under ``embedding_key`` (0: none)."""
        ...


@dataclass(frozen=True)
class IndexerLimits:
    chunk_chars: int = 1500
    chunk_overlap: int = 200
    max_chunks: int = 512
    #: Jobs claimed per round.
    batch: int = 32
    poll_s: float = 2.0
    lease_s: float = 15.0
    #: How long a claim holds its jobs unless renewed (every third of it while the
    #: batch is worked on): a dead replica's jobs are retaken this long after.
    claim_s: float = 15.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    #: The server's defaults for a workspace that names none.
    default_model: str = ""
    default_dimensions: int = 0

    @classmethod
    def from_settings(cls, settings: SemanticSettings) -> IndexerLimits:
        return cls(
            chunk_chars=settings.context_semantic_chunk_chars,
            chunk_overlap=settings.context_semantic_chunk_overlap,
            max_chunks=settings.context_semantic_max_chunks,
            poll_s=settings.context_semantic_poll_s,
            lease_s=settings.context_semantic_lease_s,
            claim_s=max(3.0, settings.context_semantic_lease_s),
            default_model=settings.context_embeddings_model,
            default_dimensions=settings.context_embeddings_dimensions,
        )


@dataclass(frozen=True)
class _Batch:
    workspaces: list[str]
    conversations: list[tuple[str, str, bool]]
    memory: list[NewJob]
    messages: list[NewJob]
    documents: list[NewJob]

    @property
    def empty(self) -> bool:
        return not (self.conversations or self.memory or self.messages or self.documents)


def _sorted(items: Sequence[Logged]) -> _Batch:
    workspaces: dict[str, None] = {}
    conversations: list[tuple[str, str, bool]] = []
    memory: list[NewJob] = []
    messages: list[NewJob] = []
    documents: list[NewJob] = []
    for item in items:
        event = item.event
        if event.type == _MEMORY:
            name = event.memory_changed.memory_item.name
            if memory_item := MemoryName.parse_or_none(name):
                memory.append(NewJob("memory", name, memory_owner(str(memory_item.scope))))
        elif event.type in (_MESSAGE, _DELETED):
            # A deleted message's job finds it gone and drops its passages.
            name = (
                event.message_created.message.name
                if event.type == _MESSAGE
                else event.message_deleted.message
            )
            if message := MessageName.parse_or_none(name):
                workspaces[message.workspace] = None
                messages.append(NewJob("message", name, str(message.parent.parent)))
        elif event.type == _FILE:
            name = event.file_changed.file.name
            if file := FileName.parse_or_none(name):
                documents.append(NewJob("document", name, str(file.parent)))
        elif event.type == _CONVERSATION:
            change = event.conversation_changed
            conversation = ConversationName.parse_or_none(change.conversation.name)
            if conversation is None:
                continue
            ids = (conversation.workspace, conversation.conversation)
            if change.change == events_pb2.CHANGE_KIND_DELETED:
                conversations.append((*ids, False))
            elif (
                change.change == events_pb2.CHANGE_KIND_UPDATED
                and not change.conversation.HasField("delete_time")
            ):
                # A restore (or an edit): its sources, unless some are indexed already.
                conversations.append((*ids, True))
    return _Batch(list(workspaces), conversations, memory, messages, documents)


def _checked(vectors: list[list[float]], count: int, model: EmbeddingModel) -> list[list[float]]:
    """``vectors`` if there is one per text, each of the model's dimensions."""
    if len(vectors) != count:
        raise EmbeddingsUnavailable(
            f"the endpoint answered {len(vectors)} vectors for {count} texts"
        )
    wrong = [len(v) for v in vectors if model.dimensions and len(v) != model.dimensions]
    if wrong:
        raise EmbeddingsUnavailable(
            f"the endpoint answered vectors of {wrong[0]} dimensions, not {model.dimensions}"
        )
    return vectors


class Indexer:
    """The feeder and the workers of one process. ``start()`` runs them; ``close()``
    stops them and hands the lease and claims back (``release=False``: as a crash)."""

    def __init__(
        self,
        database: Database,
        bus: EventBus,
        chunks: ChunkWriter,
        embedder: Embedder | None,
        limits: IndexerLimits,
        *,
        instance_id: str,
        vectors: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.store = IndexStore(database)
        self._chunks = chunks
        self._embedder = embedder
        self.limits = limits
        self._me = instance_id
        #: Whether the database has a vector engine (the chunk store's detection).
        self._vectors = vectors
        self._rng = rng or random.SystemRandom()
        self._work_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.feeder = LeasedFeeder(
            database,
            bus,
            SemanticCursorRow,
            self,
            FeedSettings(
                name="semantic feeder",
                lease_s=limits.lease_s,
                poll_s=limits.poll_s,
                batch=FEED_BATCH,
                gap_warning="semantic indexer cursor is outside the retained event log; every "
                "source is enqueued again instead",
            ),
            instance_id=instance_id,
            log=log,
        )
        #: Workspaces that index messages, as last read (only decides whether a
        #: message wakes the feeder; the feed transaction reads the settings).
        self._messaging: set[str] = set()
        self._sweep_at = 0.0
        #: Jobs this process holds now (released at a clean close).
        self._held: list[Job] = []
        #: Held while claims are renewed or given back, so both see the same expiry.
        self._claims = asyncio.Lock()

    # -- what is in effect ---------------------------------------------------------------

    @property
    def semantic(self) -> bool:
        """Whether passages are embedded at all (an endpoint and a vector engine)."""
        return self._embedder is not None and self._embedder.configured and self._vectors

    def model_of(self, index: IndexSettings | None) -> tuple[EmbeddingModel, int]:
        """The model and generation in effect for an index (None: a user's, the defaults)."""
        model = (index.model if index is not None else "") or self.limits.default_model
        dims = (index.dimensions if index is not None else 0) or self.limits.default_dimensions
        generation = index.generation if index is not None else 1
        return EmbeddingModel(model, dims), generation

    def key_of(self, index: IndexSettings | None) -> str | None:
        """The model key passages of the index are embedded under; None when not embedded."""
        if not self.semantic:
            return None
        model, generation = self.model_of(index)
        return model.key(generation) if model.name else None

    async def dimensions_of(self, index: IndexSettings | None, owner: str) -> int:
        """How many numbers the index's vectors have: the dimensions asked, else the
        model's own once known (this process's embedder learned them from an answer,
        or a vector of the index is stored); 0 until then."""
        model, generation = self.model_of(index)
        if model.dimensions or not model.name or not self.semantic:
            return model.dimensions
        assert self._embedder is not None  # noqa: S101 (semantic says so)
        return self._embedder.dimensions(model) or await self._chunks.dimensions_of(
            owner, model.key(generation)
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.feeder.start()
        self._tasks = [
            asyncio.get_running_loop().create_task(self._work_loop(), name="semantic-worker")
        ]

    async def close(self, *, release: bool = True) -> None:
        await self.feeder.close(release=release)
        tasks, self._tasks = self._tasks, []
        if await cancel_within(tasks, CLOSE_TIMEOUT_S):
            log.warning("semantic indexer tasks did not stop at close")
        if release and self._held:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self.store.release(self._held)
            except Exception as exc:  # noqa: BLE001 - the claims expire by themselves
                log_failure(log, "semantic indexer claims not released at close", exc)
        self._held = []

    def messages_indexed(self, workspace_id: str, on: bool) -> None:
        """This replica changed a workspace's ``index_messages``."""
        if on:
            self._messaging.add(workspace_id)
        else:
            self._messaging.discard(workspace_id)

    @property
    def fed(self) -> str | None:
        """How far this replica has fed the log, if it holds the lease."""
        return self.feeder.fed

    def wake(self) -> None:
        """Look for jobs now (settings changed on this replica)."""
        self._work_wake.set()

    # -- the feeder's consumer (``LogConsumer``) -------------------------------------------

    def wakes(self, event: events_pb2.Event) -> bool:
        """A message wakes the feeder only where messages are indexed; the others are
        read in its next round (a write is never followed by a transaction)."""
        if event.type == _MESSAGE:
            workspace = WorkspaceName.parse_or_none(event.workspace)
            return workspace is not None and workspace.workspace in self._messaging
        return event.type in _WANTED

    async def taken(self) -> None:
        """Repair what the index lacks before feeding, and again should this fail
        (the replica does not feed until it is done)."""
        if not self.semantic:
            return
        made = await self.store.reconcile(self._key_for_owner)
        if made:
            log.info("semantic index reconciled", extra={"jobs": made})
            self._work_wake.set()

    async def renewed(self) -> None:
        if time.monotonic() >= self._sweep_at:
            self._sweep_at = time.monotonic() + SWEEP_EVERY_S
            if await self.store.enqueue_orphans():
                self._work_wake.set()
        self._messaging = await self.store.messaging_workspaces()

    async def taking(self, items: Sequence[Logged]) -> Work | None:
        """The jobs ``items`` make; None if nothing that is indexed changed."""
        batch = _sorted(items)
        return None if batch.empty else self._jobs(batch, rescan=False)

    def gap(self) -> Work:
        """Any of the events lost may have changed anything: every source is enqueued."""
        return self._jobs(_sorted(()), rescan=True)

    def written(self, count: int) -> None:
        self._work_wake.set()

    def _key_for_owner(self, owner: str, index: IndexSettings | None) -> str | None:
        return self.key_of(index)

    def _jobs(self, batch: _Batch, *, rescan: bool) -> Work:
        def jobs(settings: Mapping[str, IndexSettings]) -> list[NewJob]:
            wanted = [
                job
                for job in batch.messages
                if (index := settings.get(job.workspace_id or "")) is not None
                and index.index_messages
            ]
            return [*batch.memory, *wanted, *batch.documents]

        return self.store.feeding(jobs, batch.workspaces, batch.conversations, rescan)

    # -- the workers ---------------------------------------------------------------------

    async def _work_loop(self) -> None:
        # Jobs queued here wake the workers; the looks between are for other
        # processes' jobs, less often while none are found.
        await work_rounds(
            self.work_once,
            self._work_wake,
            poll_s=self.limits.poll_s,
            what="semantic indexing",
            log=log,
            failed=self._forget_claims,
        )

    def _forget_claims(self) -> None:
        self._held = []

    async def work_once(self) -> tuple[int, dt.datetime | None]:
        """Claim and do one batch of jobs: (jobs claimed, when the next falls due)."""
        until = now() + dt.timedelta(seconds=self.limits.claim_s)
        jobs, later = await self.store.claim(until, self.limits.batch)
        if not jobs:
            return 0, later
        self._held = jobs
        renewing = asyncio.get_running_loop().create_task(self._renew(jobs))
        try:
            await self._do(jobs)
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            self._held = []
        return len(jobs), later

    async def _renew(self, jobs: Sequence[Job]) -> None:
        """Keep the batch's claims while it is worked on (a large document may take
        many embeddings requests)."""
        while True:
            await asyncio.sleep(self.limits.claim_s / 3)  # a period, not synchronization
            until = now() + dt.timedelta(seconds=self.limits.claim_s)
            try:
                async with self._claims:
                    await self.store.renew(jobs, until)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the write guard skips lapsed claims
                log_failure(log, "semantic job claims not renewed", exc)

    def _passages(self, source: Source) -> list[ChunkRecord]:
        workspace_id, user_id = owner_ids(source.owner)
        pieces = chunk_text(
            source.text,
            size=self.limits.chunk_chars,
            overlap=self.limits.chunk_overlap,
            max_chunks=self.limits.max_chunks,
        )
        return [
            ChunkRecord(
                owner=source.owner,
                source_kind=source.source_kind,
                source=source.source,
                chunk_index=piece.index,
                start_offset=piece.start,
                end_offset=piece.end,
                text=piece.text,
                created_at=source.created_at,
                label=source.label,
                conversation_id=source.conversation_id,
                meta=source.meta,
                workspace_id=workspace_id,
                user_id=user_id,
            )
            for piece in pieces
        ]

    async def _do(self, jobs: Sequence[Job]) -> None:
        sources, stored = await self.store.load(jobs)
        indexes = await self.store.settings(
            {workspace for job in jobs if (workspace := owner_ids(job.owner)[0])}
        )
        done: list[Job] = []
        # (owner, model, generation) -> [(job, passages)]
        to_embed: dict[tuple[str, EmbeddingModel, int], list[tuple[Job, list[ChunkRecord]]]] = {}
        for job in jobs:
            key = (job.source_kind, job.source)
            source = sources.get(key)
            present = stored.get(key)
            if source is None:
                if present is not None:
                    await self._chunks.delete_source(job.source_kind, job.source)
                done.append(job)
                continue
            passages = self._passages(source)
            texts = [p.text for p in passages]
            index = indexes.get(owner_ids(source.owner)[0] or "")
            model_key = self.key_of(index)
            if model_key is None:
                # Not embedded: documents and messages are still searchable by their
                # words; a memory item has its own full-text index, so its passages
                # are only kept current if some were written before.
                kept = source.source_kind != "memory" or present is not None
                if kept and stale(present, texts, ""):
                    await self._write(job, passages, None, "")
                done.append(job)
                continue
            if not stale(present, texts, model_key):
                done.append(job)  # indexed already, exactly so: nothing is embedded twice
                continue
            if not passages:
                await self._chunks.delete_source(job.source_kind, job.source)
                done.append(job)
                continue
            model, generation = self.model_of(index)
            to_embed.setdefault((source.owner, model, generation), []).append((job, passages))
        if done:
            async with self._claims:
                await self.store.finish(done)
        for (owner, model, generation), group in to_embed.items():
            await self._embed_group(owner, model, generation, group)

    async def _embed_group(
        self,
        owner: str,
        model: EmbeddingModel,
        generation: int,
        group: list[tuple[Job, list[ChunkRecord]]],
    ) -> None:
        embedder = self._embedder
        if embedder is None:  # pragma: no cover - key_of said embeddings are on
            return
        texts = [p.text for _, passages in group for p in passages]
        try:
            embedded = await embedder.embed(owner, texts, model)
            vectors = _checked(embedded.vectors, len(texts), model)
        except (EmbeddingsUnavailable, EmbeddingsBudgetExhausted) as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, EmbeddingsBudgetExhausted):
                reason = f"budget exhausted: {reason}"
            retry = [
                (job, now() + dt.timedelta(seconds=self._delay(job.attempts))) for job, _ in group
            ]
            async with self._claims:
                await self.store.retry(retry, reason)
            log.info(
                "semantic indexing waits for the embeddings endpoint",
                extra={"owner": owner, "jobs": len(group), "reason": reason},
            )
            return
        key = model.key(generation)
        finished: list[Job] = []
        replacements: list[tuple[SourceKind, str, Sequence[ChunkRecord]]] = []
        grouped: list[Sequence[Sequence[float]]] = []
        offset = 0
        for job, passages in group:
            mine = vectors[offset : offset + len(passages)]
            offset += len(passages)
            if now() > job.claimed_until - dt.timedelta(seconds=self.limits.claim_s / 4):
                continue  # the claim lapsed or is about to: another worker may hold the job
            replacements.append((job.source_kind, job.source, passages))
            grouped.append(mine)
            finished.append(job)
        if replacements:
            # One write for the batch (every passage here has a vector: empty sources
            # were deleted above), so the service's own writes wait once, not per source.
            await self._chunks.replace_sources(replacements, grouped, key, len(grouped[0][0]))
        if finished:
            async with self._claims:
                await self.store.finish(finished)

    async def _write(
        self,
        job: Job,
        passages: list[ChunkRecord],
        vectors: Sequence[Sequence[float]] | None,
        key: str,
    ) -> None:
        if not passages:
            await self._chunks.delete_source(job.source_kind, job.source)
            return
        dims = len(vectors[0]) if vectors else 0
        await self._chunks.replace_source(job.source_kind, job.source, passages, vectors, key, dims)

    def _delay(self, attempts: int) -> float:
        """Seconds before a failed job's next attempt: exponential, capped, half jittered."""
        ceiling = min(
            self.limits.backoff_max_s, self.limits.backoff_base_s * 2 ** min(attempts, 30)
        )
        return float(ceiling / 2 + self._rng.uniform(0.0, ceiling / 2))


__all__ = ["ChunkWriter", "Indexer", "IndexerLimits", "Stored"]
