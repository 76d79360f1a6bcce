"""The context service's section: every size and count has a limit, and its plugins."""

from __future__ import annotations

from pydantic import Field

from switchboard.platform.config import MiB, Section


class ContextSettings(Section):
    """What only the context domain reads (``context/build.py``), wherever it is built."""

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
    context_max_window_tokens: int = Field(
        default=1_000_000,
        ge=1,
        le=100_000_000,
        description="largest `token_budget` GetContextWindow accepts",
    )
    context_relevant_limit: int = Field(
        default=10,
        ge=0,
        le=100,
        description="relevant (full-text ranked) memory items a context window considers",
    )
    context_auto_prune_messages: int = Field(
        default=5000,
        ge=0,
        description="live messages in a conversation that trigger automatic pruning down to "
        "75% (0: off)",
    )
    context_auto_prune_tokens: int = Field(
        default=0,
        ge=0,
        description="live message tokens that trigger automatic pruning down to 75% (0: off)",
    )
    context_summary_tokens: int = Field(
        default=512,
        ge=16,
        le=100_000,
        description="token cap of a pruning summary",
    )
    context_tokenizer: str = Field(
        default="approx-v1",
        description="token counter: a built-in name, an entry point in "
        "`switchboard.tokenizers`, or `module:attr`",
    )
    context_summarizer: str = Field(
        default="extractive-v1",
        description="pruning summarizer: built-in, entry point in `switchboard.summarizers`, "
        "or `module:attr`",
    )
    context_entity_extractor: str = Field(
        default="builtin-v1",
        description="entity extractor: built-in, entry point in "
        "`switchboard.entity_extractors`, or `module:attr`",
    )
    context_window_cache_entries: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="context windows kept in each process's memory cache",
    )
    context_window_cache_bytes: int = Field(
        default=64 * MiB,
        ge=1 * MiB,
        le=16 * 1024 * MiB,
        description="bytes of context windows kept in each process's memory cache",
    )
    context_window_cache_ttl_s: int = Field(
        default=600,
        ge=1,
        le=86_400,
        description="lifetime of a cached context window in Redis",
    )
    context_image_tokens: int = Field(
        default=765,
        ge=0,
        le=100_000,
        description="tokens an image (JPEG, PNG, GIF, WEBP) in a message counts for in a context "
        "window: a fixed estimate, by default OpenAI's for a 1024x1024 image in high detail "
        "(85 + 4 tiles x 170)",
    )
    context_files_fetch_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="time to fetch a message's URL part (redirects included) before the "
        "append fails `UNAVAILABLE`",
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
    context_files_max_bytes: int = Field(
        default=1024 * MiB,
        ge=1,
        le=1024 * 1024 * MiB,
        description="size of one stored file; a larger upload gets `RESOURCE_EXHAUSTED` "
        "(`REQUEST_TOO_LARGE`)",
    )
    context_files_quota_bytes: int = Field(
        default=10 * 1024 * MiB,
        ge=0,
        description="bytes a workspace's files may take, counting uploads in progress at "
        "their declared size; beyond it `RESOURCE_EXHAUSTED` (`QUOTA_EXCEEDED`)",
    )
    context_files_max_uploads: int = Field(
        default=100,
        ge=1,
        le=100_000,
        description="resumable uploads in progress per workspace",
    )
    context_files_upload_expiry_s: int = Field(
        default=86_400,
        ge=60,
        le=30 * 86_400,
        description="how long a resumable upload may stay unfinished before it is discarded "
        "(`FAILED_PRECONDITION`, `UPLOAD_EXPIRED`)",
    )
    context_files_max_inline_bytes: int = Field(
        default=4 * MiB,
        ge=1024,
        le=64 * MiB,
        description="size of a file stored from bytes in a request (an inline message part, a "
        "tool's result) or fetched from a URL",
    )
    context_files_max_text_chars: int = Field(
        default=1_000_000,
        ge=1000,
        le=100_000_000,
        description="characters of text kept from one document or transcript (the rest is cut)",
    )
    context_files_max_pdf_pages: int = Field(
        default=500,
        ge=1,
        le=100_000,
        description="pages of a PDF whose text is extracted",
    )
    context_files_max_transcribe_bytes: int = Field(
        default=25 * MiB,
        ge=1024,
        le=1024 * MiB,
        description="size of an audio file sent for transcription (larger ones get no "
        "transcript: text state FAILED)",
    )
    context_files_transcribe_concurrency: int = Field(
        default=2,
        ge=1,
        le=64,
        description="audio files this process transcribes at once (each is held in memory "
        "while it is sent)",
    )
    context_files_dir: str = Field(
        default="",
        description="directory of the directory blob store; empty: `files` beside the SQLite "
        "database file (with PostgreSQL or an in-memory SQLite, empty is only allowed in dev "
        "mode, which uses a temporary directory removed when the process ends)",
    )
    context_files_orphan_grace_s: int = Field(
        default=3600,
        ge=60,
        le=30 * 86_400,
        description="how old a blob no file names (or staging no upload owns) must be before "
        "maintenance removes it",
    )
