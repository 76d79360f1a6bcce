"""Calling A2A agents: the client of a remote A2A agent registered as a domain expert
(INTEGRATION_KIND_A2A_AGENT); serving A2A is the front door's (the ``a2a`` package).

The integration's endpoint is the agent's Agent Card URL. The card is read
with the egress policy's HTTP client (``platform/security/egress.py``: the address
checked is the address connected to, no redirects, no environment proxies)
and says where the agent listens. Those addresses are the agent's to name, so
they pass the same policy: a card on a public host that names
``169.254.169.254`` gets nowhere. The gRPC interface is preferred (a channel
to the checked addresses, as for gRPC experts); JSON-RPC is used only when
the card offers nothing else, through the policy's HTTP client. The messages
and the client are the official SDK's (``a2a-sdk``, ``ClientFactory``), given
a card that names only the chosen interface, so the SDK cannot pick another.

``exchange`` sends one user message (its text, then its files: ``message_files``)
and turns the task's events into handler frames: artifact text as deltas, a
working status's message as progress, the result at the end (docs/a2a.md, "A2A
agents as domain experts", has the table). A stream that drops after the task
is known is resumed with SubscribeToTask for ``RESUME_WINDOW_S``: the task
snapshot it starts with fills in what was missed (by artifact, from the length
already relayed), so no text is lost or repeated. An agent that no longer
knows the task (it restarted without a task store) ends the exchange with
``AgentFailed``; one that stays away past the window with ``Unreachable``. Leaving the exchange
early for any reason (the run cancelled, its deadline, a failure here) while
the task may still run sends CancelTask, bounded by ``CANCEL_TIMEOUT_S``.

Errors never carry the SDK's exception text: it holds addresses, URLs and
transport details. What a caller sees names the agent's card host at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import grpc
import httpx
from a2a.types import a2a_pb2 as a2a
from a2a.utils.errors import A2AError, TaskNotFoundError, UnsupportedOperationError
from google.protobuf import struct_pb2
from google.protobuf.json_format import ParseError
from grpc import aio

from switchboard.api.context.v1 import context_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.integration.ports.connectors import (
    ConnectorError,
    Malformed,
    Progress,
    ToolNotFound,
    ToolResult,
    ToolSpec,
    Unreachable,
)
from switchboard.platform.errors import (
    DestinationBlocked,
    RequestTooLarge,
    ResultTooLarge,
    SwitchboardError,
)
from switchboard.platform.imports import imported
from switchboard.platform.resilience.backoff import Backoff
from switchboard.platform.rpc.outbound.channels import expert_channel
from switchboard.platform.security.egress import (
    PLAIN_HTTP_REFUSED,
    EgressPolicy,
    ResolutionFailed,
    grpc_target,
    http_client,
    parse_grpc_endpoint,
    parse_http_endpoint,
)
from switchboard.platform.values import jsonbounds, structs
from switchboard.platform.values.jsonbounds import JsonRejected

# The SDK's client is imported when a card is first read (``_SDK``), not with this
# module: over a hundred modules (its JSON-RPC, REST and gRPC transports) that every
# process would import at start though most never call a remote agent.
if TYPE_CHECKING:
    from a2a.client import Client, ClientCallContext
    from a2a.client.errors import A2AClientError

log = logging.getLogger("switchboard.integration.kinds.a2a")

#: A card larger than this is not a card.
MAX_CARD_BYTES: Final = 1 << 20
#: Largest line of a JSON-RPC answer (a whole answer, or one event of a stream).
MAX_MESSAGE_BYTES: Final = 16 * 1_048_576
#: How long a dropped stream is resumed for before the exchange gives up.
RESUME_WINDOW_S: Final = 10.0
#: Waits between resume attempts: from the first to the cap, doubling.
RESUME_BACKOFF_S: Final = (0.05, 1.0)
#: How long CancelTask may take when the exchange is left early.
CANCEL_TIMEOUT_S: Final = 5.0
#: A card read is kept this long before it is read again (a call after a failure reads it anew).
CARD_TTL_S: Final = 300.0
#: Characters of the agent's own status message kept in a failure.
MAX_DETAIL_CHARS: Final = 200
#: Bytes of one ``raw`` file part kept to store with the answer (the context service's
#: default inline file limit); a larger one keeps its name, type and size only.
MAX_INLINE_BYTES: Final = 4 * 1_048_576
#: Bytes of ``raw`` file parts kept for one answer, all together.
MAX_ANSWER_FILE_BYTES: Final = 16 * 1_048_576
#: Characters of a file part's ``filename`` kept as its display name.
MAX_FILENAME_CHARS: Final = 200
#: Bytes of the user's files sent in one message, all together (each file whole or
#: not at all): with the text, under the 4 MiB a gRPC server takes by default.
MAX_SENT_FILE_BYTES: Final = 3 * 1_048_576
#: The one tool the hub lists for an agent.
TOOL_NAME: Final = "send_message"
#: Data part key that ties a conversation's answers to the agent's task and context.
TASK_KEY: Final = "a2a_task"
#: ``finish_reason`` of an answer that is the agent's question (the task is input-required).
INPUT_REQUIRED: Final = "input_required"
#: Metadata key (of a task, message or status update) with the usage an agent reports.
USAGE_KEY: Final = "usage"
#: The budget extension (docs/a2a.md): a report of usage under its key is read too.
USAGE_EXTENSION: Final = "https://switchboard.dev/a2a/extensions/budget/v1"
#: Bounds of a reported usage (tokens are int32 in ``handler.v1.Usage``).
_MAX_TOKENS: Final = (1 << 31) - 1
_MAX_COST: Final = (1 << 53) - 1
#: The header naming the extensions a request uses (A2A's ``A2A-Extensions``).
EXTENSIONS_HEADER: Final = "a2a-extensions"

GRPC: Final = "GRPC"
JSONRPC: Final = "JSONRPC"
#: The SDK's client (``imported`` before the first card is parsed or client built).
_SDK: Final = ("a2a.client", "a2a.client.card_resolver", "a2a.client.errors")

_TERMINAL: Final = frozenset(
    {
        a2a.TASK_STATE_COMPLETED,
        a2a.TASK_STATE_FAILED,
        a2a.TASK_STATE_CANCELED,
        a2a.TASK_STATE_REJECTED,
    }
)
# The task waits for the client: nothing more comes on this stream.
_INTERRUPTED: Final = frozenset({a2a.TASK_STATE_INPUT_REQUIRED, a2a.TASK_STATE_AUTH_REQUIRED})
_STATE_WORDS: Final[dict[int, str]] = {
    a2a.TASK_STATE_COMPLETED: "completed",
    a2a.TASK_STATE_INPUT_REQUIRED: "input-required",
}


class AgentFailed(ConnectorError):
    """The agent answered, and the task did not succeed. ``str()`` is safe to show."""


@dataclass(frozen=True)
class PreviousTask:
    """The agent's task behind an earlier answer in the conversation."""

    task_id: str
    context_id: str
    #: ``input-required`` (continued by the next message) or ``completed``.
    state: str


def previous_task(window: context_pb2.ContextWindow, author: str) -> PreviousTask | None:
    """The task of ``author``'s newest answer in ``window`` that names one."""
    for item in reversed(window.included):
        if item.WhichOneof("item") != "message" or item.message.author != author:
            continue
        for part in item.message.parts:
            if part.WhichOneof("part") != "data" or TASK_KEY not in part.data.fields:
                continue
            found = structs.message_dict(part.data).get(TASK_KEY)
            if isinstance(found, dict) and isinstance(found.get("context"), str):
                return PreviousTask(
                    str(found.get("task", "")), found["context"], str(found.get("state", ""))
                )
    return None


#: Reads a stored file as the run's user: ``await read(name, limit)`` is its whole
#: content (RequestTooLarge past ``limit`` bytes, NotFound once deleted).
FileReader = Callable[[str, int], Awaitable[bytes]]


async def message_files(message: context_pb2.Message, read: FileReader | None) -> list[a2a.Part]:
    """The file parts of ``message`` as A2A parts, in order, each with its media type
    and name: the file's bytes (``raw``) while they fit ``MAX_SENT_FILE_BYTES`` with
    those before it, else the URL it was fetched from. A file sent neither way (too
    large, unreadable, deleted) is a text part saying so: the agent knows it was there."""
    parts: list[a2a.Part] = []
    left = MAX_SENT_FILE_BYTES
    for part in message.parts:
        if part.WhichOneof("part") != "file":
            continue
        found = part.file
        name = (found.display_name or found.file.rpartition("/")[2] or "attachment")[
            :MAX_FILENAME_CHARS
        ]
        kind = found.mime_type or "application/octet-stream"
        size = found.size_bytes or len(found.inline_data)
        data: bytes | None = None
        why = f"larger than the {left:,} bytes left to send"
        if found.inline_data:
            if len(found.inline_data) <= left:
                data = found.inline_data
        elif not found.file:
            why = "not stored"
        elif read is None:
            why = "files cannot be read here"
        elif size <= left:
            try:
                data = await read(found.file, left)
            except RequestTooLarge:
                pass
            except SwitchboardError as exc:
                # Gone since the message was stored, or its store away: the run goes on.
                why = f"could not be read ({type(exc).__name__})"
        if data is not None:
            left -= len(data)
            parts.append(a2a.Part(raw=data, media_type=kind, filename=name))
        elif found.uri:
            parts.append(a2a.Part(url=found.uri, media_type=kind, filename=name))
        else:
            parts.append(a2a.Part(text=f"[file {name} ({kind}, {size:,} bytes): not sent, {why}]"))
    return parts


# -- the card -------------------------------------------------------------------------------


async def fetch_card(
    url: str, policy: EgressPolicy, *, timeout_s: float, field: str = "integration.endpoint"
) -> a2a.AgentCard:
    """The Agent Card at ``url``, read through the egress policy.

    Raises InvalidArgument (a malformed URL), DestinationBlocked, TimeoutError,
    Unreachable (no answer, not 200) or Malformed (larger than
    ``MAX_CARD_BYTES``, not JSON, nested deeper than ``jsonbounds.MAX_DEPTH``,
    not a card).
    """
    endpoint = parse_http_endpoint(url, field)
    host = endpoint.host
    async with http_client(policy, timeout_s=timeout_s) as client:
        try:
            async with asyncio.timeout(timeout_s):
                async with client.stream(
                    "GET", endpoint.url, headers={"accept": "application/json"}
                ) as response:
                    if response.status_code != 200:
                        redirect = " (redirects are never followed)" if response.is_redirect else ""
                        raise Unreachable(
                            f"the agent card at {host!r} answered HTTP {response.status_code}"
                            + redirect
                        )
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body.extend(chunk)
                        if len(body) > MAX_CARD_BYTES:
                            raise Malformed(
                                f"the agent card at {host!r} is larger than {MAX_CARD_BYTES} bytes"
                            )
        except ResolutionFailed:
            raise Unreachable(f"the agent card's host {host!r} does not resolve") from None
        except httpx.TimeoutException:
            raise TimeoutError from None
        except httpx.HTTPError:
            raise Unreachable(f"the agent card at {host!r} could not be read") from None
    try:
        document = jsonbounds.loads(body, max_bytes=MAX_CARD_BYTES)
    except JsonRejected as rejected:
        raise Malformed(f"the agent card at {host!r} is {rejected}") from None
    await imported(*_SDK)
    from a2a.client.card_resolver import parse_agent_card

    try:
        return parse_agent_card(document)
    except (ValueError, TypeError, AttributeError, KeyError, ParseError):
        raise Malformed(f"the document at {host!r} is not an A2A agent card") from None


def choose_interface(card: a2a.AgentCard) -> a2a.AgentInterface:
    """The card's gRPC interface, else its JSON-RPC one (Unreachable if neither)."""
    for binding in (GRPC, JSONRPC):
        for interface in card.supported_interfaces:
            if interface.protocol_binding.upper() == binding and interface.url:
                return interface
    raise Unreachable("the agent card offers neither a gRPC nor a JSON-RPC interface")


# -- one agent ------------------------------------------------------------------------------


@dataclass
class _Link:
    """A client built from one read of the card, and what it holds open."""

    card: a2a.AgentCard
    interface: a2a.AgentInterface
    client: Client
    read_at: float
    channel: aio.Channel | None = None
    http: httpx.AsyncClient | None = None

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.close(grace=None)
        if self.http is not None:
            with contextlib.suppress(Exception):
                await self.http.aclose()


@dataclass
class _Relay:
    """What an exchange has relayed so far, to resume without loss or repetition."""

    task_id: str = ""
    context_id: str = ""
    state: int = a2a.TASK_STATE_UNSPECIFIED
    #: Text relayed per artifact id, in the order artifacts appeared.
    texts: dict[str, str] = field(default_factory=dict)
    #: Non-text parts of artifacts, by artifact id.
    extras: dict[str, list[context_pb2.ContentPart]] = field(default_factory=dict)
    #: The agent's words on the last status (its question, or why it failed).
    status_text: str = ""
    #: The agent answered with a Message instead of a task.
    message_text: str | None = None
    answered: bool = False
    #: The last ``metadata`` an event carried with usage in it (the agent's report
    #: of what it spent: ``usage_of``).
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def over(self) -> bool:
        return (
            self.message_text is not None or self.state in _TERMINAL or self.state in _INTERRUPTED
        )

    def take(self, response: a2a.StreamResponse) -> list[handler_pb2.HandleResponse]:
        """The frames one event adds (deltas and progress)."""
        self.answered = True
        kind = response.WhichOneof("payload")
        frames: list[handler_pb2.HandleResponse] = []
        if kind is not None:
            self._usage(getattr(response, kind).metadata)
        if kind == "task":
            task = response.task
            self._task(task.id, task.context_id)
            for artifact in task.artifacts:
                frames.extend(self._artifact(artifact, append=False))
            frames.extend(self._status(task.status))
        elif kind == "status_update":
            status = response.status_update
            self._task(status.task_id, status.context_id)
            frames.extend(self._status(status.status))
        elif kind == "artifact_update":
            chunk = response.artifact_update
            self._task(chunk.task_id, chunk.context_id)
            frames.extend(self._artifact(chunk.artifact, append=chunk.append))
        elif kind == "message":
            message = response.message
            self.context_id = message.context_id or self.context_id
            self.message_text = _text(message.parts)
            if self.message_text:
                frames.append(_delta(self.message_text))
            self.extras.setdefault("", []).extend(_extras(message.parts))
        return frames

    def _usage(self, metadata: struct_pb2.Struct) -> None:
        """Keep the event's metadata when it reports usage (the last report wins:
        a final task or status update says what the whole task spent)."""
        if USAGE_KEY in metadata.fields or USAGE_EXTENSION in metadata.fields:
            # A count that is not finite reads as none (null), never as an exception.
            value = structs.message_dict(metadata)
            if isinstance(value, dict):
                self.usage = value

    def _task(self, task_id: str, context_id: str) -> None:
        self.task_id = self.task_id or task_id
        self.context_id = context_id or self.context_id

    def _artifact(
        self, artifact: a2a.Artifact, *, append: bool
    ) -> list[handler_pb2.HandleResponse]:
        key = artifact.artifact_id
        had = self.texts.get(key, "")
        text = _text(artifact.parts)
        extras = _extras(artifact.parts)
        if append:
            self.texts[key] = had + text
            self.extras.setdefault(key, []).extend(extras)
            return [_delta(text)] if text else []
        # The whole artifact (a snapshot after a resume, or a replacement):
        # only what goes beyond the relayed text is new. Text relayed cannot be
        # taken back, so a replacement that does not extend it adds nothing.
        self.extras[key] = extras
        if text.startswith(had):
            self.texts[key] = text
            return [_delta(text[len(had) :])] if len(text) > len(had) else []
        return []

    def _status(self, status: a2a.TaskStatus) -> list[handler_pb2.HandleResponse]:
        if status.state != a2a.TASK_STATE_UNSPECIFIED:
            self.state = status.state
        words = _text(status.message.parts) if status.HasField("message") else ""
        if not words:
            return []
        self.status_text = words
        if status.state == a2a.TASK_STATE_WORKING:
            return [handler_pb2.HandleResponse(progress=handler_pb2.Progress(stage=words[:200]))]
        if status.state == a2a.TASK_STATE_INPUT_REQUIRED:
            # The question is the answer the user reads: streamed like text.
            prefix = "\n\n" if any(self.texts.values()) else ""
            return [_delta(prefix + words)]
        return []

    def result(self, agent: str) -> handler_pb2.HandleResult:
        """The answer once the task completed or waits for input; AgentFailed otherwise."""
        state = self.state
        if self.message_text is None and state not in (
            a2a.TASK_STATE_COMPLETED,
            a2a.TASK_STATE_INPUT_REQUIRED,
        ):
            raise AgentFailed(self._failure(agent))
        text = self.message_text if self.message_text is not None else "".join(self.texts.values())
        if state == a2a.TASK_STATE_INPUT_REQUIRED and self.status_text:
            text = f"{text}\n\n{self.status_text}" if text else self.status_text
        elif not text:
            text = self.status_text
        parts = [context_pb2.ContentPart(text=text)]
        for extras in self.extras.values():
            parts.extend(extras)
        _within_bound(parts)
        if self.context_id:
            tie = struct_pb2.Struct()
            tie.update(
                {
                    TASK_KEY: {
                        "task": self.task_id,
                        "context": self.context_id,
                        "state": _STATE_WORDS.get(state, "completed"),
                    }
                }
            )
            parts.append(context_pb2.ContentPart(data=tie))
        waiting = state == a2a.TASK_STATE_INPUT_REQUIRED and self.message_text is None
        return handler_pb2.HandleResult(
            parts=parts,
            finish_reason=INPUT_REQUIRED if waiting else "stop",
            usage=usage_of(self.usage),
        )

    def _failure(self, agent: str) -> str:
        detail = f": {self.status_text[:MAX_DETAIL_CHARS]}" if self.status_text else ""
        if self.state == a2a.TASK_STATE_AUTH_REQUIRED:
            return (
                f"A2A agent {agent} asks for authorization (auth-required), which Switchboard "
                "does not provide in a conversation; set the integration's credential"
            )
        if self.state == a2a.TASK_STATE_REJECTED:
            return f"A2A agent {agent} rejected the task{detail}"
        if self.state == a2a.TASK_STATE_CANCELED:
            return f"A2A agent {agent} cancelled the task{detail}"
        if self.state == a2a.TASK_STATE_FAILED:
            return f"A2A agent {agent} failed the task{detail}"
        return f"A2A agent {agent} ended its stream before the task ended"


def usage_of(metadata: Mapping[str, Any]) -> handler_pb2.Usage:
    """The usage an agent reported in an event's ``metadata``: its ``usage`` object,
    else the budget extension's ``usage`` (docs/a2a.md, "Budgets across hops"), with
    ``input_tokens``/``output_tokens`` (or ``prompt_tokens``/``completion_tokens``)
    and ``cost_micros`` (and a Switchboard agent's ``unpriced_calls``); what is not a
    count in range is left out."""
    found = metadata.get(USAGE_KEY)
    if not isinstance(found, Mapping):
        extension = metadata.get(USAGE_EXTENSION)
        found = extension.get(USAGE_KEY) if isinstance(extension, Mapping) else None
    if not isinstance(found, Mapping):
        return handler_pb2.Usage()
    cost = _count(found.get("cost_micros"), _MAX_COST)
    return handler_pb2.Usage(
        input_tokens=_count(found.get("input_tokens", found.get("prompt_tokens")), _MAX_TOKENS),
        output_tokens=_count(
            found.get("output_tokens", found.get("completion_tokens")), _MAX_TOKENS
        ),
        cost_micros=cost,
        estimated_cost_usd=cost / 1e6,
        unpriced_calls=_count(found.get("unpriced_calls"), _MAX_TOKENS),
    )


def _count(value: object, most: int) -> int:
    """A reported count: a non-negative integer of at most ``most``, else 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= most:
        return value
    return 0


def _text(parts: Any) -> str:
    return "".join(part.text for part in parts if part.WhichOneof("content") == "text")


def _extras(parts: Any) -> list[context_pb2.ContentPart]:
    """Artifact parts other than text, as content parts: ``data`` as data, ``url``
    and ``raw`` as files (a ``raw`` part's bytes kept up to ``MAX_INLINE_BYTES``,
    stored by the context service with the answer)."""
    found: list[context_pb2.ContentPart] = []
    for part in parts:
        kind = part.WhichOneof("content")
        if kind == "data":
            try:
                # The gRPC binding's decoder allows some 33 levels; what is relayed
                # becomes a Struct deeper in run updates, which must stay readable.
                # A NaN or infinity (which protobuf's JSON reader takes from an
                # HTTP+JSON body) is a bad answer too: JSON has none.
                jsonbounds.check_message(part.data)
            except JsonRejected as rejected:
                raise Malformed(f"the agent answered with data {rejected}") from None
            value = structs.message_dict(part.data)
            data = struct_pb2.Struct()
            data.update(value if isinstance(value, dict) else {"value": value})
            found.append(context_pb2.ContentPart(data=data))
        elif kind == "url":
            found.append(
                context_pb2.ContentPart(
                    file=context_pb2.FileReference(
                        uri=part.url,
                        mime_type=part.media_type,
                        display_name=part.filename[:MAX_FILENAME_CHARS],
                    )
                )
            )
        elif kind == "raw":
            reference = context_pb2.FileReference(
                mime_type=part.media_type,
                size_bytes=len(part.raw),
                display_name=part.filename[:MAX_FILENAME_CHARS],
            )
            if len(part.raw) <= MAX_INLINE_BYTES:
                reference.inline_data = part.raw
            found.append(context_pb2.ContentPart(file=reference))
    return found


def _within_bound(parts: list[context_pb2.ContentPart]) -> None:
    """Keep the bytes of inline files up to ``MAX_ANSWER_FILE_BYTES`` in all; later
    ones keep their name, type and size only."""
    kept = 0
    for part in parts:
        if part.WhichOneof("part") != "file" or not part.file.inline_data:
            continue
        kept += len(part.file.inline_data)
        if kept > MAX_ANSWER_FILE_BYTES:
            part.file.ClearField("inline_data")


def _delta(text: str) -> handler_pb2.HandleResponse:
    return handler_pb2.HandleResponse(delta=handler_pb2.TextDelta(text=text))


class _Refused(httpx.DecodingError):
    """A JSON-RPC answer the SDK must not parse (``reason`` says why, safe to show).

    An ``httpx`` request error: the SDK turns it into its own client error,
    with this as the cause, as it does a broken connection.
    """

    def __init__(self, reason: str, request: httpx.Request) -> None:
        super().__init__(reason, request=request)
        self.reason = reason


class _MeasuredBody(httpx.AsyncByteStream):
    """A response body measured by ``jsonbounds.StreamGauge`` while the SDK reads it.

    The SDK parses a JSON-RPC answer (or each event of a stream) with ``json``
    and protobuf's ``json_format``, both recursive: nothing of an answer nested
    too deep, or a line longer than ``MAX_MESSAGE_BYTES``, reaches them.
    """

    def __init__(self, stream: httpx.AsyncByteStream, request: httpx.Request) -> None:
        self._stream = stream
        self._request = request
        self._gauge = jsonbounds.StreamGauge(max_line_bytes=MAX_MESSAGE_BYTES)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                self._gauge.feed(chunk)
                yield chunk
            # Before the iteration ends, that is before the SDK parses the last line.
            self._gauge.close()
        except JsonRejected as rejected:
            raise _Refused(f"a message {rejected}", self._request) from None

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _measured(response: httpx.Response) -> None:
    """Response hook of the JSON-RPC client: its body is read through ``_MeasuredBody``."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _Refused(
            "with a compressed body, which cannot be measured (identity was asked for)",
            response.request,
        )
    if isinstance(response.stream, httpx.AsyncByteStream):
        response.stream = _MeasuredBody(response.stream, response.request)


def _transport_failure(exc: BaseException) -> bool:
    """Whether the SDK's error is the connection's (resumable), not the agent's answer."""
    cause = exc.__cause__
    if isinstance(cause, aio.AioRpcError):
        return cause.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    return isinstance(cause, httpx.TransportError)


class A2AAgent:
    """One agent: its card, a client over its preferred interface, and exchanges with it.

    ``card_url`` is checked when a client is built; ``credential`` goes as
    ``authorization: Bearer`` with every call (never with the public card's
    read, never logged); ``allow_plain_http`` allows an ``http://`` card or
    JSON-RPC interface (dev and tests, as for MCP servers and webhooks).
    """

    def __init__(
        self,
        card_url: str,
        policy: EgressPolicy,
        *,
        credential: str = "",
        timeout_s: float = 10.0,
        allow_plain_http: bool = False,
        field: str = "integration.endpoint",
    ) -> None:
        self.card_url = card_url
        self.host = parse_http_endpoint(card_url, field).host
        self._policy = policy
        self._credential = credential
        self._timeout_s = timeout_s
        self._allow_plain_http = allow_plain_http
        self._field = field
        self._link: _Link | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    # -- the client --------------------------------------------------------------------------

    async def card(self, timeout_s: float | None = None) -> a2a.AgentCard:
        """The agent's card, read again when older than ``CARD_TTL_S`` or after a failure."""
        return (await self._client(timeout_s or self._timeout_s)).card

    async def _client(self, timeout_s: float) -> _Link:
        async with self._lock:
            if self._closed:
                raise Unreachable("the agent's client is closed")
            link = self._link
            if link is not None and time.monotonic() - link.read_at < CARD_TTL_S:
                return link
            self._link = None
            if link is not None:
                await link.close()
            timeout_s = min(timeout_s, self._timeout_s)
            card = await fetch_card(self.card_url, self._policy, timeout_s=timeout_s)
            self._link = await self._build(card, timeout_s)
            return self._link

    async def _build(self, card: a2a.AgentCard, timeout_s: float) -> _Link:
        await imported(*_SDK)
        from a2a.client import ClientConfig, ClientFactory

        interface = choose_interface(card)
        chosen = a2a.AgentCard()
        chosen.CopyFrom(card)
        # The SDK picks among the card's interfaces: it gets only the checked one.
        del chosen.supported_interfaces[:]
        chosen.supported_interfaces.append(interface)
        what = f"the agent card's {interface.protocol_binding.upper()} interface"
        if interface.protocol_binding.upper() == GRPC:
            endpoint = parse_grpc_endpoint(interface.url, what)
            try:
                target, options = await grpc_target(endpoint, self._policy, timeout_s=timeout_s)
            except ResolutionFailed:
                raise Unreachable(f"{what} names a host that does not resolve") from None
            channel = expert_channel(
                target, [*options, ("grpc.use_local_subchannel_pool", 1)], tls=endpoint.tls
            )
            config = ClientConfig(
                supported_protocol_bindings=[GRPC], grpc_channel_factory=lambda _url: channel
            )
            client = ClientFactory(config).create(chosen)
            return _Link(chosen, interface, client, time.monotonic(), channel=channel)
        url = parse_http_endpoint(interface.url, what)
        if url.scheme != "https" and not self._allow_plain_http:
            raise DestinationBlocked(f"{what} {PLAIN_HTTP_REFUSED}")
        http = http_client(
            self._policy,
            timeout_s=timeout_s,
            # Measured as they arrive (_measured): a compressed body could not be.
            headers={"accept-encoding": "identity"},
            event_hooks={"response": [_measured]},
        )
        config = ClientConfig(supported_protocol_bindings=[JSONRPC], httpx_client=http)
        client = ClientFactory(config).create(chosen)
        return _Link(chosen, interface, client, time.monotonic(), http=http)

    async def _forget(self, link: _Link) -> None:
        """After a failed call: the next one reads the card, resolves and connects afresh."""
        async with self._lock:
            if self._link is link:
                self._link = None
        await link.close()

    def _context(self, timeout_s: float, extensions: tuple[str, ...] = ()) -> ClientCallContext:
        from a2a.client import ClientCallContext  # imported with the client this is for

        parameters = {"authorization": f"Bearer {self._credential}"} if self._credential else {}
        if extensions:
            parameters[EXTENSIONS_HEADER] = ",".join(extensions)
        return ClientCallContext(
            timeout=max(timeout_s, 0.001), service_parameters=parameters or None
        )

    # -- calls -------------------------------------------------------------------------------

    async def probe(self, timeout_s: float) -> None:
        """The card reads, and its interface answers: GetTask of a task that does not
        exist must come back as the agent's own answer (TaskNotFound, or any other)."""
        async with asyncio.timeout(timeout_s):
            # Health is the card's too: read it on every probe, not from the cache.
            await fetch_card(self.card_url, self._policy, timeout_s=timeout_s)
            link = await self._fresh(timeout_s)
            from a2a.client.errors import A2AClientError, A2AClientTimeoutError

            try:
                await link.client.get_task(
                    a2a.GetTaskRequest(id=f"switchboard-probe-{uuid.uuid4().hex}"),
                    context=self._context(timeout_s),
                )
            except A2AClientTimeoutError:
                raise TimeoutError from None
            except A2AClientError as exc:
                await self._forget(link)
                raise self._failure(exc) from None
            except A2AError:
                return  # it answered

    async def _fresh(self, timeout_s: float) -> _Link:
        try:
            return await self._client(timeout_s)
        except SwitchboardError:
            raise
        except ValueError:
            # ClientFactory found no transport for the interface the card names.
            raise Unreachable("the agent card's interface cannot be used") from None

    def _failure(self, exc: BaseException) -> Unreachable:
        """The safe error for an SDK call that failed: what failed, never the SDK's text."""
        cause = exc.__cause__
        if isinstance(cause, _Refused):
            return Malformed(f"A2A agent at {self.host!r} answered {cause.reason}")
        if isinstance(cause, aio.AioRpcError):
            return Unreachable(f"A2A agent at {self.host!r} is unreachable: {cause.code().name}")
        return Unreachable(f"A2A agent at {self.host!r} is unreachable")

    async def exchange(
        self,
        text: str,
        *,
        deadline: float,
        message_id: str = "",
        previous: PreviousTask | None = None,
        metadata: Mapping[str, Any] | None = None,
        extensions: Mapping[str, Any] | None = None,
        files: Sequence[a2a.Part] = (),
    ) -> AsyncGenerator[handler_pb2.HandleResponse, None]:
        """Send ``text`` (and ``files``, parts after it: ``message_files``) and yield
        the task's frames, the last one its result.

        ``extensions`` go in the message's metadata, each under its URI, and are
        named in the ``a2a-extensions`` header (the budget handed over). The
        result's ``usage`` is what the agent reported (``usage_of``).

        ``deadline`` is ``time.monotonic()``'s; past it, TimeoutError. A
        ``previous`` task in ``input-required`` is continued; otherwise its
        context is (the agent keeps its own history per context).
        """
        request = _request(text, message_id, previous, metadata, files)
        if extensions:
            request.message.metadata.update(dict(extensions))
        call = _Call(await self._fresh(_left(deadline)), deadline, tuple(extensions or ()))
        try:
            async with contextlib.aclosing(self._frames(call, request)) as frames:
                async for frame in frames:
                    yield frame
        except TaskNotFoundError:
            raise AgentFailed(
                f"A2A agent at {self.host!r} no longer knows the task"
                if call.relay.task_id
                else f"A2A agent at {self.host!r} does not know the task to continue"
            ) from None
        except A2AError as exc:
            raise AgentFailed(
                f"A2A agent at {self.host!r} refused the message ({type(exc).__name__})"
            ) from None
        else:
            yield handler_pb2.HandleResponse(result=call.relay.result(repr(self.host)))
        finally:
            if call.stream is not None:
                await _close(call.stream)
            if call.relay.task_id and not call.relay.over:
                await self._cancel(call.relay.task_id)

    async def _frames(
        self, call: _Call, request: a2a.SendMessageRequest
    ) -> AsyncGenerator[handler_pb2.HandleResponse, None]:
        """The task's frames until it is over, across dropped streams; the agent's own
        protocol errors (A2AError) pass through, transport ones become Unreachable."""
        from a2a.client.errors import A2AClientError, A2AClientTimeoutError

        call.stream = call.link.client.send_message(
            request, context=self._context(call.left, call.extensions)
        )
        while True:
            # Bounded by the call's deadline (gRPC) or each read's timeout (HTTP),
            # and by the caller's own timeout around the whole exchange: a
            # timeout context here would be open across the yields.
            try:
                async for response in call.stream:
                    for frame in call.relay.take(response):
                        yield frame
                    if call.relay.over:
                        break
                if not call.relay.over and call.relay.task_id:
                    # Ended without a final state: what it is now says how it ended.
                    await self._settle(call)
                return
            except A2AClientTimeoutError:
                raise TimeoutError from None
            except A2AClientError as exc:
                failure = exc
            # Outside the handler: what resuming raises is mapped like the rest.
            try:
                await self._recover(call, request, failure)
            except A2AClientTimeoutError:
                raise TimeoutError from None
            except A2AClientError as exc:
                raise self._failure(exc) from None

    async def _recover(
        self, call: _Call, request: a2a.SendMessageRequest, exc: A2AClientError
    ) -> None:
        """After the stream failed: send again, resume, or raise Unreachable."""
        if call.stream is not None:
            await _close(call.stream)
        transport = _transport_failure(exc)
        if transport and not call.relay.answered and not call.retried:
            # Nothing came back: the connection was gone before the agent had
            # the message (an agent that restarted). Once, afresh.
            call.retried = True
            await self._forget(call.link)
            call.link = await self._fresh(call.left)
            call.stream = call.link.client.send_message(
                request, context=self._context(call.left, call.extensions)
            )
            return
        if not transport or not call.relay.task_id:
            await self._forget(call.link)
            raise self._failure(exc) from None
        log.info(
            "A2A agent stream dropped; resuming the task",
            extra={"agent": self.host, "task": call.relay.task_id},
        )
        await self._resume(call)

    async def _resume(self, call: _Call) -> None:
        """SubscribeToTask on a fresh client, until it answers or the window closes."""
        from a2a.client.errors import A2AClientError

        await self._forget(call.link)
        window_ends = min(call.deadline, time.monotonic() + RESUME_WINDOW_S)
        backoff = Backoff(*RESUME_BACKOFF_S)
        while True:
            try:
                call.link = await self._fresh(_left(window_ends))
                stream = call.link.client.subscribe(
                    a2a.SubscribeToTaskRequest(id=call.relay.task_id),
                    context=self._context(call.left),
                )
                first = await anext(aiter(stream))
            except UnsupportedOperationError:
                # Ended while away (a finished task cannot be subscribed to): read it.
                await self._settle(call)
                call.stream = _nothing()
                return
            except (A2AClientError, Unreachable, TimeoutError) as exc:
                if isinstance(exc, A2AClientError) and not _transport_failure(exc):
                    raise
                if time.monotonic() + backoff.next_s >= window_ends:
                    raise Unreachable(
                        f"A2A agent at {self.host!r} went away mid-task and did not come back "
                        f"within {RESUME_WINDOW_S:g} s"
                    ) from None
                await backoff.wait()
                continue
            call.stream = _prepend(first, stream)
            return

    async def _settle(self, call: _Call) -> None:
        task = await call.link.client.get_task(
            a2a.GetTaskRequest(id=call.relay.task_id), context=self._context(call.left)
        )
        call.relay.take(a2a.StreamResponse(task=task))

    async def _cancel(self, task_id: str) -> None:
        """CancelTask, shielded from a second cancellation and bounded; never raises."""

        async def cancel() -> None:
            link = await self._fresh(CANCEL_TIMEOUT_S)
            await link.client.cancel_task(
                a2a.CancelTaskRequest(id=task_id), context=self._context(CANCEL_TIMEOUT_S)
            )

        try:
            async with asyncio.timeout(CANCEL_TIMEOUT_S):
                await asyncio.shield(cancel())
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - best effort, see below
            # The task may have ended meanwhile, or the agent be away: it is not ours to wait for.
            log.info("A2A task not cancelled", extra={"agent": self.host, "task": task_id})

    async def close(self) -> None:
        async with self._lock:
            self._closed = True
            link, self._link = self._link, None
        if link is not None:
            await link.close()


@dataclass
class _Call:
    """One exchange in flight: the client it uses now, its stream, what it relayed."""

    link: _Link
    deadline: float
    #: The extensions the message uses (named in each send's ``a2a-extensions``).
    extensions: tuple[str, ...] = ()
    relay: _Relay = field(default_factory=_Relay)
    stream: AsyncIterator[a2a.StreamResponse] | None = None
    retried: bool = False

    @property
    def left(self) -> float:
        return _left(self.deadline)


def _request(
    text: str,
    message_id: str,
    previous: PreviousTask | None,
    metadata: Mapping[str, Any] | None,
    files: Sequence[a2a.Part] = (),
) -> a2a.SendMessageRequest:
    # A message of files alone has no text part: an empty one would be a part of nothing.
    texts = [a2a.Part(text=text)] if text or not files else []
    message = a2a.Message(
        message_id=message_id or uuid.uuid4().hex, role=a2a.ROLE_USER, parts=[*texts, *files]
    )
    if previous is not None:
        message.context_id = previous.context_id
        if previous.state == "input-required" and previous.task_id:
            message.task_id = previous.task_id
    request = a2a.SendMessageRequest(message=message)
    if metadata:
        request.metadata.update(dict(metadata))
    return request


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


async def _close(stream: AsyncIterator[Any]) -> None:
    """End the SDK's stream now (its call with it), not at garbage collection."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def _prepend(
    first: a2a.StreamResponse, rest: AsyncIterator[a2a.StreamResponse]
) -> AsyncIterator[a2a.StreamResponse]:
    yield first
    async for item in rest:
        yield item


async def _nothing() -> AsyncIterator[a2a.StreamResponse]:
    return
    yield  # pragma: no cover - makes this an async generator


# -- the hub's connector --------------------------------------------------------------------


class A2AAgentConnector:
    """``Connector`` for an integration of kind INTEGRATION_KIND_A2A_AGENT.

    One tool, ``send_message``: ``input`` is sent as a user message (a new
    task each call; its ``message_id`` the call's idempotency key when it has
    one), the result's text is the answer, its structured content the task's
    id, context and state.
    """

    def __init__(self, agent: A2AAgent) -> None:
        self._agent = agent

    async def probe(self, timeout_s: float) -> None:
        await self._agent.probe(timeout_s)

    async def list_tools(self, timeout_s: float) -> list[ToolSpec]:
        card = await self._agent.card(timeout_s)
        skills = "; ".join(s.name or s.id for s in card.skills)
        description = card.description + (f" (skills: {skills})" if skills else "")
        return [
            ToolSpec(
                name=TOOL_NAME,
                description=description.strip(),
                input_schema={
                    "type": "object",
                    "properties": {"input": {"type": "string"}},
                    "required": ["input"],
                },
                title=card.name,
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
        if name != TOOL_NAME:
            raise ToolNotFound(f"an A2A agent offers one tool, {TOOL_NAME!r}")
        text = arguments.get("input")
        if not isinstance(text, str):
            return ToolResult(text="input must be a string", is_error=True)
        deadline = time.monotonic() + timeout_s
        size = 0
        # The key is the message id: an agent that dedupes by it sees a call
        # sent again as one (A2A names the message id for that).
        frames = self._agent.exchange(text, deadline=deadline, message_id=idempotency_key)
        try:
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    kind = frame.WhichOneof("frame")
                    if kind == "delta":
                        size += len(frame.delta.text.encode())
                        if size > max_result_bytes:
                            raise ResultTooLarge(
                                f"the agent's answer exceeded {max_result_bytes} bytes"
                            )
                    elif kind == "progress" and progress is not None:
                        await progress(0.0, None, frame.progress.stage)
                    elif kind == "result":
                        return _tool_result(frame.result)
        except AgentFailed as failed:
            return ToolResult(text=str(failed), is_error=True)
        raise Unreachable("the agent ended without a result")  # pragma: no cover

    async def close(self) -> None:
        await self._agent.close()


def _tool_result(result: handler_pb2.HandleResult) -> ToolResult:
    text = "".join(p.text for p in result.parts if p.WhichOneof("part") == "text")
    structured: dict[str, Any] = {"finish_reason": result.finish_reason}
    for part in result.parts:
        if part.WhichOneof("part") == "data" and TASK_KEY in part.data.fields:
            structured.update(structs.message_dict(part.data))
    files = tuple(
        part.file
        for part in result.parts
        if part.WhichOneof("part") == "file" and (part.file.inline_data or part.file.uri)
    )
    return ToolResult(text=text, structured=structured, files=files)
