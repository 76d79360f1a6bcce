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


class Archived(Refused):
    """The conversation is archived: read-only until it is unarchived."""


class AlreadyDeleted(Refused):
    """A delete of a row that is already deleted."""


class NotDeleted(Refused):
    """An undelete of a row that is not deleted."""


class Unsearchable(Exception):
    """The search engine refused the query the store built from the caller's terms."""
