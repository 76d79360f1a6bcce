"""The semantic indexer's writes of embedded passages, for tests that hold a worker
between embedding a batch and writing it, or stop it there.

``gated_writes`` puts a ``ChunkStore`` in the composition root (``context.build``)
for the server built next, as ``semantickit`` puts the embedder there: the real
store, every read and write real, whose batch write (``replace_sources``, what the
worker calls once a batch is embedded) first calls the test's ``before``. A
``before`` that waits holds the worker there; one that raises stops it there, as a
failed write would.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import pytest

from switchboard.context import build
from switchboard.context.semantic.indexing.chunkstore import ChunkStore
from switchboard.context.semantic.ports import ChunkRecord, SourceKind


class WriteGate:
    """What the server's chunk store does before each batch write."""

    def __init__(self) -> None:
        #: Called (and awaited if it returns an awaitable) before each batch write.
        self.before: Callable[[], object] | None = None

    async def passed(self) -> None:
        if self.before is not None:
            result = self.before()
            if inspect.isawaitable(result):
                await result


def gated_writes(monkeypatch: pytest.MonkeyPatch) -> WriteGate:
    """A gate on the batch writes of the chunk store of the server built next."""
    gate = WriteGate()

    class GatedChunkStore(ChunkStore):
        async def replace_sources(
            self,
            replacements: Sequence[tuple[SourceKind, str, Sequence[ChunkRecord]]],
            vectors: Sequence[Sequence[Sequence[float]]],
            embedding_key: str,
            dims: int,
        ) -> None:
            await gate.passed()
            await super().replace_sources(replacements, vectors, embedding_key, dims)

    monkeypatch.setattr(build, "ChunkStore", GatedChunkStore)
    return gate
