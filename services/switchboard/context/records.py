"""The context service's rows as plain values, and what its stores refuse.

The stores return these (no ORM row leaves a store) and the domain maps them
to the contract's messages (``mapping.py``). The names of resources are the
domain's: a store that finds a row missing, already there, archived or in the
wrong state raises a ``Refused`` naming the row by its kind and ids, and the
domain turns it into the client's error with the resource name
(``common.stored``). A ``memory`` or ``scope`` refusal carries the scope the
domain passed in, since memory scopes are stored as names.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal, TypeAlias

Kind: TypeAlias = Literal[
    "workspace", "user", "member", "conversation", "message", "memory", "scope"
]


@dataclass(frozen=True, slots=True)
class WorkspaceRecord:
    id: str
    display_name: str
    description: str
    created_at: dt.datetime
    updated_at: dt.datetime
    deleted_at: dt.datetime | None
    version: int
    #: A serialized ``MemoryPolicy`` (b"": none, off).
    memory_policy: bytes = b""


@dataclass(frozen=True, slots=True)
class MemberRecord:
    workspace_id: str
    user_id: str
    role: str
    created_at: dt.datetime
    updated_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class ConversationRecord:
    id: str
    workspace_id: str
    title: str
    meta: bytes
    archived: bool
    creator: str
    created_at: dt.datetime
    updated_at: dt.datetime
    deleted_at: dt.datetime | None
    version: int
    last_seq: int
    message_count: int
    token_count: int
    summary_id: str | None
    #: The branch reads and appends follow, and how many there are (docs/conversations.md).
    active_branch: int = 1
    branch_count: int = 1
    #: A fork's shared history: the conversation it was forked from (None: not a
    #: fork), the message it ends at, that message's branch and sequence.
    base_conversation_id: str | None = None
    base_message_id: str = ""
    base_branch: int = 0
    base_seq: int = 0

    @property
    def branched(self) -> bool:
        """Whether it has more than one branch (``branches/``)."""
        return self.branch_count > 1

    @property
    def layered(self) -> bool:
        """Whether reads follow a history of ranges (several branches, or a fork's
        shared history) rather than every message of the conversation (the plain
        path, unchanged)."""
        return self.branch_count > 1 or self.base_conversation_id is not None


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One stored message; ``data`` is its serialized ``Message``."""

    id: str
    conversation_id: str
    seq: int
    role: str
    token_count: int
    archived: bool
    summary_id: str | None
    created_at: dt.datetime
    data: bytes
    #: The branch it was appended on and the sequence of the message it follows (0: none).
    branch: int = 1
    parent_seq: int = 0


@dataclass(frozen=True, slots=True)
class MemoryRecord:
    """One memory item; ``scope`` is the name of its owner (user, workspace, conversation)."""

    id: str
    scope: str
    workspace_id: str | None
    conversation_id: str | None
    user_id: str | None
    kind: str
    content: str
    pinned: bool
    meta: bytes
    sources: str
    creator: str
    created_at: dt.datetime
    updated_at: dt.datetime
    expires_at: dt.datetime | None
    token_count: int
    version: int
    #: When what it says became true (None: at its creation) and stopped (None: current).
    valid_from: dt.datetime | None = None
    valid_until: dt.datetime | None = None
    #: Ids of the item it replaced and of the one that replaced it ("" for none).
    supersedes: str = ""
    superseded_by: str = ""
    invalid_reason: str = ""
    #: The forming model's confidence in thousandths (0 for items people wrote).
    confidence_milli: int = 0
    #: A serialized ``MemoryFormation`` (b"" for items people wrote).
    formation: bytes = b""
    #: A user's item formed in a workspace: that workspace's id.
    origin_workspace_id: str | None = None

    def current(self, at: dt.datetime) -> bool:
        """Whether it is true at ``at`` (not retired by then, and not expired)."""
        return (self.valid_until is None or self.valid_until > at) and (
            self.expires_at is None or self.expires_at > at
        )


@dataclass(frozen=True, slots=True)
class MemoryVersionRecord:
    """One version of a memory item (``memory_versions``)."""

    memory_id: str
    version: int
    change: str
    content: str
    changed_at: dt.datetime
    editor: str
    valid_from: dt.datetime | None
    valid_until: dt.datetime | None
    invalid_reason: str


@dataclass(frozen=True, slots=True)
class Scope:
    """A memory scope: its name and the owner columns its items are stored with."""

    scope: str
    workspace_id: str | None = None
    conversation_id: str | None = None
    user_id: str | None = None


class Refused(Exception):
    """A store's refusal of a row, by kind and ids (the domain names the resource)."""

    def __init__(self, kind: Kind, *ids: str) -> None:
        super().__init__(kind, *ids)
        self.kind: Kind = kind
        self.ids = ids


class Missing(Refused):
    """The row is not there (or is soft-deleted where only live rows count)."""


class Exists(Refused):
    """A row with that key is already there."""


class Retired(Refused):
    """A memory item is already retired (superseded or invalidated)."""


class Superseded(Refused):
    """A memory item another replaced cannot become current again."""


class Archived(Refused):
    """The conversation is archived: read-only until it is unarchived."""


class AlreadyDeleted(Refused):
    """A delete of a row that is already deleted."""


class NotDeleted(Refused):
    """An undelete of a row that is not deleted."""


class Unsearchable(Exception):
    """The search engine refused the query the store built from the caller's terms."""
