"""Prepared statements on the driver: the same rows, types and errors as SQLAlchemy's execute.

On both backends (the ``database_url`` fixture), in the store's own transaction
(``Database.run``): what a hot path reads through ``Prepared`` must equal what
``Connection.execute`` reads, a write must commit or roll back with its
transaction, and a constraint or type error must be SQLAlchemy's exception.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Float, bindparam, func, literal_column, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import asyncpg
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from switchboard.platform.store.db import Database, open_database
from switchboard.platform.store.models import UserRow, table_of
from switchboard.platform.store.prepared import NotPreparable, Prepared
from tests.conftest import TEST_DATABASE_TIMEOUT_S

pytestmark = pytest.mark.unit

USERS = table_of(UserRow)
WHEN = dt.datetime(2026, 3, 4, 5, 6, 7, 891_000, tzinfo=dt.UTC)

_INSERT = Prepared(
    USERS.insert(),
    columns=("id", "email", "password_hash", "created_at", "updated_at"),
)
_BY_ID = Prepared(
    select(
        USERS.c.id, USERS.c.email, USERS.c.created_at, USERS.c.password_hash, USERS.c.version
    ).where(USERS.c.id == bindparam("id"))
)
_FIRST_TWO = Prepared(select(USERS.c.id).order_by(USERS.c.id).limit(2))
_RENAME = Prepared(
    USERS.update().where(USERS.c.id == bindparam("match")).values(email=bindparam("name"))
)
_COUNT = Prepared(select(func.count()).select_from(USERS))


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    database = await open_database(database_url, timeout_s=TEST_DATABASE_TIMEOUT_S, migrate=True)
    try:
        yield database
    finally:
        await database.close()


def user(key: str, name: str) -> dict[str, object]:
    return {
        "id": key,
        "email": f"{name}@example.com",
        "password_hash": None,
        "created_at": WHEN,
        "updated_at": WHEN,
    }


async def test_rows_match_sqlalchemy_on_each_backend(database: Database) -> None:
    def write(db: Session) -> None:
        _INSERT.execute(db, user("u1", "ada"))
        _INSERT.execute_many(db, [user("u2", "bob"), user("u3", "cy")])

    await database.run(write, write=True)

    def read(db: Session) -> tuple[object, ...]:
        mine = _BY_ID.first(db, {"id": "u1"})
        theirs = db.connection().execute(_BY_ID_STATEMENT, {"id": "u1"}).one()
        first_two, count = _FIRST_TWO.rows(db), _COUNT.scalar(db)
        return mine, tuple(theirs), first_two, count, _BY_ID.first(db, {"id": "none"})

    mine, theirs, first_two, count, missing = await database.run(read, write=False)
    assert mine == theirs
    # A UTC datetime, a NULL, and the scalar default of a column left out, on both backends.
    assert mine == ("u1", "ada@example.com", WHEN, None, 1)
    assert isinstance(mine, tuple)
    assert first_two == [("u1",), ("u2",)]  # the LIMIT the statement carries
    assert count == 3
    assert missing is None


_BY_ID_STATEMENT = select(
    USERS.c.id, USERS.c.email, USERS.c.created_at, USERS.c.password_hash, USERS.c.version
).where(USERS.c.id == bindparam("id"))


async def test_writes_follow_their_transaction(database: Database) -> None:
    await database.run(lambda db: _INSERT.execute(db, user("u1", "ada")), write=True)

    def rename_then_fail(db: Session) -> None:
        assert _RENAME.execute(db, {"match": "u1", "name": "eve@example.com"}) == 1
        raise RuntimeError("the work fails after its write")

    with pytest.raises(RuntimeError):
        await database.run(rename_then_fail, write=True)
    row = await database.run(lambda db: _BY_ID.first(db, {"id": "u1"}), write=False)
    assert row is not None
    assert row[1] == "ada@example.com"

    changed = await database.run(
        lambda db: _RENAME.execute(db, {"match": "u1", "name": "eve@example.com"}), write=True
    )
    assert changed == 1
    row = await database.run(lambda db: _BY_ID.first(db, {"id": "u1"}), write=False)
    assert row is not None
    assert row[1] == "eve@example.com"


async def test_errors_are_sqlalchemys(database: Database) -> None:
    await database.run(lambda db: _INSERT.execute(db, user("u1", "ada")), write=True)
    with pytest.raises(IntegrityError) as raised:  # the same primary key
        await database.run(lambda db: _INSERT.execute(db, user("u1", "bob")), write=True)
    assert "bob" not in str(raised.value)  # parameters are never in the message
    naive = {**user("u2", "cy"), "created_at": WHEN.replace(tzinfo=None)}
    with pytest.raises(ValueError, match="naive"):  # UTCDateTime's own check, before the driver
        await database.run(lambda db: _INSERT.execute(db, naive), write=True)
    without_email = {k: v for k, v in user("u3", "x").items() if k != "email"}
    with pytest.raises(KeyError, match="email"):
        await database.run(lambda db: _INSERT.execute(db, without_email), write=True)
    assert await database.run(_COUNT.scalar, write=False) == 1


def test_what_cannot_run_on_the_driver_is_refused_when_compiled() -> None:
    with pytest.raises(NotPreparable):
        Prepared(USERS.insert())
    expanding = Prepared(select(USERS.c.id).where(USERS.c.id.in_(bindparam("ids", expanding=True))))
    with pytest.raises(NotPreparable):
        expanding._compiled(sqlite.dialect())
    # asyncpg converts a float by the cursor's column type, which is not read here.
    floating = Prepared(select(literal_column("1.5", Float)))
    with pytest.raises(NotPreparable, match="cursor's types"):
        floating._compiled(asyncpg.dialect())  # type: ignore[no-untyped-call]
