"""Settings: read once from SWITCHBOARD_*, frozen, and no default secret outside dev mode."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from switchboard.platform.config import (
    ALL_SERVICES,
    DEV_SECRET_KEY,
    ConfigError,
    Settings,
    load_settings,
)

STRONG = "k" * 48


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("SWITCHBOARD_"):
            monkeypatch.delenv(key)


def test_refuses_to_start_without_a_secret_outside_dev_mode() -> None:
    with pytest.raises(ConfigError, match="SWITCHBOARD_SECRET_KEY is required"):
        load_settings()


def test_refuses_the_built_in_dev_secret_outside_dev_mode() -> None:
    with pytest.raises(ConfigError, match="built-in dev key"):
        load_settings(secret_key=DEV_SECRET_KEY)


def test_refuses_a_short_secret() -> None:
    with pytest.raises(ConfigError, match="at least 32"):
        load_settings(secret_key="short")


def test_accepts_a_strong_secret_and_hides_it() -> None:
    settings = load_settings(secret_key=STRONG, signing_keys="/keys/k1.pem")
    assert settings.effective_secret_key() == STRONG
    assert STRONG not in repr(settings)
    assert STRONG not in str(settings.model_dump())
    assert settings.insecure_defaults_in_use() == []


def test_dev_mode_uses_the_dev_secret_and_reports_it() -> None:
    settings = load_settings(dev_mode=True)
    assert settings.effective_secret_key() == DEV_SECRET_KEY
    assert settings.insecure_defaults_in_use() == [
        "SWITCHBOARD_SECRET_KEY",
        "SWITCHBOARD_SIGNING_KEYS",
    ]


def test_outside_dev_mode_every_missing_secret_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "SWITCHBOARD_SECRET_KEY is required" in str(caught.value)
    assert "SWITCHBOARD_SIGNING_KEYS is required" in str(caught.value)


def test_signing_keys_are_a_comma_separated_list() -> None:
    settings = load_settings(secret_key=STRONG, signing_keys="/k/new.pem, /k/old.pem")
    assert settings.signing_keys == ("/k/new.pem", "/k/old.pem")


def test_oidc_settings_come_together() -> None:
    with pytest.raises(ConfigError, match="must be set together"):
        load_settings(dev_mode=True, oidc_issuer="https://login.example.com")


def test_database_and_redis_urls_are_secret() -> None:
    settings = load_settings(
        dev_mode=True,
        database_url="postgresql+asyncpg://app:pg-password@db/app",
        redis_url="redis://:redis-password@cache:6379/0",
    )
    assert "pg-password" not in repr(settings)
    assert "redis-password" not in repr(settings)


def test_reads_the_environment_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_PORT", "0")
    monkeypatch.setenv("SWITCHBOARD_HOST", "::1")
    monkeypatch.setenv("SWITCHBOARD_DEV_MODE", "true")
    monkeypatch.setenv("SWITCHBOARD_SERVICES", "events, auth")
    settings = load_settings()
    assert settings.port == 0
    assert settings.host == "::1"
    assert settings.dev_mode is True
    assert settings.services == ("auth", "events")


def test_overrides_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_PORT", "7000")
    assert load_settings(dev_mode=True, port=7001).port == 7001


def test_settings_are_frozen() -> None:
    settings = load_settings(dev_mode=True)
    with pytest.raises(ValidationError):
        settings.port = 1


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("port", 70000, "SWITCHBOARD_PORT"),
        ("services", "auth,bogus", "unknown services ['bogus']"),
        ("max_receive_message_bytes", 10, "SWITCHBOARD_MAX_RECEIVE_MESSAGE_BYTES"),
        ("log_level", "LOUD", "SWITCHBOARD_LOG_LEVEL"),
    ],
)
def test_bad_values_name_the_variable(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_settings(dev_mode=True, **{key: value})


def test_unknown_settings_are_rejected() -> None:
    with pytest.raises(ConfigError):
        load_settings(dev_mode=True, prot=1)


def test_all_services_by_default() -> None:
    assert Settings(dev_mode=True).services == ALL_SERVICES
