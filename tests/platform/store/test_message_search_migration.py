"""Migration 0023: messages get a full-text index of their own (issue 79: FULL_TEXT found
messages only through the semantic index's passages). The messages stored before it are
indexed from the text they hold, on SQLite and PostgreSQL alike, and a purged
conversation's messages take their index rows with them."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import delete, text

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.semantic.ports import SearchFilter
from switchboard.context.semantic.retrieval.store import SearchStore
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import ConversationRow
from tests.conftest import TEST_DATABASE_TIMEOUT_S

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
async def db(empty_database_url: str) -> AsyncIterator[Database]:
    database = Database(empty_database_url, timeout_s=TEST_DATABASE_TIMEOUT_S)
    try:
        yield database
    finally:
        await database.close()


def _message(*texts: str) -> bytes:
    return pb.Message(
        role=pb.MESSAGE_ROLE_USER, parts=[pb.ContentPart(text=t) for t in texts]
    ).SerializeToString()


async def test_messages_stored_before_are_found_by_their_words(db: Database) -> None:
    await db.migrate()
    await db.downgrade("0022")
    async with db.sessions() as session, session.begin():
        # In SQL: the models have columns later revisions add (``memory_policy``).
        await session.execute(
            text(
                "INSERT INTO workspaces (id, display_name, description, created_at, updated_at,"
                " version) VALUES ('acme', '', '', :at, :at, 1)"
            ),
            {"at": NOW},
        )
        # Conversations too (``active_branch`` and the rest of 0027).
        await session.execute(
            text(
                "INSERT INTO conversations (id, workspace_id, title, meta, archived, creator,"
                " created_at, updated_at, version, last_seq, message_count, token_count)"
                " VALUES ('c1', 'acme', '', :meta, false, '', :at, :at, 1, 0, 0, 0)"
            ),
            {"at": NOW, "meta": b""},
        )
    async with db.engine.begin() as connection:
        for seq, (message_id, data) in enumerate(
            [("m1", _message("the heron waits")), ("m2", _message("a kingfisher", "heron"))], 1
        ):
            await connection.execute(
                text(
                    "INSERT INTO messages (id, conversation_id, seq, role, token_count, archived,"
                    " created_at, data) VALUES (:id, 'c1', :seq, 'user', 3, false, :at, :data)"
                ),
                {"id": message_id, "seq": seq, "at": NOW, "data": data},
            )

    await db.migrate()

    store = SearchStore(db)
    found = await store.context_messages("acme", None, "heron", SearchFilter(), limit=10)
    assert {hit.message_id for hit in found} == {"m1", "m2"}
    found = await store.context_messages("acme", "c1", "kingfisher", SearchFilter(), limit=10)
    assert [hit.message_id for hit in found] == ["m2"]

    # Purged for good (the cascade takes its messages): nothing of them stays indexed.
    async with db.sessions() as session, session.begin():
        await session.execute(delete(ConversationRow).where(ConversationRow.id == "c1"))
    if db.dialect_name == "sqlite":
        async with db.engine.connect() as connection:
            left = (await connection.execute(text("SELECT count(*) FROM messages_fts"))).scalar()
        assert left == 0
