"""Settings: read once from SWITCHBOARD_*, frozen, and no default secret outside dev mode."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from switchboard.platform.config import ALL_SERVICES, DEV_SECRET_KEY, ConfigError, KernelSettings
from switchboard.settings import load_settings, unknown_variables

pytestmark = pytest.mark.unit

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
    assert settings.kernel.effective_secret_key() == STRONG
    assert STRONG not in repr(settings)
    assert STRONG not in str(settings.kernel.model_dump())
    assert settings.kernel.insecure_defaults_in_use() == []


def test_dev_mode_uses_the_dev_secret_and_reports_it() -> None:
    settings = load_settings(dev_mode=True)
    assert settings.kernel.effective_secret_key() == DEV_SECRET_KEY
    assert settings.kernel.insecure_defaults_in_use() == [
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
    assert settings.kernel.signing_keys == ("/k/new.pem", "/k/old.pem")


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
    assert settings.kernel.port == 0
    assert settings.kernel.host == "::1"
    assert settings.kernel.dev_mode is True
    assert settings.kernel.services == ("auth", "events")


def test_overrides_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_PORT", "7000")
    assert load_settings(dev_mode=True, port=7001).kernel.port == 7001


def test_settings_are_frozen() -> None:
    settings = load_settings(dev_mode=True)
    with pytest.raises(ValidationError):
        settings.kernel.port = 1


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
    assert KernelSettings(dev_mode=True).services == ALL_SERVICES


# Every bad setting is refused with its variable's name, never its value.


def test_a_short_secret_is_refused_in_dev_mode_too() -> None:
    # Dev mode allows the built-in secret (left unset), not a weak one of the operator's.
    with pytest.raises(ConfigError, match="SWITCHBOARD_SECRET_KEY must be at least 32") as caught:
        load_settings(dev_mode=True, secret_key="short-secret")
    assert "short-secret" not in str(caught.value)


def test_dev_mode_still_accepts_the_built_in_secret_when_set() -> None:
    assert load_settings(dev_mode=True, secret_key=DEV_SECRET_KEY).kernel.dev_mode


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("SWITCHBOARD_PROT", "SWITCHBOARD_PORT"),
        ("SWITCHBOARD_SECRET_KY", "SWITCHBOARD_SECRET_KEY"),
        ("switchboard_redis_ur", "SWITCHBOARD_REDIS_URL"),
        ("SWITCHBOARD_EVENTS_HEARTBEAT", "SWITCHBOARD_EVENTS_HEARTBEAT_S"),
    ],
)
def test_a_misspelt_variable_is_refused_with_the_nearest_name(
    monkeypatch: pytest.MonkeyPatch, variable: str, suggestion: str
) -> None:
    monkeypatch.setenv(variable, "value-that-must-not-be-echoed")
    with pytest.raises(ConfigError) as caught:
        load_settings(dev_mode=True)
    message = str(caught.value)
    assert f"{variable} is not a setting; did you mean {suggestion}?" in message
    assert "value-that-must-not-be-echoed" not in message


def test_every_misspelt_variable_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_PROT", "1")
    monkeypatch.setenv("SWITCHBOARD_ZZZZZZZZ", "1")
    monkeypatch.setenv("SWITCHBOARD_LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigError) as caught:
        load_settings(dev_mode=True)
    message = str(caught.value)
    assert "SWITCHBOARD_PROT is not a setting" in message
    assert "SWITCHBOARD_ZZZZZZZZ is not a setting" in message
    assert "SWITCHBOARD_ZZZZZZZZ is not a setting; did you mean" not in message
    assert "SWITCHBOARD_LOG_LEVEL:" in message


def test_every_switchboard_variable_the_repository_mentions_is_accepted() -> None:
    # Docs, Makefile, CI and test harnesses must never name a variable the
    # server would refuse (SWITCHBOARD_TOOLS_BIN belongs to the e2e harness).
    root = Path(__file__).resolve().parents[2]
    files = [
        root / "README.md",
        root / "Makefile",
        root / ".ci" / "run",
        *root.glob("docs/*.md"),
        *root.glob("scripts/*"),
        *root.glob("tests/**/*.py"),
        *root.glob("bench/*.py"),
        *root.glob("examples/**/*.py"),
        *root.glob("deploy/**/*.*"),
        *root.glob("services/**/*.py"),
    ]
    # These two misspell variables on purpose.
    refusing = {Path(__file__).resolve(), root / "tests" / "e2e" / "test_cli.py"}
    mentioned = set()
    for file in files:
        if file.is_file() and file.resolve() not in refusing:
            mentioned.update(re.findall(r"\bSWITCHBOARD_[A-Z0-9_]*[A-Z0-9]\b", file.read_text()))
    assert "SWITCHBOARD_PORT" in mentioned
    assert "SWITCHBOARD_TOOLS_BIN" in mentioned
    # docs/operations.md shows these two being refused.
    environ = {name: "" for name in mentioned - {"SWITCHBOARD_PROT", "SWITCHBOARD_SERVICE_HOST"}}
    assert unknown_variables(environ) == []


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"llm_base_url": "http://llm/v1"}, "(SWITCHBOARD_LLM_MODEL is missing)"),
        ({"llm_model": "m-1"}, "(SWITCHBOARD_LLM_BASE_URL is missing)"),
        ({"llm_prices": "{}"}, "SWITCHBOARD_LLM_PRICES needs SWITCHBOARD_LLM_BASE_URL"),
        (
            {"llm_api_key": "sk-123", "llm_fallbacks": "[]"},
            "SWITCHBOARD_LLM_API_KEY, SWITCHBOARD_LLM_FALLBACKS need SWITCHBOARD_LLM_BASE_URL",
        ),
    ],
)
def test_half_an_llm_configuration_is_refused(values: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(dev_mode=True, **values)
    assert fragment in str(caught.value)
    assert "sk-123" not in str(caught.value)


def test_a_complete_llm_configuration_is_accepted() -> None:
    settings = load_settings(dev_mode=True, llm_base_url="http://llm/v1", llm_model="m-1")
    assert settings.llm.llm_model == "m-1"


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("database_url", "not a url", "SWITCHBOARD_DATABASE_URL: not a valid database URL"),
        (
            "database_url",
            "mysql://app:db-password@db/app",
            "SWITCHBOARD_DATABASE_URL: unsupported scheme 'mysql'",
        ),
        ("redis_url", "cache:6379", "SWITCHBOARD_REDIS_URL: must start with redis://"),
        (
            "redis_url",
            "redis://:redis-password@cache:port/0",
            "SWITCHBOARD_REDIS_URL: not a valid Redis URL",
        ),
        ("redis_url", "redis://:redis-password@/0", "SWITCHBOARD_REDIS_URL: has no host"),
        (
            "redis_url",
            "redis+cluster://:redis-password@cache:6379/1",
            "SWITCHBOARD_REDIS_URL: a Redis Cluster has only database 0",
        ),
        ("context_address", "::::", "SWITCHBOARD_CONTEXT_ADDRESS: expected host:port"),
        ("context_address", "context service", "SWITCHBOARD_CONTEXT_ADDRESS: expected host:port"),
        ("gc_threshold", "100,10", "SWITCHBOARD_GC_THRESHOLD: expected three"),
    ],
)
def test_malformed_addresses_name_the_variable_not_the_value(
    key: str, value: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(dev_mode=True, **{key: value})
    message = str(caught.value)
    assert fragment in message
    assert "password" not in message.replace("user:password@host", "")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("database_url", "postgresql+asyncpg://app:pw@db:5432/app"),
        ("database_url", "sqlite+aiosqlite:///:memory:"),
        ("redis_url", "rediss://:pw@cache:6380/1"),
        ("redis_url", "unix:///run/redis.sock"),
        ("redis_url", "redis+cluster://:pw@cache-0:6379"),
        ("redis_url", "rediss+cluster://cache:6380/0"),
        ("context_address", "context:50051"),
        ("context_address", "[::1]:50051"),
        ("context_address", "dns:///context.internal:50051"),
    ],
)
def test_well_formed_addresses_are_accepted(key: str, value: str) -> None:
    load_settings(dev_mode=True, **{key: value})


def test_bad_variables_of_every_section_are_named_at_once() -> None:
    # Each section is read even when another is bad: one start names them all.
    with pytest.raises(ConfigError) as caught:
        load_settings(
            dev_mode=True,
            port=70000,
            dispatcher_max_running=0,
            context_max_pinned=-1,
            oidc_issuer="https://login.example.com",
        )
    message = str(caught.value)
    for fragment in (
        "SWITCHBOARD_PORT:",
        "SWITCHBOARD_DISPATCHER_MAX_RUNNING:",
        "SWITCHBOARD_CONTEXT_MAX_PINNED:",
        "must be set together",
    ):
        assert fragment in message


def test_each_section_reads_its_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_DISPATCHER_MAX_RUNNING", "3")
    monkeypatch.setenv("SWITCHBOARD_EGRESS_ALLOW_CIDRS", "10.0.0.0/8, fd00::/8")
    settings = load_settings(dev_mode=True)
    assert settings.dispatcher.dispatcher_max_running == 3
    assert settings.egress.egress_allow_cidrs == ("10.0.0.0/8", "fd00::/8")
    assert settings.section(type(settings.dispatcher)) is settings.dispatcher
