"""Tools: what an integration offers (``ListTools``) and calling one (``InvokeTool``).

A tool list is cached per integration version for ``TOOLS_TTL_S`` and dropped
when the integration says it changed (MCP ``list_changed``). A call is
validated against the tool's JSON Schema with ``jsonschema`` before anything
is sent, limited per workspace, bounded by the shortest of its timeouts, made
through the integration's breaker with its idempotency key (checked against
``platform/idempotency.KEY``; each connector sends it its own way), and audited
(``TOOL_INVOKED``) whatever its outcome, never with its arguments, result or
credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from google.protobuf import json_format
from google.rpc import code_pb2, status_pb2

from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2 as pb
from switchboard.integration.connect.connections import NO_TOOLS, Connections, Limits, find
from switchboard.integration.kinds.webhooktools import declares_tools
from switchboard.integration.mapping import name_of
from switchboard.integration.ports.connectors import Malformed, ToolNotFound, ToolResult, ToolSpec
from switchboard.integration.store import IntegrationRecord, IntegrationStore
from switchboard.platform.cache import Cache
from switchboard.platform.errors import (
    DependencyUnavailable,
    FailedPrecondition,
    NotFound,
    RateLimited,
    ResultTooLarge,
    SwitchboardError,
    Violations,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.observe.metrics import Metrics
from switchboard.platform.schemas import Compiled, SchemaUnusable, compile_schema
from switchboard.platform.security.policy import Principal
from switchboard.platform.store import pagination
from switchboard.platform.values import idempotency, jsonbounds, names, structs, timefields
from switchboard.platform.values.jsonbounds import JsonRejected
from switchboard.platform.values.resources import IntegrationName, ToolName

log = logging.getLogger("switchboard.integration")

#: Tools an integration's list is cached for before it is asked again.
TOOLS_TTL_S: Final = 300.0
#: A record read for calls is dropped on its change's event; this is the backstop.
RECORD_TTL_S: Final = 5.0
MAX_RECORDS: Final = 10_000
#: ``platform/idempotency.KEY`` in words (the contract's).
KEY_RULE: Final = "must be 1-64 ASCII letters, digits, '-', '_', '.' or ':' (or empty for none)"


def _jsonable(value: Any) -> Any:
    """Struct numbers are doubles; JSON has one number type, so 3.0 is 3 again."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


@dataclass
class _Tools:
    version: int
    fetched: float
    #: The tools by segment (``names.tool_segment``); a tool without one is left out.
    tools: dict[str, ToolSpec]
    #: Each tool's argument checker by segment, compiled with the list.
    compiled: dict[str, Compiled] = field(default_factory=dict)


class Tools:
    def __init__(
        self,
        store: IntegrationStore,
        connections: Connections,
        bus: EventBus,
        counters: Cache,
        page_tokens: pagination.PageTokens,
        limits: Limits,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._connections = connections
        self._bus = bus
        self._counters = counters
        self._pages = page_tokens
        self._limits = limits
        self._tools: dict[str, _Tools] = {}
        #: Records read for calls, by name: dropped on every change of theirs
        #: (``forget``, on the integration's event in every process), and kept
        #: at most RECORD_TTL_S as a backstop.
        self._records: dict[str, tuple[float, IntegrationRecord]] = {}

    def forget(self, name: str) -> None:
        """Drop what is cached of ``name`` (it changed, said so, or lost a tool)."""
        self._tools.pop(name, None)
        self._records.pop(name, None)

    async def _record(self, workspace_id: str, integration_id: str) -> IntegrationRecord | None:
        name = str(IntegrationName(workspace_id, integration_id))
        cached = self._records.get(name)
        if cached is not None and time.monotonic() - cached[0] < RECORD_TTL_S:
            return cached[1]
        record = await self._store.get(workspace_id, integration_id)
        if record is not None:
            if len(self._records) >= MAX_RECORDS:
                self._records.clear()  # rare; a bound, not an eviction policy
            self._records[name] = (time.monotonic(), record)
        return record

    async def _tool_list(self, record: IntegrationRecord) -> _Tools:
        name = name_of(record)
        cached = self._tools.get(name)
        if (
            cached is not None
            and cached.version == record.version
            and time.monotonic() - cached.fetched < TOOLS_TTL_S
        ):
            return cached
        if record.disabled:
            raise FailedPrecondition(f"{name} is disabled")
        connector = self._connections.get(record)
        timeout_s = self._connections.timeout_s(record)

        async def checked() -> list[ToolSpec]:
            found = await connector.list_tools(timeout_s)
            for tool in found:
                _check_schemas(tool)
            return found

        # Checked inside the breaker: an integration that lists what cannot be
        # used answered outside its protocol, and that counts.
        tools: list[ToolSpec] = await self._connections.guarded(record, checked, timeout_s)
        by_segment: dict[str, ToolSpec] = {}
        for tool in tools:
            segment = names.tool_segment(tool.name)
            if segment is None:
                log.warning(
                    "a tool is left out: its name is longer than 128 bytes or not text",
                    extra={"integration": name},
                )
                continue
            by_segment[segment] = tool
        # Schemas are the server's: compiling and resolving their references is
        # work of unknown size, kept off the loop and done once per list.
        compiled = await asyncio.to_thread(_compile_tools, by_segment)
        listed = _Tools(record.version, time.monotonic(), by_segment, compiled)
        self._tools[name] = listed
        return listed

    async def list_tools(self, request: pb.ListToolsRequest) -> pb.ListToolsResponse:
        record = await find(self._store, request.parent, "parent")
        size = pagination.page_size(request.page_size, default=50, maximum=200)
        if record.kind == pb.INTEGRATION_KIND_WEBHOOK and not declares_tools(record.config):
            return pb.ListToolsResponse()
        listed = await self._tool_list(record)
        tools = sorted(listed.tools.items())
        parent = IntegrationName(record.workspace_id, record.id)
        fingerprint = pagination.fingerprint("tools", request.parent)
        start = 0
        if request.page_token:
            (position,) = self._pages.decode(request.page_token, fingerprint, (pagination.COUNT,))
            start = int(position)
        page = tools[start : start + size]
        response = pb.ListToolsResponse(
            tools=[self._tool_proto(parent, segment, tool) for segment, tool in page]
        )
        if start + size < len(tools):
            response.next_page_token = self._pages.encode([start + size], fingerprint)
        return response

    @staticmethod
    def _tool_proto(parent: IntegrationName, segment: str, tool: ToolSpec) -> pb.Tool:
        name = ToolName(parent.workspace, parent.integration, segment)
        message = pb.Tool(name=str(name), description=tool.description, title=tool.title)
        with contextlib.suppress(json_format.ParseError, TypeError, ValueError):
            json_format.ParseDict(dict(tool.input_schema), message.input_schema)
        if tool.output_schema:
            with contextlib.suppress(json_format.ParseError, TypeError, ValueError):
                json_format.ParseDict(dict(tool.output_schema), message.output_schema)
        return message

    async def invoke_tool(
        self,
        principal: Principal,
        request: pb.InvokeToolRequest,
        *,
        deadline_s: float | None = None,
        run: str = "",
    ) -> pb.InvokeToolResponse:
        tool_name = ToolName.parse(request.name, "name")
        workspace_id, integration_id, segment = (
            tool_name.workspace,
            tool_name.integration,
            tool_name.segment,
        )
        violations = Violations()
        if tool_name.tool is None:
            violations.add(
                "name", "names a tool that no name escapes to (see docs/integration.md, Tools)"
            )
        requested_s = timefields.seconds(request.timeout, "timeout")
        if requested_s < 0:
            violations.add("timeout", "must not be negative")
        key = request.idempotency_key
        if key and not idempotency.KEY.fullmatch(key):
            violations.add("idempotency_key", KEY_RULE)
        violations.check()
        await self._spend(workspace_id)
        record = await self._record(workspace_id, integration_id)
        parent = tool_name.parent
        if record is None:
            raise NotFound(f"{parent} not found")
        if record.disabled:
            raise FailedPrecondition(f"{parent} is disabled; enable it to call its tools")
        if record.kind == pb.INTEGRATION_KIND_WEBHOOK and not declares_tools(record.config):
            raise FailedPrecondition(f"{parent} is a webhook that declares no tools; {NO_TOOLS}")
        listed = await self._tool_list(record)
        tool = listed.tools.get(segment)
        if tool is None:
            raise NotFound(f"{request.name} not found")
        arguments = _jsonable(structs.message_dict(request.arguments))
        await self._validate(listed.compiled[segment], request.name, arguments)
        timeout_s = self._connections.timeout_s(record)
        if requested_s > 0:
            timeout_s = min(timeout_s, requested_s)
        if deadline_s is not None:
            timeout_s = min(timeout_s, max(deadline_s, 0.001))
        return await self._call(
            principal, record, request.name, tool, arguments, timeout_s, run, key
        )

    async def _call(
        self,
        principal: Principal,
        record: IntegrationRecord,
        tool: str,
        spec: ToolSpec,
        arguments: Any,
        timeout_s: float,
        run: str,
        key: str,
    ) -> pb.InvokeToolResponse:
        """Call a validated tool through the breaker; audit it whatever the outcome.
        ``key`` (may be empty) is the call's idempotency key, sent the connector's way."""
        parent = name_of(record)
        tool_name = spec.name
        connector = self._connections.get(record)
        limit = self._limits.max_result_bytes
        started = time.monotonic()
        status = status_pb2.Status(code=code_pb2.OK)
        result: ToolResult | None = None

        async def called() -> ToolResult:
            answer = await connector.call_tool(
                tool_name,
                arguments,
                timeout_s=timeout_s,
                max_result_bytes=limit,
                idempotency_key=key,
            )
            _check_result(answer)
            return answer

        try:
            result = await self._connections.guarded(record, called, timeout_s)
        except SwitchboardError as exc:
            status = status_pb2.Status(code=int(exc.code), message=exc.message[:300])
            raise
        except ToolNotFound:
            status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="no such tool")
            self._tools.pop(parent, None)
            raise NotFound(f"{tool} not found") from None
        except asyncio.CancelledError:
            status = status_pb2.Status(code=code_pb2.CANCELLED, message="cancelled")
            raise
        finally:
            elapsed = time.monotonic() - started
            self._audit(principal, tool, elapsed, status, result, run)
            if self._metrics is not None:
                self._metrics.tool_call(_kind_label(record.kind), _outcome(status, result), elapsed)
        if result is None:  # _guarded returns the result or raises
            raise DependencyUnavailable(f"{parent} gave no answer")
        return self._tool_response(result, elapsed, limit)

    @staticmethod
    async def _validate(compiled: Compiled, tool: str, arguments: Any) -> None:
        try:
            # Off the loop: a schema's size is the server's choice.
            found = await asyncio.to_thread(compiled.violations, arguments)
        except SchemaUnusable as exc:
            raise FailedPrecondition(f"{tool} cannot be called: {exc.reason}") from None
        violations = Violations()
        for path, message in found:
            violations.add(path, message)
        violations.check()

    def _tool_response(
        self, result: ToolResult, elapsed: float, limit: int
    ) -> pb.InvokeToolResponse:
        response = pb.InvokeToolResponse(text=result.text, is_error=result.is_error)
        if result.structured is not None:
            try:
                json_format.ParseDict(dict(result.structured), response.result)
            except (json_format.ParseError, TypeError, ValueError):
                raise DependencyUnavailable(
                    "the tool answered with a structured result that is not a JSON object"
                ) from None
        response.files.extend(result.files)
        response.latency.FromNanoseconds(int(elapsed * 1e9))
        # Files count: the dispatcher carries them to the handler and the stored message.
        if response.ByteSize() > limit:
            raise ResultTooLarge(f"the tool's result is larger than {limit} bytes")
        return response

    def _audit(
        self,
        principal: Principal,
        tool: str,
        elapsed: float,
        status: status_pb2.Status,
        result: ToolResult | None,
        run: str,
    ) -> None:
        """One TOOL_INVOKED event per call: who, which tool, how long, the outcome.

        Never the arguments or the result (they may hold anything) and never
        the credential.
        """
        workspace = tool.split("/integrations/", 1)[0]
        event = events_pb2.Event(
            type=events_pb2.EVENT_TYPE_TOOL_INVOKED,
            actor=events_pb2.Actor(
                name=principal.user_name,
                credential=principal.session_name or principal.api_key_name,
            ),
            workspace=workspace,
            tool_invoked=events_pb2.ToolInvoked(
                tool=tool,
                status=status,
                is_error=bool(result and result.is_error),
                run=run,
            ),
        )
        event.tool_invoked.duration.FromNanoseconds(int(elapsed * 1e9))
        self._connections.spawn(self._publish_audit(event), "integration-audit")

    async def _publish_audit(self, event: events_pb2.Event) -> None:
        try:
            async with asyncio.timeout(10):
                await self._bus.publish(event)
        except Exception:  # noqa: BLE001 - the call happened; a lost audit record is logged
            log.warning("tool audit event not published", extra={"tool": event.tool_invoked.tool})

    async def _spend(self, workspace_id: str) -> None:
        limit = self._limits.tool_calls_per_minute
        count, reset_s = await self._counters.hit(f"integration:tools:{workspace_id}", 60)
        if count > limit:
            raise RateLimited(
                f"more than {limit} tool calls in a minute in this workspace; slow down",
                retry_after_s=max(reset_s, 1.0),
            )


def _check_schemas(tool: ToolSpec) -> None:
    """Malformed if a schema nests deeper than JSON from outside may (``jsonbounds``):
    compiling it, validating with it and its Struct form all recurse."""
    try:
        jsonbounds.check_value(tool.input_schema)
        jsonbounds.check_value(tool.output_schema)
    except JsonRejected as rejected:
        raise Malformed(f"the schema of its tool {tool.name[:100]!r} is {rejected}") from None


def _check_result(result: ToolResult) -> None:
    """Malformed if the structured result nests deeper than ``jsonbounds`` allows,
    whichever connector parsed it: it becomes a Struct clients must be able to read."""
    try:
        jsonbounds.check_value(result.structured)
    except JsonRejected as rejected:
        raise Malformed(f"its tool's structured content is {rejected}") from None


def _kind_label(kind: int) -> str:
    """``INTEGRATION_KIND_MCP_SERVER`` -> ``mcp_server`` (a metric label)."""
    return pb.IntegrationKind.Name(kind).removeprefix("INTEGRATION_KIND_").lower()  # type: ignore[arg-type]


def _outcome(status: status_pb2.Status, result: ToolResult | None) -> str:
    """A call's outcome as a metric label: ``ok``, ``tool_error`` (the tool said it
    failed) or the status code's name in lower case (``unavailable``...)."""
    if status.code != code_pb2.OK:
        name: str = code_pb2.Code.Name(status.code)
        return name.lower()
    return "tool_error" if result is not None and result.is_error else "ok"


def _compile_tools(tools: Mapping[str, ToolSpec]) -> dict[str, Compiled]:
    """Every tool's checker under the key it has in ``tools``: run in a worker thread,
    once per list."""
    return {key: compile_schema(tool.input_schema) for key, tool in tools.items()}
