"""What the hub needs from each kind of integration: one interface, one client per kind.

A ``Connector`` is the hub's client of one integration (a HandlerService
channel, an MCP session, a webhook sender). The hub wraps every call in the
integration's circuit breaker and its timeout; a connector only speaks its
protocol and says how a call failed:

- ``ToolError`` never reaches a connector's caller as an exception for a
  tool that ran and reported an error: that is a ``ToolResult`` with
  ``is_error``. Exceptions are for calls that did not complete.
- ``Unreachable`` (connection refused, reset, DNS, TLS, 5xx, protocol
  errors): counts against the breaker, answered UNAVAILABLE.
- ``Malformed``, an ``Unreachable``: it answered, but with something that is
  not its protocol (not JSON, JSON nested deeper than
  ``platform/jsonbounds.MAX_DEPTH`` or larger than its limit, the wrong
  shape): counts against the breaker, answered UNAVAILABLE. A
  ``JsonRejected`` a connector lets through is taken as the same.
- ``TimeoutError``: the call's deadline passed (counts against the breaker,
  answered DEADLINE_EXCEEDED).
- ``ToolNotFound``: the integration does not offer the tool (NOT_FOUND,
  does not count against the breaker).
- ``ResultTooLarge`` (platform/errors.py): the answer exceeded the limit.
- ``DestinationBlocked`` (platform/errors.py): the address resolved to one the
  egress policy refuses.

Anything else a connector raises is a bug or an answer nobody foresaw: the hub
logs it with its traceback, counts it against the breaker (it came from
talking to this integration) and answers UNAVAILABLE without its text.

Cancellation is asyncio's: a cancelled ``call_tool`` must tell the server
(MCP ``notifications/cancelled``, gRPC RST_STREAM) before it re-raises.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from switchboard.api.context.v1 import context_pb2


@dataclass(frozen=True)
class ToolSpec:
    """One tool an integration offers, as its server describes it."""

    name: str
    description: str = ""
    #: JSON Schema of the arguments (an object schema).
    input_schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})
    title: str = ""
    output_schema: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ToolResult:
    """What a tool answered."""

    #: Structured output (MCP ``structuredContent``), if any.
    structured: Mapping[str, Any] | None = None
    #: Text output (MCP text content joined by newlines).
    text: str = ""
    #: The tool ran but reported an error.
    is_error: bool = False
    #: Files it returned (MCP image, audio and embedded resource content), each with
    #: ``inline_data``, ``mime_type`` and ``display_name``, or a ``uri``; counted in
    #: the result's size.
    files: tuple[context_pb2.FileReference, ...] = ()


#: Progress reported by a running tool: (progress, total or None, message).
Progress = Callable[[float, float | None, str], Awaitable[None]]
#: Called when the integration says its tool list changed (MCP ``list_changed``).
ToolsChanged = Callable[[], None]


class ConnectorError(Exception):
    """A call that did not complete. ``str()`` is safe to show the caller."""


class Unreachable(ConnectorError):
    """The integration could not be reached or broke the protocol."""


class Malformed(Unreachable):
    """It answered, but not in its protocol (``str()`` says what was wrong, never quotes it)."""


class ToolNotFound(ConnectorError):
    """The integration does not offer that tool."""


class Connector(Protocol):
    """The hub's client of one integration; one per integration per process."""

    async def probe(self, timeout_s: float) -> None:
        """Check the integration answers (gRPC health, MCP ping, ...); raise if not."""
        ...

    async def list_tools(self, timeout_s: float) -> list[ToolSpec]:
        """Every tool it offers (all pages)."""
        ...

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any],
        *,
        timeout_s: float,
        max_result_bytes: int,
        progress: Progress | None = None,
        idempotency_key: str = "",
    ) -> ToolResult:
        """Call one tool; see the module doc for how failures are raised.
        ``idempotency_key`` (may be empty) goes with the call in the
        integration's own way (``platform/values/idempotency.py``)."""
        ...

    async def close(self) -> None:
        """Release connections and sessions (idempotent)."""
        ...
