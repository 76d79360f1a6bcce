"""Passages' metadata as valid JSON (docs/contracts.md "Malformed input"): a number that
is not finite in a source's metadata was written beside its passages as ``NaN`` or
``Infinity`` (``json.dumps``), which SQLite's and PostgreSQL's JSON functions refuse,
so every metadata-filtered search of the workspace failed. Requests holding such a
number are refused now and the index writes ``null`` for one stored before; this
revision rewrites the passages already written that way, ``null`` in its place.

No schema change: a downgrade leaves the rows as they are.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-01
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | Sequence[str] | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 500


class _NotJson(ValueError):
    pass


def _strict(text: str) -> object:
    def refuse(name: str) -> object:
        raise _NotJson(name)

    return json.loads(text, parse_constant=refuse)


def repaired(text: str) -> str | None:
    """``text`` with each NaN, Infinity and -Infinity as null, written as the index
    writes metadata (``indexstore._meta_json``); None when it is valid JSON already
    (a string that merely spells one) or not JSON at all (left as it is)."""
    try:
        _strict(text)
    except _NotJson:
        pass
    except ValueError:
        return None
    else:
        return None
    try:
        value = json.loads(text, parse_constant=lambda _name: None)
    except ValueError:
        return None
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def upgrade() -> None:
    if op.get_context().as_sql:
        # Rendered as SQL for review (alembic --sql): which rows hold such a number is
        # for a JSON parser to tell, and the rendered script says so.
        op.execute(
            "-- 0018: switchboard migrate rewrites semantic_chunks.meta that holds NaN or "
            "Infinity as JSON with null in its place; applied as this SQL, such a passage "
            "keeps it until its source is indexed again"
        )
        return
    chunks = sa.table("semantic_chunks", sa.column("id", sa.BigInteger), sa.column("meta", sa.Text))
    connection = op.get_bind()
    # Only rows whose text spells one can hold one: the rest are never read here.
    suspect = sa.or_(chunks.c.meta.like("%NaN%"), chunks.c.meta.like("%Infinity%"))
    after = -1
    while True:
        rows = connection.execute(
            sa.select(chunks.c.id, chunks.c.meta)
            .where(suspect, chunks.c.id > after)
            .order_by(chunks.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            return
        for chunk_id, meta in rows:
            fixed = repaired(meta)
            if fixed is not None:
                connection.execute(
                    sa.update(chunks).where(chunks.c.id == chunk_id).values(meta=fixed)
                )
        after = rows[-1][0]


def downgrade() -> None:
    pass
