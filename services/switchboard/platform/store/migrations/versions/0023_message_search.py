"""Messages get a full-text index of their own, written with the message (docs/semantic.md,
"Searching"): a message is found by its words as soon as it is stored, whatever the
semantic index holds (before this, only through the chunks the indexer wrote in
workspaces with ``index_messages``).

The index lives outside the models, as memory items' does (``models.SEARCH_*``):

* SQLite: an FTS5 table ``messages_fts`` keyed by ``messages.fts_rowid``, written by
  the message store in the append's transaction; a trigger removes a message's row
  when the message goes (a purged conversation's messages go by cascade).
* PostgreSQL: a ``tsvector`` column ``messages.search`` with a GIN index, written by
  the append (the text is inside the serialized message, so it cannot be generated).

Existing messages are indexed here, from each stored message's text as a model reads it.

Revision ID: 0023
Revises: 0022
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0023"
down_revision: str | Sequence[str] | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 500


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.add_column("messages", sa.Column("fts_rowid", sa.BigInteger(), nullable=True))
    op.create_index("uq_messages_fts_rowid", "messages", ["fts_rowid"], unique=True)
    if sqlite:
        op.execute(
            "CREATE VIRTUAL TABLE messages_fts USING fts5(text, tokenize='porter unicode61')"
        )
        op.execute(
            "CREATE TRIGGER messages_fts_gone AFTER DELETE ON messages "
            "WHEN old.fts_rowid IS NOT NULL "
            "BEGIN DELETE FROM messages_fts WHERE rowid = old.fts_rowid; END"
        )
    else:
        op.execute("ALTER TABLE messages ADD COLUMN search tsvector")
    _fill_in(sqlite)
    if not sqlite:
        # Built once the rows are in: one pass instead of an update per row.
        op.execute("CREATE INDEX ix_messages_search ON messages USING gin (search)")


def _fill_in(sqlite: bool) -> None:
    if op.get_context().as_sql:
        # Rendered as SQL for review (alembic --sql): a message's text is inside its
        # serialized form, which only Python reads.
        op.execute(
            "-- 0023: switchboard migrate indexes every stored message's text; applied as "
            "this SQL, messages stored before it are not found by their words"
        )
        return
    # The contract's generated code and the text a model reads (the indexer's too).
    from switchboard.api.context.v1 import context_pb2
    from switchboard.shared.parttext import render_parts

    messages = sa.table(
        "messages",
        sa.column("id", sa.String),
        sa.column("data", sa.LargeBinary),
        sa.column("fts_rowid", sa.BigInteger),
    )
    connection = op.get_bind()
    after, rowid = "", 0
    while True:
        rows = connection.execute(
            sa.select(messages.c.id, messages.c.data)
            .where(messages.c.id > after)
            .order_by(messages.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            return
        for message_id, data in rows:
            words = render_parts(context_pb2.Message.FromString(data).parts)
            if sqlite:
                rowid += 1
                connection.execute(
                    sa.text("INSERT INTO messages_fts(rowid, text) VALUES (:rowid, :text)"),
                    {"rowid": rowid, "text": words},
                )
                connection.execute(
                    sa.update(messages).where(messages.c.id == message_id).values(fts_rowid=rowid)
                )
            else:
                connection.execute(
                    sa.text(
                        "UPDATE messages SET search = to_tsvector('english', :text) WHERE id = :id"
                    ),
                    {"text": words, "id": message_id},
                )
        after = rows[-1][0]


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER messages_fts_gone")
        op.execute("DROP TABLE messages_fts")
    else:
        op.execute("DROP INDEX ix_messages_search")
        op.execute("ALTER TABLE messages DROP COLUMN search")
    op.drop_index("uq_messages_fts_rowid", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("fts_rowid")
