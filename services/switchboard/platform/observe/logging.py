"""Structured logs with a request id per call: JSON lines, or text for people.

The request id lives in a context variable set by the interceptor, so every
log line written while serving a call carries it without passing it around;
with tracing on, the current span's trace and span ids come the same way.
Both formats carry the same fields (the text one as ``key=value`` after the
message). Secret-looking keys in ``extra`` are redacted as a last line of
defence; the first line is never logging secrets at all.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from typing import Any, Final

from opentelemetry.trace import get_current_span

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
method_var: contextvars.ContextVar[str] = contextvars.ContextVar("method", default="")

_RESERVED: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_SECRET_MARKERS: Final = ("password", "secret", "token", "authorization", "api_key", "apikey")
REDACTED: Final = "[REDACTED]"
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


def _redact(key: str, value: Any) -> Any:
    lowered = key.lower()
    if any(marker in lowered for marker in _SECRET_MARKERS):
        return REDACTED
    return value


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The call's request id, method and trace ids, then the record's extras (redacted)."""
    found: dict[str, Any] = {}
    request_id = request_id_var.get()
    if request_id:
        found["request_id"] = request_id
    method = method_var.get()
    if method:
        found["method"] = method
    # A span is current only while tracing is on (platform/observe/telemetry.py).
    span = get_current_span().get_span_context()
    if span.is_valid:
        found["trace_id"] = format(span.trace_id, "032x")
        found["span_id"] = format(span.span_id, "016x")
    for key, value in record.__dict__.items():
        if key not in _RESERVED and not key.startswith("_"):
            found[key] = _redact(key, value)
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


_BARE: Final = re.compile(r"[^\s\"'=\\\x00-\x1f\x7f]+")


def _text_value(value: Any) -> str:
    """A value as one token: bare when it is one word, else a JSON string."""
    if isinstance(value, list | tuple) and all(
        isinstance(item, str) and _BARE.fullmatch(item) for item in value
    ):
        text = ",".join(value)  # services=auth,context,events
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
    if _BARE.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines: time, level, logger, message, then ``key=value`` fields.

    The same fields as the JSON lines (the bound address, an access line's
    method, code and duration, the request id). Values with spaces, quotes or
    control characters are quoted, so a client-supplied value cannot start a
    forged line of its own.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The message escaped like a value, minus the quotes, when it has line breaks.
        message = record.message
        if _CONTROL.search(message):
            record.message = json.dumps(message, ensure_ascii=False)[1:-1]
        try:
            return super().formatMessage(record)
        finally:
            record.message = message

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        head, sep, trace = line.partition("\n")  # an exception's traceback follows the line
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in fields(record).items())
        return f"{head} {pairs}{sep}{trace}" if pairs else line


_GRPC_CORE_LOGGER = "grpc._cython.cygrpc"


class _ClientLeftMidSend(logging.Filter):
    """grpc's own ERROR-with-traceback when a client cancels a stream while a
    response is being sent (grpc's send loop raised before it noticed the client
    had gone). No servicer code is involved and any client can cause it at will,
    so at ERROR it would let an anonymous client flood the logs: it becomes one
    DEBUG line without the traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("ExecuteBatchError raised in core"):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_client_cancellations() -> None:
    """Install the filter above on grpc's core logger (idempotent)."""
    core = logging.getLogger(_GRPC_CORE_LOGGER)
    if not any(isinstance(f, _ClientLeftMidSend) for f in core.filters):
        core.addFilter(_ClientLeftMidSend())


class _OneLinePerRequest(logging.Filter):
    """httpx's and httpx2's INFO line for every request ("HTTP Request: POST URL ...").

    An MCP call goes through both (the SDK's httpx2 request is sent on by the
    egress-checked httpx client, ``integration/kinds/mcp.py``), so each request was logged
    twice at INFO: about half of a short session's log. httpx2's line goes (httpx's says
    the same); httpx's is DEBUG when the answer is a success and WARNING when it is an
    error status. The URL is cut to its origin: a webhook's path or query may hold its
    secret (a Slack-style hook URL is one).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith("HTTP Request:"):
            return True
        if record.name == "httpx2":
            return False
        args = record.args
        if not isinstance(args, tuple) or len(args) != 5:
            return True
        method, url, version, status, reason = args
        record.msg = 'HTTP Request: %s %s "%s %d %s"'
        record.args = (method, _origin(url), version, status, reason)
        level = logging.WARNING if isinstance(status, int) and status >= 400 else logging.DEBUG
        record.levelno, record.levelname = level, logging.getLevelName(level)
        return logging.getLogger(record.name).isEnabledFor(level)


def _origin(url: object) -> str:
    """``scheme://host[:port]`` of ``url`` (an ``httpx.URL`` or a string), nothing after."""
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return "?"
    return f"{scheme}://{rest.split('/', 1)[0].split('?', 1)[0].rpartition('@')[2]}"


_HTTP_CLIENT_LOGGERS = ("httpx", "httpx2")


def quiet_http_requests() -> None:
    """Install the filter above on the HTTP clients' loggers (idempotent)."""
    for name in _HTTP_CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLinePerRequest) for f in logger.filters):
            logger.addFilter(_OneLinePerRequest())


def configure_logging(level: str, fmt: str) -> None:
    """Install one stderr handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_switchboard", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler._switchboard = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    quiet_http_requests()
