"""The semantic index's store: chunks, their full-text rows and their vectors.

SQL only, plain values in and out (``ports.py``). A source's chunks are
replaced whole in one transaction: the old chunks go with their full-text rows
and vectors, the new ones come with theirs, so a search never sees half a
source and a repeated replace leaves one copy.

Vectors live in one table per dimension count, made on first use
(``ensure_dimensions``): on SQLite a sqlite-vec ``vec0`` table partitioned by
owner (an exact, brute-force scan of one owner's vectors); on PostgreSQL a
``vector(n)`` table with an HNSW index (cosine), whose rows go with their
chunk by a cascading foreign key. ``vec0`` has no foreign keys, so on SQLite
the store deletes a chunk's vector itself, in every dimension's table.

Filtered nearest-neighbour queries (``nearest``). The ANN index does not know
the filters (pgvector 0.6 has no iterative scan), so the store asks it for
more candidates than wanted (``OVER_FETCH``, and ``hnsw.ef_search`` at least
that many), keeps those that pass the filters; when fewer than ``k`` survive
out of a full candidate list it asks again with the widest search (1000), and
if that is still short it answers by an exact scan of the filtered chunks: a
selective filter costs a scan of what it selects, never a wrong answer. Scores
are cosine similarities (1 - cosine distance).
"""

from __future__ import annotations

import json
import logging
import math
import re
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, TypeVar

from sqlalchemy import bindparam, delete, select, text
from sqlalchemy.exc import DataError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter

from switchboard.context.records import Unsearchable
from switchboard.context.semantic.ports import (
    ChunkRecord,
    Comparison,
    Hit,
    SearchFilter,
    SourceKind,
)
from switchboard.context.text.fulltext import fts5_match, pg_tsquery
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import VECTOR_TABLE_PREFIX, SemanticChunkRow, table_of
from switchboard.platform.store.storage import transaction

log = logging.getLogger("switchboard.context.semantic.store")
_T = TypeVar("_T")

#: pgvector's HNSW index takes ``vector`` columns of at most this many dimensions.
MAX_DIMENSIONS: Final = 2000
#: Most chunks one replace writes (the indexer's own cap is lower).
MAX_CHUNKS_PER_SOURCE: Final = 4096
#: Most results one query returns.
MAX_K: Final = 1000
#: Candidates asked of the ANN index per wanted result when filters may drop some.
OVER_FETCH: Final = 4
#: Candidates asked of vec0 at least (its brute-force scan costs the same for any k).
SQLITE_FETCH: Final = 512
#: pgvector caps ``hnsw.ef_search`` at 1000.
MAX_EF_SEARCH: Final = 1000
#: vec0 caps a KNN query's ``k`` at 4096.
_VEC0_MAX_K: Final = 4096

_CHUNKS: Final = table_of(SemanticChunkRow)
_CREATED_AT_TYPE: Final = _CHUNKS.c.created_at.type
_VECTOR_TABLE: Final = re.compile(re.escape(VECTOR_TABLE_PREFIX) + r"(\d+)")
# Advisory lock key serializing vector-table DDL across replicas (PostgreSQL).
_DDL_LOCK: Final = 0x5EC7_0057


class VectorMismatch(ValueError):
    """Vectors that do not fit: wrong dimension count, not finite, or not one per chunk.

    ``str()`` says which, fit for the indexer to record as the source's error.
    """


class ChunkCounts(NamedTuple):
    """An owner's chunks: how many carry a vector of the current embedding, of all."""

    indexed: int
    total: int


@dataclass(frozen=True)
class StoredChunk:
    """A chunk as search shows it: where it is in its source, and its text."""

    id: int
    owner: str
    source_kind: SourceKind
    source: str
    chunk_index: int
    start_offset: int
    end_offset: int
    text: str
    label: str
    conversation_id: str | None
    created_at: Any
    meta: str
    embedding: str


def vector_table(dims: int) -> str:
    """The table holding ``dims``-dimensional vectors (dims checked, so safe to inline)."""
    _check_dims(dims)
    return f"{VECTOR_TABLE_PREFIX}{dims}"


def _check_dims(dims: int) -> None:
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= MAX_DIMENSIONS:
        raise VectorMismatch(f"dimensions must be 1 to {MAX_DIMENSIONS}, not {dims!r}")


def _check_vector(vector: Sequence[float], dims: int, what: str) -> None:
    if len(vector) != dims:
        raise VectorMismatch(f"{what} has {len(vector)} dimensions; the index has {dims}")
    if not all(math.isfinite(value) for value in vector):
        raise VectorMismatch(f"{what} has a value that is not a finite number")


class ChunkStore:
    """The chunks of one database, with their full-text rows and vectors."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._sqlite = database.dialect_name == "sqlite"
        # Dimension tables known to exist (made here or found): DDL once per process.
        self._tables: set[int] = set()

    async def _run(self, work: Callable[[Session], _T], *, write: bool) -> _T:
        return await transaction(self._database, work, write=write, log=log)

    # -- vector tables -----------------------------------------------------------------

    async def ensure_dimensions(self, dims: int) -> None:
        """Make ``semantic_vec_<dims>`` if missing; safe with replicas doing the same.

        Needs the vector engine (``platform/store/vectors.py``): on PostgreSQL the
        ``vector`` extension must exist in the database.
        """
        _check_dims(dims)
        if dims in self._tables:
            return

        def work(db: Session) -> None:
            self._create_table(db, dims)

        await self._run(work, write=True)
        self._tables.add(dims)

    def _create_table(self, db: Session, dims: int) -> None:
        table = vector_table(dims)
        if self._sqlite:
            # One writer at a time on SQLite: IF NOT EXISTS is enough.
            db.execute(
                text(
                    f"CREATE VIRTUAL TABLE IF NOT EXISTS {table} USING vec0("
                    "chunk_id integer primary key, owner text partition key, "
                    f"embedding float[{dims}] distance_metric=cosine)"
                )
            )
            return
        # CREATE ... IF NOT EXISTS still races on the catalog's unique names.
        db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _DDL_LOCK})
        db.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {table} ("
                "chunk_id bigint PRIMARY KEY REFERENCES semantic_chunks(id) ON DELETE CASCADE, "
                f"owner varchar(160) NOT NULL, embedding vector({dims}) NOT NULL)"
            )
        )
        db.execute(
            text(
                f"CREATE INDEX IF NOT EXISTS ix_{table}_hnsw ON {table} "
                "USING hnsw (embedding vector_cosine_ops)"
            )
        )

    def _vector_tables(self, db: Session) -> list[str]:
        """Every dimension's vector table in the database (shadow tables left out)."""
        if self._sqlite:
            names = db.execute(
                text("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE :p"),
                {"p": f"{VECTOR_TABLE_PREFIX}%"},
            ).scalars()
        else:
            names = db.execute(
                text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                    "AND tablename LIKE :p"
                ),
                {"p": f"{VECTOR_TABLE_PREFIX}%"},
            ).scalars()
        return sorted(name for name in names if _VECTOR_TABLE.fullmatch(name))

    # -- writes ------------------------------------------------------------------------

    async def replace_source(
        self,
        source_kind: SourceKind,
        source: str,
        chunks: Sequence[ChunkRecord],
        vectors: Sequence[Sequence[float]] | None,
        embedding_key: str,
        dims: int,
    ) -> list[int]:
        """Replace the source's chunks with ``chunks`` (and their vectors) in one
        transaction; the new chunks' ids, in order.

        ``vectors`` None: the chunks are full-text only (``embedding`` ""). Raises
        VectorMismatch (before writing anything) for vectors that do not fit.
        """
        _check_source(source_kind, source, chunks, vectors, dims)
        if vectors is not None and chunks:
            await self.ensure_dimensions(dims)

        def work(db: Session) -> list[int]:
            self._delete_source(db, source_kind, source)
            ids = self._insert_chunks(db, chunks, "" if vectors is None else embedding_key)
            if vectors is not None and ids:
                self._insert_vectors(db, dims, ids, chunks, vectors)
            return ids

        ids: list[int] = await self._run(work, write=True)
        return ids

    async def replace_sources(
        self,
        replacements: Sequence[tuple[SourceKind, str, Sequence[ChunkRecord]]],
        vectors: Sequence[Sequence[Sequence[float]]],
        embedding_key: str,
        dims: int,
    ) -> None:
        """``replace_source`` for several sources with vectors of one model, in ONE
        transaction: on SQLite, one writer at a time, a batch of sources costs the
        writes of the service (AppendMessage...) one wait instead of one per source."""
        if len(vectors) != len(replacements):
            raise ValueError("one list of vectors per source")
        for (source_kind, source, chunks), mine in zip(replacements, vectors, strict=True):
            _check_source(source_kind, source, chunks, mine, dims)
        await self.ensure_dimensions(dims)

        def work(db: Session) -> None:
            for (source_kind, source, chunks), mine in zip(replacements, vectors, strict=True):
                self._delete_source(db, source_kind, source)
                ids = self._insert_chunks(db, chunks, embedding_key)
                if ids:
                    self._insert_vectors(db, dims, ids, chunks, mine)

        await self._run(work, write=True)

    async def delete_source(self, source_kind: SourceKind, source: str) -> int:
        """Delete the source's chunks with their full-text rows and vectors; how many."""

        def work(db: Session) -> int:
            return self._delete_source(db, source_kind, source)

        deleted: int = await self._run(work, write=True)
        return deleted

    async def delete_owner(self, owner: str) -> int:
        """Delete every chunk of ``owner`` (a workspace or user going away); how many."""

        def work(db: Session) -> int:
            ids = list(db.execute(select(_CHUNKS.c.id).where(_CHUNKS.c.owner == owner)).scalars())
            self._delete_ids(db, ids)
            return len(ids)

        deleted: int = await self._run(work, write=True)
        return deleted

    def _delete_source(self, db: Session, source_kind: str, source: str) -> int:
        ids = list(
            db.execute(
                select(_CHUNKS.c.id).where(
                    _CHUNKS.c.source_kind == source_kind, _CHUNKS.c.source == source
                )
            ).scalars()
        )
        self._delete_ids(db, ids)
        return len(ids)

    def _delete_ids(self, db: Session, ids: list[int]) -> None:
        if not ids:
            return
        if self._sqlite:
            self._forget_sqlite_rows(db, ids)
        # PostgreSQL: the vectors go by their foreign key, the full-text column with the row.
        db.execute(
            delete(_CHUNKS).where(_CHUNKS.c.id.in_(bindparam("ids", expanding=True))), {"ids": ids}
        )

    def _forget_sqlite_rows(self, db: Session, ids: list[int]) -> None:
        """Drop the full-text rows and vectors keyed by ``ids`` (SQLite keeps them apart)."""
        params = {"ids": ids}
        expanding: BindParameter[Any] = bindparam("ids", expanding=True)
        db.execute(
            text("DELETE FROM semantic_chunks_fts WHERE rowid IN :ids").bindparams(expanding),
            params,
        )
        for table in self._vector_tables(db):
            db.execute(
                text(f"DELETE FROM {table} WHERE chunk_id IN :ids").bindparams(expanding),  # noqa: S608
                params,
            )

    def _insert_chunks(self, db: Session, chunks: Sequence[ChunkRecord], key: str) -> list[int]:
        ids: list[int] = []
        for chunk in chunks:
            row = {
                "owner": chunk.owner,
                "workspace_id": chunk.workspace_id,
                "user_id": chunk.user_id,
                "source_kind": chunk.source_kind,
                "source": chunk.source,
                "chunk_index": chunk.chunk_index,
                "start_offset": chunk.start_offset,
                "end_offset": chunk.end_offset,
                "conversation_id": chunk.conversation_id,
                "label": chunk.label,
                "created_at": chunk.created_at,
                "text": chunk.text,
                "meta": chunk.meta,
                "embedding": key,
            }
            ids.append(db.execute(_CHUNKS.insert().returning(_CHUNKS.c.id), row).scalar_one())
        if self._sqlite and ids:
            # A hard-deleted workspace's chunks went by cascade and left these rows
            # behind; a reused id must not inherit them.
            self._forget_sqlite_rows(db, ids)
            db.execute(
                text("INSERT INTO semantic_chunks_fts(rowid, text) VALUES (:id, :text)"),
                [{"id": i, "text": c.text} for i, c in zip(ids, chunks, strict=True)],
            )
        return ids

    def _insert_vectors(
        self,
        db: Session,
        dims: int,
        ids: list[int],
        chunks: Sequence[ChunkRecord],
        vectors: Sequence[Sequence[float]],
    ) -> None:
        table = vector_table(dims)
        rows = [
            {"id": i, "owner": c.owner, "v": self._vector_param(v)}
            for i, c, v in zip(ids, chunks, vectors, strict=True)
        ]
        value = "vec_f32(:v)" if self._sqlite else f"CAST(:v AS vector({dims}))"
        db.execute(
            text(f"INSERT INTO {table} (chunk_id, owner, embedding) VALUES (:id, :owner, {value})"),  # noqa: S608
            rows,
        )

    def _vector_param(self, vector: Sequence[float]) -> bytes | str:
        if self._sqlite:
            return array("f", vector).tobytes()
        # Nine significant digits round-trip a float4, which is what pgvector keeps.
        return "[" + ",".join(format(value, ".9g") for value in vector) + "]"

    # -- reads -------------------------------------------------------------------------

    async def nearest(
        self,
        owners: Sequence[str],
        query: Sequence[float],
        dims: int,
        embedding_key: str,
        k: int,
        filter: SearchFilter,
        ef_search: int = 40,
    ) -> list[Hit]:
        """The ``k`` chunks of ``owners`` nearest ``query`` that pass ``filter``, best first.

        Only chunks embedded with ``embedding_key``, never a deleted conversation's.
        Through the ANN index (HNSW on PostgreSQL, vec0 on SQLite), with the
        fallback to an exact scan described in the module docstring. Raises
        VectorMismatch for a query of the wrong dimension count.
        """
        _check_dims(dims)
        _check_vector(query, dims, "the query vector")
        k = max(0, min(k, MAX_K))
        if not owners or k == 0 or not await self._has_table(dims):
            return []
        # Always over-fetched: besides the filters, a deleted conversation's chunks and
        # those of another embedding (a re-embed half done) are dropped after the index.
        # vec0's cost is its scan, whatever k: there, fetch many at once.
        if self._sqlite:
            fetch = min(max(k * OVER_FETCH, SQLITE_FETCH), _VEC0_MAX_K)
        else:
            fetch = min(k * OVER_FETCH, MAX_EF_SEARCH)
        vector = self._vector_param(query)

        def work(db: Session) -> list[Hit]:
            hits = self._ann(db, owners, vector, dims, embedding_key, fetch, k, filter, ef_search)
            if len(hits.hits) < k and hits.full and not self._sqlite and fetch < MAX_EF_SEARCH:
                # The filters dropped too many: once more with the widest HNSW search.
                hits = self._ann(
                    db, owners, vector, dims, embedding_key, MAX_EF_SEARCH, k, filter, ef_search
                )
            if len(hits.hits) < k and hits.full:
                # Still too few out of a full candidate list: the true top k may lie
                # beyond it, so the exact answer over what the filters select.
                if self._sqlite:
                    return self._filtered_knn(db, owners, vector, dims, embedding_key, k, filter)
                return self._exact(db, owners, vector, dims, embedding_key, k, filter)
            return hits.hits

        hits: list[Hit] = await self._run(work, write=False)
        return hits

    async def exact_nearest(
        self,
        owners: Sequence[str],
        query: Sequence[float],
        dims: int,
        embedding_key: str,
        k: int,
        filter: SearchFilter,
    ) -> list[Hit]:
        """``nearest``'s answer by a full scan of the filtered chunks (recall, tests)."""
        _check_dims(dims)
        _check_vector(query, dims, "the query vector")
        k = max(0, min(k, MAX_K))
        if not owners or k == 0 or not await self._has_table(dims):
            return []
        vector = self._vector_param(query)

        def work(db: Session) -> list[Hit]:
            return self._exact(db, owners, vector, dims, embedding_key, k, filter)

        hits: list[Hit] = await self._run(work, write=False)
        return hits

    async def _has_table(self, dims: int) -> bool:
        """Whether ``dims``'s table exists (none yet: nothing to find)."""
        if dims in self._tables:
            return True

        def work(db: Session) -> list[str]:
            return self._vector_tables(db)

        if vector_table(dims) in await self._run(work, write=False):
            self._tables.add(dims)
        return dims in self._tables

    def _ann(
        self,
        db: Session,
        owners: Sequence[str],
        vector: bytes | str,
        dims: int,
        key: str,
        fetch: int,
        k: int,
        search: SearchFilter,
        ef_search: int,
    ) -> _Candidates:
        """The index's ``fetch`` nearest, then those of them that pass the filters."""
        table = vector_table(dims)
        found: list[tuple[int, float]] = []
        if self._sqlite:
            # vec0 is exact within a partition: one KNN per owner, merged.
            knn = text(
                f"SELECT chunk_id, distance FROM {table} WHERE embedding MATCH :q "  # noqa: S608
                "AND k = :fetch AND owner = :owner"
            )
            full = False
            for owner in dict.fromkeys(owners):
                rows = db.execute(knn, {"q": vector, "fetch": fetch, "owner": owner}).all()
                full = full or len(rows) >= fetch
                found.extend((int(row[0]), float(row[1])) for row in rows)
        else:
            db.execute(
                text(f"SET LOCAL hnsw.ef_search = {min(max(ef_search, fetch), MAX_EF_SEARCH):d}")
            )
            knn = text(
                f"SELECT chunk_id, embedding <=> CAST(:q AS vector({dims})) FROM {table} "  # noqa: S608
                f"WHERE owner IN :owners ORDER BY embedding <=> CAST(:q AS vector({dims})) "
                "LIMIT :fetch"
            ).bindparams(bindparam("owners", expanding=True))
            params = {"q": vector, "fetch": fetch, "owners": list(dict.fromkeys(owners))}
            found = [(int(row[0]), float(row[1])) for row in db.execute(knn, params).all()]
            full = len(found) >= fetch
        if not found:
            return _Candidates([], full)
        distances = dict(found)
        where, conditions, binds = _conditions(search, sqlite=self._sqlite)
        conditions.update({"key": key, "ids": list(distances)})
        sql = (
            "SELECT c.id, c.source_kind, c.source FROM semantic_chunks c "  # noqa: S608
            f"WHERE c.id IN :ids AND c.embedding = :key AND {where}"
        )
        statement = text(sql).bindparams(*binds, bindparam("ids", expanding=True))
        kept = sorted(
            (distances[int(row[0])], int(row[0]), row[1], str(row[2]))
            for row in db.execute(statement, conditions).all()
        )
        return _Candidates(
            [
                Hit(chunk_id, kind, source, 1.0 - distance)
                for distance, chunk_id, kind, source in kept[:k]
            ],
            full,
        )

    def _exact(
        self,
        db: Session,
        owners: Sequence[str],
        vector: bytes | str,
        dims: int,
        key: str,
        k: int,
        search: SearchFilter,
    ) -> list[Hit]:
        table = vector_table(dims)
        where, params, binds = _conditions(search, sqlite=self._sqlite)
        params.update({"key": key, "k": k, "q": vector, "owners": list(dict.fromkeys(owners))})
        distance = (
            "vec_distance_cosine(v.embedding, :q)"
            if self._sqlite
            else f"(v.embedding <=> CAST(:q AS vector({dims})))"
        )
        sql = (
            f"SELECT c.id, c.source_kind, c.source, {distance} AS distance "  # noqa: S608
            f"FROM semantic_chunks c JOIN {table} v ON v.chunk_id = c.id "
            f"WHERE c.owner IN :owners AND c.embedding = :key AND {where} "
            # "+ 0": an expression the HNSW index cannot serve, so this is a scan of the
            # filtered chunks (the point is the exact answer).
            f"ORDER BY {distance} + 0, c.id LIMIT :k"
        )
        statement = text(sql).bindparams(*binds, bindparam("owners", expanding=True))
        return [_hit(row) for row in db.execute(statement, params).all()]

    def _filtered_knn(
        self,
        db: Session,
        owners: Sequence[str],
        vector: bytes | str,
        dims: int,
        key: str,
        k: int,
        search: SearchFilter,
    ) -> list[Hit]:
        """SQLite's exact filtered answer: vec0's KNN restricted to the chunks that pass
        (``chunk_id IN (subquery)``, which vec0 applies while it scans), per owner.

        Several times faster than ``_exact``'s join, whose per-row reads of a vec0
        table are point lookups into its chunked storage.
        """
        table = vector_table(dims)
        where, params, binds = _conditions(search, sqlite=True)
        params.update({"key": key, "k": k, "q": vector})
        sql = (
            "SELECT c.id, c.source_kind, c.source, n.distance FROM ("  # noqa: S608
            f"SELECT chunk_id, distance FROM {table} WHERE embedding MATCH :q AND k = :k "
            "AND owner = :owner AND chunk_id IN (SELECT c.id FROM semantic_chunks c "
            f"WHERE c.owner = :owner AND c.embedding = :key AND {where})) n "
            "JOIN semantic_chunks c ON c.id = n.chunk_id"
        )
        statement = text(sql).bindparams(*binds)
        rows: list[Any] = []
        for owner in dict.fromkeys(owners):
            rows.extend(db.execute(statement, {**params, "owner": owner}).all())
        rows.sort(key=lambda row: (float(row[3]), int(row[0])))
        return [_hit(row) for row in rows[:k]]

    async def fulltext(
        self,
        owners: Sequence[str],
        terms: Sequence[str],
        filter: SearchFilter,
        limit: int,
    ) -> list[Hit]:
        """Chunks of ``owners`` matching any of ``terms`` (``search.query_terms``), best
        first; ``Hit.score`` is bm25 (SQLite, negated: higher is better) or ts_rank.

        Raises Unsearchable if the engine refuses the (quoted) query.
        """
        match = fts5_match(terms) if self._sqlite else pg_tsquery(terms)
        limit = max(0, min(limit, MAX_K))
        if not match or not owners or limit == 0:
            return []
        where, params, binds = _conditions(filter, sqlite=self._sqlite)
        params.update({"match": match, "limit": limit, "owners": list(dict.fromkeys(owners))})
        if self._sqlite:
            sql = (
                "SELECT c.id, c.source_kind, c.source, -bm25(semantic_chunks_fts) AS score "  # noqa: S608
                "FROM semantic_chunks_fts "
                "JOIN semantic_chunks c ON c.id = semantic_chunks_fts.rowid "
                f"WHERE semantic_chunks_fts MATCH :match AND c.owner IN :owners AND {where} "
                "ORDER BY score DESC, c.id LIMIT :limit"
            )
        else:
            sql = (
                "SELECT c.id, c.source_kind, c.source, ts_rank(c.search, q) AS score "  # noqa: S608
                "FROM semantic_chunks c, to_tsquery('english', :match) q "
                f"WHERE c.search @@ q AND c.owner IN :owners AND {where} "
                "ORDER BY score DESC, c.id LIMIT :limit"
            )
        statement = text(sql).bindparams(*binds, bindparam("owners", expanding=True))

        def work(db: Session) -> list[Hit]:
            try:
                rows = db.execute(statement, params).all()
            except (OperationalError, ProgrammingError, DataError) as exc:
                if not any(w in str(exc.orig).lower() for w in ("fts5", "tsquery", "syntax")):
                    raise
                raise Unsearchable() from None
            return [Hit(int(row[0]), row[1], str(row[2]), float(row[3])) for row in rows]

        hits: list[Hit] = await self._run(work, write=False)
        return hits

    async def chunks(self, ids: Sequence[int]) -> dict[int, StoredChunk]:
        """The chunks with these ids (those that still exist), by id."""
        if not ids:
            return {}
        columns = [_CHUNKS.c[name] for name in StoredChunk.__dataclass_fields__]
        statement = select(*columns).where(_CHUNKS.c.id.in_(bindparam("ids", expanding=True)))

        def work(db: Session) -> dict[int, StoredChunk]:
            rows = db.execute(statement, {"ids": list(ids)}).all()
            return {row[0]: StoredChunk(*row) for row in rows}

        found: dict[int, StoredChunk] = await self._run(work, write=False)
        return found

    async def counts(self, owner: str, embedding_key: str) -> ChunkCounts:
        """How many of ``owner``'s chunks carry ``embedding_key``'s vectors, of all."""
        sql = text(
            "SELECT count(*), coalesce(sum(CASE WHEN embedding = :key THEN 1 ELSE 0 END), 0) "
            "FROM semantic_chunks WHERE owner = :owner"
        )

        def work(db: Session) -> ChunkCounts:
            total, indexed = db.execute(sql, {"owner": owner, "key": embedding_key}).one()
            return ChunkCounts(int(indexed), int(total))

        counts: ChunkCounts = await self._run(work, write=False)
        return counts

    async def dimensions_of(self, owner: str, embedding_key: str) -> int:
        """How many dimensions the vectors of ``owner``'s chunks under ``embedding_key``
        have: the table one of them is in (0 while none has a vector)."""
        pick = (
            select(SemanticChunkRow.id)
            .where(SemanticChunkRow.owner == owner, SemanticChunkRow.embedding == embedding_key)
            .limit(1)
        )

        def work(db: Session) -> int:
            chunk_id = db.scalar(pick)
            if chunk_id is None:
                return 0
            for table in self._vector_tables(db):
                # The name was matched whole against the prefix and digits: safe to inline.
                found = db.scalar(
                    text(f"SELECT 1 FROM {table} WHERE chunk_id = :id"),  # noqa: S608
                    {"id": chunk_id},
                )
                if found is not None:
                    return int(table.removeprefix(VECTOR_TABLE_PREFIX))
            return 0

        dims: int = await self._run(work, write=False)
        return dims


@dataclass(frozen=True)
class _Candidates:
    hits: list[Hit]
    #: Whether the index gave as many candidates as asked (more may lie beyond).
    full: bool


def _check_source(
    source_kind: SourceKind,
    source: str,
    chunks: Sequence[ChunkRecord],
    vectors: Sequence[Sequence[float]] | None,
    dims: int,
) -> None:
    """What a replacement must be before anything is written: its own chunks, a
    bounded number, and (with vectors) one vector of ``dims`` finite numbers each."""
    if len(chunks) > MAX_CHUNKS_PER_SOURCE:
        raise ValueError(f"at most {MAX_CHUNKS_PER_SOURCE} chunks per source")
    for chunk in chunks:
        if chunk.source_kind != source_kind or chunk.source != source:
            raise ValueError("every chunk must belong to the source being replaced")
    if vectors is not None:
        _check_dims(dims)
        if len(vectors) != len(chunks):
            raise VectorMismatch(f"{len(vectors)} vectors for {len(chunks)} chunks")
        for index, vector in enumerate(vectors):
            _check_vector(vector, dims, f"vector {index}")


def _hit(row: Any) -> Hit:
    # Cosine distance is 1 - cosine similarity on both engines.
    return Hit(int(row[0]), row[1], str(row[2]), 1.0 - float(row[3]))


def _conditions(
    search: SearchFilter, *, sqlite: bool
) -> tuple[str, dict[str, Any], list[BindParameter[Any]]]:
    """``search`` as SQL conditions on ``semantic_chunks c`` (values bound), ANDed.

    Always excludes the chunks of a soft-deleted conversation.
    """
    where = [
        "NOT EXISTS (SELECT 1 FROM conversations cv WHERE cv.id = c.conversation_id "
        "AND cv.deleted_at IS NOT NULL)"
    ]
    params: dict[str, Any] = {}
    binds: list[BindParameter[Any]] = []

    def one_of(name: str, column: str, values: frozenset[str] | None, negate: bool) -> None:
        if values is None or (negate and not values):
            return
        if not values:  # "one of nothing"
            where.append("1 = 0")
            return
        params[name] = sorted(values)
        binds.append(bindparam(name, expanding=True))
        if negate:
            where.append(f"({column} IS NULL OR {column} NOT IN :{name})")
        else:
            where.append(f"{column} IN :{name}")

    one_of("f_sources", "c.source_kind", _strs(search.sources), False)
    one_of("f_xsources", "c.source_kind", _strs(search.exclude_sources), True)
    one_of("f_labels", "c.label", search.labels, False)
    one_of("f_xlabels", "c.label", search.exclude_labels, True)
    one_of("f_convs", "c.conversation_id", search.conversation_ids, False)
    one_of("f_xconvs", "c.conversation_id", search.exclude_conversation_ids, True)
    if search.without_conversation:
        where.append("c.conversation_id IS NULL")
    if search.files is not None:
        one_of("f_files", "c.source", search.files, False)
        where.append("c.source_kind = 'document'")
    if search.exclude_files:
        params["f_xfiles"] = sorted(search.exclude_files)
        binds.append(bindparam("f_xfiles", expanding=True))
        where.append("NOT (c.source_kind = 'document' AND c.source IN :f_xfiles)")
    if search.created_after is not None:
        op = ">=" if search.created_after_inclusive else ">"
        where.append(f"c.created_at {op} :f_after")
        params["f_after"] = search.created_after
        binds.append(bindparam("f_after", type_=_CREATED_AT_TYPE))
    if search.created_before is not None:
        op = "<=" if search.created_before_inclusive else "<"
        where.append(f"c.created_at {op} :f_before")
        params["f_before"] = search.created_before
        binds.append(bindparam("f_before", type_=_CREATED_AT_TYPE))
    for index, comparison in enumerate(search.metadata):
        condition = _metadata_condition(comparison, index, params, sqlite=sqlite)
        where.append(condition if comparison.op == "=" else f"NOT ({condition})")
    return " AND ".join(where), params, binds


def _strs(values: frozenset[SourceKind] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


def _metadata_condition(
    comparison: Comparison, index: int, params: dict[str, Any], *, sqlite: bool
) -> str:
    """``meta.KEY = value``, typed: a string equals only a JSON string, a number only a
    JSON number (numerically: 2 = 2.0), a boolean only a JSON boolean. A missing key
    equals nothing (so ``!=`` holds for it)."""
    value = comparison.value
    key, val = f"f_mk{index}", f"f_mv{index}"
    if not sqlite:
        # jsonb equality is typed and numeric for numbers.
        params[key] = comparison.key
        params[val] = json.dumps(value)
        return f"coalesce((c.meta::jsonb -> :{key}) = CAST(:{val} AS jsonb), false)"
    params[key] = "$." + json.dumps(comparison.key)  # a quoted label: any key is literal
    if isinstance(value, bool):
        params[val] = "true" if value else "false"
        return f"coalesce(json_type(c.meta, :{key}) = :{val}, 0)"
    params[val] = value
    kinds = "('integer', 'real')" if isinstance(value, int | float) else "('text')"
    return (
        f"coalesce(json_type(c.meta, :{key}) IN {kinds} "
        f"AND json_extract(c.meta, :{key}) = :{val}, 0)"
    )
