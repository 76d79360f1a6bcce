"""The model handler's configuration from its settings (``dispatcher/build.py`` adds the
handler to the registry; ``mesh.check_settings`` parses it before anything opens)."""

from __future__ import annotations

from switchboard.dispatcher.llm.config import LlmConfig, Provider, parse_prices, parse_providers
from switchboard.dispatcher.llm.settings import LlmSettings
from switchboard.platform.process import setting


def llm_config(settings: LlmSettings) -> LlmConfig:
    """The LLM handler's configuration; ConfigError naming the variable at fault."""
    with setting("SWITCHBOARD_LLM_BASE_URL"):
        primary = Provider(
            name="primary",
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key.get_secret_value(),
            model=settings.llm_model,
            vision=settings.llm_vision,
        )
    with setting("SWITCHBOARD_LLM_FALLBACKS"):
        fallbacks = parse_providers(settings.llm_fallbacks.get_secret_value() or "[]")
        if any(provider.name == primary.name for provider in fallbacks):
            raise ValueError(f"the name {primary.name!r} is the primary provider's")
    with setting("SWITCHBOARD_LLM_PRICES"):
        prices = parse_prices(settings.llm_prices or "{}")
    return LlmConfig(
        providers=(primary, *fallbacks),
        prices=prices,
        max_retries=settings.llm_max_retries,
        breaker_failures=settings.llm_breaker_failures,
        breaker_reset_s=settings.llm_breaker_reset_s,
        max_output_tokens=settings.llm_max_output_tokens,
        min_output_tokens=settings.llm_min_output_tokens,
        max_connections=settings.llm_max_connections,
        image_policy=settings.llm_image_policy,
        max_image_bytes=settings.llm_max_image_bytes,
        max_images=settings.llm_max_images,
    )
