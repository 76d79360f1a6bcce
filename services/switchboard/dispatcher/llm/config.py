"""The ``llm`` handler's settings: its providers, their prices and its limits.

Built once from settings (``SWITCHBOARD_LLM_*``) by ``dispatcher/build.py``;
the parsers turn the JSON settings into typed values and refuse anything
doubtful before the server starts, never quoting the text (it may hold keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from switchboard.dispatcher.llm.usage import Price
from switchboard.platform.values import jsonbounds
from switchboard.platform.values.jsonbounds import JsonRejected

MIB: Final = 1024 * 1024
#: A providers or prices setting longer than this is not a setting.
MAX_SETTING_BYTES: Final = MIB
#: What an image sent to a model without vision becomes.
IMAGE_POLICIES: Final = ("note", "refuse")


@dataclass(frozen=True)
class Provider:
    """An OpenAI-compatible endpoint and the model to ask there.

    ``base_url`` ends before ``/chat/completions`` (``https://api.openai.com/v1``).
    ``api_key`` may be empty for local servers; it is kept out of ``repr``.
    """

    name: str
    base_url: str
    api_key: str = field(repr=False)
    model: str
    #: Whether the model sees images (OpenAI-compatible ``image_url`` parts); a
    #: model without vision gets a note or refuses (``LlmConfig.image_policy``).
    vision: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name != self.name.strip():
            raise ValueError(
                f"provider name {self.name!r} must be non-empty, without '/' or outer spaces"
            )
        if not self.base_url.startswith(("http://", "https://")):
            # The URL itself is left out: it may carry credentials.
            raise ValueError(f"provider {self.name!r}: base_url must start with http(s)://")
        if not self.model.strip():
            raise ValueError(f"provider {self.name!r}: model must be non-empty")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))

    @property
    def label(self) -> str:
        """``provider/model``, as reported in ``Usage.model`` and used for prices."""
        return f"{self.name}/{self.model}"


@dataclass(frozen=True)
class LlmConfig:
    """Everything the handler needs; built once from settings."""

    #: The first is the primary; the rest are tried in order when it fails.
    providers: tuple[Provider, ...]
    #: Keyed by ``provider/model`` or by ``model``; the former wins.
    prices: Mapping[str, Price] = field(default_factory=dict)
    #: Retries per provider after the first attempt.
    max_retries: int = 3
    backoff_base_s: float = 0.2
    backoff_max_s: float = 5.0
    #: Consecutive failed attempts that open a provider's circuit.
    breaker_failures: int = 5
    #: How long an open circuit stays open before one trial call may pass.
    breaker_reset_s: float = 30.0
    connect_timeout_s: float = 5.0
    #: The default and the ceiling of a run's ``max_tokens``.
    max_output_tokens: int = 1024
    #: The fewest answer tokens a model call is made with when a budget has less
    #: room than its prompt and ``max_tokens``: it is made with ``max_tokens``
    #: lowered to what fits while at least this many do (or its whole ``max_tokens``
    #: when that is smaller), and the run pauses at the cap only below that
    #: (``SWITCHBOARD_LLM_MIN_OUTPUT_TOKENS``, docs/budgets.md).
    min_output_tokens: int = 64
    #: A streamed answer longer than this (on the wire) is cut off as a failure.
    max_response_bytes: int = 4 * MIB
    #: Connections open at once, over all providers.
    max_connections: int = 64
    #: What an image sent to a model without vision becomes: ``note`` (a text
    #: note in its place) or ``refuse`` (the run fails ``MODALITY_UNSUPPORTED``).
    image_policy: str = "note"
    #: Larger images are not sent; the model reads a note instead.
    max_image_bytes: int = 5 * MIB
    #: Images sent in one model call at most (the newest); older ones become notes.
    max_images: int = 16

    def __post_init__(self) -> None:
        if not self.providers:
            raise ValueError("at least one LLM provider is required")
        names = [provider.name for provider in self.providers]
        if len(set(names)) != len(names):
            raise ValueError(f"LLM provider names must be unique, got {names}")
        if self.max_retries < 0:
            raise ValueError("max_retries must not be negative")
        if not (0 <= self.backoff_base_s <= self.backoff_max_s):
            raise ValueError("backoff must satisfy 0 <= backoff_base_s <= backoff_max_s")
        for name in (
            "breaker_failures",
            "max_output_tokens",
            "min_output_tokens",
            "max_response_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.image_policy not in IMAGE_POLICIES:
            raise ValueError(f"image_policy must be one of {', '.join(IMAGE_POLICIES)}")
        if self.max_image_bytes < 1 or self.max_images < 0:
            raise ValueError("max_image_bytes must be at least 1 and max_images not negative")
        if self.breaker_reset_s < 0 or self.connect_timeout_s <= 0:
            raise ValueError("breaker_reset_s must be >= 0 and connect_timeout_s > 0")

    def price_of(self, provider: Provider) -> Price | None:
        return self.prices.get(provider.label) or self.prices.get(provider.model)


# The parsers raise ValueError even for wrong JSON types: a settings validator
# (pydantic) reports a ValueError as an invalid setting, a TypeError as a crash.
_PROVIDER_KEYS: Final = frozenset({"name", "base_url", "api_key", "model", "vision"})
_PRICE_KEYS: Final = frozenset({"input_per_mtok", "output_per_mtok"})


def _load_json(text: str, what: str) -> object:
    try:
        return jsonbounds.loads(text, max_bytes=MAX_SETTING_BYTES)
    except JsonRejected as exc:
        # Its reason gives a position at most: the text may hold API keys.
        raise ValueError(f"{what}: {exc}") from None


def parse_providers(text: str) -> tuple[Provider, ...]:
    """Providers from a JSON list of ``{name, base_url, api_key?, model, vision?}`` objects.

    Blank text means none. Unknown keys are refused (a misspelt ``api_key``
    would otherwise send requests without one).
    """
    if not text.strip():
        return ()
    data = _load_json(text, "LLM providers")
    if not isinstance(data, list):
        raise ValueError("LLM providers: expected a JSON list of objects")  # noqa: TRY004
    providers: list[Provider] = []
    for index, item in enumerate(data):
        where = f"LLM providers: item {index}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object")  # noqa: TRY004
        unknown = sorted(set(item) - _PROVIDER_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(_PROVIDER_KEYS)}")
        for key in ("name", "base_url", "model"):
            if not isinstance(item.get(key), str):
                raise ValueError(f"{where}: {key!r} must be a string")  # noqa: TRY004
        api_key = item.get("api_key", "")
        if not isinstance(api_key, str):
            raise ValueError(f"{where}: 'api_key' must be a string")  # noqa: TRY004
        vision = item.get("vision", False)
        if not isinstance(vision, bool):
            raise ValueError(f"{where}: 'vision' must be true or false")  # noqa: TRY004
        try:
            providers.append(
                Provider(item["name"], item["base_url"], api_key, item["model"], vision)
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    names = [provider.name for provider in providers]
    if len(set(names)) != len(names):
        raise ValueError(f"LLM providers: names must be unique, got {names}")
    return tuple(providers)


def parse_prices(text: str) -> dict[str, Price]:
    """Prices from a JSON object keyed by ``model`` or ``provider/model``.

    Each value is ``{"input_per_mtok": dollars, "output_per_mtok": dollars}``.
    Blank text means none.
    """
    if not text.strip():
        return {}
    data = _load_json(text, "LLM prices")
    if not isinstance(data, dict):
        raise ValueError("LLM prices: expected a JSON object keyed by model")  # noqa: TRY004
    prices: dict[str, Price] = {}
    for key, item in data.items():
        where = f"LLM prices: {key!r}"
        if not isinstance(item, dict) or set(item) != _PRICE_KEYS:
            raise ValueError(f"{where}: expected an object with exactly {sorted(_PRICE_KEYS)}")
        values = [item["input_per_mtok"], item["output_per_mtok"]]
        # bool is an int in Python, but "true dollars" is a typo, not a price.
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{where}: prices must be numbers")
        try:
            prices[key] = Price(float(values[0]), float(values[1]))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return prices
