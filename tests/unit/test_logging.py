"""JSON log lines carry the request id and never the secrets in their extras."""

from __future__ import annotations

import json
import logging

from switchboard.platform.logging import REDACTED, JsonFormatter, request_id_var


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
