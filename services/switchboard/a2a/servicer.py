"""Transport for ``lf.a2a.v1.A2AService``: converts proto to domain calls and nothing else.

The messages and the service come from the official ``a2a-sdk`` (``a2a.types``),
pinned in pyproject.toml: the contract is A2A's, not ours. Push notification
configs are per-task webhooks (``push/``).

A request without a ``tenant`` is for the deployment's root agent
(``SWITCHBOARD_A2A_ROOT_AGENT``), the one the root Agent Card serves, if it names
one. Every error goes back in A2A's terms (``errors.in_a2a_terms``): the
Switchboard fields the front door filled in from the caller's are named by those.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Final, Protocol

from google.protobuf import empty_pb2
from google.protobuf.message import Message
from grpc import aio

from a2a.types import a2a_pb2 as a2a
from a2a.types import a2a_pb2_grpc
from switchboard.a2a import errors, mapping
from switchboard.a2a.card.public import forwarded
from switchboard.a2a.frontdoor import FrontDoor
from switchboard.platform.errors import (
    FieldViolation,
    InvalidArgument,
    SwitchboardError,
)
from switchboard.platform.rpc.registration import check_json
from switchboard.platform.security.authn import current_principal

SERVICE = a2a.DESCRIPTOR.services_by_name["A2AService"]

Context = aio.ServicerContext[object, object]

#: The Switchboard request fields each method fills in from the caller's, by the A2A
#: field they came from ("" for what the caller never sent: a run's cancel reason).
_TASK: Final = {"name": "id", "reason": "", "after_sequence": mapping.AFTER_HEADER}
_PUSH: Final = {"name": "task_id"}
_RENAMES: Final[dict[str, Mapping[str, str]]] = {
    "GetTask": _TASK,
    "CancelTask": _TASK,
    "SubscribeToTask": _TASK,
    "GetExtendedAgentCard": {"name": "tenant"},
    "CreateTaskPushNotificationConfig": _PUSH,
    "GetTaskPushNotificationConfig": _PUSH,
    "ListTaskPushNotificationConfigs": _PUSH,
    "DeleteTaskPushNotificationConfig": _PUSH,
}


class _Tenanted(Protocol):
    tenant: str


def _send_renames(request: a2a.SendMessageRequest) -> Mapping[str, str]:
    """A message becomes a conversation (if new), then SendMessage; a message on a task
    SubmitToolApprovals (its decisions in the data part) or SteerRun (a working task)."""
    data = [i for i, part in enumerate(request.message.parts) if part.HasField("data")]
    return {
        "request_id": "message.message_id",
        "conversation": "message.context_id",
        "parent": "tenant",
        "assistant": "tenant",
        "parameters": "metadata",
        "name": "message.task_id",
        # SteerRun, for a message on a working task.
        "run": "message.task_id",
        "approvals": f"message.parts[{data[0]}].data.approvals" if data else "message.parts",
        "handler": "",
        "timeout": "",
        "concurrency_policy": "",
    }


def _list_renames(request: a2a.ListTasksRequest) -> Mapping[str, str]:
    return {
        "parent": "context_id" if request.context_id else "tenant",
        "assistant": "tenant",
        "states": "status",
        "state_changed_after": "status_timestamp_after",
    }


def _resume_after(metadata: Iterable[tuple[str, str | bytes]]) -> mapping.Cursor | None:
    """The cursor the resume extension continues after; None when not asked for.

    It applies when the client activates the extension (``a2a-extensions``)
    and names a sequence; a sequence without the activation is ignored, as
    A2A says of an extension's parameters.
    """
    activated, value = False, None
    for key, raw in metadata:
        text = raw if isinstance(raw, str) else ""
        if key == mapping.EXTENSIONS_HEADER:
            activated |= mapping.RESUME_EXTENSION in (part.strip() for part in text.split(","))
        elif key == mapping.AFTER_HEADER:
            value = text.strip()
    if not activated or value is None:
        return None
    cursor = mapping.parse_cursor(value)
    if cursor is None:
        description = "must be the sequence of an event the stream sent (N or N.1)"
        raise InvalidArgument(
            f"{mapping.AFTER_HEADER} {description}",
            [FieldViolation(mapping.AFTER_HEADER, description)],
        )
    return cursor


@contextlib.contextmanager
def _a2a(
    context: Context,
    method: str,
    request: Message,
    *,
    names_task: bool = False,
    renames: Mapping[str, str] | None = None,
) -> Iterator[None]:
    """A2A's reason on every error the call raises, in the A2A request's terms
    (``errors.py``), and its version checked."""
    try:
        for key, value in context.invocation_metadata() or ():
            if key == errors.VERSION_HEADER and isinstance(value, str):
                errors.check_version(value)
        # Here, not at registration: a refusal named in the A2A request's terms.
        check_json(request)
        yield
    except SwitchboardError as error:
        fields = {field.name for field in request.DESCRIPTOR.fields} | {mapping.AFTER_HEADER}
        if renames is None:
            renames = _RENAMES.get(method, {})
        named = errors.in_a2a_terms(error, renames, fields)
        raise errors.tagged(named, method, names_task=names_task) from None


class A2AServiceServicer(a2a_pb2_grpc.A2AServiceServicer):
    def __init__(self, front_door: FrontDoor, root_agent: str = "") -> None:
        self._front_door = front_door
        #: The tenant of a request that names none (``SWITCHBOARD_A2A_ROOT_AGENT``).
        self._root = root_agent

    def _tenanted(self, request: _Tenanted) -> None:
        if not request.tenant:
            request.tenant = self._root

    async def SendMessage(
        self, request: a2a.SendMessageRequest, context: Context
    ) -> a2a.SendMessageResponse:
        self._tenanted(request)
        with _a2a(
            context,
            "SendMessage",
            request,
            names_task=bool(request.message.task_id),
            renames=_send_renames(request),
        ):
            return await self._front_door.send(current_principal(), request)

    async def SendStreamingMessage(
        self, request: a2a.SendMessageRequest, context: Context
    ) -> AsyncIterator[a2a.StreamResponse]:
        self._tenanted(request)
        with _a2a(
            context,
            "SendStreamingMessage",
            request,
            names_task=bool(request.message.task_id),
            renames=_send_renames(request),
        ):
            async for response in self._front_door.stream(current_principal(), request):
                yield response

    async def GetTask(self, request: a2a.GetTaskRequest, context: Context) -> a2a.Task:
        self._tenanted(request)
        with _a2a(context, "GetTask", request, names_task=True):
            return await self._front_door.get(current_principal(), request)

    async def ListTasks(
        self, request: a2a.ListTasksRequest, context: Context
    ) -> a2a.ListTasksResponse:
        self._tenanted(request)
        with _a2a(context, "ListTasks", request, renames=_list_renames(request)):
            return await self._front_door.list(current_principal(), request)

    async def CancelTask(self, request: a2a.CancelTaskRequest, context: Context) -> a2a.Task:
        self._tenanted(request)
        with _a2a(context, "CancelTask", request, names_task=True):
            return await self._front_door.cancel(current_principal(), request)

    async def SubscribeToTask(
        self, request: a2a.SubscribeToTaskRequest, context: Context
    ) -> AsyncIterator[a2a.StreamResponse]:
        self._tenanted(request)
        with _a2a(context, "SubscribeToTask", request, names_task=True):
            after = _resume_after(context.invocation_metadata() or ())
            if after is not None:
                # A2A: the extensions a server applied are named back to the client.
                await context.send_initial_metadata(
                    ((mapping.EXTENSIONS_HEADER, mapping.RESUME_EXTENSION),)
                )
            async for response in self._front_door.subscribe(current_principal(), request, after):
                yield response

    async def GetExtendedAgentCard(
        self, request: a2a.GetExtendedAgentCardRequest, context: Context
    ) -> a2a.AgentCard:
        self._tenanted(request)
        with _a2a(context, "GetExtendedAgentCard", request):
            via = forwarded(context.invocation_metadata() or ())
            return await self._front_door.card(current_principal(), request.tenant, via)

    async def CreateTaskPushNotificationConfig(
        self, request: a2a.TaskPushNotificationConfig, context: Context
    ) -> a2a.TaskPushNotificationConfig:
        self._tenanted(request)
        with _a2a(context, "CreateTaskPushNotificationConfig", request, names_task=True):
            return await self._front_door.push.create(current_principal(), request)

    async def GetTaskPushNotificationConfig(
        self, request: a2a.GetTaskPushNotificationConfigRequest, context: Context
    ) -> a2a.TaskPushNotificationConfig:
        self._tenanted(request)
        with _a2a(context, "GetTaskPushNotificationConfig", request, names_task=True):
            return await self._front_door.push.get(current_principal(), request)

    async def ListTaskPushNotificationConfigs(
        self, request: a2a.ListTaskPushNotificationConfigsRequest, context: Context
    ) -> a2a.ListTaskPushNotificationConfigsResponse:
        self._tenanted(request)
        with _a2a(context, "ListTaskPushNotificationConfigs", request, names_task=True):
            return await self._front_door.push.list(current_principal(), request)

    async def DeleteTaskPushNotificationConfig(
        self, request: a2a.DeleteTaskPushNotificationConfigRequest, context: Context
    ) -> empty_pb2.Empty:
        self._tenanted(request)
        with _a2a(context, "DeleteTaskPushNotificationConfig", request, names_task=True):
            await self._front_door.push.delete(current_principal(), request)
            return empty_pb2.Empty()
