"""The hub's client of a gRPC domain expert (``switchboard.api.handler.v1.HandlerService``).

An expert offers one tool: its declared capability, named by the capability's
id. The tool takes ``input`` (the user message's text) and ``parameters``
(checked against the expert's ``parameters_schema``); calling it is one
``Handle`` call, whose deltas make the result's text and whose final
``HandleResult`` is the structured result.

Health is grpc.health.v1 ``Check``: first for the HandlerService entry, then
for the server as a whole (``""``) if the expert does not report per service;
an expert without the health service is probed with ``GetCapabilities``.

One channel per expert, kept open with keepalive (``platform/rpc/outbound/channels.py``).
The channel dials the addresses the egress check allowed and never resolves
the name again; after a call could not reach the expert (and whenever the
channel is in TRANSIENT_FAILURE) the next call resolves, checks and connects
afresh, so an expert that restarted, even at a new address, answers the very
next call instead of after gRPC's reconnect backoff. A call that failed
UNAVAILABLE before the expert answered anything is retried once on the fresh
channel (gRPC's code for "not processed").

The credential, if any, goes as ``authorization: Bearer <credential>`` with
every call; it appears in no error or log. A tool call's idempotency key goes
as ``idempotency-key`` metadata (``platform/idempotency.METADATA``) on its
``Handle`` call, the retry on a fresh channel included.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.api.context.v1 import context_pb2
from switchboard.api.handler.v1 import handler_pb2, handler_pb2_grpc
from switchboard.integration.ports.connectors import (
    Malformed,
    Progress,
    ToolNotFound,
    ToolResult,
    ToolSpec,
    Unreachable,
)
from switchboard.platform.errors import ResultTooLarge
from switchboard.platform.rpc.outbound.channels import DOWN, expert_channel
from switchboard.platform.security.egress import (
    EgressPolicy,
    GrpcEndpoint,
    ResolutionFailed,
    grpc_target,
    parse_grpc_endpoint,
)
from switchboard.platform.values import idempotency, jsonbounds, structs
from switchboard.platform.values.jsonbounds import JsonRejected

SERVICE_NAME: Final = handler_pb2.DESCRIPTOR.services_by_name["HandlerService"].full_name
#: Characters of an expert's own error message kept in an error result.
MAX_DETAIL_CHARS: Final = 500

_T = TypeVar("_T")

# The expert answered, and said no: the tool ran and reported an error.
_TOOL_ERRORS: Final = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


def tool_input_schema(capabilities: handler_pb2.HandlerCapabilities) -> dict[str, Any]:
    """The JSON Schema of an expert's one tool: the text, and its declared parameters."""
    parameters: dict[str, Any] = {"type": "object"}
    if capabilities.HasField("parameters_schema") and capabilities.parameters_schema.fields:
        parameters = json_format.MessageToDict(capabilities.parameters_schema)
    return {
        "type": "object",
        "properties": {"input": {"type": "string"}, "parameters": parameters},
        "required": ["input"],
    }


def _unreachable(exc: aio.AioRpcError, what: str) -> Exception:
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError()
    # The code only: an expert's message may say anything, and this is an outage.
    return Unreachable(f"the expert's {what} failed: {exc.code().name}")


class GrpcExpertConnector:
    """``Connector`` for an integration of kind INTEGRATION_KIND_GRPC_HANDLER.

    ``endpoint`` is ``host:port`` (plaintext) or ``grpcs://host[:port]``; a
    malformed one raises InvalidArgument naming ``field`` here, a blocked
    address raises DestinationBlocked at the first call.
    """

    def __init__(
        self,
        endpoint: str,
        policy: EgressPolicy,
        *,
        credential: str = "",
        field: str = "integration.endpoint",
    ) -> None:
        self._endpoint: GrpcEndpoint = parse_grpc_endpoint(endpoint, field)
        self._policy = policy
        self._field = field
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {credential}"),) if credential else ()
        )
        self._channel: aio.Channel | None = None
        # Set after a call could not reach the expert: resolve and connect afresh.
        self._stale = False
        self._lock = asyncio.Lock()
        self._capabilities: handler_pb2.HandlerCapabilities | None = None
        self._closed = False

    # -- the channel ---------------------------------------------------------------

    async def _open(self) -> aio.Channel:
        async with self._lock:
            if self._closed:
                raise Unreachable("the connector is closed")
            channel = self._channel
            if (
                channel is not None
                and not self._stale
                and channel.get_state(try_to_connect=False) not in DOWN
            ):
                return channel
            try:
                # Bounded by the caller's timeout around the whole call.
                target, options = await grpc_target(
                    self._endpoint, self._policy, timeout_s=10.0, field=self._field
                )
            except ResolutionFailed as exc:
                raise Unreachable(exc.message) from None
            self._stale = False
            if channel is not None:
                # Even to the same addresses: a fresh channel skips the old
                # one's reconnect backoff.
                await channel.close(grace=None)
            # A subchannel pool of its own: gRPC shares connections between
            # channels to one address by default, and the fresh channel would
            # inherit the old one's reconnect backoff.
            own_pool = [*options, ("grpc.use_local_subchannel_pool", 1)]
            self._channel = expert_channel(target, own_pool, tls=self._endpoint.tls)
            return self._channel

    async def _call(
        self, what: str, timeout_s: float, call: Callable[[aio.Channel], Awaitable[_T]]
    ) -> _T:
        """``call`` on the channel, once more on a fresh one if it was UNAVAILABLE."""
        async with asyncio.timeout(timeout_s):
            for attempt in range(2):
                channel = await self._open()
                try:
                    return await call(channel)
                except aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        self._stale = True
                        if attempt == 0:
                            continue
                    raise _unreachable(exc, what) from None
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    # -- Connector -----------------------------------------------------------------

    async def probe(self, timeout_s: float) -> None:
        """grpc.health.v1 Check (the service's entry, else the server's); GetCapabilities
        for an expert without the health service. Raises Unreachable if not serving."""

        async def check(channel: aio.Channel) -> int | None:
            health = health_pb2_grpc.HealthStub(channel)
            for service in (SERVICE_NAME, ""):
                try:
                    answer = await health.Check(
                        health_pb2.HealthCheckRequest(service=service), metadata=self._metadata
                    )
                except aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.NOT_FOUND and service:
                        continue  # no per-service entry: ask about the server
                    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                        return None
                    raise
                return int(_decoded(answer, "health check").status)
            return None  # pragma: no cover - "" is never NOT_FOUND-skipped

        status = await self._call("health check", timeout_s, check)
        if status is None:
            await self._describe(timeout_s)
        elif status != health_pb2.HealthCheckResponse.SERVING:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            raise Unreachable(f"the expert reports {name}")

    async def _describe(self, timeout_s: float) -> handler_pb2.HandlerCapabilities:
        async def ask(channel: aio.Channel) -> handler_pb2.GetCapabilitiesResponse:
            stub = handler_pb2_grpc.HandlerServiceStub(channel)
            answer: handler_pb2.GetCapabilitiesResponse = await stub.GetCapabilities(
                handler_pb2.GetCapabilitiesRequest(), metadata=self._metadata
            )
            return answer

        answer = _decoded(await self._call("GetCapabilities", timeout_s, ask), "GetCapabilities")
        found = answer.capabilities
        if not found.id:
            raise Unreachable("the expert's capabilities declare no id")
        self._capabilities = found
        return found

    async def list_tools(self, timeout_s: float) -> list[ToolSpec]:
        """The expert's declared capability, as one tool named by its id."""
        found = await self._describe(timeout_s)
        return [
            ToolSpec(
                name=found.id,
                description=found.description,
                input_schema=tool_input_schema(found),
                title=found.display_name,
            )
        ]

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
        """One ``Handle`` call: ``input`` as the user message, ``parameters`` as its parameters."""
        async with asyncio.timeout(timeout_s):
            known = self._capabilities or await self._describe(timeout_s)
            if name != known.id:
                raise ToolNotFound(f"the expert offers no tool {name!r}")
            text = arguments.get("input")
            parameters = arguments.get("parameters", {})
            if not isinstance(text, str) or not isinstance(parameters, Mapping):
                # The hub validates against the schema first; this only guards the types.
                return ToolResult(
                    text="input must be a string and parameters an object", is_error=True
                )
            request = handler_pb2.HandleRequest(
                message=context_pb2.Message(
                    role=context_pb2.MESSAGE_ROLE_USER, parts=[context_pb2.ContentPart(text=text)]
                ),
            )
            request.parameters.CopyFrom(_struct(parameters))
            metadata = self._metadata
            if idempotency_key:
                metadata = (*metadata, (idempotency.METADATA, idempotency_key))

            async def handle(channel: aio.Channel) -> ToolResult:
                return await self._handle(channel, request, metadata, max_result_bytes, progress)

            try:
                return await self._call("Handle", timeout_s, handle)
            except _ToolFailed as failed:
                return failed.result

    async def _handle(
        self,
        channel: aio.Channel,
        request: handler_pb2.HandleRequest,
        metadata: tuple[tuple[str, str], ...],
        max_result_bytes: int,
        progress: Progress | None,
    ) -> ToolResult:
        stub = handler_pb2_grpc.HandlerServiceStub(channel)
        stream = stub.Handle(request, metadata=metadata)
        deltas: list[str] = []
        size = 0
        answered = False
        try:
            async for answer in stream:
                answered = True
                frame = _decoded(answer, "Handle")
                kind = frame.WhichOneof("frame")
                if kind == "delta":
                    size += len(frame.delta.text.encode())
                    if size > max_result_bytes:
                        raise ResultTooLarge(
                            f"the expert's answer exceeded {max_result_bytes} bytes"
                        )
                    deltas.append(frame.delta.text)
                elif kind == "progress" and progress is not None:
                    fraction = frame.progress.fraction
                    known = 0.0 <= fraction <= 1.0
                    await progress(
                        fraction if known else 0.0, 1.0 if known else None, frame.progress.stage
                    )
                elif kind == "result":
                    return _result(frame.result, deltas, size, max_result_bytes)
        except aio.AioRpcError as exc:
            if exc.code() in _TOOL_ERRORS:
                detail = (exc.details() or "")[:MAX_DETAIL_CHARS]
                raise _ToolFailed(
                    ToolResult(text=f"{exc.code().name}: {detail}", is_error=True)
                ) from None
            if exc.code() == grpc.StatusCode.UNAVAILABLE and answered:
                # It had answered: not safe to send again.
                self._stale = True
                raise Unreachable("the expert's Handle failed: UNAVAILABLE") from None
            raise
        finally:
            # Reached on cancellation and timeouts too: RST_STREAM tells the expert to stop.
            stream.cancel()
        raise Unreachable("the expert ended its answer without a result")

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close(grace=None)


_M = TypeVar("_M", bound=Message)


def _decoded(answer: _M | None, what: str) -> _M:
    """``answer``, or Malformed: grpc's client hands over ``None`` for a message it
    could not decode (not the message, or nested deeper than protobuf allows), and
    one that did may still nest a Struct deeper than JSON from outside may."""
    if answer is None:
        raise Malformed(f"the expert's {what} answer cannot be decoded")
    try:
        jsonbounds.check_message(answer)
    except JsonRejected as rejected:
        raise Malformed(f"the expert's {what} answer holds a value {rejected}") from None
    return answer


class _ToolFailed(Exception):
    """Carries an error result out of ``_call`` (which maps only transport failures)."""

    def __init__(self, result: ToolResult) -> None:
        super().__init__(result.text)
        self.result = result


def _struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    found = struct_pb2.Struct()
    found.update(dict(values))
    return found


def _result(
    result: handler_pb2.HandleResult, deltas: list[str], size: int, max_result_bytes: int
) -> ToolResult:
    if size + result.ByteSize() > max_result_bytes:
        raise ResultTooLarge(f"the expert's answer exceeded {max_result_bytes} bytes")
    text = "".join(deltas)
    if not text:  # an expert that does not stream: the result's text parts
        text = "\n\n".join(p.text for p in result.parts if p.WhichOneof("part") == "text")
    # File parts are the result's files; their bytes are not repeated in the
    # structured result (base64 there, and counted twice).
    files = tuple(part.file for part in result.parts if part.WhichOneof("part") == "file")
    shown = handler_pb2.HandleResult()
    shown.CopyFrom(result)
    for part in shown.parts:
        if part.WhichOneof("part") == "file":
            part.file.ClearField("inline_data")
    structured = structs.message_dict(shown, preserving_proto_field_name=True)
    return ToolResult(structured=structured, text=text, files=files)
