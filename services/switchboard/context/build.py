"""The context service as a process builds it: the domain with its plugins and limits.

The domain is one per process (``context_domain``): the context service serves
it, and an in-process dispatcher reaches it through ``LocalContext``.

A workspace's embedding calls are held and charged in its budgets like model
calls (docs/semantic.md, "Embeddings"). The budgets are the dispatcher's, which
this service may not import: it asks for a ``Charger`` through
``EMBEDDING_CHARGER``, and the composition root (``mesh.connect``) plugs in the
budget ledger's.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Final

from switchboard.context import servicer
from switchboard.context.common import Limits
from switchboard.context.domain import ContextDomain, FileParts, Plugins, SemanticParts
from switchboard.context.files.blobs.stores import open_blob_store
from switchboard.context.files.catalog import FileLimits
from switchboard.context.files.reading.transcriber import Transcriber
from switchboard.context.files.reading.transcription import OpenAITranscriber
from switchboard.context.files.settings import FileSettings
from switchboard.context.privacy.exports import ExportLimits
from switchboard.context.semantic.embedder import Charger, OpenAIEmbedder
from switchboard.context.semantic.indexing.chunkstore import ChunkStore
from switchboard.context.semantic.indexing.indexer import IndexerLimits
from switchboard.context.semantic.ports import Embedder
from switchboard.context.semantic.retrieval.search import SEARCH_EMBED_TIMEOUT_S, SearchParts
from switchboard.context.semantic.settings import SemanticSettings
from switchboard.context.settings import ContextSettings
from switchboard.context.text.plugins import (
    load_entity_extractor,
    load_summarizer,
    load_token_counter,
)
from switchboard.context.windows.cache import WindowCache
from switchboard.context.windows.settings import WindowSettings
from switchboard.platform.cache import Cache
from switchboard.platform.config import KernelSettings, Sections
from switchboard.platform.events.bus import EventBus
from switchboard.platform.process import Port, Shared, setting
from switchboard.platform.rpc.server import ServiceRegistration
from switchboard.platform.security.egress import EgressPolicy, EgressSettings
from switchboard.platform.security.policy import Policy
from switchboard.platform.store.db import Database
from switchboard.platform.store.pagination import PageTokens
from switchboard.platform.store.vectors import FULL_TEXT_ONLY, vector_support

log = logging.getLogger("switchboard.context.semantic")

#: The charger of a workspace's embedding calls at the prices that
#: SWITCHBOARD_CONTEXT_EMBEDDINGS_PRICES names (a ValueError for bad ones).
EMBEDDING_CHARGER: Final = Port[Callable[[str], Charger]]("the embedding calls' charger")


def context_limits(settings: ContextSettings, windows: WindowSettings) -> Limits:
    return Limits(
        max_title_chars=200,
        max_metadata_bytes=settings.context_max_metadata_bytes,
        max_message_bytes=settings.context_max_message_bytes,
        max_parts=settings.context_max_message_parts,
        max_memory_chars=settings.context_max_memory_chars,
        max_members=settings.context_max_members,
        max_owned_workspaces=settings.context_max_owned_workspaces,
        max_conversations=settings.context_max_conversations,
        max_memory_items=settings.context_max_memory_items,
        max_pinned=settings.context_max_pinned,
        max_window_tokens=windows.context_max_window_tokens,
        image_tokens=windows.context_image_tokens,
        relevant_limit=windows.context_relevant_limit,
        auto_prune_messages=windows.context_auto_prune_messages,
        auto_prune_tokens=windows.context_auto_prune_tokens,
        summary_tokens=windows.context_summary_tokens,
        purge_after_s=settings.context_purge_after_s,
        writes_per_minute=settings.context_max_writes_per_minute,
        max_branches=settings.context_max_branches,
    )


def file_limits(settings: FileSettings, purge_after_s: int) -> FileLimits:
    return FileLimits(
        max_bytes=settings.context_files_max_bytes,
        quota_bytes=settings.context_files_quota_bytes,
        max_uploads=settings.context_files_max_uploads,
        upload_expiry_s=settings.context_files_upload_expiry_s,
        max_inline_bytes=settings.context_files_max_inline_bytes,
        max_text_chars=settings.context_files_max_text_chars,
        max_pdf_pages=settings.context_files_max_pdf_pages,
        extract_timeout_s=settings.context_files_extract_timeout_s,
        extract_memory_bytes=settings.context_files_extract_memory_bytes,
        extract_concurrency=settings.context_files_extract_concurrency,
        max_transcribe_bytes=settings.context_files_max_transcribe_bytes,
        transcribe_concurrency=settings.context_files_transcribe_concurrency,
        orphan_grace_s=settings.context_files_orphan_grace_s,
        purge_after_s=purge_after_s,
    )


def context_transcriber(settings: FileSettings, egress: EgressSettings) -> OpenAITranscriber | None:
    """The audio transcriber the settings configure, or None (no URL: audio files get no
    transcript). Its endpoint is reached through the egress policy like any other."""
    if not settings.context_transcription_url:
        return None
    with setting("SWITCHBOARD_EGRESS_ALLOW_CIDRS"):
        policy = EgressPolicy.from_settings(egress)
    return OpenAITranscriber(
        settings.context_transcription_url,
        model=settings.context_transcription_model,
        api_key=settings.context_transcription_api_key.get_secret_value(),
        policy=policy,
        max_bytes=settings.context_files_max_transcribe_bytes,
    )


def context_service(
    sections: Sections,
    database: Database,
    bus: EventBus,
    counters: Cache,
    page_tokens: PageTokens,
    *,
    policy: Policy | None = None,
    transcriber: Transcriber | None = None,
    egress: EgressPolicy | None = None,
    embedder: Embedder | None = None,
    vectors: bool = False,
    instance_id: str = "context",
) -> ContextDomain:
    """The context domain with its configured plugins; raises ConfigError for unknown ones.
    Its window cache is in the kernel's Redis."""
    settings, kernel = sections.section(ContextSettings), sections.section(KernelSettings)
    windows, files = sections.section(WindowSettings), sections.section(FileSettings)
    semantic = sections.section(SemanticSettings)
    with setting("SWITCHBOARD_CONTEXT_TOKENIZER"):
        counter = load_token_counter(windows.context_tokenizer)
    with setting("SWITCHBOARD_CONTEXT_SUMMARIZER"):
        summarizer = load_summarizer(windows.context_summarizer)
    with setting("SWITCHBOARD_CONTEXT_ENTITY_EXTRACTOR"):
        extractor = load_entity_extractor(settings.context_entity_extractor)
    cache = WindowCache(
        kernel.redis_url.get_secret_value(),
        timeout_s=kernel.redis_timeout_s,
        ttl_s=windows.context_window_cache_ttl_s,
        max_entries=windows.context_window_cache_entries,
        max_bytes=windows.context_window_cache_bytes,
    )
    with setting("SWITCHBOARD_CONTEXT_FILES_DIR"):
        blobs = open_blob_store(
            files,
            database_url=kernel.database_url.get_secret_value(),
            dev_mode=kernel.dev_mode,
        )
    return ContextDomain(
        database,
        bus,
        cache,
        counters,
        plugins=Plugins(counter, summarizer, extractor),
        limits=context_limits(settings, windows),
        page_tokens=page_tokens,
        files=FileParts(
            blobs=blobs,
            limits=file_limits(files, settings.context_purge_after_s),
            policy=policy,
            transcriber=transcriber,
            egress=egress,
            fetch_timeout_s=files.context_files_fetch_timeout_s,
            exports=ExportLimits(
                max_bytes=files.context_export_max_bytes,
                ttl=dt.timedelta(seconds=files.context_export_ttl_s),
                per_day=files.context_exports_per_day,
            ),
        ),
        semantic=SemanticParts(
            chunks=ChunkStore(database),
            embedder=embedder,
            vectors=vectors,
            indexer_limits=IndexerLimits.from_settings(semantic),
            search=SearchParts(
                candidates=semantic.context_semantic_candidates,
                ef_search=semantic.context_semantic_ef_search,
                # A search waits on its query's embedding at most this, then falls back:
                # a reader is waiting, unlike the indexer.
                embed_timeout_s=min(semantic.context_embeddings_timeout_s, SEARCH_EMBED_TIMEOUT_S),
            ),
        ),
        instance_id=instance_id,
    )


def context_embedder(settings: SemanticSettings, shared: Shared) -> Embedder | None:
    """The embeddings client for ``SWITCHBOARD_CONTEXT_EMBEDDINGS_URL`` (None without a
    URL), reached through the egress policy like any other endpoint; closed with the
    process (after the domain that uses it)."""
    if not settings.context_embeddings_url:
        return None
    with setting("SWITCHBOARD_EGRESS_ALLOW_CIDRS"):
        policy = EgressPolicy.from_settings(shared.section(EgressSettings))
    with setting("SWITCHBOARD_CONTEXT_EMBEDDINGS_PRICES"):
        charger = shared.plugged(EMBEDDING_CHARGER)(settings.context_embeddings_prices)
    embedder = OpenAIEmbedder(
        settings.context_embeddings_url,
        api_key=settings.context_embeddings_api_key.get_secret_value(),
        policy=policy,
        charger=charger,
        batch=settings.context_embeddings_batch,
        timeout_s=settings.context_embeddings_timeout_s,
        attempts=settings.context_embeddings_attempts,
        concurrency=settings.context_embeddings_concurrency,
    )
    shared.resources.push_async_callback(embedder.close)
    return embedder


async def semantic_engines(
    settings: SemanticSettings, shared: Shared, *, say: bool
) -> tuple[Embedder | None, bool]:
    """The embedder and whether the database has a vector engine; ``say``: log once
    (in a process serving ContextService) when semantic search is off, and why."""
    embedder = context_embedder(settings, shared)
    support = await vector_support(shared.database)
    if say:
        if embedder is None:
            log.info(
                "no embeddings endpoint is configured (SWITCHBOARD_CONTEXT_EMBEDDINGS_URL): "
                "%s; documents are still indexed for full-text search",
                FULL_TEXT_ONLY,
            )
        elif not support.available:
            log.warning("%s", support.reason)
        else:
            log.info("semantic search is on (%s)", support.engine)
    return embedder, support.available


async def context_domain(shared: Shared) -> ContextDomain:
    """The process's one context domain, started the first time a service asks for it."""

    async def make() -> ContextDomain:
        transcriber = context_transcriber(
            shared.section(FileSettings), shared.section(EgressSettings)
        )
        if transcriber is not None:
            # Closed after the domain (the stack unwinds in reverse): transcriptions stop first.
            shared.resources.push_async_callback(transcriber.close)
        serving = "context" in shared.settings.services
        embedder, vectors = await semantic_engines(
            shared.section(SemanticSettings), shared, say=serving
        )
        domain = context_service(
            shared.sections,
            shared.database,
            shared.bus,
            shared.cache,
            shared.page_tokens,
            policy=shared.policy,
            transcriber=transcriber,
            egress=EgressPolicy.from_settings(shared.section(EgressSettings)),
            embedder=embedder,
            vectors=vectors,
            instance_id=shared.instance_id,
        )
        # Maintenance (pruning, purging, indexing) runs where the context service is served.
        await domain.start(maintain=serving)
        shared.resources.push_async_callback(domain.close)
        return domain

    return await shared.part(ContextDomain, make)


async def build(shared: Shared) -> ServiceRegistration:
    return ServiceRegistration(
        servicer.SERVICE,
        servicer.ContextServiceServicer(await context_domain(shared)),
        servicer.PRESERIALIZED,
    )
