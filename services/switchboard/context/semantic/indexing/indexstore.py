"""Persistence of the semantic indexer: each workspace's index settings and the job
queue (``semantic_jobs``); the feeder's lease and cursor over the event log
(``semantic_cursor``) are the leased feeder's (``platform/events/feedstore.py``).

The same two rules as the webhook engine's (``integration/webhooks/store.py``):

* The jobs of a batch of events are written in the transaction that moves the
  feeder's cursor past them (``feeding``, run by the feeder's compare-and-set),
  so an event becomes its job once whichever replica reads it; a job is one row
  per source, so a repeat or a later event only replaces it.
* A job is claimed by moving its ``not_before`` to the claim's expiry
  (compare-and-set on the old value), so one worker holds it at a time and
  a dead worker's jobs fall due again when the claim expires. A job is
  deleted only if it was not enqueued again meanwhile (``enqueued_at``).
  Enqueuing never moves ``not_before`` earlier: a job held by a claim stays
  held (its worker releases it when it sees the job was replaced), and a
  job waiting out a backoff keeps waiting.

The chunks themselves are written by the chunk store; this store only reads
them (which sources have which passages, under which model key).

Nothing here raises a request-field error or builds a response.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

from sqlalchemy import and_, case, delete, func, literal, null, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from switchboard.api.context.v1 import context_pb2
from switchboard.context.semantic.ports import SourceKind
from switchboard.platform.store.db import Database
from switchboard.platform.store.models import (
    ConversationRow,
    FileRow,
    MemoryItemRow,
    MessageRow,
    SemanticChunkRow,
    SemanticIndexRow,
    SemanticJobRow,
    UTCDateTime,
)
from switchboard.platform.store.storage import check_etag, transaction
from switchboard.platform.values.names import now
from switchboard.platform.values.resources import (
    FileName,
    MemoryName,
    MessageName,
    WorkspaceName,
    owner_or_none,
)
from switchboard.platform.values.structs import plain
from switchboard.shared.parttext import render_parts

log = logging.getLogger("switchboard.context.semantic")

_T = TypeVar("_T")
#: Jobs written per INSERT statement (bound parameters stay well under SQLite's limit).
_INSERT_BATCH: Final = 500
MAX_ERROR_CHARS: Final = 500


@dataclass(frozen=True)
class IndexSettings:
    """A workspace's stored settings (``version`` 0: no row, the server's defaults)."""

    workspace_id: str
    model: str = ""
    dimensions: int = 0
    index_messages: bool = False
    generation: int = 1
    version: int = 0
    updated_at: dt.datetime | None = None


@dataclass(frozen=True)
class NewJob:
    source_kind: SourceKind
    source: str
    owner: str

    @property
    def workspace_id(self) -> str | None:
        return owner_ids(self.owner)[0]


@dataclass
class Job:
    """A job a worker holds until ``claimed_until`` (moved on by ``renew``)."""

    source_kind: SourceKind
    source: str
    owner: str
    enqueued_at: dt.datetime
    claimed_until: dt.datetime
    attempts: int


@dataclass(frozen=True)
class Source:
    """A source's current state, as the index should hold it."""

    source_kind: SourceKind
    source: str
    owner: str
    text: str
    created_at: dt.datetime
    label: str = ""
    conversation_id: str | None = None
    meta: str = "{}"


@dataclass(frozen=True)
class Stored:
    """A source's passages as indexed now: (text, model key) by chunk index."""

    chunks: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Status:
    indexed: int
    pending: int
    #: The latest error of a job waiting to be retried ("" if none is).
    last_error: str


def owner_ids(owner: str) -> tuple[str | None, str | None]:
    """(workspace id, user id) of an index's owner, ``workspaces/{w}`` or ``users/{u}``."""
    found = owner_or_none(owner)
    if isinstance(found, WorkspaceName):
        return found.workspace, None
    return None, found.user if found is not None else None


def _count(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def _meta_json(data: bytes) -> str:
    """A source's metadata as the JSON object search filters with SQL's JSON functions.

    Always valid JSON: a number that is not finite (a Struct stored before requests
    holding one were refused) is ``null`` (``structs.plain``), where ``json.dumps``
    would write ``NaN``, which SQLite and PostgreSQL refuse, failing every filtered
    search of the workspace. ``allow_nan=False`` holds that.
    """
    from google.protobuf import struct_pb2

    value = struct_pb2.Struct.FromString(data) if data else struct_pb2.Struct()
    body = {key: plain(item) for key, item in value.fields.items()}
    return json.dumps(
        body, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False
    )


def memory_owner(scope: str) -> str:
    """The index a memory item of ``scope`` belongs to: its workspace, or its user."""
    found = owner_or_none(scope)
    return str(found) if found is not None else ""


class IndexStore:
    """The indexer's tables of one database."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._sqlite = database.dialect_name == "sqlite"

    async def _run(
        self, work: Callable[[Session], _T], *, write: bool, snapshot: bool = False
    ) -> _T:
        return await transaction(self._database, work, write=write, snapshot=snapshot, log=log)

    def _insert(self) -> Any:
        return sqlite_insert if self._sqlite else pg_insert

    # -- settings --------------------------------------------------------------------

    async def settings(self, workspace_ids: Iterable[str]) -> dict[str, IndexSettings]:
        ids = sorted(set(workspace_ids))

        def work(db: Session) -> dict[str, IndexSettings]:
            return _settings(db, ids)

        return await self._run(work, write=False)

    async def update_settings(
        self,
        workspace_id: str,
        etag: str,
        edit: Callable[[IndexSettings], IndexSettings],
        enqueue: Callable[[IndexSettings, IndexSettings], tuple[SourceKind, ...]],
        remove_messages: Callable[[IndexSettings, IndexSettings], bool],
    ) -> tuple[IndexSettings, int]:
        """Apply ``edit`` under the row lock (etag checked) and, in the same
        transaction, enqueue the workspace's sources of the kinds ``enqueue``
        names for (before, after); returns the stored settings and the jobs made."""

        def work(db: Session) -> tuple[IndexSettings, int]:
            row = db.get(SemanticIndexRow, workspace_id, with_for_update=True)
            before = _settings_of(row) if row is not None else IndexSettings(workspace_id)
            check_etag(etag, before.version, "semantic index")
            after = edit(before)
            after = replace(after, version=before.version + 1, updated_at=now())
            if row is None:
                row = SemanticIndexRow(workspace_id=workspace_id)
                db.add(row)
            row.model = after.model
            row.dimensions = after.dimensions
            row.index_messages = after.index_messages
            row.generation = after.generation
            row.version = after.version
            row.updated_at = after.updated_at  # type: ignore[assignment]
            db.flush()
            made = 0
            for kind in enqueue(before, after):
                made += self._enqueue_workspace(db, workspace_id, kind)
            if remove_messages(before, after):
                made += self._enqueue_chunk_sources(
                    db, SemanticChunkRow.owner == str(WorkspaceName(workspace_id)), kind="message"
                )
            return after, made

        return await self._run(work, write=True)

    async def messaging_workspaces(self) -> set[str]:
        """The workspaces whose messages are indexed."""

        def work(db: Session) -> set[str]:
            return set(
                db.execute(
                    select(SemanticIndexRow.workspace_id).where(
                        SemanticIndexRow.index_messages.is_(True)
                    )
                ).scalars()
            )

        return await self._run(work, write=False)

    # -- the feeder ----------------------------------------------------------------------

    def feeding(
        self,
        jobs: Callable[[Mapping[str, IndexSettings]], Sequence[NewJob]],
        workspace_ids: Sequence[str],
        conversations: Sequence[tuple[str, str, bool]] = (),
        rescan: bool = False,
    ) -> Callable[[Session], int]:
        """The jobs of a batch of events, as the work of the feeder's transaction that
        moves the cursor past them; the work returns the number of jobs written.

        ``jobs`` maps the index settings of ``workspace_ids`` (read in that
        transaction) to the jobs to write. ``conversations`` are (workspace,
        conversation, only_if_unindexed): their sources are enqueued (a deleted
        or restored conversation). ``rescan`` enqueues every source there is
        (the cursor fell behind the log's horizon).
        """

        def work(db: Session) -> int:
            made = 0
            if rescan:
                made += self._enqueue_everything(db)
            rows = jobs(_settings(db, sorted(set(workspace_ids)))) if workspace_ids else jobs({})
            made += self._upsert(db, rows)
            for workspace_id, conversation_id, only_unindexed in conversations:
                if only_unindexed and db.scalar(
                    select(SemanticChunkRow.id)
                    .where(SemanticChunkRow.conversation_id == conversation_id)
                    .limit(1)
                ):
                    continue
                made += self._enqueue_conversation(db, workspace_id, conversation_id)
            return made

        return work

    # -- enqueuing ---------------------------------------------------------------------

    def _upsert(self, db: Session, rows: Sequence[NewJob]) -> int:
        unique = list({(row.source_kind, row.source): row for row in rows}.values())
        current = now()
        for start in range(0, len(unique), _INSERT_BATCH):
            batch = unique[start : start + _INSERT_BATCH]
            statement = self._insert()(SemanticJobRow).values(
                [
                    {
                        "source_kind": row.source_kind,
                        "source": row.source,
                        "owner": row.owner,
                        "workspace_id": owner_ids(row.owner)[0],
                        "user_id": owner_ids(row.owner)[1],
                        "enqueued_at": current,
                        "not_before": current,
                        "attempts": 0,
                        "last_error": "",
                    }
                    for row in batch
                ]
            )
            db.execute(self._on_conflict(statement))
        return len(unique)

    def _on_conflict(self, statement: Any) -> Any:
        excluded = statement.excluded
        return statement.on_conflict_do_update(
            index_elements=[SemanticJobRow.source_kind, SemanticJobRow.source],
            set_={
                "owner": excluded.owner,
                "workspace_id": excluded.workspace_id,
                "user_id": excluded.user_id,
                "enqueued_at": excluded.enqueued_at,
                # Never earlier: a claim keeps its job, a backoff keeps waiting.
                "not_before": case(
                    (SemanticJobRow.not_before > excluded.not_before, SemanticJobRow.not_before),
                    else_=excluded.not_before,
                ),
            },
        )

    def _enqueue_select(self, db: Session, query: Any) -> int:
        """Enqueue the rows of ``query`` (kind, source, owner, workspace_id, user_id)."""
        current = now()
        stamp = literal(current, UTCDateTime())
        rows = query.add_columns(stamp, stamp, literal(0), literal(""))
        statement = self._insert()(SemanticJobRow).from_select(
            [
                "source_kind",
                "source",
                "owner",
                "workspace_id",
                "user_id",
                "enqueued_at",
                "not_before",
                "attempts",
                "last_error",
            ],
            rows,
        )
        return _count(db.execute(self._on_conflict(statement)))

    @staticmethod
    def _memory_query() -> Any:
        return select(
            literal("memory"),
            MemoryItemRow.scope + "/memories/" + MemoryItemRow.id,
            case(
                (
                    MemoryItemRow.workspace_id.is_not(None),
                    "workspaces/" + MemoryItemRow.workspace_id,
                ),
                else_="users/" + MemoryItemRow.user_id,
            ),
            MemoryItemRow.workspace_id,
            case((MemoryItemRow.workspace_id.is_(None), MemoryItemRow.user_id), else_=null()),
        )

    @staticmethod
    def _message_query() -> Any:
        return (
            select(
                literal("message"),
                "workspaces/"
                + ConversationRow.workspace_id
                + "/conversations/"
                + MessageRow.conversation_id
                + "/messages/"
                + MessageRow.id,
                "workspaces/" + ConversationRow.workspace_id,
                ConversationRow.workspace_id,
                null(),
            )
            .select_from(MessageRow)
            .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
        )

    @staticmethod
    def _document_query() -> Any:
        return select(
            literal("document"),
            "workspaces/" + FileRow.workspace_id + "/files/" + FileRow.id,
            "workspaces/" + FileRow.workspace_id,
            FileRow.workspace_id,
            null(),
        ).where(FileRow.text_state == "ready", FileRow.deleted_at.is_(None))

    def _enqueue_workspace(self, db: Session, workspace_id: str, kind: SourceKind) -> int:
        if kind == "memory":
            query = self._memory_query().where(MemoryItemRow.workspace_id == workspace_id)
        elif kind == "message":
            query = self._message_query().where(ConversationRow.workspace_id == workspace_id)
        else:
            query = self._document_query().where(FileRow.workspace_id == workspace_id)
        made = self._enqueue_select(db, query)
        # What is indexed but no longer there (or no longer wanted) is removed the same way.
        return made + self._enqueue_chunk_sources(
            db, SemanticChunkRow.owner == str(WorkspaceName(workspace_id)), kind=kind
        )

    def _enqueue_conversation(self, db: Session, workspace_id: str, conversation_id: str) -> int:
        made = self._enqueue_select(
            db, self._memory_query().where(MemoryItemRow.conversation_id == conversation_id)
        )
        index = _settings(db, [workspace_id]).get(workspace_id)
        if index is not None and index.index_messages:
            made += self._enqueue_select(
                db, self._message_query().where(MessageRow.conversation_id == conversation_id)
            )
        return made + self._enqueue_chunk_sources(
            db, SemanticChunkRow.conversation_id == conversation_id
        )

    def _enqueue_chunk_sources(
        self, db: Session, condition: Any, *, kind: SourceKind | None = None
    ) -> int:
        query = (
            select(
                SemanticChunkRow.source_kind,
                SemanticChunkRow.source,
                SemanticChunkRow.owner,
                SemanticChunkRow.workspace_id,
                SemanticChunkRow.user_id,
            )
            .where(condition, SemanticChunkRow.chunk_index == 0)
            .distinct()
        )
        if kind is not None:
            query = query.where(SemanticChunkRow.source_kind == kind)
        return self._enqueue_select(db, query)

    def _enqueue_everything(self, db: Session) -> int:
        made = self._enqueue_select(db, self._memory_query().where(MemoryItemRow.id.is_not(None)))
        made += self._enqueue_select(
            db,
            self._message_query()
            .join(
                SemanticIndexRow,
                SemanticIndexRow.workspace_id == ConversationRow.workspace_id,
            )
            .where(SemanticIndexRow.index_messages.is_(True)),
        )
        made += self._enqueue_select(db, self._document_query())
        return made + self._enqueue_chunk_sources(db, SemanticChunkRow.id.is_not(None))

    def _enqueue_orphans(self, db: Session) -> int:
        gone = (
            ~select(ConversationRow.id)
            .where(ConversationRow.id == SemanticChunkRow.conversation_id)
            .exists()
        )
        return self._enqueue_chunk_sources(
            db, and_(SemanticChunkRow.conversation_id.is_not(None), gone)
        )

    async def enqueue_orphans(self) -> int:
        """Enqueue the passages of conversations purged for good (no event says so, and
        passages have no foreign key to conversations): their removal."""

        def work(db: Session) -> int:
            return self._enqueue_orphans(db)

        return await self._run(work, write=True)

    async def reconcile(
        self, current_keys: Callable[[str, IndexSettings | None], str | None]
    ) -> int:
        """Enqueue what the index lacks or holds wrongly: sources whose passages are
        under another model key than ``current_keys(owner)`` (None: not embedded,
        so not compared), passages of conversations gone, and memory items (and
        ready documents) of embedded owners with no passage at all. Run when a
        replica takes the feeder's lease: it repairs a change of the server's
        default model, or embeddings configured since the index was filled."""

        def work(db: Session) -> int:
            indexes = {
                row.workspace_id: _settings_of(row)
                for row in db.execute(select(SemanticIndexRow)).scalars()
            }

            def key_of(owner: str) -> str | None:
                workspace_id, _ = owner_ids(owner)
                return current_keys(owner, indexes.get(workspace_id) if workspace_id else None)

            owners = db.execute(
                select(SemanticChunkRow.owner, SemanticChunkRow.embedding).distinct()
            ).all()
            made = 0
            for owner, embedding in owners:
                key = key_of(owner)
                if key is not None and embedding != key:
                    made += self._enqueue_chunk_sources(
                        db,
                        and_(
                            SemanticChunkRow.owner == owner, SemanticChunkRow.embedding == embedding
                        ),
                    )
            made += self._enqueue_orphans(db)
            indexed = select(SemanticChunkRow.id).where(
                SemanticChunkRow.source_kind == "memory",
                SemanticChunkRow.source == MemoryItemRow.scope + "/memories/" + MemoryItemRow.id,
            )
            workspaces = list(db.execute(select(MemoryItemRow.workspace_id).distinct()).scalars())
            for workspace_id in workspaces:
                if key_of(str(WorkspaceName(workspace_id)) if workspace_id else "users/") is None:
                    continue
                condition = (
                    MemoryItemRow.workspace_id == workspace_id
                    if workspace_id is not None
                    else MemoryItemRow.workspace_id.is_(None)
                )
                made += self._enqueue_select(
                    db, self._memory_query().where(condition, ~indexed.exists())
                )
            unindexed_files = (
                ~select(SemanticChunkRow.id)
                .where(
                    SemanticChunkRow.source_kind == "document",
                    SemanticChunkRow.source
                    == "workspaces/" + FileRow.workspace_id + "/files/" + FileRow.id,
                )
                .exists()
            )
            made += self._enqueue_select(db, self._document_query().where(unindexed_files))
            return made

        return await self._run(work, write=True)

    # -- the workers -------------------------------------------------------------------

    async def claim(self, until: dt.datetime, limit: int) -> tuple[list[Job], dt.datetime | None]:
        """Claim up to ``limit`` due jobs until ``until``; also when the next job falls
        due (None: none waits). An idle worker writes nothing."""

        def look(db: Session) -> tuple[bool, dt.datetime | None]:
            current = now()
            found = db.scalar(
                select(SemanticJobRow.source).where(SemanticJobRow.not_before <= current).limit(1)
            )
            later = db.scalar(
                select(func.min(SemanticJobRow.not_before)).where(
                    SemanticJobRow.not_before > current
                )
            )
            return found is not None, later

        anything, later = await self._run(look, write=False)
        if not anything:
            return [], later

        def work(db: Session) -> list[Job]:
            current = now()
            rows = db.execute(
                select(SemanticJobRow)
                .where(SemanticJobRow.not_before <= current)
                .order_by(SemanticJobRow.not_before)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).scalars()
            claimed: list[Job] = []
            for row in rows:
                row.not_before = until
                claimed.append(
                    Job(
                        source_kind=row.source_kind,  # type: ignore[arg-type]
                        source=row.source,
                        owner=row.owner,
                        enqueued_at=row.enqueued_at,
                        claimed_until=until,
                        attempts=row.attempts,
                    )
                )
            db.flush()
            return claimed

        return await self._run(work, write=True), later

    async def renew(self, jobs: Sequence[Job], until: dt.datetime) -> None:
        """Extend the claims still held on ``jobs`` to ``until`` (a long batch); a job
        whose claim was lost keeps its old ``claimed_until`` (its write is skipped)."""

        def work(db: Session) -> list[Job]:
            kept = []
            for job in jobs:
                moved = db.execute(
                    update(SemanticJobRow)
                    .where(
                        SemanticJobRow.source_kind == job.source_kind,
                        SemanticJobRow.source == job.source,
                        SemanticJobRow.not_before == job.claimed_until,
                    )
                    .values(not_before=until)
                )
                if _count(moved):
                    kept.append(job)
            return kept

        for job in await self._run(work, write=True):
            job.claimed_until = until

    async def finish(self, jobs: Sequence[Job]) -> int:
        """Delete the jobs done, unless enqueued again meanwhile (those are released to be
        done again at once); the number deleted."""

        def work(db: Session) -> int:
            done = 0
            current = now()
            for job in jobs:
                mine = and_(
                    SemanticJobRow.source_kind == job.source_kind,
                    SemanticJobRow.source == job.source,
                )
                deleted = db.execute(
                    delete(SemanticJobRow).where(
                        mine,
                        SemanticJobRow.enqueued_at == job.enqueued_at,
                        SemanticJobRow.not_before == job.claimed_until,
                    )
                )
                if _count(deleted):
                    done += 1
                    continue
                db.execute(
                    update(SemanticJobRow)
                    .where(mine, SemanticJobRow.not_before == job.claimed_until)
                    .values(not_before=current, attempts=0, last_error="")
                )
            return done

        return await self._run(work, write=True)

    async def retry(self, jobs: Sequence[tuple[Job, dt.datetime]], error: str) -> None:
        """Put claimed jobs back, due at the given times, with ``error`` and one more attempt."""

        def work(db: Session) -> None:
            for job, when in jobs:
                db.execute(
                    update(SemanticJobRow)
                    .where(
                        SemanticJobRow.source_kind == job.source_kind,
                        SemanticJobRow.source == job.source,
                        SemanticJobRow.not_before == job.claimed_until,
                    )
                    .values(
                        not_before=when,
                        attempts=SemanticJobRow.attempts + 1,
                        last_error=error[:MAX_ERROR_CHARS],
                    )
                )

        await self._run(work, write=True)

    async def release(self, jobs: Sequence[Job]) -> None:
        """Make claimed jobs due again at once (a clean shutdown)."""

        def work(db: Session) -> None:
            current = now()
            for job in jobs:
                db.execute(
                    update(SemanticJobRow)
                    .where(
                        SemanticJobRow.source_kind == job.source_kind,
                        SemanticJobRow.source == job.source,
                        SemanticJobRow.not_before == job.claimed_until,
                    )
                    .values(not_before=current)
                )

        await self._run(work, write=True)

    async def load(
        self, jobs: Sequence[Job]
    ) -> tuple[dict[tuple[str, str], Source | None], dict[tuple[str, str], Stored]]:
        """The current state of each job's source (None: gone, or not to be indexed), and
        what the index holds of it now, read in one transaction."""

        def work(
            db: Session,
        ) -> tuple[dict[tuple[str, str], Source | None], dict[tuple[str, str], Stored]]:
            sources: dict[tuple[str, str], Source | None] = {}
            workspaces = {owner_ids(job.owner)[0] for job in jobs} - {None}
            indexes = _settings(db, sorted(w for w in workspaces if w))
            for job in jobs:
                key = (job.source_kind, job.source)
                if job.source_kind == "memory":
                    sources[key] = _memory(db, job)
                elif job.source_kind == "message":
                    workspace_id = owner_ids(job.owner)[0] or ""
                    index = indexes.get(workspace_id)
                    wanted = index is not None and index.index_messages
                    sources[key] = _message(db, job) if wanted else None
                else:
                    sources[key] = _document(db, job)
            stored: dict[tuple[str, str], Stored] = {}
            names = [job.source for job in jobs]
            for start in range(0, len(names), _INSERT_BATCH):
                rows = db.execute(
                    select(
                        SemanticChunkRow.source_kind,
                        SemanticChunkRow.source,
                        SemanticChunkRow.text,
                        SemanticChunkRow.embedding,
                    )
                    .where(SemanticChunkRow.source.in_(names[start : start + _INSERT_BATCH]))
                    .order_by(SemanticChunkRow.source, SemanticChunkRow.chunk_index)
                ).all()
                grouped: dict[tuple[str, str], list[tuple[str, str]]] = {}
                for row in rows:
                    grouped.setdefault((row.source_kind, row.source), []).append(
                        (row.text, row.embedding)
                    )
                for found, chunks in grouped.items():
                    stored[found] = Stored(tuple(chunks))
            return sources, stored

        return await self._run(work, write=False, snapshot=True)

    # -- status ----------------------------------------------------------------------------

    async def pending(self, owner: str) -> int:
        """Jobs of the owner's index waiting (claimed ones too): what a search by meaning
        does not find yet. The table holds only waiting jobs, so this is one small count."""

        def work(db: Session) -> int:
            return int(db.scalar(select(func.count()).where(SemanticJobRow.owner == owner)) or 0)

        return await self._run(work, write=False)

    async def status(self, owner: str, key: str | None) -> Status:
        """Passages under ``key`` (None: not embedded: none counted), jobs pending."""

        def work(db: Session) -> Status:
            indexed = 0
            if key is not None:
                indexed = int(
                    db.scalar(
                        select(func.count()).where(
                            SemanticChunkRow.owner == owner, SemanticChunkRow.embedding == key
                        )
                    )
                    or 0
                )
            pending = int(db.scalar(select(func.count()).where(SemanticJobRow.owner == owner)) or 0)
            error = db.scalar(
                select(SemanticJobRow.last_error)
                .where(SemanticJobRow.owner == owner, SemanticJobRow.last_error != "")
                .order_by(SemanticJobRow.not_before.desc())
                .limit(1)
            )
            return Status(indexed, pending, error or "")

        return await self._run(work, write=False, snapshot=True)


def _settings_of(row: SemanticIndexRow) -> IndexSettings:
    return IndexSettings(
        workspace_id=row.workspace_id,
        model=row.model,
        dimensions=row.dimensions,
        index_messages=row.index_messages,
        generation=row.generation,
        version=row.version,
        updated_at=row.updated_at,
    )


def _settings(db: Session, workspace_ids: Sequence[str]) -> dict[str, IndexSettings]:
    if not workspace_ids:
        return {}
    rows = db.execute(
        select(SemanticIndexRow).where(SemanticIndexRow.workspace_id.in_(workspace_ids))
    ).scalars()
    return {row.workspace_id: _settings_of(row) for row in rows}


def _memory(db: Session, job: Job) -> Source | None:
    name = MemoryName.parse_or_none(job.source)
    if name is None:
        return None
    row = db.get(MemoryItemRow, name.memory)
    if row is None or row.scope != str(name.scope):
        return None
    if row.conversation_id is not None:
        conversation = db.get(ConversationRow, row.conversation_id)
        if conversation is None or conversation.deleted_at is not None:
            return None
    return Source(
        source_kind="memory",
        source=job.source,
        owner=memory_owner(row.scope),
        text=row.content,
        created_at=row.created_at,
        label=row.kind,
        conversation_id=row.conversation_id,
        meta=_meta_json(row.meta),
    )


def _message(db: Session, job: Job) -> Source | None:
    name = MessageName.parse_or_none(job.source)
    if name is None:
        return None
    row = db.get(MessageRow, name.message)
    if row is None or row.conversation_id != name.conversation:
        return None
    conversation = db.get(ConversationRow, row.conversation_id)
    if conversation is None or conversation.deleted_at is not None:
        return None
    if conversation.workspace_id != name.workspace:
        return None
    message = context_pb2.Message.FromString(row.data)
    return Source(
        source_kind="message",
        source=job.source,
        owner=str(name.parent.parent),
        text=render_parts(message.parts),
        created_at=row.created_at,
        label=row.role,
        conversation_id=row.conversation_id,
        meta=_meta_json(message.metadata.SerializeToString())
        if message.HasField("metadata")
        else "{}",
    )


def _document(db: Session, job: Job) -> Source | None:
    name = FileName.parse_or_none(job.source)
    if name is None:
        return None
    row = db.get(FileRow, name.file)
    if (
        row is None
        or row.workspace_id != name.workspace
        or row.deleted_at is not None
        or row.text_state != "ready"
    ):
        return None
    return Source(
        source_kind="document",
        source=job.source,
        owner=str(name.parent),
        text=row.text,
        created_at=row.created_at,
        label=row.media_type[:128],
        meta=_meta_json(row.meta),
    )


def stale(stored: Stored | None, texts: Sequence[str], key: str) -> bool:
    """Whether the index must be rewritten for a source cut into ``texts`` under ``key``."""
    if stored is None:
        return bool(texts)
    return tuple(stored.chunks) != tuple((text, key) for text in texts)


__all__ = [
    "IndexSettings",
    "IndexStore",
    "Job",
    "NewJob",
    "Source",
    "Status",
    "Stored",
    "memory_owner",
    "owner_ids",
    "stale",
]
