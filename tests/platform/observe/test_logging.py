"""Log lines (JSON and text) carry the request id and extras, never the secrets in them."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator

import pytest

from switchboard.platform.observe.logging import (
    REDACTED,
    JsonFormatter,
    TextFormatter,
    method_var,
    request_id_var,
)

pytestmark = pytest.mark.unit


def _format(record: logging.LogRecord) -> dict[str, object]:
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert isinstance(parsed, dict)
    return parsed


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("switchboard.test", logging.INFO, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_line_has_request_id_and_extras() -> None:
    token = request_id_var.set("req-42")
    try:
        entry = _format(_record("hello %s", code="OK", duration_ms=1.5))
    finally:
        request_id_var.reset(token)
    assert entry["message"] == "hello %s"
    assert entry["request_id"] == "req-42"
    assert entry["code"] == "OK"
    assert entry["level"] == "INFO"
    assert str(entry["time"]).endswith("Z")


def test_secret_looking_extras_are_redacted() -> None:
    entry = _format(
        _record("login", password="hunter2", refresh_token="rt", api_key="sbk_x", user="u1")
    )
    assert entry["password"] == REDACTED
    assert entry["refresh_token"] == REDACTED
    assert entry["api_key"] == REDACTED
    assert entry["user"] == "u1"


def test_no_request_id_outside_a_call() -> None:
    assert "request_id" not in _format(_record("boot"))


def test_exceptions_are_serialized_on_one_line() -> None:
    error = ValueError("boom")
    record = _record("failed")
    record.exc_info = (ValueError, error, None)
    entry = _format(record)
    assert "ValueError: boom" in str(entry["exception"])


# The text format carries the same fields as the JSON one.


def _text(record: logging.LogRecord) -> str:
    return TextFormatter().format(record)


def test_text_line_has_the_bound_address_and_services() -> None:
    line = _text(
        _record("switchboard listening", address="127.0.0.1:50051", services=["auth", "events"])
    )
    assert line.endswith(" switchboard listening address=127.0.0.1:50051 services=auth,events")
    assert " INFO " in line
    assert " switchboard.test " in line


def test_text_access_line_has_method_code_duration_peer_and_request_id() -> None:
    request = request_id_var.set("req-7")
    method = method_var.set("/switchboard.api.auth.v1.AuthService/Login")
    try:
        line = _text(
            _record(
                "rpc finished", code="UNAUTHENTICATED", duration_ms=3.25, peer="ipv6:[::1]:5555"
            )
        )
    finally:
        method_var.reset(method)
        request_id_var.reset(request)
    fields = dict(pair.split("=", 1) for pair in line.split(" rpc finished ", 1)[1].split(" "))
    assert fields == {
        "request_id": "req-7",
        "method": "/switchboard.api.auth.v1.AuthService/Login",
        "code": "UNAUTHENTICATED",
        "duration_ms": "3.25",
        "peer": "ipv6:[::1]:5555",
    }


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_both_formats_carry_every_extra_and_redact_secrets(formatter: logging.Formatter) -> None:
    record = _record("signed in", user="u1", attempts=2, refresh_token="rt-secret", password="p")
    line = formatter.format(record)
    for fragment in ("u1", "attempts", "2", "refresh_token", "password"):
        assert fragment in line
    assert "rt-secret" not in line
    assert line.count(REDACTED) == 2


def test_text_values_and_messages_cannot_forge_a_line() -> None:
    line = _text(_record("hello\nFAKE INFO line", agent='curl "x"\n2026 ERROR forged'))
    assert "\n" not in line
    assert "hello\\nFAKE INFO line" in line
    assert 'agent="curl \\"x\\"\\n2026 ERROR forged"' in line


def test_text_line_without_fields_is_just_the_message() -> None:
    assert _text(_record("boot")).endswith(" switchboard.test boot")


def test_text_traceback_follows_the_fields() -> None:
    error = ValueError("boom")
    record = _record("failed", step="x")
    record.exc_info = (ValueError, error, None)
    first, rest = _text(record).split("\n", 1)
    assert first.endswith(" failed step=x")
    assert "ValueError: boom" in rest


@contextlib.contextmanager
def _kept(name: str, level: int) -> Iterator[tuple[logging.Logger, list[logging.LogRecord]]]:
    """Logger ``name`` at ``level``, and the records it lets through, while the block runs."""
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger(name)
    keep = Keep(logging.DEBUG)
    logger.addHandler(keep)
    before = logger.level
    logger.setLevel(level)
    try:
        yield logger, seen
    finally:
        logger.removeHandler(keep)
        logger.setLevel(before)


def test_grpc_core_error_for_a_client_that_left_mid_send_is_demoted_to_debug() -> None:
    from switchboard.platform.observe.logging import quiet_client_cancellations

    quiet_client_cancellations()
    quiet_client_cancellations()  # idempotent
    with _kept("grpc._cython.cygrpc", logging.INFO) as (core, seen):
        failure = RuntimeError("Failed execute_batch")
        for message in (
            "ExecuteBatchError raised in core by servicer method [/x.Y/Z]",
            "Unexpected [RuntimeError] raised by servicer method [/x.Y/Z]",
        ):
            core.error(message, exc_info=(RuntimeError, failure, None))
        assert [(r.levelno, r.getMessage()[:17]) for r in seen] == [
            (logging.ERROR, "Unexpected [Runti")
        ]
        seen.clear()
        core.setLevel(logging.DEBUG)
        core.error("ExecuteBatchError raised in core by servicer method [/x.Y/Z]")
        assert [(r.levelno, r.exc_info) for r in seen] == [(logging.DEBUG, None)]


def test_an_http_request_that_failed_is_a_warning_naming_only_the_origin() -> None:
    from switchboard.platform.observe.logging import quiet_http_requests

    quiet_http_requests()
    quiet_http_requests()  # idempotent
    with _kept("httpx", logging.INFO) as (logger, seen):
        line = 'HTTP Request: %s %s "%s %d %s"'
        hook = "https://user:pw@hooks.example.com:8443/services/T0/B0/SECRET?token=x"
        logger.info(line, "POST", hook, "HTTP/1.1", 500, "Internal Server Error")
        logger.info(line, "POST", hook, "HTTP/1.1", 200, "OK")  # DEBUG: not at INFO
    assert [(r.levelname, r.getMessage()) for r in seen] == [
        (
            "WARNING",
            'HTTP Request: POST https://hooks.example.com:8443 "HTTP/1.1 500 '
            'Internal Server Error"',
        )
    ]
