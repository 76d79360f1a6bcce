"""Find a marker string in every store a running server keeps data in (issue 83).

A test of erasure writes a unique marker as the user, erases the user, and then
asks ``find_marker`` where the marker still is: it must be nowhere. A search that
skipped a store would pass for the wrong reason, so every store is found by
inspection, never from a list kept here, and a table or key this module cannot
read fails the search (``StoreSearchError``) instead of being passed over:

- **SQL**: every table of the server's database, found in ``sqlite_master`` or
  ``pg_class`` (SQLite's FTS5 and sqlite-vec virtual tables and their shadow
  tables, every non-system PostgreSQL schema, pgvector tables included), every
  column of every row; binary columns (serialized protobufs) are searched as raw
  bytes. Full-text indexes are also asked directly (FTS5 ``MATCH``, tsvector
  ``@@``), since an index keeps its terms stemmed and lowercased, not as written.
- **Blobs**: every object of the files' blob store (the directory store's whole
  tree, staging included, or every object of the S3 bucket; the parts of a multipart
  upload never completed cannot be read back, and are only counted in ``searched``).
- **Redis**: every key of the server's Redis database (the one its URL names: the
  server uses no other; every primary of a cluster), its name and its value
  (strings, hashes, lists, sets, sorted sets, every entry of every stream; any
  other type by its ``DUMP``).
- **Raw database files** (``raw=True``): on SQLite the bytes of the database file,
  its WAL and rollback journal; on PostgreSQL (a superuser's connection to a server
  on this machine, as the test clusters are) the database's relation files after a
  CHECKPOINT, and the cluster's WAL. Deleted rows linger there (free pages, WAL
  frames, dead tuples and index entries until VACUUM) after every live store is
  clean; those hits are reported apart (``Findings.raw``) so that a test decides
  what to make of them.

The marker is searched as written (UTF-8), lowercased (full-text terms), and as
JSON escapes it (non-ASCII in a JSON column). Choose a marker that full-text
stemming leaves alone: lowercase letters and digits, ending with a digit
(``new_marker``). A marker split by a page boundary of the raw SQLite file (a row
spilling into an overflow page) is not seen there; the live tables are searched
row by row, so this only limits what the raw scan adds; PostgreSQL compresses values
of more than about 2 KB (TOAST), which its raw scan does not see either.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from switchboard.context.domain import ContextDomain
from switchboard.context.files.blobs.directory import DirectoryBlobStore
from switchboard.context.files.blobs.stores import files_directory
from switchboard.context.files.settings import FileSettings
from switchboard.platform.cache import AnyRedis, binary_client
from switchboard.platform.config import SQLITE_DRIVER
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.db import is_sqlite_memory, parse_database_url
from tests.conftest import CALL_DEADLINE_S

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

#: Bound on one store's whole search (a hang guard, never a measure of speed).
SEARCH_DEADLINE_S: Final = 4 * CALL_DEADLINE_S
#: Largest piece of a file or blob held at once.
_CHUNK: Final = 1024 * 1024
#: Entries or elements asked of Redis at once.
_PAGE: Final = 1000
_FTS5: Final = re.compile(r"\bUSING\s+fts5\b", re.IGNORECASE)
#: Text search configurations the tsvector columns may have been built with.
_TS_CONFIGS: Final = ("english", "simple")
_SQLITE_HEADER: Final = 100
_WAL_HEADER: Final = 32
_WAL_FRAME_HEADER: Final = 24


class StoreSearchError(AssertionError):
    """A store could not be searched whole: a test must not read that as "not found"."""


@dataclass(frozen=True)
class Findings:
    """Where the marker was found: the live stores, and the raw SQLite files' bytes."""

    stores: tuple[str, ...] = ()
    raw: tuple[str, ...] = ()
    #: What was searched, one line per store ("sql sqlite: 65 tables", ...), for messages.
    searched: tuple[str, ...] = field(default=(), compare=False)

    def everywhere(self) -> list[str]:
        return [*self.stores, *self.raw]


def new_marker() -> str:
    """A marker no store holds by chance, and that full-text stemming keeps whole."""
    return f"zqmark{uuid.uuid4().hex}7"


async def find_marker(
    server: SwitchboardServer,
    marker: str,
    *,
    redis_url: str | None = None,
    raw_files: bool = True,
) -> list[str]:
    """Every place ``server``'s stores hold ``marker`` ("sql messages.data row id=...",
    "blob blobs/ab/ab12...", "redis stream switchboard:events entry 17-0", "sqlite file
    page 12"...); empty when it is nowhere. ``redis_url`` None: the server's own (none if
    it has none). ``raw_files`` False leaves out the raw database files' hits
    (``search_stores`` gives both lists apart)."""
    found = await search_stores(server, marker, redis_url=redis_url, raw=raw_files)
    return found.everywhere()


async def search_stores(
    server: SwitchboardServer,
    marker: str,
    *,
    redis_url: str | None = None,
    raw: bool = True,
) -> Findings:
    """``find_marker``'s search, its live and raw findings apart."""
    needles = _needles(marker)
    stores: list[str] = []
    searched: list[str] = []
    async with asyncio.timeout(SEARCH_DEADLINE_S):
        stores += await _search_sql(server, marker, needles, searched)
    async with asyncio.timeout(SEARCH_DEADLINE_S):
        stores += await _search_blobs(server, needles, searched)
    url = server.settings.redis_url.get_secret_value() if redis_url is None else redis_url
    if url:
        async with asyncio.timeout(SEARCH_DEADLINE_S):
            stores += await _search_redis(url, needles, searched)
    raw_hits: list[str] = []
    if raw:
        async with asyncio.timeout(SEARCH_DEADLINE_S):
            raw_hits = await _search_raw(server, needles, searched)
    return Findings(tuple(stores), tuple(raw_hits), tuple(searched))


# -- the marker's forms -------------------------------------------------------------------


def _needles(marker: str) -> tuple[bytes, ...]:
    if not marker:
        raise ValueError("an empty marker is found everywhere")
    forms = [marker, marker.lower(), json.dumps(marker)[1:-1]]
    return tuple(dict.fromkeys(form.encode() for form in forms))


def _holds(value: object, needles: Sequence[bytes]) -> bool:
    data = _as_bytes(value)
    return data is not None and any(needle in data for needle in needles)


def _as_bytes(value: object) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return str(value).encode()


def _offsets(path: Path, needles: Sequence[bytes]) -> list[int]:
    """Where ``needles`` start in the file at ``path`` (read a chunk at a time)."""
    overlap = max(len(needle) for needle in needles) - 1
    found: set[int] = set()
    with path.open("rb") as handle:
        start = 0  # the file offset of ``window[0]``
        window = b""
        while chunk := handle.read(_CHUNK):
            window += chunk
            for needle in needles:
                at = window.find(needle)
                while at >= 0:
                    found.add(start + at)
                    at = window.find(needle, at + 1)
            keep = min(overlap, len(window))
            start += len(window) - keep
            window = window[len(window) - keep :] if keep else b""
    return sorted(found)


# -- SQL ----------------------------------------------------------------------------------
#
# The statements name tables and columns read from the database's own catalog, each
# quoted (``_quoted``); the marker itself is always a bound parameter (hence S608's noqa).


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _search_sql(
    server: SwitchboardServer, marker: str, needles: Sequence[bytes], searched: list[str]
) -> list[str]:
    database = server.shared.database

    def work(session: Session) -> tuple[list[str], str]:
        connection = session.connection()
        if database.dialect_name == "sqlite":
            return _sqlite_tables(connection, marker, needles)
        return _postgres_tables(connection, marker, needles)

    hits, summary = await database.run(work, write=False, snapshot=True)
    searched.append(summary)
    return hits


def _row_label(names: Sequence[str], keys: Sequence[str], row: Sequence[Any]) -> str:
    if not keys:
        return ""
    values = dict(zip(names, row, strict=True))
    return " row " + ",".join(f"{key}={values[key]!r}" for key in keys)


def _scan_rows(
    table: str,
    names: Sequence[str],
    keys: Sequence[str],
    rows: Iterable[Sequence[Any]],
    needles: Sequence[bytes],
) -> list[str]:
    hits = []
    for number, row in enumerate(rows):
        label = _row_label(names, keys, row) or f" row #{number}"
        for name, value in zip(names, row, strict=True):
            if _holds(value, needles):
                hits.append(f"sql {table}.{name}{label}")
    return hits


def _fts_query(marker: str) -> str | None:
    """The marker as one FTS5 phrase; None when it has no word to match."""
    if not any(ch.isalnum() for ch in marker):
        return None
    return '"' + marker.replace('"', '""') + '"'


def _sqlite_tables(
    connection: Connection, marker: str, needles: Sequence[bytes]
) -> tuple[list[str], str]:
    tables = connection.execute(
        text("SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name")
    ).all()
    hits: list[str] = []
    phrase = _fts_query(marker)
    for name, sql in tables:
        keys = [
            str(key)
            for key in connection.execute(
                text("SELECT name FROM pragma_table_info(:t) WHERE pk > 0 ORDER BY pk"), {"t": name}
            ).scalars()
        ]
        # Without a declared key a row is named by its rowid (plain, FTS5 and vec0
        # tables all have one; a WITHOUT ROWID table always declares its key).
        select = f"SELECT {'' if keys else 'rowid AS rowid, '}* FROM {_quoted(name)}"  # noqa: S608
        try:
            result = connection.execute(text(select))
        except DBAPIError as exc:
            raise StoreSearchError(f"sql table {name} cannot be read: {exc.orig}") from exc
        names = list(result.keys())
        hits += _scan_rows(name, names, keys or ["rowid"], result, needles)
        if phrase is not None and _FTS5.search(sql or ""):
            matched = connection.execute(
                text(f"SELECT rowid FROM {_quoted(name)} WHERE {_quoted(name)} MATCH :q"),  # noqa: S608
                {"q": phrase},
            ).scalars()
            hits += [f"sql fts5 index {name} rowid={rowid}" for rowid in matched]
    return hits, f"sql sqlite: {len(tables)} tables"


def _postgres_tables(
    connection: Connection, marker: str, needles: Sequence[bytes]
) -> tuple[list[str], str]:
    # Tables and materialized views of every schema but the system's; a partitioned
    # table's rows are read in its partitions (relkind 'r'), once.
    tables = connection.execute(
        text(
            "SELECT c.oid, n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'm') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' "
            "ORDER BY n.nspname, c.relname"
        )
    ).all()
    hits: list[str] = []
    for oid, schema, table in tables:
        columns = connection.execute(
            text(
                "SELECT a.attname, t.typname FROM pg_attribute a "
                "JOIN pg_type t ON t.oid = a.atttypid "
                "WHERE a.attrelid = :oid AND a.attnum > 0 AND NOT a.attisdropped "
                "ORDER BY a.attnum"
            ),
            {"oid": oid},
        ).all()
        keys = [
            str(key)
            for key in connection.execute(
                text(
                    "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
                    "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                    "WHERE i.indrelid = :oid AND i.indisprimary ORDER BY a.attnum"
                ),
                {"oid": oid},
            ).scalars()
        ]
        where = f"{_quoted(schema)}.{_quoted(table)}"
        label = table if schema == "public" else f"{schema}.{table}"
        if not columns:
            continue
        # Every value as PostgreSQL writes it (json, tsvector, vector, arrays alike),
        # bytea as its bytes.
        exprs = [
            _quoted(name) if kind == "bytea" else f"{_quoted(name)}::text AS {_quoted(name)}"
            for name, kind in columns
        ]
        result = connection.execute(text(f"SELECT {', '.join(exprs)} FROM {where}"))  # noqa: S608
        names = [str(name) for name, _kind in columns]
        hits += _scan_rows(label, names, keys, result, needles)
        for name, kind in columns:
            if kind != "tsvector":
                continue
            for config in _TS_CONFIGS:
                matched = connection.execute(
                    text(
                        f"SELECT {', '.join(_quoted(k) + '::text' for k in keys) or 'NULL'} "  # noqa: S608
                        f"FROM {where} WHERE {_quoted(name)} @@ plainto_tsquery("
                        f"CAST(:config AS regconfig), :m)"
                    ),
                    {"config": config, "m": marker},
                ).all()
                hits += [
                    f"sql tsvector {label}.{name} ({config})" + _row_label(keys, keys, row)
                    for row in matched
                ]
    return hits, f"sql postgresql: {len(tables)} tables"


# -- blobs --------------------------------------------------------------------------------


async def _search_blobs(
    server: SwitchboardServer, needles: Sequence[bytes], searched: list[str]
) -> list[str]:
    settings = server.shared.section(FileSettings)
    domain = server.shared.built(ContextDomain)
    if settings.context_blob_store == "s3":
        return await asyncio.to_thread(_search_bucket, settings, needles, searched)
    if domain is not None:
        blobs = domain.files.blobs
        if not isinstance(blobs, DirectoryBlobStore):
            raise StoreSearchError(f"a blob store of kind {blobs.kind!r} cannot be searched")
        root: Path | None = blobs.root
    else:
        # A process that serves no context service has no store of its own; the one its
        # settings name is the deployment's (a temporary one belongs to a process only).
        root = files_directory(
            settings,
            database_url=server.settings.database_url.get_secret_value(),
            dev_mode=server.settings.dev_mode,
        )
    if root is None or not root.exists():
        searched.append("blobs: none")
        return []
    return await asyncio.to_thread(_search_directory, root, needles, searched)


def _search_directory(root: Path, needles: Sequence[bytes], searched: list[str]) -> list[str]:
    hits: list[str] = []
    count = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        count += 1
        relative = path.relative_to(root).as_posix()
        if any(needle in relative.encode() for needle in needles):
            hits.append(f"blob name {relative}")
        if _offsets(path, needles):
            hits.append(f"blob {relative}")
    searched.append(f"blobs: directory {root}, {count} files")
    return hits


def _s3_client(settings: FileSettings) -> S3Client:
    # Only here: boto3 takes about a second to import.
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=settings.context_s3_timeout_s,
        read_timeout=settings.context_s3_timeout_s,
        retries={"mode": "standard", "total_max_attempts": 2},
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.context_s3_endpoint,
        aws_access_key_id=settings.context_s3_access_key_id.get_secret_value() or None,
        aws_secret_access_key=settings.context_s3_secret_access_key.get_secret_value() or None,
        region_name=settings.context_s3_region,
        config=config,
    )


def _search_bucket(
    settings: FileSettings, needles: Sequence[bytes], searched: list[str]
) -> list[str]:
    client = _s3_client(settings)
    bucket = settings.context_s3_bucket
    hits: list[str] = []
    count = 0
    try:
        # A multipart upload never completed holds parts that no listing shows and the
        # S3 API cannot read back: said in ``searched``, for a test to judge.
        unfinished = len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                key = item.get("Key", "")
                count += 1
                if any(needle in key.encode() for needle in needles):
                    hits.append(f"blob name s3://{bucket}/{key}")
                body = client.get_object(Bucket=bucket, Key=key)["Body"]
                if _stream_holds(iter(partial(body.read, _CHUNK), b""), needles):
                    hits.append(f"blob s3://{bucket}/{key}")
    finally:
        client.close()
    searched.append(
        f"blobs: s3 bucket {bucket}, {count} objects, {unfinished} unfinished multipart uploads"
    )
    return hits


def _stream_holds(chunks: Iterator[bytes], needles: Sequence[bytes]) -> bool:
    overlap = max(len(needle) for needle in needles) - 1
    tail = b""
    for chunk in chunks:
        window = tail + chunk
        if any(needle in window for needle in needles):
            return True
        tail = window[-overlap:] if overlap else b""
    return False


# -- Redis --------------------------------------------------------------------------------


def _key_label(key: bytes | str | None) -> str:
    if isinstance(key, bytes):
        return key.decode("utf-8", "backslashreplace")
    return "" if key is None else key


async def _search_redis(url: str, needles: Sequence[bytes], searched: list[str]) -> list[str]:
    client: AnyRedis = binary_client(url, timeout_s=CALL_DEADLINE_S, max_connections=4)
    hits: list[str] = []
    count = 0
    try:
        async for key in client.scan_iter(count=_PAGE):
            count += 1
            hits += await _search_key(client, key, needles)
    finally:
        await client.aclose()
    searched.append(f"redis: {count} keys")
    return hits


async def _search_key(client: AnyRedis, key: bytes, needles: Sequence[bytes]) -> list[str]:
    name = _key_label(key)
    hits = [f"redis key name {name}"] if _holds(key, needles) else []
    kind = _key_label(await client.type(key))
    values: list[object] = []
    if kind == "none":  # gone since the scan (expired)
        return hits
    if kind == "string":
        values = [await client.get(key)]
    elif kind == "hash":
        async for field_name, value in client.hscan_iter(key, count=_PAGE):
            values += [field_name, value]
    elif kind == "list":
        start = 0
        while page := await client.lrange(key, start, start + _PAGE - 1):
            values += page
            start += _PAGE
    elif kind == "set":
        values = [member async for member in client.sscan_iter(key, count=_PAGE)]
    elif kind == "zset":
        values = [member async for member, _score in client.zscan_iter(key, count=_PAGE)]
    elif kind == "stream":
        return hits + await _search_stream(client, key, needles)
    else:
        # A module's type (JSON, ...): its serialized form still holds its strings
        # (except those its own encoding compresses).
        values = [await client.dump(key)]
        kind = f"{kind}, dumped"
    if any(_holds(value, needles) for value in values):
        hits.append(f"redis key {name} ({kind})")
    return hits


async def _search_stream(client: AnyRedis, key: bytes, needles: Sequence[bytes]) -> list[str]:
    name = _key_label(key)
    hits: list[str] = []
    low = "-"
    while entries := await client.xrange(key, min=low, max="+", count=_PAGE):
        for entry_id, fields in entries:
            pairs = (fields or {}).items()
            if any(_holds(k, needles) or _holds(v, needles) for k, v in pairs):
                hits.append(f"redis stream {name} entry {_key_label(entry_id)}")
        low = "(" + _key_label(entries[-1][0])  # exclusive: after the last one read
    return hits


# -- raw files ----------------------------------------------------------------------------


async def _search_raw(
    server: SwitchboardServer, needles: Sequence[bytes], searched: list[str]
) -> list[str]:
    database = server.shared.database
    if database.dialect_name == "sqlite":
        return await asyncio.to_thread(_search_sqlite_files, server, needles, searched)
    where = await database.run(_postgres_files, write=True)
    if where is None:
        searched.append("raw: postgresql files not searched (the role is no superuser)")
        return []
    return await asyncio.to_thread(_search_postgres_files, where, needles, searched)


def _sqlite_path(server: SwitchboardServer) -> Path | None:
    parsed = parse_database_url(server.settings.database_url.get_secret_value())
    if parsed.drivername != SQLITE_DRIVER or is_sqlite_memory(parsed):
        return None
    return Path(parsed.database or "").resolve()


def _page_size(path: Path) -> int:
    with path.open("rb") as handle:
        header = handle.read(_SQLITE_HEADER)
    size = int.from_bytes(header[16:18], "big")
    return 65536 if size == 1 else size or 4096


def _search_sqlite_files(
    server: SwitchboardServer, needles: Sequence[bytes], searched: list[str]
) -> list[str]:
    path = _sqlite_path(server)
    if path is None:
        return []
    page = _page_size(path)
    hits = [f"sqlite file page {at // page + 1} (offset {at})" for at in _offsets(path, needles)]
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        frame = _WAL_FRAME_HEADER + page
        hits += [
            f"sqlite wal frame {(at - _WAL_HEADER) // frame + 1} (offset {at})"
            for at in _offsets(wal, needles)
        ]
    journal = path.with_name(path.name + "-journal")
    if journal.exists():
        hits += [f"sqlite journal offset {at}" for at in _offsets(journal, needles)]
    searched.append(f"raw: {path} and its WAL")
    return hits


@dataclass(frozen=True)
class _PostgresFiles:
    """Where a PostgreSQL database keeps its files, and whose each file is."""

    data_dir: Path
    database_dir: Path
    #: Relation file node (the file's name) to "schema.relation".
    relations: dict[str, str]


def _postgres_files(session: Session) -> _PostgresFiles | None:
    """The database's files, once its dirty pages are on disk (CHECKPOINT: the test
    clusters run with ``synchronous_commit`` off). None unless the role may see them."""
    connection = session.connection()
    superuser = connection.execute(
        text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    ).scalar_one_or_none()
    if not superuser:
        return None
    connection.execute(text("CHECKPOINT"))
    data_dir = Path(
        str(connection.execute(text("SELECT current_setting('data_directory')")).scalar_one())
    )
    oid = connection.execute(
        text("SELECT oid FROM pg_database WHERE datname = current_database()")
    ).scalar_one()
    relations = {
        str(node): f"{schema}.{name}"
        for node, schema, name in connection.execute(
            text(
                "SELECT pg_relation_filenode(c.oid), n.nspname, c.relname FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE pg_relation_filenode(c.oid) IS NOT NULL"
            )
        )
    }
    return _PostgresFiles(data_dir, data_dir / "base" / str(oid), relations)


def _search_postgres_files(
    where: _PostgresFiles, needles: Sequence[bytes], searched: list[str]
) -> list[str]:
    if not where.database_dir.is_dir():
        searched.append(f"raw: postgresql files not searched ({where.data_dir} is elsewhere)")
        return []
    hits: list[str] = []
    for path in sorted(where.database_dir.iterdir()):
        offsets = _offsets(path, needles) if path.is_file() else []
        if offsets:
            # "16384", "16384.1" (the next GiB), "16384_fsm": named by their file node.
            node = path.name.split(".")[0].split("_")[0]
            relation = where.relations.get(node, "an unknown relation")
            hits.append(f"postgresql file {path.name} ({relation}) offsets {offsets[:8]}")
    # The write-ahead log is the cluster's, shared by every database in it.
    wal = where.data_dir / "pg_wal"
    for path in sorted(wal.iterdir()) if wal.is_dir() else []:
        offsets = _offsets(path, needles) if path.is_file() else []
        if offsets:
            hits.append(f"postgresql wal {path.name} offsets {offsets[:8]}")
    searched.append(f"raw: {where.database_dir} and {wal}")
    return hits
