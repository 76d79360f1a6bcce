"""A tool call and its result as every part of the runner states them (pure).

The call's tool resource name, a failure's status, a result's text cut to its
limit, and its files without their bytes (what watchers and the stored job may
hold): shared by the runner (``runner.py``), the calls it sends to the hub
(``hub.py``) and the messages it stores (``messages.py``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from google.rpc import status_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.handler.v1 import handler_pb2 as hpb

#: What OpenAI-style APIs accept as a function name.
FUNCTION_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: What a function name may not hold (replaced by ``_``).
UNSAFE: Final = re.compile(r"[^A-Za-z0-9_-]")
MAX_ERROR_CHARS: Final = 300
#: Arguments of one call, serialized (the context service stores no more with a message).
MAX_ARGUMENT_BYTES: Final = 16 * 1024


def status(code: int, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code, message=message[:MAX_ERROR_CHARS])


def cut(text: str, limit: int) -> str:
    """``text`` as the model reads it and the run stores it: ``limit`` characters at most."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[cut: the output had {len(text)} characters]"


def tool_name(call: hpb.ToolCall) -> str:
    """The call's tool resource name; empty when it names no integration or tool."""
    return f"{call.integration}/tools/{call.tool}" if call.integration and call.tool else ""


def without_bytes(files: Sequence[cpb.FileReference]) -> None:
    """Names, types and sizes only: what watchers and the stored job may hold."""
    for found in files:
        if found.inline_data:
            found.size_bytes = found.size_bytes or len(found.inline_data)
            found.ClearField("inline_data")
