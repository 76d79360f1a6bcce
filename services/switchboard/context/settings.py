"""The context service's section: every size and count has a limit, and its plugins."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from switchboard.platform.config import MiB, Section, shown

# S3's rule for a bucket name that works everywhere (path-style and virtual hosts).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


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
        "append fails `INVALID_ARGUMENT` on the part (`fetch_error` `timeout`)",
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
    context_files_extract_timeout_s: float = Field(
        default=60.0,
        ge=1,
        le=3600,
        description="wall time to read one PDF's text, in a child process killed past it (its "
        "CPU time is capped too); such a file is stored with text state FAILED and "
        "`text_error` saying so",
    )
    context_files_extract_memory_bytes: int = Field(
        default=1024 * MiB,
        ge=128 * MiB,
        le=64 * 1024 * MiB,
        description="address space of the child process that reads one PDF's text "
        "(`RLIMIT_AS`); a PDF that needs more is stored with text state FAILED and `text_error` "
        "saying so",
    )
    context_files_extract_concurrency: int = Field(
        default=2,
        ge=1,
        le=64,
        description="PDFs this process reads at once, each in its own child process (more "
        "wait their turn)",
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
        "database file (with PostgreSQL or an in-memory SQLite: `files` in the working "
        "directory, said at start, or in dev mode a temporary directory removed when the "
        "process ends)",
    )
    context_files_orphan_grace_s: int = Field(
        default=3600,
        ge=60,
        le=30 * 86_400,
        description="how old a blob no file names (or staging no upload owns) must be before "
        "maintenance removes it",
    )
    # Audio transcription (context/files/reading/transcription.py): off unless a URL is set; the
    # largest audio sent is context_files_max_transcribe_bytes.
    context_transcription_url: str = Field(
        default="",
        max_length=512,
        description="OpenAI-compatible API base for transcribing audio files, e.g. "
        "`https://api.openai.com/v1` (requests go to `{url}/audio/transcriptions`, through "
        "the egress policy); empty: audio files are stored without a transcript",
    )
    context_transcription_model: str = Field(
        default="whisper-1",
        min_length=1,
        max_length=128,
        description="model the transcription endpoint is asked for",
    )
    context_transcription_api_key: SecretStr = Field(
        default=SecretStr(""),
        description="the transcription endpoint's bearer key (a secret: never logged)",
    )

    # Semantic memory (context/semantic/): off unless a URL and a model are set.
    context_embeddings_url: str = Field(
        default="",
        max_length=512,
        description="OpenAI-compatible API base for embeddings, e.g. `https://api.openai.com/v1` "
        "(requests go to `{url}/embeddings`, through the egress policy); empty: search is "
        "full-text only (said once at start)",
    )
    context_embeddings_api_key: SecretStr = Field(
        default=SecretStr(""),
        description="the embeddings endpoint's bearer key (a secret: never logged)",
    )
    context_embeddings_model: str = Field(
        default="",
        max_length=128,
        description="the default embedding model of a workspace that names none; empty: "
        "only workspaces that name a model are indexed",
    )
    context_embeddings_dimensions: int = Field(
        default=0,
        ge=0,
        le=2000,
        description="the default embeddings' dimensions (sent as `dimensions`); 0: the "
        "model's own, learned from its first answer",
    )
    context_embeddings_prices: str = Field(
        default="",
        max_length=4096,
        description="JSON prices of embedding models in USD per million input tokens, e.g. "
        '`{"text-embedding-3-small": 0.02}`: a workspace\'s embedding calls are held and '
        "charged to its whole-workspace budgets at that price (tokens are always counted)",
    )
    context_embeddings_batch: int = Field(
        default=64,
        ge=1,
        le=2048,
        description="texts sent in one embeddings request",
    )
    context_embeddings_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="time one embeddings request may take",
    )
    context_embeddings_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="attempts per embeddings request on a retryable failure (429, 5xx, "
        "timeout), with jittered backoff",
    )
    context_embeddings_concurrency: int = Field(
        default=2,
        ge=1,
        le=64,
        description="embeddings requests this process has in flight at once",
    )
    context_semantic_chunk_chars: int = Field(
        default=1500,
        ge=200,
        le=20_000,
        description="characters in one indexed chunk of a document or a long item",
    )
    context_semantic_chunk_overlap: int = Field(
        default=200,
        ge=0,
        le=5_000,
        description="characters two neighbouring chunks share",
    )
    context_semantic_max_chunks: int = Field(
        default=512,
        ge=1,
        le=100_000,
        description="chunks indexed per item (the rest of a longer document is not embedded)",
    )
    context_semantic_poll_s: float = Field(
        default=2.0,
        gt=0,
        le=300,
        description="how often the indexer checks the event log and its queue when no live "
        "event woke it (its queue up to four times less often while it finds no job)",
    )
    context_semantic_lease_s: float = Field(
        default=15.0,
        ge=1,
        le=600,
        description="how long the replica reading the event log for the indexer holds it "
        "without renewing before another takes over",
    )
    context_semantic_candidates: int = Field(
        default=100,
        ge=10,
        le=1000,
        description="results each ranked list (full-text, semantic) contributes before fusion",
    )
    context_semantic_ef_search: int = Field(
        default=100,
        ge=10,
        le=1000,
        description="pgvector `hnsw.ef_search` for semantic queries (higher: better recall, "
        "slower)",
    )

    @field_validator("context_embeddings_url")
    @classmethod
    def _embeddings_url(cls, value: str) -> str:
        return _api_base(value)

    @field_validator("context_transcription_url")
    @classmethod
    def _transcription_url(cls, value: str) -> str:
        return _api_base(value)

    context_blob_store: Literal["directory", "s3"] = Field(
        default="directory",
        description="where file contents live: `directory` (beside the SQLite database, one "
        "machine) or `s3` (an S3-compatible object store every replica shares: "
        "[docs/files.md](docs/files.md))",
    )
    context_s3_endpoint: str = Field(
        default="",
        description="the object store's `http(s)://host:port` URL (required with `s3`)",
    )
    context_s3_bucket: str = Field(
        default="switchboard-files",
        description="the bucket of file contents; created at start if missing",
    )
    context_s3_region: str = Field(
        default="us-east-1",
        description="the bucket's region (S3-compatible servers mostly ignore it)",
    )
    context_s3_access_key_id: SecretStr = Field(
        default=SecretStr(""),
        description="the object store's access key id (with the secret; required with `s3` "
        "outside dev mode, where empty uses the AWS SDK's own credential chain)",
        json_schema_extra=shown("none"),
    )
    context_s3_secret_access_key: SecretStr = Field(
        default=SecretStr(""),
        description="the object store's secret access key (a secret: never logged)",
        json_schema_extra=shown("none"),
    )
    context_s3_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="connect and read timeout of one object store request (each is tried "
        "up to 3 times; beyond that UNAVAILABLE)",
    )

    @model_validator(mode="after")
    def _check_s3(self) -> ContextSettings:
        # Secrets are never quoted: a message names the variable, not its value.
        if self.context_blob_store != "s3":
            return self
        problems = []
        parts = urlsplit(self.context_s3_endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(
                "SWITCHBOARD_CONTEXT_S3_ENDPOINT must be an http(s)://host[:port] URL with "
                "SWITCHBOARD_CONTEXT_BLOB_STORE=s3"
            )
        if not _BUCKET.fullmatch(self.context_s3_bucket) or ".." in self.context_s3_bucket:
            problems.append(
                "SWITCHBOARD_CONTEXT_S3_BUCKET must be 3 to 63 lowercase letters, digits, "
                "dots and hyphens, starting and ending with a letter or digit"
            )
        key_id = self.context_s3_access_key_id.get_secret_value()
        secret = self.context_s3_secret_access_key.get_secret_value()
        if bool(key_id) != bool(secret):
            problems.append(
                "SWITCHBOARD_CONTEXT_S3_ACCESS_KEY_ID and SWITCHBOARD_CONTEXT_S3_SECRET_ACCESS_KEY "
                "must be set together"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _api_base(value: str) -> str:
    """An OpenAI-compatible API base URL, without its trailing slash ("" stays "")."""
    if not value:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http(s) URL, e.g. https://api.openai.com/v1")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("expected an http(s) URL without a query, fragment or user")
    return value.rstrip("/")
