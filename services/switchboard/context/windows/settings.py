"""The context window's section: its budget, what it keeps, how it is pruned and
summarised, how tokens are counted, and the cache of windows built."""

from __future__ import annotations

from pydantic import Field

from switchboard.platform.config import MiB, Section


class WindowSettings(Section):
    """What ``GetContextWindow`` and the automatic pruning read (``context/build.py``)."""

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
