"""Files' section: sizes and quotas, extraction and transcription, and where the
contents live (a directory, or an S3-compatible object store)."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from switchboard.context.settings import api_base
from switchboard.platform.config import MiB, Section, shown

# S3's rule for a bucket name that works everywhere (path-style and virtual hosts).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class FileSettings(Section):
    """What files read (``context/build.py``: their limits, the transcriber, the blob store)."""

    context_files_fetch_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="time to fetch a message's URL part (redirects included) before the "
        "append fails `INVALID_ARGUMENT` on the part (`fetch_error` `timeout`)",
    )
    context_export_max_bytes: int = Field(
        default=1024 * MiB,
        gt=0,
        description="largest data export archive (ExportMyData); a larger one ends FAILED "
        "with `RESOURCE_EXHAUSTED`",
    )
    context_export_ttl_s: int = Field(
        default=7 * 86400,
        gt=0,
        le=90 * 86400,
        description="how long a finished data export can be downloaded; then its archive "
        "is deleted",
    )
    context_exports_per_day: int = Field(
        default=5,
        gt=0,
        le=100,
        description="data exports one person may ask for in 24 hours "
        "(`RESOURCE_EXHAUSTED` past it)",
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

    @field_validator("context_transcription_url")
    @classmethod
    def _transcription_url(cls, value: str) -> str:
        return api_base(value)

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
    def _check_s3(self) -> FileSettings:
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
