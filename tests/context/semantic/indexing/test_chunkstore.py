"""The semantic chunk store on real engines: sqlite-vec on SQLite, pgvector (HNSW) on
the suite's PostgreSQL (pgserver's 16 with pgvector), each case on both."""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import AsyncIterator, Sequence

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from switchboard.context.semantic.indexing.chunkstore import (
    ChunkCounts,
    ChunkStore,
    VectorMismatch,
)
from switchboard.context.semantic.ports import ChunkRecord, Comparison, SearchFilter, SourceKind
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import ConversationRow, WorkspaceRow
from switchboard.platform.store.vectors import vector_support
from tests.conftest import TEST_DATABASE_TIMEOUT_S

pytestmark = pytest.mark.service

DIMS = 8
KEY = "test-model/8/1"
OWNER = "workspaces/w1"
OTHER = "workspaces/w2"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
EVERYTHING = SearchFilter()


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = Database(database_url, timeout_s=TEST_DATABASE_TIMEOUT_S)
    try:
        support = await vector_support(db)
        assert support.available, support.reason
        yield db
    finally:
        await db.close()


@pytest.fixture
async def store(database: Database) -> ChunkStore:
    def seed(db: Session) -> None:
        for workspace in ("w1", "w2"):
            db.add(WorkspaceRow(id=workspace, created_at=T0, updated_at=T0))
        db.flush()
        for conversation in ("c1", "c2"):
            db.add(
                ConversationRow(id=conversation, workspace_id="w1", created_at=T0, updated_at=T0)
            )

    await database.run(seed, write=True)
    return ChunkStore(database)


def unit(seed: int, dims: int = DIMS) -> list[float]:
    rng = random.Random(seed)  # noqa: S311 - test data
    vector = [rng.gauss(0, 1) for _ in range(dims)]
    norm = math.sqrt(sum(value * value for value in vector))
    return [value / norm for value in vector]


def near(vector: Sequence[float], seed: int, noise: float = 0.05) -> list[float]:
    rng = random.Random(seed)  # noqa: S311 - test data
    return [value + rng.gauss(0, noise) for value in vector]


def chunk(
    source: str,
    index: int = 0,
    *,
    text_: str = "a passage",
    owner: str = OWNER,
    kind: SourceKind = "memory",
    label: str = "",
    conversation: str | None = None,
    created: dt.datetime = T0,
    meta: str = "{}",
) -> ChunkRecord:
    return ChunkRecord(
        owner=owner,
        source_kind=kind,
        source=source,
        chunk_index=index,
        start_offset=index * 10,
        end_offset=index * 10 + len(text_),
        text=text_,
        created_at=created,
        label=label,
        conversation_id=conversation,
        meta=meta,
        workspace_id=owner.removeprefix("workspaces/"),
    )


async def put(store: ChunkStore, record: ChunkRecord, vector: Sequence[float]) -> int:
    ids = await store.replace_source(
        record.source_kind, record.source, [record], [vector], KEY, DIMS
    )
    return ids[0]


async def test_the_engine_is_there_and_postgres_uses_the_hnsw_index(
    store: ChunkStore, database: Database
) -> None:
    await store.ensure_dimensions(DIMS)
    await store.ensure_dimensions(DIMS)  # idempotent
    if database.dialect_name == "sqlite":
        return

    def explain(db: Session) -> str:
        db.execute(text("SET LOCAL enable_seqscan = off"))
        rows = db.execute(
            text(
                f"EXPLAIN SELECT chunk_id FROM semantic_vec_{DIMS} WHERE owner IN ('x') "  # noqa: S608
                f"ORDER BY embedding <=> CAST(:q AS vector({DIMS})) LIMIT 10"
            ),
            {"q": str(unit(1))},
        ).scalars()
        return "\n".join(rows)

    plan = await database.run(explain, write=False)
    assert f"ix_semantic_vec_{DIMS}_hnsw" in plan, plan


async def test_replace_twice_leaves_one_copy_and_delete_removes_everything(
    store: ChunkStore, database: Database
) -> None:
    records = [chunk("memories/m1", i, text_=f"zebra stripes part {i}") for i in range(3)]
    vectors = [unit(i) for i in range(3)]
    first = await store.replace_source("memory", "memories/m1", records, vectors, KEY, DIMS)
    second = await store.replace_source("memory", "memories/m1", records, vectors, KEY, DIMS)
    assert len(second) == 3
    assert not set(first) & set(second) or database.dialect_name == "sqlite"
    assert await store.counts(OWNER, KEY) == ChunkCounts(indexed=3, total=3)
    hits = await store.exact_nearest([OWNER], unit(0), DIMS, KEY, 10, EVERYTHING)
    assert sorted(hit.chunk_id for hit in hits) == sorted(second)
    assert len(await store.fulltext([OWNER], ["zebra"], EVERYTHING, 10)) == 3

    assert await store.delete_source("memory", "memories/m1") == 3
    assert await store.counts(OWNER, KEY) == ChunkCounts(0, 0)
    assert await store.nearest([OWNER], unit(0), DIMS, KEY, 10, EVERYTHING) == []
    assert await store.exact_nearest([OWNER], unit(0), DIMS, KEY, 10, EVERYTHING) == []
    assert await store.fulltext([OWNER], ["zebra"], EVERYTHING, 10) == []

    def leftovers(db: Session) -> int:
        sql = f"SELECT count(*) FROM semantic_vec_{DIMS}"  # noqa: S608 - a constant
        return int(db.execute(text(sql)).scalar_one())

    assert await database.run(leftovers, write=False) == 0


async def test_a_batch_of_sources_is_replaced_in_one_write_and_stays_one_copy(
    store: ChunkStore, database: Database
) -> None:
    batch: list[tuple[SourceKind, str, Sequence[ChunkRecord]]] = [
        ("memory", "memories/a", [chunk("memories/a", i, text_=f"okapi {i}") for i in range(2)]),
        ("memory", "memories/b", [chunk("memories/b", 0, text_="okapi b")]),
    ]
    vectors = [[unit(1), unit(2)], [unit(3)]]
    await store.replace_sources(batch, vectors, KEY, DIMS)
    await store.replace_sources(batch, vectors, KEY, DIMS)  # a repeated batch: still one copy
    assert await store.counts(OWNER, KEY) == ChunkCounts(indexed=3, total=3)
    hits = await store.exact_nearest([OWNER], unit(3), DIMS, KEY, 10, EVERYTHING)
    assert len(hits) == 3
    assert hits[0].source == "memories/b"
    # A vector that does not fit refuses the whole batch before anything is written.
    with pytest.raises(VectorMismatch):
        await store.replace_sources(
            [("memory", "memories/c", [chunk("memories/c")]), *batch[:1]],
            [[unit(4)], [unit(1), [1.0, 2.0]]],
            KEY,
            DIMS,
        )
    assert await store.counts(OWNER, KEY) == ChunkCounts(indexed=3, total=3)

    def vector_rows(db: Session) -> int:
        sql = f"SELECT count(*) FROM semantic_vec_{DIMS}"  # noqa: S608 - a constant
        return int(db.execute(text(sql)).scalar_one())

    assert await database.run(vector_rows, write=False) == 3


async def test_chunks_without_vectors_are_full_text_only(store: ChunkStore) -> None:
    ids = await store.replace_source(
        "message",
        "conversations/c1/messages/1",
        [chunk("conversations/c1/messages/1", kind="message", text_="the giraffe")],
        None,
        KEY,
        DIMS,
    )
    assert await store.counts(OWNER, KEY) == ChunkCounts(indexed=0, total=1)
    hits = await store.fulltext([OWNER], ["giraffe"], EVERYTHING, 10)
    assert [hit.chunk_id for hit in hits] == ids
    assert hits[0].score > 0
    assert (await store.chunks(ids))[ids[0]].embedding == ""
    assert await store.nearest([OWNER], unit(0), DIMS, KEY, 5, EVERYTHING) == []


async def test_a_failed_replace_leaves_the_old_chunks(store: ChunkStore) -> None:
    old = await put(store, chunk("memories/m1", text_="original"), unit(1))
    duplicate = [chunk("memories/m1", 0, text_="new"), chunk("memories/m1", 0, text_="new")]
    with pytest.raises(Exception):  # noqa: B017,PT011 - the database's unique-key error
        await store.replace_source(
            "memory", "memories/m1", duplicate, [unit(2), unit(3)], KEY, DIMS
        )
    hits = await store.exact_nearest([OWNER], unit(1), DIMS, KEY, 5, EVERYTHING)
    assert [hit.chunk_id for hit in hits] == [old]
    assert [hit.chunk_id for hit in await store.fulltext([OWNER], ["original"], EVERYTHING, 5)] == [
        old
    ]


async def test_vectors_that_do_not_fit_are_refused_before_anything_is_written(
    store: ChunkStore,
) -> None:
    record = chunk("memories/m1")
    with pytest.raises(VectorMismatch, match="3 dimensions; the index has 8"):
        await store.replace_source("memory", "memories/m1", [record], [[0.1, 0.2, 0.3]], KEY, DIMS)
    with pytest.raises(VectorMismatch, match="not a finite number"):
        await store.replace_source(
            "memory", "memories/m1", [record], [[math.nan] * DIMS], KEY, DIMS
        )
    with pytest.raises(VectorMismatch, match="2 vectors for 1 chunks"):
        await store.replace_source("memory", "memories/m1", [record], [unit(1), unit(2)], KEY, DIMS)
    with pytest.raises(VectorMismatch, match="dimensions must be 1 to 2000"):
        await store.ensure_dimensions(4096)
    with pytest.raises(VectorMismatch, match="the query vector has 4 dimensions"):
        await store.nearest([OWNER], [1.0, 0, 0, 0], DIMS, KEY, 5, EVERYTHING)
    assert await store.counts(OWNER, KEY) == ChunkCounts(0, 0)


async def test_scores_are_cosine_similarities_and_other_owners_never_appear(
    store: ChunkStore,
) -> None:
    target = unit(7)
    mine = await put(store, chunk("memories/mine"), near(target, 1))
    await put(store, chunk("memories/theirs", owner=OTHER), target)  # the nearest of all
    await put(store, chunk("memories/far"), unit(99))
    for search in (store.nearest, store.exact_nearest):
        hits = await search([OWNER], target, DIMS, KEY, 10, EVERYTHING)
        assert hits[0].source == "memories/mine"
        assert "memories/theirs" not in {hit.source for hit in hits}
        assert hits[0].chunk_id == mine
        assert 0.95 < hits[0].score <= 1.0
        assert hits[0].score > hits[-1].score
    both = await store.nearest([OWNER, OTHER], target, DIMS, KEY, 1, EVERYTHING)
    assert [hit.source for hit in both] == ["memories/theirs"]
    assert both[0].score == pytest.approx(1.0, abs=1e-5)
    assert await store.fulltext([OTHER], ["passage"], EVERYTHING, 10) != []
    assert {h.source for h in await store.fulltext([OWNER], ["passage"], EVERYTHING, 10)} == {
        "memories/mine",
        "memories/far",
    }


async def test_other_embeddings_and_deleted_conversations_are_left_out(
    store: ChunkStore, database: Database
) -> None:
    target = unit(3)
    live = await put(
        store,
        chunk("conversations/c1/messages/1", kind="message", conversation="c1"),
        near(target, 1),
    )
    await put(
        store, chunk("conversations/c2/messages/1", kind="message", conversation="c2"), target
    )
    await store.replace_source(
        "memory", "memories/old", [chunk("memories/old")], [target], "old-model/8/1", DIMS
    )

    def delete_c2(db: Session) -> None:
        db.execute(
            text("UPDATE conversations SET deleted_at = :t WHERE id = 'c2'").bindparams(),
            {"t": "2026-01-02 00:00:00" if database.dialect_name == "sqlite" else T0},
        )

    await database.run(delete_c2, write=True)
    for search in (store.nearest, store.exact_nearest):
        hits = await search([OWNER], target, DIMS, KEY, 5, EVERYTHING)
        assert [hit.chunk_id for hit in hits] == [live]
    assert {h.source for h in await store.fulltext([OWNER], ["passage"], EVERYTHING, 10)} == {
        "conversations/c1/messages/1",
        "memories/old",
    }


async def test_each_filter_is_applied_exactly(store: ChunkStore) -> None:
    query = unit(5)
    rows = [
        (chunk("memories/fact", label="fact", created=T0, meta='{"topic": "zoo", "n": 2}'), 1),
        (
            chunk(
                "memories/pref",
                label="preference",
                created=T0 + dt.timedelta(days=1),
                meta='{"topic": "food", "n": 2.0, "pinned": true}',
            ),
            2,
        ),
        (
            chunk(
                "conversations/c1/messages/1",
                kind="message",
                label="user",
                conversation="c1",
                created=T0 + dt.timedelta(days=2),
                meta='{"topic": "2"}',
            ),
            3,
        ),
        (
            chunk(
                "files/f1",
                kind="document",
                label="text/plain",
                created=T0 + dt.timedelta(days=3),
                meta='{"pinned": false}',
            ),
            4,
        ),
        (
            chunk(
                "files/f2", kind="document", label="text/plain", created=T0 + dt.timedelta(days=4)
            ),
            5,
        ),
    ]
    for record, seed in rows:
        await put(store, record, near(query, seed, noise=0.3))

    cases: list[tuple[SearchFilter, set[str]]] = [
        (SearchFilter(sources=frozenset({"document"})), {"files/f1", "files/f2"}),
        (
            SearchFilter(exclude_sources=frozenset({"document", "memory"})),
            {"conversations/c1/messages/1"},
        ),
        (
            SearchFilter(labels=frozenset({"fact", "user"})),
            {"memories/fact", "conversations/c1/messages/1"},
        ),
        (
            SearchFilter(exclude_labels=frozenset({"text/plain"})),
            {"memories/fact", "memories/pref", "conversations/c1/messages/1"},
        ),
        (SearchFilter(conversation_ids=frozenset({"c1"})), {"conversations/c1/messages/1"}),
        (
            SearchFilter(exclude_conversation_ids=frozenset({"c1"})),
            {"memories/fact", "memories/pref", "files/f1", "files/f2"},
        ),
        (
            SearchFilter(without_conversation=True),
            {"memories/fact", "memories/pref", "files/f1", "files/f2"},
        ),
        (SearchFilter(files=frozenset({"files/f2"})), {"files/f2"}),
        (
            SearchFilter(exclude_files=frozenset({"files/f2"})),
            {"memories/fact", "memories/pref", "conversations/c1/messages/1", "files/f1"},
        ),
        (SearchFilter(created_after=T0 + dt.timedelta(days=3)), {"files/f2"}),
        (
            SearchFilter(created_after=T0 + dt.timedelta(days=3), created_after_inclusive=True),
            {"files/f1", "files/f2"},
        ),
        (SearchFilter(created_before=T0 + dt.timedelta(days=1)), {"memories/fact"}),
        (
            SearchFilter(created_before=T0 + dt.timedelta(days=1), created_before_inclusive=True),
            {"memories/fact", "memories/pref"},
        ),
        (SearchFilter(metadata=(Comparison("topic", "=", "zoo"),)), {"memories/fact"}),
        # Typed: the number 2 equals 2 and 2.0, never the string "2".
        (SearchFilter(metadata=(Comparison("n", "=", 2),)), {"memories/fact", "memories/pref"}),
        (SearchFilter(metadata=(Comparison("topic", "=", "2"),)), {"conversations/c1/messages/1"}),
        (SearchFilter(metadata=(Comparison("pinned", "=", True),)), {"memories/pref"}),
        (SearchFilter(metadata=(Comparison("pinned", "=", False),)), {"files/f1"}),
        # A missing key is "not equal".
        (
            SearchFilter(metadata=(Comparison("topic", "!=", "zoo"),)),
            {"memories/pref", "conversations/c1/messages/1", "files/f1", "files/f2"},
        ),
        (
            SearchFilter(
                sources=frozenset({"memory"}),
                metadata=(Comparison("topic", "!=", "zoo"), Comparison("n", "=", 2.0)),
            ),
            {"memories/pref"},
        ),
        (SearchFilter(labels=frozenset()), set()),
    ]
    for search, expected in cases:
        for method in (store.nearest, store.exact_nearest):
            hits = await method([OWNER], query, DIMS, KEY, 10, search)
            assert {hit.source for hit in hits} == expected, (method.__name__, search)
        found = await store.fulltext([OWNER], ["passage"], search, 10)
        assert {hit.source for hit in found} == expected, ("fulltext", search)


async def test_nearest_equals_exact_on_small_data_with_and_without_filters(
    store: ChunkStore,
) -> None:
    rng = random.Random(11)  # noqa: S311 - test data
    for index in range(120):
        kind: SourceKind = "memory" if index % 3 else "message"
        await put(
            store,
            chunk(
                f"s/{index}",
                kind=kind,
                label="even" if index % 2 == 0 else "odd",
                conversation="c1" if kind == "message" else None,
            ),
            unit(1000 + index),
        )
    selective = SearchFilter(labels=frozenset({"even"}), sources=frozenset({"message"}))
    for trial in range(10):
        query = [rng.gauss(0, 1) for _ in range(DIMS)]
        for search in (EVERYTHING, selective):
            fast = await store.nearest([OWNER], query, DIMS, KEY, 10, search)
            exact = await store.exact_nearest([OWNER], query, DIMS, KEY, 10, search)
            assert [hit.chunk_id for hit in fast] == [hit.chunk_id for hit in exact], trial
            for a, b in zip(fast, exact, strict=True):
                assert a.score == pytest.approx(b.score, abs=1e-5)


async def test_delete_owner_and_unsearchable_terms(store: ChunkStore) -> None:
    await put(store, chunk("memories/a"), unit(1))
    await put(store, chunk("memories/b", owner=OTHER), unit(2))
    assert await store.delete_owner(OWNER) == 1
    assert await store.counts(OWNER, KEY) == ChunkCounts(0, 0)
    assert await store.counts(OTHER, KEY) == ChunkCounts(1, 1)
    # Operators in terms stay words: no error, just no match.
    assert await store.fulltext([OTHER], ['"NEAR(', "*", "a:b"], EVERYTHING, 5) == []


async def test_the_migration_downgrades_with_vector_tables_in_place(
    store: ChunkStore, database: Database
) -> None:
    """Vector tables are the store's, not the migration's; on PostgreSQL they reference
    semantic_chunks, so 0016's downgrade must drop them first."""
    await put(store, chunk("memories/a"), unit(1))
    await database.downgrade("0015")

    def tables(db: Session) -> list[str]:
        sql = (
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            if database.dialect_name == "sqlite"
            else "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
        return [name for name in db.execute(text(sql)).scalars() if "semantic" in name]

    assert await database.run(tables, write=False) == []
    await database.migrate()
    fresh = ChunkStore(database)
    await put(fresh, chunk("memories/a"), unit(1))
    assert len(await fresh.exact_nearest([OWNER], unit(1), DIMS, KEY, 5, EVERYTHING)) == 1


async def test_a_role_that_may_not_create_pgvector_gets_the_reason_not_an_error(
    migrated_postgres_url: str,
) -> None:
    """The server has pgvector, this database does not, and the service's role may not
    create it (pgvector is not a trusted extension): full-text only, said in one sentence."""
    admin = Database(migrated_postgres_url, timeout_s=TEST_DATABASE_TIMEOUT_S)
    role = f"app_{random.randrange(10**9)}"  # noqa: S311 - a name

    def make_role(db: Session) -> None:
        db.execute(text(f"CREATE ROLE {role} LOGIN"))

    try:
        await admin.run(make_role, write=True)
    finally:
        await admin.close()
    database = Database(
        migrated_postgres_url.replace("//postgres@", f"//{role}@"),
        timeout_s=TEST_DATABASE_TIMEOUT_S,
    )
    try:
        support = await vector_support(database)
    finally:
        await database.close()
    assert not support.available
    assert support.reason == (
        "the server has pgvector but this database does not, and CREATE EXTENSION vector "
        "failed (42501; a superuser or the database owner can run it); semantic search is "
        "off and search is full-text only"
    )


async def test_a_selective_filter_beyond_every_candidate_list_is_still_answered_exactly(
    store: ChunkStore,
) -> None:
    """The five chunks passing the filter are the farthest of 1100 from the query: no
    candidate list holds them (vec0's 512, HNSW's 40 then 1000), so only the fallback
    to the exact answer over the filtered chunks finds them."""
    query = unit(42)
    opposite = [-value for value in query]
    for batch in range(11):
        records = [
            chunk(f"memories/b{batch}", index, label="rare" if batch == 0 and index < 5 else "")
            for index in range(100)
        ]
        vectors = [
            near(opposite, index, noise=0.01)
            if batch == 0 and index < 5
            else near(query, 1000 * batch + index, noise=0.4)
            for index in range(100)
        ]
        await store.replace_source("memory", f"memories/b{batch}", records, vectors, KEY, DIMS)
    rare = SearchFilter(labels=frozenset({"rare"}))
    fast = await store.nearest([OWNER], query, DIMS, KEY, 10, rare)
    exact = await store.exact_nearest([OWNER], query, DIMS, KEY, 10, rare)
    assert len(fast) == 5
    assert [hit.chunk_id for hit in fast] == [hit.chunk_id for hit in exact]
    assert all(hit.score < -0.9 for hit in fast)
