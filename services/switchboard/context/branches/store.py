"""Persistence of branches (``paths.py`` for the model): their rows, and what the other
stores read and write of them inside their own transactions.

Every change of a conversation's branches (a new one, the active one, a head) runs
under the conversation's row lock, as appends do: two edits at once take their turns,
and each gets its own branch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from switchboard.context.branches.paths import (
    Branch,
    Path,
    Segment,
    latest,
    path_of,
    plain,
    through,
)
from switchboard.context.records import ConversationRecord, Missing
from switchboard.context.storebase import StoreBase
from switchboard.platform.errors import FailedPrecondition, NotFound, QuotaExceeded
from switchboard.platform.store.models import BranchRow, ConversationRow, MessageRow, table_of
from switchboard.platform.store.outbox import Staged, staging
from switchboard.platform.store.prepared import Prepared
from switchboard.platform.store.storage import check_etag, retrying
from switchboard.platform.values.names import now

_BRANCHES: Final = table_of(BranchRow)
_CONVERSATIONS: Final = table_of(ConversationRow)
#: How deep forks of forks may go: reading one is a read of each source's branches.
MAX_FORK_DEPTH: Final = 8
_RECORD: Final = Prepared(
    select(*(_CONVERSATIONS.c[field] for field in ConversationRecord.__dataclass_fields__)).where(
        _CONVERSATIONS.c.id == bindparam("id")
    ),
    name="fork source",
)
_MESSAGES: Final = table_of(MessageRow)
_BRANCH_ROWS: Final = Prepared(
    select(_BRANCHES.c.number, _BRANCHES.c.parent, _BRANCHES.c.fork_seq, _BRANCHES.c.head_seq)
    .where(_BRANCHES.c.conversation_id == bindparam("conversation"))
    .order_by(_BRANCHES.c.number),
    name="branches",
)
_SET_HEAD: Final = Prepared(
    update(_BRANCHES)
    .where(
        _BRANCHES.c.conversation_id == bindparam("conversation"),
        _BRANCHES.c.number == bindparam("number"),
    )
    .values(head_seq=bindparam("seq"), updated_at=bindparam("stamp")),
    name="branch head",
)
_MESSAGE_PLACE: Final = Prepared(
    select(_MESSAGES.c.branch, _MESSAGES.c.seq, _MESSAGES.c.parent_seq, _MESSAGES.c.archived).where(
        _MESSAGES.c.id == bindparam("id"),
        _MESSAGES.c.conversation_id == bindparam("conversation"),
    ),
    name="message place",
)


@dataclass(frozen=True, slots=True)
class Place:
    """Where a stored message is: its branch, sequence, the one it follows."""

    branch: int
    seq: int
    parent_seq: int
    archived: bool


@dataclass(frozen=True, slots=True)
class Fork:
    """A new branch: its number, and the conversation after it."""

    number: int
    conversation: ConversationRecord


def branches(connection: Connection, conversation_id: str) -> dict[int, Branch]:
    """The conversation's branch rows (none while it has one branch)."""
    return {
        int(number): Branch(int(number), int(parent), int(fork), int(head))
        for number, parent, fork, head in _BRANCH_ROWS.rows(
            connection, {"conversation": conversation_id}
        )
    }


def check_branch(conversation: ConversationRecord, branch: int, field: str = "branch") -> int:
    """``branch`` (0: the active one) as a number the conversation has, or NOT_FOUND."""
    if branch == 0:
        return conversation.active_branch
    if branch < 0 or branch > conversation.branch_count:
        raise NotFound(
            f"{field}: the conversation has no branch {branch} (it has {conversation.branch_count})"
        )
    return branch


def path(
    connection: Connection, conversation: ConversationRecord, branch: int, depth: int = 0
) -> Path:
    """The history of ``branch`` (a number ``check_branch`` let through), on top of a
    fork's shared history."""
    if not conversation.layered:
        return plain(branch)
    rows = branches(connection, conversation.id) if conversation.branched else {}
    if not rows:
        # A fork with one branch: branch 1 holds everything it wrote.
        rows = {1: Branch(1, 0, 0, conversation.last_seq)}
    found = path_of(rows, branch)
    if conversation.base_conversation_id is None:
        return found
    return found.with_base(_base(connection, conversation, depth))


def _base(connection: Connection, fork: ConversationRecord, depth: int) -> tuple[Segment, ...]:
    """A fork's shared history: its source's history on the shared message's branch,
    up to that message, each range naming the conversation it reads."""
    source_id = fork.base_conversation_id or ""
    source = record(connection, source_id)
    if source is None or depth >= MAX_FORK_DEPTH:
        return ()  # pragma: no cover - a source outlives its forks (``purge``)
    history = path(connection, source, fork.base_branch, depth + 1)
    if history.every:
        own: tuple[Segment, ...] = (Segment(fork.base_branch or 1, 0, None, source_id),)
    else:
        own = tuple(
            Segment(s.branch, s.after, s.upto, s.conversation or source_id)
            for s in history.segments
        )
    return tuple(c for c in (s.clipped(fork.base_seq) for s in (*history.base, *own)) if c)


def record(connection: Connection, conversation_id: str) -> ConversationRecord | None:
    """A conversation by id alone (a fork's source: the same workspace, maybe deleted)."""
    row = _RECORD.first(connection, {"id": conversation_id})
    return ConversationRecord(*row) if row is not None else None


def has_forks(connection: Connection, conversation_id: str) -> bool:
    """Whether a conversation has a fork (live or deleted: either reads its rows)."""
    return (
        connection.execute(
            select(_CONVERSATIONS.c.id)
            .where(_CONVERSATIONS.c.base_conversation_id == conversation_id)
            .limit(1)
        ).first()
        is not None
    )


def forks_of(connection: Connection, conversation_id: str) -> list[str]:
    """The forks of a conversation, and theirs, to ``MAX_FORK_DEPTH``."""
    found: list[str] = []
    level = [conversation_id]
    for _ in range(MAX_FORK_DEPTH):
        level = list(
            connection.execute(
                select(_CONVERSATIONS.c.id).where(_CONVERSATIONS.c.base_conversation_id.in_(level))
            ).scalars()
        )
        if not level:
            break
        found += level
    return found


def place(connection: Connection, conversation_id: str, message_id: str) -> Place | None:
    row = _MESSAGE_PLACE.first(connection, {"id": message_id, "conversation": conversation_id})
    if row is None:
        return None
    return Place(int(row[0]), int(row[1]), int(row[2]), bool(row[3]))


def head(connection: Connection, conversation: ConversationRecord, branch: int) -> int:
    """The sequence of the newest message on ``branch``'s history (what an append
    there follows)."""
    if not conversation.branched:
        return conversation.last_seq
    found = branches(connection, conversation.id).get(branch)
    return found.head_seq if found is not None else 0


def moved_head(
    connection: Connection, conversation: ConversationRecord, branch: int, seq: int
) -> None:
    """An append to ``branch`` at ``seq``: its head moves (nothing while one branch)."""
    if conversation.branched:
        _SET_HEAD.execute(
            connection,
            {"conversation": conversation.id, "number": branch, "seq": seq, "stamp": now()},
        )


def fork(
    connection: Connection,
    conversation: ConversationRecord,
    *,
    source: int,
    after: int,
    max_branches: int,
    stamp: dt.datetime,
) -> Fork:
    """A new active branch whose history is ``source``'s up to sequence ``after`` (0:
    none), and the conversation after it (its version moved)."""
    if conversation.branch_count >= max_branches:
        raise QuotaExceeded(
            f"a conversation may have at most {max_branches} branches; fork it into a new "
            "conversation or delete it",
            subject="branches per conversation",
        )
    rows = branches(connection, conversation.id) if conversation.branched else {}
    if not conversation.branched:
        # The first fork: branch 1 becomes a row, holding every message so far.
        first = Branch(1, 0, 0, conversation.last_seq)
        rows[1] = first
        connection.execute(insert(_BRANCHES), [_values(conversation.id, first, stamp)])
    history = path_of(rows, source)
    parent = history.owner(after)
    number = conversation.branch_count + 1
    new = Branch(number, parent, after if parent else 0, after if parent else 0)
    connection.execute(insert(_BRANCHES), [_values(conversation.id, new, stamp)])
    connection.execute(
        update(_CONVERSATIONS)
        .where(_CONVERSATIONS.c.id == conversation.id)
        .values(
            active_branch=number,
            branch_count=number,
            version=_CONVERSATIONS.c.version + 1,
            updated_at=stamp,
        )
    )
    return Fork(
        number,
        dataclasses.replace(
            conversation,
            active_branch=number,
            branch_count=number,
            version=conversation.version + 1,
            updated_at=stamp,
        ),
    )


def shared_upto(connection: Connection, conversation_id: str) -> int:
    """The sequence up to which every branch holds the same history (branch 1's
    messages up to the earliest fork from it; 0 when a branch starts empty)."""
    rows = branches(connection, conversation_id)
    forks = [b.fork_seq for b in rows.values() if b.number != 1 and b.parent in (0, 1)]
    first = rows.get(1)
    return min(forks, default=first.head_seq if first is not None else 0)


def check_unfolded(connection: Connection, conversation_id: str, seq: int, field: str) -> None:
    """Refuse a branch from a message pruning folded into a summary along with later
    ones: the summary would speak of messages the branch does not hold."""
    folded = connection.execute(
        select(_MESSAGES.c.seq)
        .where(
            _MESSAGES.c.conversation_id == conversation_id,
            _MESSAGES.c.archived.is_(True),
            _MESSAGES.c.seq > seq,
        )
        .limit(1)
    ).first()
    if folded is not None:
        raise FailedPrecondition(
            f"{field}: the messages after it were folded into a summary by pruning; "
            "a branch can start only after the summary"
        )


def siblings(
    connection: Connection, conversation_id: str, parents: Sequence[int]
) -> dict[int, list[str]]:
    """The ids of the messages following each of ``parents`` (sequences), oldest first."""
    if not parents:
        return {}
    rows = connection.execute(
        select(_MESSAGES.c.parent_seq, _MESSAGES.c.id)
        .where(
            _MESSAGES.c.conversation_id == conversation_id,
            _MESSAGES.c.parent_seq.in_(sorted(set(parents))),
        )
        .order_by(_MESSAGES.c.parent_seq, _MESSAGES.c.seq)
    ).all()
    found: dict[int, list[str]] = {}
    for parent_seq, message_id in rows:
        found.setdefault(int(parent_seq), []).append(str(message_id))
    return found


def _values(conversation_id: str, branch: Branch, stamp: dt.datetime) -> dict[str, Any]:
    return {
        "conversation_id": conversation_id,
        "number": branch.number,
        "parent": branch.parent,
        "fork_seq": branch.fork_seq,
        "head_seq": branch.head_seq,
        "updated_at": stamp,
    }


class BranchStore(StoreBase):
    async def create_branch(
        self,
        workspace_id: str,
        conversation_id: str,
        after_id: str,
        *,
        etag: str,
        max_branches: int,
        staged: Staged[Any] | None = None,
    ) -> Fork:
        """A new active branch whose history ends at message ``after_id`` ("" : none)."""

        def tx(db: Session) -> Fork:
            connection = db.connection()
            conversation = self._conversation_record(
                connection, workspace_id, conversation_id, writable=True, lock=True
            )
            check_etag(etag, conversation.version, "conversation")
            source, after = conversation.active_branch, 0
            if after_id:
                found = place(connection, conversation_id, after_id)
                if found is None:
                    raise Missing("message", workspace_id, conversation_id, after_id)
                source, after = found.branch, found.seq
            check_unfolded(connection, conversation_id, after, "after")
            return fork(
                connection,
                conversation,
                source=source,
                after=after,
                max_branches=max_branches,
                stamp=now(),
            )

        return await retrying(lambda: self._run(staging(staged, tx), write=True))

    async def switch_branch(
        self,
        workspace_id: str,
        conversation_id: str,
        *,
        branch: int,
        message_id: str,
        etag: str,
        staged: Staged[Any] | None = None,
    ) -> tuple[ConversationRecord, bool]:
        """Make ``branch``, or the branch through ``message_id`` that changed last, active;
        the conversation, and whether it changed (switching to the branch already active
        changes nothing)."""

        def tx(db: Session) -> tuple[ConversationRecord, bool]:
            connection = db.connection()
            conversation = self._conversation_record(
                connection, workspace_id, conversation_id, writable=True, lock=True
            )
            check_etag(etag, conversation.version, "conversation")
            number = check_branch(conversation, branch)
            if message_id:
                found = place(connection, conversation_id, message_id)
                if found is None:
                    raise Missing("message", workspace_id, conversation_id, message_id)
                if not conversation.branched:
                    number = 1
                else:
                    rows = branches(connection, conversation_id)
                    chosen = latest(through(rows, found.branch, found.seq))
                    if chosen is None:
                        raise FailedPrecondition("no branch holds the message")
                    number = chosen.number
            if number == conversation.active_branch:
                return conversation, False
            stamp = now()
            connection.execute(
                update(_CONVERSATIONS)
                .where(_CONVERSATIONS.c.id == conversation_id)
                .values(
                    active_branch=number, version=_CONVERSATIONS.c.version + 1, updated_at=stamp
                )
            )
            changed = dataclasses.replace(
                conversation,
                active_branch=number,
                version=conversation.version + 1,
                updated_at=stamp,
            )
            return changed, True

        return await retrying(lambda: self._run(staging(staged, tx), write=True))
