"""A workspace's semantic index settings and progress (Get/UpdateSemanticIndex).

No row means the server's defaults (``SWITCHBOARD_CONTEXT_EMBEDDINGS_MODEL`` and
``_DIMENSIONS``, messages not indexed). A change of the model or the dimensions
in effect moves the index to a new generation and enqueues every source of the
workspace in the same transaction, so the re-embed runs through the indexer's
queue like any other indexing (and survives a crash); switching
``index_messages`` on enqueues the workspace's messages, off their passages.
No event is published: nothing in the event log describes index settings, and
the queue, not the log, carries the work to every replica.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Final

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.semantic.indexing.indexer import Indexer
from switchboard.context.semantic.indexing.indexstore import IndexSettings, IndexStore
from switchboard.context.semantic.ports import SourceKind
from switchboard.platform.errors import Violations
from switchboard.platform.security.policy import Principal
from switchboard.platform.values.fieldmask import update_paths
from switchboard.platform.values.names import checked_etag
from switchboard.platform.values.resources import SemanticIndexName, WorkspaceName

MUTABLE: Final = ("embedding_model", "dimensions", "index_messages")
MAX_DIMENSIONS: Final = 2000
MAX_MODEL_CHARS: Final = 128
#: A model's name as OpenAI-compatible servers spell them (``text-embedding-3-small``,
#: ``BAAI/bge-m3``, ``nomic-embed-text:v1.5``, ``org/model@rev``).
MODEL: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")


class SemanticIndexes:
    def __init__(self, store: IndexStore, indexer: Indexer) -> None:
        self._store = store
        self._indexer = indexer

    async def get(self, name: str) -> pb.SemanticIndex:
        workspace_id = SemanticIndexName.parse(name, "name").workspace
        found = await self._store.settings([workspace_id])
        return await self._message(found.get(workspace_id) or IndexSettings(workspace_id))

    async def update(
        self, principal: Principal, request: pb.UpdateSemanticIndexRequest
    ) -> pb.SemanticIndex:
        given = request.semantic_index
        workspace_id = SemanticIndexName.parse(given.name, "semantic_index.name").workspace
        paths = update_paths(request.update_mask, given, MUTABLE)
        checked_etag(given.etag, "semantic_index.etag")
        _validate(given, paths)
        indexer = self._indexer

        def edit(before: IndexSettings) -> IndexSettings:
            after = before
            if "embedding_model" in paths:
                after = replace(after, model=given.embedding_model)
            if "dimensions" in paths:
                after = replace(after, dimensions=given.dimensions)
            if "index_messages" in paths:
                after = replace(after, index_messages=given.index_messages)
            old, new = indexer.model_of(before)[0], indexer.model_of(after)[0]
            if old != new:
                after = replace(after, generation=before.generation + 1)
            return after

        def enqueue(before: IndexSettings, after: IndexSettings) -> tuple[SourceKind, ...]:
            kinds: list[SourceKind] = []
            if after.generation != before.generation:
                kinds += ["memory", "document"]
                if after.index_messages:
                    kinds.append("message")
            elif after.index_messages and not before.index_messages:
                kinds.append("message")
            return tuple(kinds)

        def unindex_messages(before: IndexSettings, after: IndexSettings) -> bool:
            return before.index_messages and not after.index_messages

        stored, made = await self._store.update_settings(
            workspace_id, given.etag, edit, enqueue, unindex_messages
        )
        indexer.messages_indexed(workspace_id, stored.index_messages)
        if made:
            indexer.wake()
        return await self._message(stored)

    async def _message(self, index: IndexSettings) -> pb.SemanticIndex:
        indexer = self._indexer
        model, _ = indexer.model_of(index)
        key = indexer.key_of(index)
        owner = str(WorkspaceName(index.workspace_id))
        status = await self._store.status(owner, key)
        dims = await indexer.dimensions_of(index, owner)
        if key is None:
            state = pb.SEMANTIC_INDEX_STATE_DISABLED
        elif status.last_error:
            state = pb.SEMANTIC_INDEX_STATE_WAITING
        elif status.pending:
            state = pb.SEMANTIC_INDEX_STATE_INDEXING
        else:
            state = pb.SEMANTIC_INDEX_STATE_READY
        message = pb.SemanticIndex(
            name=str(SemanticIndexName(index.workspace_id)),
            embedding_model=index.model,
            dimensions=index.dimensions,
            index_messages=index.index_messages,
            state=state,
            indexed_count=status.indexed,
            pending_count=status.pending,
            last_error=status.last_error,
            effective_model=f"{model.name}/{dims}" if model.name else "",
            etag=f'"{index.version}"',
        )
        if index.updated_at is not None:
            message.update_time.FromDatetime(index.updated_at)
        return message


def _validate(given: pb.SemanticIndex, paths: list[str]) -> None:
    violations = Violations()
    if "embedding_model" in paths and given.embedding_model:
        if len(given.embedding_model) > MAX_MODEL_CHARS:
            violations.add(
                "semantic_index.embedding_model", f"must be at most {MAX_MODEL_CHARS} characters"
            )
        elif not MODEL.fullmatch(given.embedding_model):
            violations.add(
                "semantic_index.embedding_model",
                "must start with a letter or digit and hold only letters, digits and . _ : / @ + -",
            )
    if "dimensions" in paths and not 0 <= given.dimensions <= MAX_DIMENSIONS:
        violations.add(
            "semantic_index.dimensions",
            f"must be 0 (the server's default) to {MAX_DIMENSIONS:,}",
        )
    violations.check()


__all__ = ["MUTABLE", "SemanticIndexes"]
