"""The context domain as one handle: each resource's domain object, built together.

Callers reach a resource's methods through it (``domain.messages.append``,
``domain.windows.window``...); it adds none of its own beyond starting and
closing the background work.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Final

from switchboard.context.branches.catalog import Branches
from switchboard.context.branches.store import BranchStore
from switchboard.context.common import Common, Limits
from switchboard.context.conversations.catalog import Conversations
from switchboard.context.conversations.store import ConversationStore
from switchboard.context.files.blobs.port import BlobStore
from switchboard.context.files.blobs.stores import temporary_store
from switchboard.context.files.catalog import FileLimits, Files
from switchboard.context.files.fetch import UrlFetcher
from switchboard.context.files.reading.transcriber import Transcriber
from switchboard.context.files.store import FileStore
from switchboard.context.memory.catalog import Memory
from switchboard.context.memory.store import MemoryStore
from switchboard.context.messages.attachments import Attachments
from switchboard.context.messages.catalog import Messages
from switchboard.context.messages.store import MessageStore
from switchboard.context.privacy.eraser import ContextEraser
from switchboard.context.privacy.exports import DataExports, ExportLimits
from switchboard.context.privacy.exportstore import ExportStore
from switchboard.context.privacy.store import PrivacyStore
from switchboard.context.pruning.pruner import Pruning
from switchboard.context.pruning.store import PruneStore
from switchboard.context.semantic.indexing.chunkstore import ChunkStore
from switchboard.context.semantic.indexing.indexer import Indexer, IndexerLimits
from switchboard.context.semantic.indexing.indexes import SemanticIndexes
from switchboard.context.semantic.indexing.indexstore import IndexStore
from switchboard.context.semantic.ports import Embedder
from switchboard.context.semantic.retrieval.search import IndexerSettings, Search, SearchParts
from switchboard.context.semantic.retrieval.store import SearchStore
from switchboard.context.text.entities import EntityExtractor
from switchboard.context.text.summarizer import Summarizer
from switchboard.context.text.tokencount import TokenCounter
from switchboard.context.windows.builder import Windows
from switchboard.context.windows.cache import WindowCache
from switchboard.context.windows.store import WindowStore
from switchboard.context.workspaces.catalog import Members, Workspaces
from switchboard.context.workspaces.store import WorkspaceStore
from switchboard.platform.cache import Cache
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.erasure.store import CONTEXT, ErasureStore
from switchboard.platform.events.erasure.worker import ErasureWorker
from switchboard.platform.security.egress import EgressPolicy
from switchboard.platform.security.policy import Policy
from switchboard.platform.store.db import Database
from switchboard.platform.store.pagination import PageTokens


@dataclass(frozen=True)
class Plugins:
    """The domain's plugins (``SWITCHBOARD_CONTEXT_TOKENIZER``, ``..._SUMMARIZER``,
    ``..._ENTITY_EXTRACTOR``)."""

    counter: TokenCounter
    summarizer: Summarizer
    extractor: EntityExtractor


@dataclass(frozen=True)
class FileParts:
    """Where files live and what reaches outside for them. ``blobs`` None: a fresh
    temporary directory; ``egress`` None: the strictest policy for URL parts."""

    blobs: BlobStore | None = None
    limits: FileLimits | None = None
    policy: Policy | None = None
    transcriber: Transcriber | None = None
    egress: EgressPolicy | None = None
    fetch_timeout_s: float = 30.0
    #: Data exports' limits (ExportMyData).
    exports: ExportLimits = field(default_factory=ExportLimits)


@dataclass(frozen=True)
class SemanticParts:
    """The semantic index's parts. ``chunks`` None: nothing is indexed (the indexes'
    settings still are) and search is full-text over memory items only."""

    chunks: ChunkStore | None = None
    embedder: Embedder | None = None
    vectors: bool = False
    indexer_limits: IndexerLimits | None = None
    #: Search's tuning.
    search: SearchParts | None = None


FILES_IN_A_TEMPORARY_DIRECTORY: Final = FileParts()
NOTHING_INDEXED: Final = SemanticParts()


class ContextDomain:
    def __init__(
        self,
        database: Database,
        bus: EventBus,
        cache: WindowCache,
        counters: Cache,
        *,
        plugins: Plugins,
        limits: Limits,
        page_tokens: PageTokens,
        files: FileParts = FILES_IN_A_TEMPORARY_DIRECTORY,
        semantic: SemanticParts = NOTHING_INDEXED,
        instance_id: str = "context",
    ) -> None:
        """``files`` and ``semantic`` default to what tests and benchmarks need: files in a
        fresh temporary directory, nothing indexed (search full-text over memory items)."""
        counter, summarizer, extractor = plugins.counter, plugins.summarizer, plugins.extractor
        blobs, file_limits = files.blobs, files.limits
        chunks, embedder, vectors = semantic.chunks, semantic.embedder, semantic.vectors
        common = Common(bus, counters, limits=limits, page_tokens=page_tokens, counter=counter)
        self.limits = limits
        workspace_store = WorkspaceStore(database)
        conversation_store = ConversationStore(database)
        self.workspaces = Workspaces(common, workspace_store)
        self.members = Members(common, workspace_store)
        self.conversations = Conversations(common, conversation_store)
        self.branches = Branches(common, BranchStore(database))
        self.pruning = Pruning(
            common, PruneStore(database), conversation_store, summarizer=summarizer
        )
        if blobs is None:
            blobs = temporary_store()
        self.files = Files(
            common,
            FileStore(database),
            blobs,
            limits=file_limits or FileLimits(purge_after_s=limits.purge_after_s),
            policy=files.policy,
            transcriber=files.transcriber,
        )
        self.exports = DataExports(ExportStore(database), blobs, files.exports, claimer=instance_id)
        self.files.exports = self.exports
        # A message's file parts become files of its workspace; URL parts are
        # fetched under the egress policy (the strictest when none is given).
        self._attachments = Attachments(
            self.files,
            UrlFetcher(files.egress or EgressPolicy(), timeout_s=files.fetch_timeout_s),
            max_inline_bytes=self.files.file_limits.max_inline_bytes,
        )
        self.messages = Messages(
            common,
            MessageStore(database),
            extractor=extractor,
            appended=self.pruning.appended,
            attachments=self._attachments,
        )
        self._chunks = chunks
        self.indexer = Indexer(
            database,
            bus,
            chunks or _NoChunks(),
            embedder,
            semantic.indexer_limits or IndexerLimits(),
            instance_id=instance_id,
            vectors=vectors,
        )
        self.semantic = SemanticIndexes(IndexStore(database), self.indexer)
        self.search = Search(
            common,
            SearchStore(database),
            replace(
                semantic.search or SearchParts(),
                embedder=embedder,
                settings=IndexerSettings(self.indexer),
                chunks=chunks,
                vectors=vectors,
            ),
        )
        self.memory = Memory(common, MemoryStore(database), self.search)
        self.windows = Windows(
            common, WindowStore(database), cache, files=self.files, search=self.search
        )
        #: The context part of deleted accounts' erasures (docs/privacy.md).
        self.erasing = ErasureWorker(
            CONTEXT,
            ErasureStore(database),
            bus,
            ContextEraser(
                PrivacyStore(database),
                ErasureStore(database),
                self.messages,
                self.files,
                self.exports,
                chunks,
                cache,
            ),
            claimer=instance_id,
        )

    async def start(self, *, maintain: bool = True) -> None:
        """Start background work; ``maintain`` only in processes serving ContextService."""
        self.pruning.start(maintain=maintain)
        await self.files.start(maintain=maintain)
        if maintain and self._chunks is not None:
            await self.indexer.start()
        if maintain:
            self.erasing.start()
            self.exports.start()

    async def close(self) -> None:
        await self.erasing.stop()
        await self.exports.close()
        await self.indexer.close()
        await self.pruning.close()
        await self.files.close()
        await self._attachments.close()
        await self.windows.cache.close()


class _NoChunks:
    """The chunk store of a domain that indexes nothing (its indexer is not started)."""

    async def replace_source(self, *args: object) -> list[int]:
        raise RuntimeError("this context domain has no chunk store")

    async def replace_sources(self, *args: object) -> None:
        raise RuntimeError("this context domain has no chunk store")

    async def delete_source(self, *args: object) -> int:
        raise RuntimeError("this context domain has no chunk store")

    async def dimensions_of(self, *args: object) -> int:
        return 0
