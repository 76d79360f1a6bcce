"""The context service's section: every size and count has a limit, and its plugins.

Its rooms with settings of their own keep them beside their code: the context window's
(``windows/settings.py``), files' (``files/settings.py``) and semantic memory's
(``semantic/settings.py``). A new setting is a field of its room's section, read in
``context/build.py``, and a row of the README that ``make docs`` writes.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field

from switchboard.platform.config import MiB, Section


class ContextSettings(Section):
    """What the context domain reads beside its rooms' sections (``context/build.py``),
    wherever it is built."""

    context_max_message_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        le=4 * MiB,
        description="serialized size of one appended message (larger: RESOURCE_EXHAUSTED)",
    )
    context_max_message_parts: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="content parts per message",
    )
    context_max_metadata_bytes: int = Field(
        default=16 * 1024,
        ge=256,
        le=1 * MiB,
        description="serialized size of a conversation's, message's or memory item's metadata",
    )
    context_max_branches: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="branches per conversation (an edited message or a regenerated answer "
        "starts one; beyond it `RESOURCE_EXHAUSTED`)",
    )
    context_max_memory_chars: int = Field(
        default=8 * 1024,
        ge=64,
        le=1 * MiB,
        description="characters in one memory item",
    )
    context_max_members: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="members per workspace",
    )
    context_max_owned_workspaces: int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        description="workspaces one user may own",
    )
    context_max_conversations: int = Field(
        default=10_000,
        ge=1,
        le=100_000_000,
        description="conversations per workspace (soft-deleted ones count until purged)",
    )
    context_max_memory_items: int = Field(
        default=10_000,
        ge=1,
        le=100_000_000,
        description="memory items per scope (a user, a workspace, a conversation); entity "
        "extraction stops adding when full",
    )
    context_max_pinned: int = Field(
        default=50,
        ge=0,
        le=10_000,
        description="pinned memory items per scope",
    )
    context_entity_extractor: str = Field(
        default="builtin-v1",
        description="entity extractor: built-in, entry point in "
        "`switchboard.entity_extractors`, or `module:attr`",
    )
    context_max_writes_per_minute: int = Field(
        default=6000,
        ge=1,
        le=10_000_000,
        description="context writes (creates, updates, deletes, appends, prunes) per user per "
        "minute, across processes when Redis is configured; beyond it "
        "`RESOURCE_EXHAUSTED` (`RATE_LIMITED`) with a retry delay",
    )
    context_purge_after_s: int = Field(
        default=30 * 86_400,
        ge=60,
        description="how long soft-deleted workspaces and conversations can be restored "
        "before they are purged",
    )


def api_base(value: str) -> str:
    """An OpenAI-compatible API base URL, without its trailing slash ("" stays "")."""
    if not value:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http(s) URL, e.g. https://api.openai.com/v1")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("expected an http(s) URL without a query, fragment or user")
    return value.rstrip("/")
