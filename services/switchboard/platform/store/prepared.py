"""Hot-path statements compiled once and run on the driver (decisions 52).

SQLAlchemy's per-statement Python (compiling from its cache, building an
execution context, processing parameters and rows into ``Row`` objects) costs
30-130 µs where SQLite runs a small statement in about 2.5 (decisions 35). A run
makes dozens of such statements. ``Prepared`` keeps the statement as a Core
construct (the schema stays SQLAlchemy's, and so do the types' conversions) but
compiles it once per dialect and executes it on the DB-API cursor of the
session's own connection, inside the session's transaction and savepoints:

* parameters by name, converted by the types' bind processors (``UTCDateTime``'s
  UTC check included) and passed positionally in the compiled order;
* rows as plain tuples, converted by the types' result processors, so a
  ``DateTime`` comes back a UTC datetime on both backends as through the ORM;
* a DB-API error handled by the connection as ``Connection.execute`` handles
  it: raised as SQLAlchemy's own exception (``IntegrityError``,
  ``OperationalError``, ...), so callers, the group commit and ``is_outage``
  classify it as they always did, and a connection found closed invalidated
  with the pool's older ones.

On PostgreSQL the cursor is SQLAlchemy's asyncpg adapter, which begins the
transaction, prepares each statement once per connection and awaits inside
``AsyncSession.run_sync``'s greenlet. What is not supported is refused when the
statement is first compiled, never at a caller's surprise: expanding ``IN``
lists, and column defaults that need an execution context (give the value).
Everything off the hot path keeps ``Connection.execute``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.expression import ClauseElement

Row = tuple[Any, ...]
_Processor = Callable[[Any], Any]
#: A column default given when the caller leaves the column out.
_NO_DEFAULT: Final = object()


class NotPreparable(ValueError):
    """A statement ``Prepared`` cannot run on the driver (a bug in the store, found at once)."""


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    #: (name, bind processor or None, default or _NO_DEFAULT), in the driver's order.
    params: tuple[tuple[str, _Processor | None, Any], ...]
    #: One per result column; None when no column needs converting.
    results: tuple[_Processor | None, ...] | None


class Prepared:
    """One Core statement, compiled once per dialect, executed on the DB-API cursor.

    ``columns`` (inserts only) names the columns given, in any order; a column
    left out takes its scalar default, if it has one.
    """

    __slots__ = ("_by_dialect", "_columns", "_statement", "name")

    def __init__(
        self, statement: ClauseElement, *, columns: Iterable[str] = (), name: str = ""
    ) -> None:
        self._statement = statement
        self._columns = tuple(columns)
        if isinstance(statement, Insert) and not self._columns:
            raise NotPreparable("an INSERT names the columns it gives (columns=...)")
        self._by_dialect: dict[str, _Compiled] = {}
        self.name = name

    def rows(self, db: Session | Connection, params: Mapping[str, Any] | None = None) -> list[Row]:
        """Every row the statement returns, as tuples."""
        cursor, compiled = self._execute(db, params)
        fetched = cursor.fetchall()
        results = compiled.results
        if results is None:
            return [tuple(row) for row in fetched]
        return [
            tuple(
                value if convert is None else convert(value)
                for convert, value in zip(results, row, strict=True)
            )
            for row in fetched
        ]

    def first(
        self, db: Session | Connection, params: Mapping[str, Any] | None = None
    ) -> Row | None:
        """The first row, or None."""
        found = self.rows(db, params)
        return found[0] if found else None

    def scalar(self, db: Session | Connection, params: Mapping[str, Any] | None = None) -> Any:
        """The first column of the first row, or None."""
        row = self.first(db, params)
        return None if row is None else row[0]

    def execute(self, db: Session | Connection, params: Mapping[str, Any] | None = None) -> int:
        """Run a statement that returns no rows; the rows it changed."""
        cursor, _ = self._execute(db, params)
        count: int = cursor.rowcount
        return count

    def execute_many(self, db: Session | Connection, many: Sequence[Mapping[str, Any]]) -> None:
        """Run the statement once per parameter set (one ``executemany``)."""
        if many:
            self._call(
                db,
                lambda cursor, compiled: cursor.executemany(
                    compiled.sql, [_bind(compiled, params) for params in many]
                ),
            )

    def _execute(
        self, db: Session | Connection, params: Mapping[str, Any] | None
    ) -> tuple[Any, _Compiled]:
        return self._call(
            db, lambda cursor, compiled: cursor.execute(compiled.sql, _bind(compiled, params or {}))
        )

    def _call(
        self, db: Session | Connection, run: Callable[[Any, _Compiled], object]
    ) -> tuple[Any, _Compiled]:
        """``run(cursor, compiled)`` on a cursor of ``db``'s own connection, a DB-API error
        raised as SQLAlchemy's."""
        connection = db.connection() if isinstance(db, Session) else db
        dialect = connection.dialect
        compiled = self._compiled(dialect)
        driver = connection.connection.dbapi_connection
        if driver is None:  # pragma: no cover - a connection is checked out while in use
            raise RuntimeError("the session's connection is closed")
        cursor = driver.cursor()
        try:
            run(cursor, compiled)
        except dialect.loaded_dbapi.Error as exc:
            # The connection's own handling, as ``Connection.execute`` gives it: a
            # connection the server closed is invalidated, with every older one in the
            # pool, and the ``handle_error`` listeners (the database health) hear it.
            # Raised as is, a dead connection went back to the pool as if alive and,
            # just used, was never pinged: every call on it failed until it rested.
            connection._handle_dbapi_exception(exc, compiled.sql, None, cursor, None)
        return cursor, compiled

    def _compiled(self, dialect: Dialect) -> _Compiled:
        found = self._by_dialect.get(dialect.name)
        if found is None:
            found = self._by_dialect[dialect.name] = self._compile(dialect)
        return found

    def _compile(self, dialect: Dialect) -> _Compiled:
        compiled = self._statement.compile(dialect=dialect, column_keys=list(self._columns) or None)
        if not isinstance(compiled, SQLCompiler):  # pragma: no cover - DDL is not a hot path
            raise NotPreparable("only SQL statements are prepared")
        if compiled.post_compile_params or compiled.literal_execute_params:
            raise NotPreparable("expanding or literal parameters are compiled per call")
        defaults: dict[str, Any] = {}
        for column in (*compiled.insert_prefetch, *compiled.update_prefetch):
            default = column.default
            if column.key in self._columns:
                continue
            if default is None or not getattr(default, "is_scalar", False):
                raise NotPreparable(f"give {column.key!r}: its default needs an execution context")
            defaults[column.key] = default.arg  # type: ignore[attr-defined]
        names = compiled.positiontup or []
        params = []
        for name in names:
            bind = compiled.binds.get(name)
            processor = None if bind is None else bind.type._cached_bind_processor(dialect)
            given: Any = _NO_DEFAULT
            if name in defaults:
                given = defaults[name]
            elif bind is not None and bind.value is not None and not bind.required:
                given = bind.value  # a literal the statement carries, e.g. LIMIT 1
            params.append((name, processor, given))
        try:
            processors = [
                column[3]._cached_result_processor(dialect, None)
                for column in compiled._result_columns
            ]
        except TypeError as exc:
            # A type whose conversion depends on the cursor's column type (a float
            # on asyncpg): select it untyped and convert it in Python.
            raise NotPreparable(f"a result column's type needs the cursor's types: {exc}") from exc
        results = tuple(processors) if any(p is not None for p in processors) else None
        return _Compiled(compiled.string, tuple(params), results)


def _bind(compiled: _Compiled, params: Mapping[str, Any]) -> tuple[Any, ...]:
    values = []
    for name, processor, default in compiled.params:
        value = params.get(name, default)
        if value is _NO_DEFAULT:
            raise KeyError(f"parameter {name!r} is missing")
        values.append(value if processor is None else processor(value))
    return tuple(values)
