"""Idempotency keys of tool and handler calls (docs/integration.md, "Idempotency keys").

A run's call carries a key derived from the run and the call id, so every
attempt at the same call (a retry, a run resumed on another replica after a
crash) sends the same key and a tool can do its effect once. The key is a
UUID (version 8, from SHA-256): it fits every place it travels (an HTTP header,
gRPC metadata, MCP ``_meta``, an A2A message id) and says nothing of the run.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Final

#: What ``InvokeToolRequest.idempotency_key`` may hold.
KEY: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
#: gRPC metadata key (gRPC experts' tool calls, HandlerService calls).
METADATA: Final = "idempotency-key"
#: Key in an MCP request's ``_meta`` (a prefixed name, as the specification asks).
MCP_META: Final = "dev.switchboard/idempotency-key"
#: HTTP header of a webhook tool's request.
HEADER: Final = "Idempotency-Key"


def _uuid8(text: str) -> str:
    digest = bytearray(hashlib.sha256(text.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8: custom
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC 9562 variant
    return str(uuid.UUID(bytes=bytes(digest)))


def call_key(run: str, call_id: str) -> str:
    """The key of tool call ``call_id`` of ``run`` (its resource name)."""
    return _uuid8(f"switchboard/tool-call\n{run}\n{call_id}")


def handler_key(run: str) -> str:
    """The key of ``run``'s call to its remote handler (every attempt sends it)."""
    return _uuid8(f"switchboard/handler-call\n{run}")


def derived_request_id(kind: str, *parts: object) -> str:
    """A request id (``names.REQUEST_ID``: 1-64 letters, digits, ``-``, ``_``) that the
    same ``parts`` always give: what a caller inside the server (a schedule's tick, a
    delegate call) sends again after a crash, so the retry is answered with the first
    attempt's result. ``kind`` (a few letters) keeps the callers' ids apart."""
    digest = hashlib.sha256("/".join(str(part) for part in parts).encode()).hexdigest()
    return f"{kind}-{digest[:48]}"
