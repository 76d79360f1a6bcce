"""The semantic indexer's job queries use their indexes on real engines (SQLite and the
suite's PostgreSQL), with one workspace's backlog of 20,000 jobs in the table.

A search by meaning counts its owner's waiting jobs (``IndexStore.pending``, docs/
semantic.md "While the index catches up"): another owner's count finds its rows through
``ix_semantic_jobs_owner`` instead of scanning the backlog, and the workers' claim
still reads due jobs through ``ix_semantic_jobs_due``. The statements checked are the
ones the store runs, captured as it runs them, each explained by its engine.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, insert, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from switchboard.context.semantic.indexing.indexstore import IndexStore
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import SemanticJobRow, WorkspaceRow

pytestmark = pytest.mark.service

TIMEOUT_S = 30.0
BACKLOG = 20_000
BUSY, QUIET = "workspaces/busy", "workspaces/quiet"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = Database(database_url, timeout_s=TIMEOUT_S)
    try:
        yield db
    finally:
        await db.close()


def job(owner: str, number: int, not_before: dt.datetime) -> dict[str, Any]:
    return {
        "source_kind": "memory",
        "source": f"{owner}/memories/m{number}",
        "owner": owner,
        "workspace_id": owner.removeprefix("workspaces/"),
        "user_id": None,
        "enqueued_at": NOW,
        "not_before": not_before,
        "attempts": 0,
        "last_error": "",
    }


async def seed(database: Database) -> None:
    """BUSY's backlog, each job waiting for a later retry (as after an endpoint outage),
    and QUIET's five jobs, due now."""

    def work(db: Session) -> None:
        for workspace in ("busy", "quiet"):
            db.add(WorkspaceRow(id=workspace, created_at=NOW, updated_at=NOW))
        db.flush()
        later = NOW + dt.timedelta(hours=1)
        db.execute(insert(SemanticJobRow), [job(BUSY, n, later) for n in range(BACKLOG)])
        past = NOW - dt.timedelta(seconds=1)
        db.execute(insert(SemanticJobRow), [job(QUIET, n, past) for n in range(5)])

    await database.run(work, write=True)

    def analyze(db: Session) -> None:
        # The planner's statistics, as autovacuum (or SQLite's ANALYZE) would keep them.
        db.execute(
            text("ANALYZE semantic_jobs" if database.dialect_name != "sqlite" else "ANALYZE")
        )

    await database.run(analyze, write=True)


@contextmanager
def captured() -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements (with their parameters) any engine runs meanwhile."""
    statements: list[tuple[str, Any]] = []

    def before(_conn: Any, _cursor: Any, sql: str, params: Any, *_: Any) -> None:
        statements.append((sql, params))

    event.listen(Engine, "before_cursor_execute", before)
    try:
        yield statements
    finally:
        event.remove(Engine, "before_cursor_execute", before)


async def plan(database: Database, sql: str, params: Any) -> str:
    """How the engine runs ``sql``, in its own words."""
    sqlite = database.dialect_name == "sqlite"
    prefix = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "

    def work(db: Session) -> str:
        rows = db.connection().exec_driver_sql(prefix + sql, params).all()
        return "\n".join(str(row[-1] if sqlite else row[0]) for row in rows)

    return await database.run(work, write=False)


def on_jobs(statements: list[tuple[str, Any]], *words: str) -> list[tuple[str, Any]]:
    """The statements that read ``semantic_jobs`` and hold each of ``words``."""
    return [
        (sql, params)
        for sql, params in statements
        if sql.lstrip().upper().startswith("SELECT")
        and "semantic_jobs" in sql
        and all(word in sql for word in words)
    ]


async def test_another_owners_count_uses_the_owner_index_and_claims_the_due_index(
    database: Database,
) -> None:
    await seed(database)
    store = IndexStore(database)

    with captured() as statements:
        assert await store.pending(QUIET) == 5
    [(sql, params)] = on_jobs(statements, "count(")
    counted = await plan(database, sql, params)
    assert "ix_semantic_jobs_owner" in counted, counted

    with captured() as statements:
        jobs, _ = await store.claim(NOW + dt.timedelta(minutes=5), 10)
    assert sorted(found.owner for found in jobs) == [QUIET] * 5
    claims = on_jobs(statements, "not_before")
    # The look (one due job? the next one due?) and the claim itself.
    assert len(claims) == 3, claims
    for sql, params in claims:
        explained = await plan(database, sql, params)
        assert "ix_semantic_jobs_due" in explained, f"{sql}\n{explained}"
