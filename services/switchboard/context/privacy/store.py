"""SQL of the context service's part of an erasure (docs/privacy.md): finding what a
deleted account wrote or owned, and removing what no other path removes.

Messages go through the messages store's own deletion (``MessageStore.delete_messages``:
files, citations, versions, tombstone events); this store finds them, and removes the
rest: memory about the person, their files' rows, whole workspaces they chose to delete,
and messages of conversations already deleted (waiting for their purge).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy import delete, or_, select, text
from sqlalchemy.orm import Session

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.storebase import StoreBase
from switchboard.platform.store.models import (
    ConversationRow,
    DataExportRow,
    FileRow,
    MemoryItemRow,
    MessageRow,
    RunRow,
    UploadRow,
    WorkspaceRow,
)

#: Runs that may still store an answer (``dispatcher.v1.RunState``: QUEUED, RUNNING). A
#: run waiting for an approval (REQUIRES_ACTION) stores nothing until it resumes, and its
#: row is gone by then (the dispatcher's part).
_WORKING: Final = (1, 2)
#: SQLite's full-text indexes (migrations 0023 and the semantic index's).
_FTS_TABLES: Final = ("messages_fts", "memory_fts", "semantic_chunks_fts")
#: Messages read per round while looking for a person's.
SCAN_BATCH: Final = 500


@dataclass(frozen=True)
class Doomed:
    """A message to erase."""

    workspace_id: str
    conversation_id: str
    id: str
    #: Whether its conversation is deleted (waiting for its purge): removed here.
    conversation_deleted: bool


@dataclass(frozen=True)
class ErasedRows:
    """What a removal took: the names of its rows' resources, and the content hashes of
    the files removed (their bytes go once no other file names them)."""

    names: list[str]
    hashes: list[str]


class PrivacyStore(StoreBase):
    async def working_runs(self, user_name: str, within: Sequence[str] = ()) -> int:
        """How many of the person's runs are queued or running (``within`` some
        workspaces only): each may still store an answer."""

        def tx(db: Session) -> int:
            query = select(sa.func.count()).where(
                RunRow.creator.in_(creator_forms(user_name)),
                RunRow.state.in_(_WORKING),
            )
            if within:
                query = query.where(RunRow.workspace_id.in_(list(within)))
            return int(db.execute(query).scalar_one())

        return await self._run(tx, write=False)

    async def fill_authors(self) -> int:
        """Give the messages appended before migration 0028 their ``author`` column (read
        from their bytes), a batch at a time; how many were filled (0: none are left).
        Then a person's messages are found by the column alone."""

        def tx(db: Session) -> int:
            rows = db.execute(
                select(MessageRow.id, MessageRow.data)
                .where(MessageRow.author.is_(None))
                .limit(SCAN_BATCH)
            ).all()
            for message_id, data in rows:
                author = pb.Message.FromString(data).author
                db.execute(
                    sa.update(MessageRow).where(MessageRow.id == message_id).values(author=author)
                )
            return len(rows)

        return await self._run(tx, write=True)

    async def messages_of(self, user_name: str) -> list[Doomed]:
        """Every message the person wrote, in any workspace (one they left too), and the
        answers of the runs they started."""

        def tx(db: Session) -> list[Doomed]:
            return [
                Doomed(found.workspace_id, found.conversation_id, found.id, found.deleted)
                for found in persons_messages(db, user_name)
            ]

        return await self._run(tx, write=False)

    async def purge_messages(self, ids: Sequence[str]) -> None:
        """Delete messages of deleted conversations (their words' index goes with them:
        SQLite's by migration 0023's trigger, PostgreSQL's with the row)."""
        if not ids:
            return

        def tx(db: Session) -> None:
            db.execute(delete(MessageRow).where(MessageRow.id.in_(list(ids))))

        await self._run(tx, write=True)

    async def memory_of(
        self, user_id: str, user_name: str, within: Sequence[str] = ()
    ) -> list[tuple[str, str]]:
        """``(scope, id)`` of every memory item about the person: their own memory
        (every workspace's too) and the items they created anywhere; ``within`` some
        workspaces only, the items there they created and their own memory formed there."""

        def tx(db: Session) -> list[tuple[str, str]]:
            about = or_(
                MemoryItemRow.user_id == user_id,
                MemoryItemRow.creator.in_(creator_forms(user_name)),
            )
            query = select(MemoryItemRow.scope, MemoryItemRow.id).where(about)
            if within:
                query = query.where(
                    or_(
                        MemoryItemRow.workspace_id.in_(list(within)),
                        MemoryItemRow.origin_workspace_id.in_(list(within)),
                    )
                )
            return [(str(scope), str(item)) for scope, item in db.execute(query)]

        return await self._run(tx, write=False)

    async def delete_memory(self, ids: Sequence[str]) -> None:
        """Delete memory items with their versions and full-text rows."""
        if not ids:
            return

        def tx(db: Session) -> None:
            for chunk in _chunks(ids):
                if self._sqlite:
                    db.execute(
                        text(
                            "DELETE FROM memory_fts WHERE rowid IN (SELECT fts_rowid FROM "
                            "memory_items WHERE id IN :ids)"
                        ).bindparams(sa.bindparam("ids", expanding=True)),
                        {"ids": chunk},
                    )
                db.execute(delete(MemoryItemRow).where(MemoryItemRow.id.in_(chunk)))

        await self._run(tx, write=True)

    async def files_of(self, user_name: str, within: Sequence[str] = ()) -> list[tuple[str, str]]:
        """``(workspace, id)`` of every file the person uploaded (``within`` some
        workspaces only), deleted ones too."""

        def tx(db: Session) -> list[tuple[str, str]]:
            query = select(FileRow.workspace_id, FileRow.id).where(
                FileRow.creator.in_(creator_forms(user_name))
            )
            if within:
                query = query.where(FileRow.workspace_id.in_(list(within)))
            return [(str(w), str(f)) for w, f in db.execute(query)]

        return await self._run(tx, write=False)

    async def remove_files(self, ids: Sequence[str]) -> list[str]:
        """Delete file rows and the person's unfinished uploads; the content hashes of the
        files removed."""
        if not ids:
            return []

        def tx(db: Session) -> list[str]:
            hashes: list[str] = []
            for chunk in _chunks(ids):
                hashes += [
                    str(h)
                    for h in db.execute(select(FileRow.sha256).where(FileRow.id.in_(chunk)))
                    .scalars()
                    .all()
                ]
                db.execute(delete(FileRow).where(FileRow.id.in_(chunk)))
            return hashes

        return await self._run(tx, write=True)

    async def remove_uploads(self, user_name: str, within: Sequence[str] = ()) -> list[str]:
        """Delete the person's uploads, finished or not (``within`` some workspaces only);
        the ids of their staging."""

        def tx(db: Session) -> list[str]:
            query = select(UploadRow.id).where(UploadRow.creator.in_(creator_forms(user_name)))
            if within:
                query = query.where(UploadRow.workspace_id.in_(list(within)))
            ids = list(db.execute(query).scalars())
            if ids:
                db.execute(delete(UploadRow).where(UploadRow.id.in_(ids)))
            return ids

        return await self._run(tx, write=True)

    async def named_hashes(self, hashes: Sequence[str]) -> set[str]:
        """Those of ``hashes`` a file row or a data export still names (their bytes stay:
        a blob is shared by equal contents)."""
        if not hashes:
            return set()

        def tx(db: Session) -> set[str]:
            wanted = list(hashes)
            files = select(FileRow.sha256).where(FileRow.sha256.in_(wanted))
            exports = select(DataExportRow.sha256).where(DataExportRow.sha256.in_(wanted))
            return set(db.execute(files).scalars()) | set(db.execute(exports).scalars())

        return await self._run(tx, write=False)

    async def workspace_files(self, workspace_id: str) -> list[str]:
        def tx(db: Session) -> list[str]:
            return list(
                db.execute(select(FileRow.id).where(FileRow.workspace_id == workspace_id)).scalars()
            )

        return await self._run(tx, write=False)

    async def delete_workspace(self, workspace_id: str) -> bool:
        """Delete a workspace now, with everything in it (the rows cascade; SQLite's
        memory and message words go first, as the purge does); False if it is gone."""

        def tx(db: Session) -> bool:
            if db.get(WorkspaceRow, workspace_id) is None:
                return False
            if self._sqlite:
                # Messages' words go by migration 0023's trigger as the rows cascade.
                db.execute(
                    text(
                        "DELETE FROM memory_fts WHERE rowid IN (SELECT fts_rowid FROM "
                        "memory_items WHERE workspace_id = :w)"
                    ),
                    {"w": workspace_id},
                )
            db.execute(delete(WorkspaceRow).where(WorkspaceRow.id == workspace_id))
            return True

        return await self._run(tx, write=True)

    async def compact_words(self) -> None:
        """SQLite's full-text indexes keep a deleted row's terms in their segments until
        they are merged: merge them now, so an erased word leaves the index too.
        PostgreSQL's index is a column of the rows, gone with them."""
        if not self._sqlite:
            return
        for table in _FTS_TABLES:

            def tx(db: Session, table: str = table) -> None:
                # A constant table name; FTS5's own command form.
                db.execute(text(f"INSERT INTO {table}({table}) VALUES ('optimize')"))  # noqa: S608

            await self._run(tx, write=True)

    async def conversations_in(self, workspace_id: str) -> list[str]:
        def tx(db: Session) -> list[str]:
            return list(
                db.execute(
                    select(ConversationRow.id).where(ConversationRow.workspace_id == workspace_id)
                ).scalars()
            )

        return await self._run(tx, write=False)


@dataclass(frozen=True)
class Theirs:
    """A message of the person's (they wrote it, or it answers their run)."""

    id: str
    conversation_id: str
    workspace_id: str
    #: Whether its conversation is deleted (waiting for its purge).
    deleted: bool
    title: str
    data: bytes


def persons_messages(db: Session, user_name: str) -> list[Theirs]:
    """The messages ``user_name`` wrote (by the ``author`` column: ``fill_authors`` first)
    and the answers of the runs they started, oldest first per conversation."""
    columns = (
        MessageRow.id,
        MessageRow.conversation_id,
        ConversationRow.workspace_id,
        ConversationRow.deleted_at,
        ConversationRow.title,
        MessageRow.data,
        MessageRow.seq,
    )
    joined = select(*columns).join(
        ConversationRow, ConversationRow.id == MessageRow.conversation_id
    )
    rows = list(db.execute(joined.where(MessageRow.author == user_name)))
    runs: dict[str, set[str]] = {}
    for run_id, conversation_id in db.execute(
        select(RunRow.id, RunRow.conversation_id).where(
            RunRow.creator.in_(creator_forms(user_name))
        )
    ):
        runs.setdefault(str(conversation_id), set()).add(str(run_id))
    for conversation_id, theirs in runs.items():
        # The answers name their run in their bytes only: read the conversation's others.
        for row in db.execute(
            joined.where(
                MessageRow.conversation_id == conversation_id, MessageRow.author != user_name
            )
        ):
            run = pb.Message.FromString(row[5]).run
            if run and run.rsplit("/", 1)[-1] in theirs:
                rows.append(row)
    rows.sort(key=lambda row: (str(row[1]), int(row[6])))
    return [
        Theirs(str(m), str(c), str(w), deleted is not None, str(title), bytes(data))
        for m, c, w, deleted, title, data, _ in rows
    ]


def _chunks(ids: Sequence[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def creator_forms(user_name: str) -> tuple[str, str]:
    """A creator column holds ``users/{id}`` or the bare id, by table: both match."""
    return user_name, user_name.removeprefix("users/")
