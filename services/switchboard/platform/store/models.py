"""SQLAlchemy models of the shared database.

All tables live in one metadata so one Alembic history migrates the database
whichever services a process runs: in the mesh shape every process opens the
same database, and a schema split across histories could drift. Each table is
read and written only by its owner's ``store.py`` (auth, context, ...); the
workspace membership tables are read by the policy module for every service.

Times are stored as timezone-aware UTC (``UTCDateTime``) so SQLite, which keeps
no zone, and PostgreSQL return the same values.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID_LENGTH = 32
EMAIL_LENGTH = 254
DISPLAY_NAME_LENGTH = 200


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A datetime that is always timezone-aware UTC in Python, whatever the backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use UTC-aware values")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        if value.tzinfo is None:  # SQLite drops the zone; we only ever store UTC
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def table_of(model: type[Base]) -> Table:
    """The Core table behind ``model``, for statements that skip the ORM on hot paths."""
    return Base.metadata.tables[str(model.__tablename__)]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    # Stored lower-cased; uniqueness is on the normalized form.
    email: Mapped[str] = mapped_column(String(EMAIL_LENGTH), unique=True)
    display_name: Mapped[str] = mapped_column(String(DISPLAY_NAME_LENGTH), default="")
    # NULL for users who only ever signed in through a federated issuer.
    password_hash: Mapped[str | None] = mapped_column(String(512), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    version: Mapped[int] = mapped_column(Integer, default=1)
    # Set when the account was deleted (DeleteMyAccount): the row stays as a tombstone
    # without email or name, so ``users/{id}`` still names no one else (migration 0028).
    erased_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ErasureRow(Base):
    """A deleted account's erasure (docs/privacy.md): one part per service, each done by
    the processes serving it; ``plan`` is the serialized DeleteMyAccountRequest's
    workspaces (what becomes of those it owned alone)."""

    __tablename__ = "erasures"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    plan: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    # Space-separated ids of the workspaces the erasure keeps to (a member's words erased
    # there: RemoveWorkspaceMember with ``erase``); "" for a deleted account's (everywhere).
    workspaces: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    done_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ErasurePartRow(Base):
    """One service's part of an erasure, claimed for a while by one process."""

    __tablename__ = "erasure_parts"

    erasure_id: Mapped[str] = mapped_column(
        ForeignKey("erasures.id", ondelete="CASCADE"), primary_key=True
    )
    part: Mapped[str] = mapped_column(String(16), primary_key=True)
    claimer: Mapped[str] = mapped_column(String(64), default="")
    claimed_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    done_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ErasureNameRow(Base):
    """A resource an erasure removed (a message, a run): the events naming it are
    redacted by the last part, so its words leave the log too."""

    __tablename__ = "erasure_names"

    erasure_id: Mapped[str] = mapped_column(
        ForeignKey("erasures.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(300), primary_key=True)


class DataExportRow(Base):
    """An archive of a person's data (ExportMyData, docs/privacy.md), written by the
    context service: RUNNING until a process claims and writes it, then SUCCEEDED (its
    bytes in the blob store under ``sha256`` until ``expire_at``) or FAILED."""

    __tablename__ = "data_exports"
    __table_args__ = (Index("ix_data_exports_user", "user_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    # "running", "succeeded" or "failed".
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    done_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    expire_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    # The serialized google.rpc.Status of a failure.
    error: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    claimer: Mapped[str] = mapped_column(String(64), default="")
    claimed_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class FederatedIdentityRow(Base):
    __tablename__ = "federated_identities"
    __table_args__ = (UniqueConstraint("issuer", "subject", name="uq_federated_issuer_subject"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    issuer: Mapped[str] = mapped_column(String(512))
    subject: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class SessionRow(Base):
    """A login. Its refresh tokens are one family; revoking the session ends them all."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    auth_method: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoke_reason: Mapped[str] = mapped_column(String(64), default="")
    user_agent: Mapped[str] = mapped_column(String(256), default="")
    device_name: Mapped[str] = mapped_column(String(128), default="")
    client_address: Mapped[str] = mapped_column(String(128), default="")


class RefreshTokenRow(Base):
    """One refresh token of a session: only the newest unused one may be redeemed."""

    __tablename__ = "refresh_tokens"

    # HMAC-SHA256 hex digest of the token; the token itself is never stored.
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    session_id: Mapped[str] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    # Set when the token is exchanged; presenting it again is reuse.
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    # The public key id embedded in the key (``sbk_<id>_...``).
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    display_name: Mapped[str] = mapped_column(String(DISPLAY_NAME_LENGTH), default="")
    digest: Mapped[str] = mapped_column(String(64))
    # Space-separated, like the JWT ``scope`` claim.
    scopes: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Space-separated ``workspaces/{w}/assistants/{a}@{revision}``: the assistants its
    # calls use at a fixed revision (docs/assistants.md, "Revisions").
    assistant_pins: Mapped[str] = mapped_column(Text, default="", server_default="")


class WorkspaceRow(Base):
    __tablename__ = "workspaces"

    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(DISPLAY_NAME_LENGTH), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True, index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    # Serialized MemoryPolicy: the default of its assistants that set none (b"": off).
    memory_policy: Mapped[bytes] = mapped_column(
        LargeBinary, default=b"", server_default=text("''")
    )


class WorkspaceMemberRow(Base):
    __tablename__ = "workspace_members"
    __table_args__ = (Index("ix_workspace_members_user", "user_id"),)

    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    # "owner", "editor" or "viewer" (switchboard.platform.security.policy.Role).
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ConversationRow(Base):
    """A conversation. ``version`` counts every write to it or its messages and
    memory: the context window cache is keyed by it, so a write can never be
    answered with a window built before it."""

    __tablename__ = "conversations"
    __table_args__ = (
        Index("ix_conversations_listing", "workspace_id", "updated_at", "id"),
        Index("ix_conversations_base", "base_conversation_id"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(DISPLAY_NAME_LENGTH), default="")
    # Serialized google.protobuf.Struct.
    meta: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    creator: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    version: Mapped[int] = mapped_column(BigInteger, default=1)
    # The sequence of the newest message; appends take the next one under the row lock.
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    # Live (not archived) messages and their tokens, for the automatic pruning policy.
    message_count: Mapped[int] = mapped_column(BigInteger, default=0)
    token_count: Mapped[int] = mapped_column(BigInteger, default=0)
    # The newest summary memory item (pruning), if any.
    summary_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    # The branch reads and appends follow, and how many there are (migration 0027).
    active_branch: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    branch_count: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # A fork's shared history (ForkConversation): the conversation it was forked from
    # (no foreign key: a purge waits for its forks instead), the message the history
    # ends at, that message's branch and sequence. NULL, "", 0, 0: not a fork.
    base_conversation_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    base_message_id: Mapped[str] = mapped_column(String(ID_LENGTH), default="", server_default="")
    base_branch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    base_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class BranchRow(Base):
    """One branch of a conversation that has more than one (docs/conversations.md).

    A branch holds its own messages (``messages.branch``) after the first ``fork_seq``
    messages' worth of its ``parent``'s history: the parent's messages up to sequence
    ``fork_seq`` (and, in turn, whatever the parent shares of its own parent). Branch 1
    has no parent. ``head_seq`` is the sequence of the newest message on the branch's
    history (``fork_seq`` until it has one of its own).
    """

    __tablename__ = "conversation_branches"

    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    # 0: none (branch 1, or a branch started with no history).
    parent: Mapped[int] = mapped_column(Integer)
    fork_seq: Mapped[int] = mapped_column(BigInteger)
    head_seq: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class MessageRow(Base):
    """One message; ``data`` is the serialized ``Message`` (messages never change
    after the append, except for the archive marks pruning sets).

    Its full-text index lives outside the models, in migration 0023: an FTS5 table
    (``messages_fts``, keyed by ``fts_rowid``) on SQLite, a ``tsvector`` column with a
    GIN index on PostgreSQL; both written by the append.
    """

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("conversation_id", "seq", name="uq_messages_conversation_seq"),
        Index("ix_messages_live", "conversation_id", "archived", "seq"),
        Index("uq_messages_fts_rowid", "fts_rowid", unique=True),
        Index("ix_messages_parent", "conversation_id", "parent_seq", "seq"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    role: Mapped[str] = mapped_column(String(16))
    token_count: Mapped[int] = mapped_column(Integer)
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    summary_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    data: Mapped[bytes] = mapped_column(LargeBinary)
    # The SQLite FTS5 rowid (messages_fts); NULL on PostgreSQL.
    fts_rowid: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The branch it was appended on, and the sequence of the message it follows (0: none):
    # messages that follow the same one are versions of each other (migration 0027).
    branch: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    parent_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # ``Message.author``, so that an erasure finds a person's messages by it (migration
    # 0028; NULL for messages appended before it: the erasure reads those whole).
    author: Mapped[str | None] = mapped_column(String(200), nullable=True)


class MessageFileRow(Base):
    """A file an append stored for its message (inline bytes, a fetched URL, a Talk
    turn's recording): deleting the message deletes it (migration 0027). A file the
    message only names (an upload) has no row here."""

    __tablename__ = "message_files"

    message_id: Mapped[str] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    file_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)


class MemoryItemRow(Base):
    """A memory item under a scope: ``users/u``, ``workspaces/w`` or a conversation.

    Full-text search lives outside the models, in the migration: an FTS5 table
    (``memory_fts``, keyed by ``fts_rowid``) on SQLite, a generated ``tsvector``
    column with a GIN index on PostgreSQL.
    """

    __tablename__ = "memory_items"
    __table_args__ = (
        Index("ix_memory_items_listing", "scope", "created_at", "id"),
        Index("ix_memory_items_pinned", "scope", "pinned"),
        Index("ix_memory_items_valid", "scope", "valid_until"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    scope: Mapped[str] = mapped_column(String(160))
    # Set for workspace and conversation scopes, so deleting them deletes their memory.
    workspace_id: Mapped[str | None] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=True
    )
    conversation_id: Mapped[str | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), nullable=True, index=True
    )
    user_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    # Serialized google.protobuf.Struct.
    meta: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    # Space-separated message names.
    sources: Mapped[str] = mapped_column(Text, default="")
    creator: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    token_count: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer, default=1)
    # The SQLite FTS5 rowid (memory_fts); NULL on PostgreSQL.
    fts_rowid: Mapped[int | None] = mapped_column(BigInteger, nullable=True, unique=True)
    # When what it says became true (NULL: at its creation) and stopped (NULL: current).
    valid_from: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    valid_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Ids of the item it replaced and of the one that replaced it ("" for none).
    supersedes: Mapped[str] = mapped_column(String(ID_LENGTH), default="", server_default="")
    superseded_by: Mapped[str] = mapped_column(String(ID_LENGTH), default="", server_default="")
    invalid_reason: Mapped[str] = mapped_column(String(200), default="", server_default="")
    # The forming model's confidence in thousandths (an integer: a float column's
    # result processor on asyncpg needs the cursor's types, which prepared reads lack).
    confidence_milli: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Serialized MemoryFormation (b"" for items people wrote).
    formation: Mapped[bytes] = mapped_column(LargeBinary, default=b"", server_default=text("''"))
    # A user's item formed in a workspace: that workspace (its windows alone use it).
    origin_workspace_id: Mapped[str | None] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=True
    )


class MemoryVersionRow(Base):
    """One version of a memory item (docs/memory.md, "History"): what it said and
    when it was true as of a change; deleted with the item, so forgetting an item
    forgets its history."""

    __tablename__ = "memory_versions"

    memory_id: Mapped[str] = mapped_column(
        ForeignKey("memory_items.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    # "created", "edited" or "retired".
    change: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    editor: Mapped[str] = mapped_column(String(160))
    valid_from: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    valid_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    invalid_reason: Mapped[str] = mapped_column(String(200), default="")


class MemoryScopeRow(Base):
    """Version of a user's or workspace's memory, bumped on every change to it.

    Part of the context window cache key (a conversation's own memory bumps
    the conversation's version instead).
    """

    __tablename__ = "memory_scopes"

    scope: Mapped[str] = mapped_column(String(160), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class IdempotencyRow(Base):
    """A create request's ``request_id``: a retry returns the first result."""

    __tablename__ = "idempotency_keys"

    # "<user>/<method>/<request_id>".
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    # SHA-256 of the request, so a reused id with a different request is refused.
    fingerprint: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)


class RunRow(Base):
    """A dispatcher run; ``data`` is the serialized ``Run`` as last persisted,
    ``job`` what is needed to (re)start it (``dispatcher/runs/core/store.py``)."""

    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_listing", "conversation_id", "created_at", "id"),
        Index("ix_runs_active", "worker", "state"),
        # ListRuns across a workspace's conversations, by assistant (A2A's ListTasks).
        Index("ix_runs_workspace", "workspace_id", "assistant_id", "created_at", "id"),
        # QueryUsage: a workspace's ended runs by day.
        Index("ix_runs_usage", "workspace_id", "usage_day"),
        # Quotas: a workspace's queued and running runs, and an API key's of them,
        # counted on every SendMessage.
        Index("ix_runs_quota", "workspace_id", "state", "api_key_id"),
        # A run's children (ListRuns' ``parent_run``), a tree's size (delegation).
        Index("ix_runs_parent", "parent_id"),
        Index("ix_runs_root", "root_id"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    # RunState value; QUEUED and RUNNING are the active ones.
    state: Mapped[int] = mapped_column(Integer)
    # The dispatcher instance that owns it while active (SWITCHBOARD_INSTANCE_ID).
    worker: Mapped[str] = mapped_column(String(64))
    creator: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    # The assistant the run uses (its id in the workspace), "" for none: ListRuns'
    # ``assistant`` filter.
    assistant_id: Mapped[str] = mapped_column(String(63), server_default="")
    # When its state last changed (its end, else start, else create time): ListRuns'
    # ``state_changed_after`` filter.
    state_time: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    data: Mapped[bytes] = mapped_column(LargeBinary)
    # Serialized dispatcher ``Job`` (the input, parameters, credential ids).
    job: Mapped[bytes] = mapped_column(LargeBinary)
    # What the run spent, stored with its end (QueryUsage sums these): the API key
    # it was started with ("" for none), the model that answered, its tokens and
    # its cost in micro-units, and the UTC day it ended ("" while active).
    api_key_id: Mapped[str] = mapped_column(String(64), server_default="")
    model: Mapped[str] = mapped_column(String(256), server_default="")
    input_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    output_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cost_micros: Mapped[int] = mapped_column(BigInteger, server_default="0")
    usage_day: Mapped[str] = mapped_column(String(10), server_default="")
    # Its model calls made with ``max_tokens`` lowered to fit a budget
    # (``Usage.budget_lowered_calls``), stored with its end.
    budget_lowered_calls: Mapped[int] = mapped_column(Integer, server_default="0")
    # Its model calls the price table has no price for (``Usage.unpriced_calls``),
    # stored with its end: QueryUsage counts the runs whose cost leaves some out.
    unpriced_calls: Mapped[int] = mapped_column(Integer, server_default="0")
    # The run whose delegate tool call started it ("" for none: ListRuns' ``parent_run``
    # filter), and the root of its tree (itself for a run with no parent): a tree's
    # children are counted against ``dispatcher_max_children_per_tree``.
    parent_id: Mapped[str] = mapped_column(String(ID_LENGTH), server_default="")
    root_id: Mapped[str] = mapped_column(String(ID_LENGTH), server_default="")


#: Schema the migrations create outside the models (full-text search); the drift
#: check and table listings ignore it.
_FTS_PARTS = ("data", "idx", "content", "docsize", "config")
_FTS_TABLES = ("memory_fts", "semantic_chunks_fts", "messages_fts")
SEARCH_TABLES = frozenset(
    {*_FTS_TABLES} | {f"{table}_{part}" for table in _FTS_TABLES for part in _FTS_PARTS}
)
SEARCH_COLUMNS = frozenset(
    {("memory_items", "search"), ("semantic_chunks", "search"), ("messages", "search")}
)
SEARCH_INDEXES = frozenset(
    {"ix_memory_items_search", "ix_semantic_chunks_search", "ix_messages_search"}
)
#: The semantic index's vector tables, one per dimension count (``semantic_vec_384``...),
#: are made by the chunk store on first use, outside the models and migrations.
VECTOR_TABLE_PREFIX = "semantic_vec_"


def modelled(name: str | None, type_: str, parent_names: Mapping[str, Any]) -> bool:
    """Alembic ``include_name`` filter: False for the search schema the models omit."""
    if type_ == "table":
        return name not in SEARCH_TABLES and not (name or "").startswith(VECTOR_TABLE_PREFIX)
    if type_ == "column":
        return (parent_names.get("table_name"), name) not in SEARCH_COLUMNS
    if type_ == "index":
        return name not in SEARCH_INDEXES
    return True


class EventLogRow(Base):
    """One event of the embedded log (``platform/events/eventlog.py``), in cursor order.

    Only the embedded default writes here; scaled out, Redis Streams is the log.
    ``data`` is the serialized ``Event`` envelope, cursor included.
    """

    __tablename__ = "event_log"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)


class EventLogStateRow(Base):
    """The embedded log's horizon: every seq at or below it has been trimmed.

    Kept apart from the rows so that trimming everything never lets a restart
    reuse a sequence number a client may still hold as its cursor.
    """

    __tablename__ = "event_log_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    horizon: Mapped[int] = mapped_column(BigInteger)


class EventOutboxRow(Base):
    """An event written in the same transaction as the change it announces.

    Deleted once the event is in the log; a row that stays (the process died
    between commit and publish, or the log was away) is published by any
    process's relay (``platform/store/outbox.py``). ``key`` is the write's
    idempotency key, if any: a retried request publishes its leftover at once.

    No secondary indexes: every write inserts a row and the log deletes it
    moments later, so the table is near empty and each index would be two
    more B-tree updates per event on the hot path (a large share of a paced
    echo run's server CPU: decisions 39); the relay's and a retry's scans stay small.
    """

    __tablename__ = "event_outbox"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    key: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class DispatcherLeaseRow(Base):
    """How long a dispatcher instance is known alive; its runs are taken over after."""

    __tablename__ = "dispatcher_leases"

    instance: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    #: ``host:port`` other replicas forward the instance's calls to; "" if it has none.
    address: Mapped[str] = mapped_column(String(300), default="", server_default="")


class ConversationHolderRow(Base):
    """Which assistant holds a conversation after a handoff (docs/delegation.md): the
    conversation's later messages that name no assistant go to it. No row: the
    workspace's default assistant answers, as before any handoff."""

    __tablename__ = "conversation_holders"

    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    assistant_id: Mapped[str] = mapped_column(String(63))
    # The run that handed it over, and why (the handing model's words).
    run_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    reason: Mapped[str] = mapped_column(String(1000), server_default="")
    # Whether the holder sees only what came from the handoff (``updated_at``) on.
    since_handoff: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class AssistantRow(Base):
    """A workspace's assistant (``dispatcher/assistants/catalog.py``): the serialized
    ``Assistant`` message (``data``) beside the columns that are queried.
    ``version`` is the etag's source; ``is_default`` marks the one used by
    messages that name no assistant (at most one per workspace)."""

    __tablename__ = "assistants"
    __table_args__ = (Index("ix_assistants_default", "workspace_id", "is_default"),)

    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    creator: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    version: Mapped[int] = mapped_column(Integer, default=1)
    #: The current revision (``AssistantRevisionRow``); the default flag moves
    #: ``version`` but not this.
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class AssistantRevisionRow(Base):
    """One revision of an assistant (docs/assistants.md, "Revisions"): its serialized
    settings as a change left them, immutable, deleted with the assistant."""

    __tablename__ = "assistant_revisions"
    __table_args__ = (
        ForeignKeyConstraint(
            ["workspace_id", "assistant_id"],
            ["assistants.workspace_id", "assistants.id"],
            ondelete="CASCADE",
        ),
    )

    workspace_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    assistant_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    author: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    # "created", "updated" or "rolled_back".
    origin: Mapped[str] = mapped_column(String(16))
    #: For "rolled_back": the revision restored; 0 otherwise.
    restored: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class BudgetRow(Base):
    """A workspace's budget (``dispatcher/budgets/``): the serialized ``Budget``
    (``data``, without its usage) beside what finds the budgets of a run: the
    kind of its scope (``workspace``, ``assistant``, ``api_key``) and the id of
    what it names ("" for the workspace)."""

    __tablename__ = "budgets"
    __table_args__ = (Index("ix_budgets_scope", "workspace_id", "scope_kind", "scope_id"),)

    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    scope_kind: Mapped[str] = mapped_column(String(16))
    scope_id: Mapped[str] = mapped_column(String(128))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    creator: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    version: Mapped[int] = mapped_column(Integer, default=1)


class BudgetWindowRow(Base):
    """One period of a budget: what it used (settled) and holds (reserved by calls
    in flight). A reservation is one conditional UPDATE of this row per budget
    (``dispatcher/budgets/ledger.py``), so two replicas cannot both take the last
    of it. ``window`` names the period: ``total``, ``d:2026-11-26``,
    ``w:2026-11-23`` (its Monday), ``m:2026-11`` or ``r:{run}``. ``alerted`` is
    the highest alert threshold already logged for it, in percent."""

    __tablename__ = "budget_windows"
    __table_args__ = (
        ForeignKeyConstraint(
            ["workspace_id", "budget_id"],
            ["budgets.workspace_id", "budgets.id"],
            ondelete="CASCADE",
        ),
    )

    workspace_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    budget_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    window: Mapped[str] = mapped_column(String(48), primary_key=True)
    cost_used: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_held: Mapped[int] = mapped_column(BigInteger, default=0)
    input_used: Mapped[int] = mapped_column(BigInteger, default=0)
    input_held: Mapped[int] = mapped_column(BigInteger, default=0)
    output_used: Mapped[int] = mapped_column(BigInteger, default=0)
    output_held: Mapped[int] = mapped_column(BigInteger, default=0)
    alerted: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class BudgetHoldRow(Base):
    """A reservation in flight: what one step of a run holds in one budget's
    window until it settles. A replica that dies holding some has them released
    when its runs are taken over (by ``run_id``)."""

    __tablename__ = "budget_holds"
    __table_args__ = (Index("ix_budget_holds_run", "run_id"),)

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    budget_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    window: Mapped[str] = mapped_column(String(48))
    run_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    cost: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class WorkspaceQuotaRow(Base):
    """A workspace's quotas as its owners set them (the serialized
    ``WorkspaceQuota``); a workspace without a row has the server's defaults."""

    __tablename__ = "workspace_quotas"

    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    data: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    version: Mapped[int] = mapped_column(Integer, default=1)


class ScheduleRow(Base):
    """A workspace's schedule (``dispatcher/schedules/``): the serialized ``Schedule``
    settings (``data``) beside the columns the firing loop queries. ``next_fire_us``
    is the next tick in microseconds since the epoch (NULL while paused): a replica
    claims a tick by moving it on, conditional on the value it read, so a tick is
    claimed once. ``uid`` is unique to this schedule's life: the request ids of
    its ticks derive from it, so a schedule deleted and made again with the same id
    never replays the old one's runs. ``version`` is the etag's source (a claim
    does not change it)."""

    __tablename__ = "schedules"
    __table_args__ = (Index("ix_schedules_due", "state", "next_fire_us"),)

    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    uid: Mapped[str] = mapped_column(String(ID_LENGTH))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    # ScheduleState value.
    state: Mapped[int] = mapped_column(Integer)
    next_fire_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_fire_us: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_run: Mapped[str] = mapped_column(String(255), default="", server_default="")
    # The SHARED conversation's id ("" for PER_RUN).
    conversation_id: Mapped[str] = mapped_column(String(63), default="", server_default="")
    # The creator's user id: its runs run as this user.
    creator: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    version: Mapped[int] = mapped_column(Integer, default=1)


class ScheduleFiringRow(Base):
    """One tick of a schedule, claimed once: the primary key is the claim (two
    replicas inserting the same tick cannot both commit). ``outcome`` is a
    ``FiringOutcome`` value: CLAIMED while its run is being started by ``claimer``
    (a dispatcher instance; a live one takes over a claim whose claimer's lease
    expired), then STARTED (``run``), SKIPPED or FAILED (``error``, a serialized
    ``google.rpc.Status``). ``request`` is the serialized ``SendMessageRequest`` the
    tick sends, fixed at the claim so a replay is the same request."""

    __tablename__ = "schedule_firings"
    __table_args__ = (
        ForeignKeyConstraint(
            ["workspace_id", "schedule_id"],
            ["schedules.workspace_id", "schedules.id"],
            ondelete="CASCADE",
        ),
        Index("ix_schedule_firings_claimed", "outcome", "claimer"),
    )

    workspace_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    schedule_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    fire_us: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    claim_time: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    claimer: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[int] = mapped_column(Integer)
    catch_up: Mapped[bool] = mapped_column(Boolean, default=False)
    run: Mapped[str] = mapped_column(String(255), default="")
    error: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    request: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    # For PER_RUN: the title of the conversation the tick makes ("" for SHARED).
    title: Mapped[str] = mapped_column(String(255), default="")


class FileRow(Base):
    """A stored file's metadata (``context/files/``); its bytes are the blob
    named by ``sha256`` in the blob store. A deleted file keeps its row (with
    ``deleted_at``) until maintenance purges it; only live rows hold a blob."""

    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_listing", "workspace_id", "created_at", "id"),
        # The quota's sum: live files of a workspace, by size.
        Index("ix_files_usage", "workspace_id", "deleted_at", "size_bytes"),
        Index("ix_files_sha256", "sha256"),
        Index("ix_files_text_state", "text_state"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    display_name: Mapped[str] = mapped_column(String(255))
    media_type: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # "image", "document", "audio" or "other".
    kind: Mapped[str] = mapped_column(String(16))
    # "none", "pending", "ready" or "failed".
    text_state: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text, default="")
    text_tokens: Mapped[int] = mapped_column(Integer, default=0)
    text_error: Mapped[str] = mapped_column(String(512), default="")
    # Serialized google.protobuf.Struct.
    meta: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    creator: Mapped[str] = mapped_column(String(128), default="")
    source_uri: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=1)


class VoiceSessionRow(Base):
    """A voice session (``dispatcher/voice/``): ``data`` is the serialized
    ``VoiceSession`` as last stored; the session may be resumed on any replica
    until ``expire_at``, unless ``ended_at`` is set."""

    __tablename__ = "voice_sessions"
    __table_args__ = (
        Index("ix_voice_sessions_conversation", "conversation_id", "created_at", "id"),
        Index("ix_voice_sessions_expiry", "expire_at"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    # Who started it, `users/{user}`: only they may resume it.
    creator: Mapped[str] = mapped_column(String(128))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    turn_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expire_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class CallRow(Base):
    """A phone call (``dispatcher/talk/phone/``): ``data`` is its serialized ``Call``
    as last stored, beside the columns listed and looked for. ``holder`` is the
    dispatcher instance whose SIP engine carries it while it is not ENDED: EndCall is
    forwarded there, and the calls of a holder whose lease expired are ended by the
    next process that starts SIP. ``user_id`` is the user the call acts as (an erasure
    removes their calls: numbers are personal data). ``usage_day`` (the UTC day it ended,
    "" before) and ``seconds`` (how long it was answered) are QueryUsage's, as a run's
    usage columns are."""

    __tablename__ = "calls"
    __table_args__ = (
        Index("ix_calls_listed", "workspace_id", "created_at", "id"),
        Index("ix_calls_holder", "holder", "state"),
        Index("ix_calls_usage", "workspace_id", "usage_day"),
    )

    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    # CallState value.
    state: Mapped[int] = mapped_column(Integer)
    holder: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    assistant_id: Mapped[str] = mapped_column(String(63))
    usage_day: Mapped[str] = mapped_column(String(10))
    seconds: Mapped[int] = mapped_column(Integer)
    # When it was answered (NULL before): a live call's minutes so far, for the quota.
    answered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class VoiceTurnRow(Base):
    """A stored turn of a voice session: its user message and the run answering
    it, written once the message is stored (a resume replays from these)."""

    __tablename__ = "voice_turns"

    session_id: Mapped[str] = mapped_column(
        ForeignKey("voice_sessions.id", ondelete="CASCADE"), primary_key=True
    )
    turn: Mapped[int] = mapped_column(Integer, primary_key=True)
    message: Mapped[str] = mapped_column(String(255))
    run: Mapped[str] = mapped_column(String(255))
    recording: Mapped[str] = mapped_column(String(255), default="")
    transcript: Mapped[str] = mapped_column(Text, default="")
    audio_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class UploadRow(Base):
    """A resumable upload in progress: what was declared, and how many bytes
    are durable in the blob store's staging (``committed_size``). An expired
    upload's row stays a while after its staging is discarded, so a late
    client hears UPLOAD_EXPIRED rather than NOT_FOUND; a finished one names
    its file until it expires."""

    __tablename__ = "uploads"
    __table_args__ = (
        Index("ix_uploads_workspace", "workspace_id", "expires_at"),
        Index("ix_uploads_expiry", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    display_name: Mapped[str] = mapped_column(String(255))
    media_type: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    committed_size: Mapped[int] = mapped_column(BigInteger, default=0)
    creator: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    # The file it became; kept until expiry so a retried FinishUpload gets it again.
    file_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)


class IntegrationRow(Base):
    """An external service registered in a workspace (``integration/``).

    ``credential`` is sealed (``platform/security/credentials/secretbox.py``) and never leaves the
    hub; ``previous_credential`` keeps a rotated webhook secret signing until
    ``previous_until``. The health columns are written by the prober when the
    health changes, so they say how it stood at the last change.
    """

    __tablename__ = "integrations"
    __table_args__ = (Index("ix_integrations_listing", "workspace_id", "created_at", "id"),)

    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    # IntegrationKind value.
    kind: Mapped[int] = mapped_column(Integer)
    display_name: Mapped[str] = mapped_column(String(DISPLAY_NAME_LENGTH), default="")
    endpoint: Mapped[str] = mapped_column(String(2048))
    call_timeout_ms: Mapped[int] = mapped_column(Integer, default=0)
    # Serialized google.protobuf.Struct.
    config: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    # Webhooks: subscribed event type names, space-separated (all if empty).
    event_types: Mapped[str] = mapped_column(Text, default="")
    credential: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    previous_credential: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    previous_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    creator: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    version: Mapped[int] = mapped_column(Integer, default=1)
    # HealthState value, since when, and the latest failure (serialized google.rpc.Status).
    health: Mapped[int] = mapped_column(Integer, default=0)
    health_since: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_probe_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_error: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    failures: Mapped[int] = mapped_column(Integer, default=0)
    # Tool call prices (micro-units, docs/integration.md "Prices"): the default as a
    # column of its own, a number anyone can read or sum in SQL; the per-tool
    # overrides as one JSON object of segment to price ("" for none), since they are
    # only ever read and written whole with the integration, never queried by tool,
    # and a JSON text column is the same on SQLite and PostgreSQL.
    call_price_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    tool_call_prices: Mapped[str] = mapped_column(Text, default="", server_default="")
    # Whether a call left in flight by a crash may be sent again (docs/integration.md,
    # "Idempotency keys and retry-safe tools"): every tool, or the tools named, by
    # segment, space-separated (a segment holds no space), as event_types are.
    retry_safe: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    retry_safe_tools: Mapped[str] = mapped_column(Text, default="", server_default="")


class WebhookDeliveryRow(Base):
    """One event to deliver to one webhook endpoint (``integration/webhooks/delivery.py``).

    Unique per endpoint and event: however many replicas see the event, it is
    recorded (and so delivered) once. ``data`` is the serialized ``Event``.

    An endpoint (``integration_id``) is a webhook integration or an A2A push
    config (``PushConfigRow.endpoint_id``, which holds a ``.``, so it never
    names an integration). No foreign key ties it to either table: the
    endpoint's store deletes its deliveries with it, and the engine's
    maintenance deletes any left behind (a pruned workspace).
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint(
            "workspace_id", "integration_id", "event_id", name="uq_webhook_deliveries_event"
        ),
        Index("ix_webhook_deliveries_listing", "workspace_id", "integration_id", "seq"),
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
        # The head of an endpoint's queue (its oldest pending delivery) is one
        # seek, whatever the number of finished deliveries kept beside it.
        Index("ix_webhook_deliveries_queue", "workspace_id", "integration_id", "state", "seq"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(63))
    integration_id: Mapped[str] = mapped_column(String(63))
    # Log order of the event: deliveries to one endpoint go out in this order.
    seq: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    # DeliveryState value.
    state: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_http_status: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The replica sending it now, and until when that claim holds.
    claimed_by: Mapped[str] = mapped_column(String(64), default="")
    claimed_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class PushConfigRow(Base):
    """An A2A push notification config: a per-task webhook (``a2a/push/``).

    Its deliveries are ``webhook_deliveries`` rows of endpoint ``endpoint_id``,
    fed and sent by the webhook engine; ``token`` and ``credentials`` are
    sealed (``platform/security/credentials/secretbox.py``). ``ready`` is set once the task's
    status so far has been recorded, so nothing later goes out before it.
    """

    __tablename__ = "push_configs"
    __table_args__ = (
        UniqueConstraint(
            "workspace_id", "conversation_id", "run_id", "config_id", name="uq_push_configs_task"
        ),
    )

    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    endpoint_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(String(63))
    run_id: Mapped[str] = mapped_column(String(63))
    # The A2A config id (the client's, or one the server chose).
    config_id: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2048))
    token: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    auth_scheme: Mapped[str] = mapped_column(String(64), default="")
    credentials: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    creator: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    ready: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    # When the task's final status was recorded for delivery (pruning counts from it).
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class SemanticIndexRow(Base):
    """A workspace's semantic index settings (``context/semantic/``); no row: the
    server's defaults. ``generation`` moves on when the model or the dimensions
    change: chunks embedded under an older one are re-embedded in the background."""

    __tablename__ = "semantic_indexes"

    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(128), default="")
    dimensions: Mapped[int] = mapped_column(Integer, default=0)
    index_messages: Mapped[bool] = mapped_column(Boolean, default=False)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    version: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class SemanticCursorRow(Base):
    """How far the semantic indexer has read the event log, and who reads it now
    (one row; the same lease-and-compare-and-set as ``webhook_cursor``)."""

    __tablename__ = "semantic_cursor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    cursor: Mapped[str] = mapped_column(String(64), default="")
    holder: Mapped[str] = mapped_column(String(64), default="")
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class MemoryCursorRow(Base):
    """How far memory forming has read the event log, and who reads it now (one row;
    the lease-and-compare-and-set of ``semantic_cursor``)."""

    __tablename__ = "memory_cursor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    cursor: Mapped[str] = mapped_column(String(64), default="")
    holder: Mapped[str] = mapped_column(String(64), default="")
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class MemoryJobRow(Base):
    """An exchange waiting to be formed into memory, or a workspace's consolidation
    (docs/memory.md, "Forming"). Written in the transaction that moves the feeder's
    cursor past the run's end, so no exchange is lost; ``plan`` holds the model's
    decisions once stored (``state`` "decided"), applied idempotently until done."""

    __tablename__ = "memory_jobs"
    __table_args__ = (Index("ix_memory_jobs_due", "state", "not_before"),)

    # "run:{run name}", "idle:{conversation name}" or "consolidate:{workspace id}".
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    # "exchange" or "consolidate".
    kind: Mapped[str] = mapped_column(String(16))
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    conversation: Mapped[str] = mapped_column(String(160), default="")
    run: Mapped[str] = mapped_column(String(255), default="")
    assistant: Mapped[str] = mapped_column(String(160), default="")
    user_id: Mapped[str] = mapped_column(String(ID_LENGTH), default="")
    # JSON: the exchange's messages and the run's facts the worker needs.
    exchange: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    # JSON: the decisions, once the model made them ("decided").
    plan: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    # "pending", "decided", "paused" (a budget at its cap).
    state: Mapped[str] = mapped_column(String(16))
    enqueued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    claimer: Mapped[str] = mapped_column(String(64), default="")
    claimed_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(String(512), default="")


class SemanticJobRow(Base):
    """A source (memory item, message, document) waiting to be (re)indexed or removed.

    One row per source: a later event for the same source replaces the job, so a
    source is indexed once for its latest state however many events it had.
    """

    __tablename__ = "semantic_jobs"
    __table_args__ = (
        Index("ix_semantic_jobs_due", "not_before"),
        # A search by meaning counts its owner's waiting jobs (``IndexStore.pending``):
        # without it one owner's backlog makes every owner's search scan the table.
        Index("ix_semantic_jobs_owner", "owner"),
    )

    # "memory", "message" or "document".
    source_kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    # The memory item's, message's or file's resource name.
    source: Mapped[str] = mapped_column(String(255), primary_key=True)
    # The index it belongs to: `workspaces/{w}`, or `users/{u}` for a user's memory.
    owner: Mapped[str] = mapped_column(String(160))
    # Set as the owner is, so deleting a workspace or user deletes its jobs.
    workspace_id: Mapped[str | None] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=True
    )
    user_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True
    )
    enqueued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    not_before: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(String(512), default="")


class SemanticChunkRow(Base):
    """One indexed passage of a source, with its text for full-text search.

    Its vector, when it has one, is in the dimension's vector table (created by
    the store on first use: ``vec0`` on SQLite, ``vector(n)`` with an HNSW index
    on PostgreSQL), keyed by ``id``; ``embedding`` names the model, dimensions
    and generation it was embedded with ("" while it has none). Full-text search
    of the text lives in the migration, as for memory items.
    """

    __tablename__ = "semantic_chunks"
    __table_args__ = (
        UniqueConstraint("source_kind", "source", "chunk_index"),
        Index("ix_semantic_chunks_embedding", "owner", "embedding"),
        Index("ix_semantic_chunks_conversation", "conversation_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    # The index it belongs to: `workspaces/{w}`, or `users/{u}` for a user's memory
    # (the vector tables' partition).
    owner: Mapped[str] = mapped_column(String(160))
    # Set as the owner is, so deleting a workspace or user deletes its chunks.
    workspace_id: Mapped[str | None] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=True
    )
    user_id: Mapped[str | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True
    )
    source_kind: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(255))
    chunk_index: Mapped[int] = mapped_column(Integer)
    start_offset: Mapped[int] = mapped_column(Integer)
    end_offset: Mapped[int] = mapped_column(Integer)
    # The conversation a message or a conversation's memory item belongs to.
    conversation_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True)
    # A memory item's kind, a message's role, a document's media type.
    label: Mapped[str] = mapped_column(String(128), default="")
    # When the source was created (filters on create_time).
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    text: Mapped[str] = mapped_column(Text)
    # The source's metadata as a JSON object (filters on `metadata.KEY`).
    meta: Mapped[str] = mapped_column(Text, default="{}")
    embedding: Mapped[str] = mapped_column(String(200), default="")


class WebhookCursorRow(Base):
    """How far the webhook feeder has read the event log, and who feeds now.

    One row: the replica holding the lease turns new events into deliveries
    and advances the cursor in the same transaction, so an event becomes
    deliveries exactly once whichever replica reads it.
    """

    __tablename__ = "webhook_cursor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    cursor: Mapped[str] = mapped_column(String(64), default="")
    holder: Mapped[str] = mapped_column(String(64), default="")
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
