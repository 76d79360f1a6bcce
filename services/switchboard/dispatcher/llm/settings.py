"""The model handler's section (``SWITCHBOARD_LLM_*``): an OpenAI-compatible Chat
Completions provider, its fallbacks and prices, and what a call may send and ask for.
Off unless a base URL and a model are set."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from switchboard.platform.config import MiB, Section


class LlmSettings(Section):
    """What the ``llm`` handler reads (``dispatcher/build.py``: ``llm_config``)."""

    llm_base_url: str = Field(
        default="",
        description="OpenAI-compatible API base, e.g. `https://api.openai.com/v1`; the `llm` "
        "handler exists only when this and the model are set; set both or "
        "neither, or the server refuses to start",
    )
    llm_api_key: SecretStr = Field(
        default=SecretStr(""),
        description="the provider's bearer key (a secret: never logged)",
    )
    llm_model: str = Field(
        default="",
        description="model of the primary provider",
    )
    llm_vision: bool = Field(
        default=False,
        description="the primary model sees images: messages' image files go to it as "
        "`image_url` parts (docs/files.md)",
    )
    llm_fallbacks: SecretStr = Field(
        default=SecretStr(""),
        description='JSON list of fallback providers, tried in order: `[{"name": "b", '
        '"base_url": "...", "api_key": "...", "model": "...", "vision": false}]` (a secret; '
        "`vision`: the model sees images)",
    )
    llm_prices: str = Field(
        default="",
        description='JSON price table in USD per million tokens: `{"gpt-4o-mini": '
        '{"input_per_mtok": 0.15, "output_per_mtok": 0.6}}`',
    )
    llm_max_retries: int = Field(
        default=3,
        ge=0,
        le=20,
        description="retries per provider on 429, 5xx and connection errors, before any text "
        "has streamed",
    )
    llm_breaker_failures: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="failed attempts in a row that open a provider's circuit breaker",
    )
    llm_breaker_reset_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="how long an open breaker waits before one trial call",
    )
    llm_max_output_tokens: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="cap on `max_tokens` asked of the model",
    )
    llm_min_output_tokens: int = Field(
        default=64,
        ge=1,
        le=1_000_000,
        description="near a budget's cap, a model call is made with `max_tokens` lowered to "
        "what the budget has room for while at least this many answer tokens fit (or its whole "
        "`max_tokens`, if smaller); below that the run pauses at the cap (docs/budgets.md)",
    )
    llm_max_connections: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="model connections open at once: at most this many llm runs stream at a time",
    )

    llm_image_policy: Literal["note", "refuse"] = Field(
        default="note",
        description="an image sent to a model without vision: `note` (a text note in its "
        "place) or `refuse` (the run fails `FAILED_PRECONDITION`, `MODALITY_UNSUPPORTED`)",
    )
    llm_max_image_bytes: int = Field(
        default=5 * MiB,
        ge=1024,
        le=64 * MiB,
        description="largest image sent to a vision model; a larger one is a text note",
    )
    llm_max_images: int = Field(
        default=16,
        ge=0,
        le=500,
        description="images sent in one model call (the newest); older ones are text notes",
    )

    @model_validator(mode="after")
    def _check_llm(self) -> LlmSettings:
        # Half an LLM configuration used to be ignored without a word: the
        # operator believed the model was on while every run was echoed.
        if bool(self.llm_base_url) != bool(self.llm_model):
            missing = "SWITCHBOARD_LLM_MODEL" if self.llm_base_url else "SWITCHBOARD_LLM_BASE_URL"
            raise ValueError(
                "SWITCHBOARD_LLM_BASE_URL and SWITCHBOARD_LLM_MODEL must be set together "
                f"({missing} is missing)"
            )
        if self.llm_base_url:
            return self
        orphans = [
            f"SWITCHBOARD_{name.upper()}"
            for name in ("llm_api_key", "llm_fallbacks", "llm_prices")
            if _text(getattr(self, name))
        ]
        if orphans:
            verb = "needs" if len(orphans) == 1 else "need"
            raise ValueError(
                f"{', '.join(orphans)} {verb} SWITCHBOARD_LLM_BASE_URL and SWITCHBOARD_LLM_MODEL "
                "(the language model is off without them)"
            )
        return self


def _text(value: object) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)
