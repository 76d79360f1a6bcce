"""Helpers for event tests: publish into a mesh, read frames with deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.platform.security.policy import Role
from tests.conftest import CALL_DEADLINE_S
from tests.kits.authkit import bearer, quick_user

# What read() returns once a stream has ended (not in the type stubs).
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009


def ws(workspace_id: str) -> events_pb2.Scope:
    return events_pb2.Scope(workspace=f"workspaces/{workspace_id}")


def conv(workspace_id: str, conversation_id: str) -> events_pb2.Scope:
    return events_pb2.Scope(
        conversation=f"workspaces/{workspace_id}/conversations/{conversation_id}"
    )


def user_scope(user_id: str) -> events_pb2.Scope:
    return events_pb2.Scope(user=f"users/{user_id}")


def workspace_event(
    workspace_id: str,
    conversation_id: str = "",
    kind: events_pb2.EventType.ValueType = events_pb2.EVENT_TYPE_CONVERSATION_CHANGED,
    note: str = "",
) -> events_pb2.Event:
    event = events_pb2.Event(type=kind, workspace=f"workspaces/{workspace_id}")
    if conversation_id:
        event.conversation = f"workspaces/{workspace_id}/conversations/{conversation_id}"
    event.actor.name = note or "system"
    return event


async def publish(mesh: Any, events: Sequence[events_pb2.Event]) -> list[events_pb2.Event]:
    """Publish in order, one after another; returns the stamped envelopes."""
    return [await mesh.shared.bus.publish(event) for event in events]


async def set_role(mesh: Any, workspace_id: str, user_id: str, role: Role) -> None:
    """``user_id``'s role in ``workspace_id`` changed as UpdateWorkspaceMember changes it:
    committed, then its MEMBER_CHANGED event published (which drops every process's
    cached memberships of the workspace, ``platform/security/membership.py``)."""
    await mesh.shared.memberships.set_member(workspace_id, user_id, role)
    changed = workspace_event(workspace_id, kind=events_pb2.EVENT_TYPE_MEMBER_CHANGED)
    changed.member_changed.change = events_pb2.CHANGE_KIND_UPDATED
    changed.member_changed.member.user = f"users/{user_id}"
    await publish(mesh, [changed])


async def member(mesh: Any, workspace_id: str, role: Role = Role.VIEWER) -> tuple[str, str]:
    """(user id, token) of a new user with ``role`` in ``workspace_id``.

    ``Role.OWNER`` creates the workspace; other roles need it to exist.
    """
    user_id, token = await quick_user(mesh)
    memberships = mesh.shared.memberships
    if role == Role.OWNER:
        await memberships.create_workspace(workspace_id, workspace_id, user_id)
    else:
        await memberships.set_member(workspace_id, user_id, role)
    return user_id, token


class Subscriber:
    """One Subscribe call: frames read with a deadline, events and cursors collected."""

    def __init__(
        self,
        channel: aio.Channel,
        token: str,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        **request: Any,
    ) -> None:
        """``metadata`` goes with the bearer token (a ``traceparent``, say)."""
        stub = events_pb2_grpc.EventServiceStub(channel)
        self.call: Any = stub.Subscribe(
            events_pb2.SubscribeRequest(**request), metadata=(*bearer(token), *metadata)
        )
        self.events: list[events_pb2.Event] = []
        self.cursor = ""
        self.frames = 0
        self.batches = 0
        self.heartbeats: list[events_pb2.Heartbeat] = []

    async def frame(self) -> events_pb2.SubscribeResponse:
        async with asyncio.timeout(CALL_DEADLINE_S):
            response: Any = await self.call.read()
        assert response is not _EOF, "the stream ended"
        self.frames += 1
        kind = response.WhichOneof("frame")
        if kind == "batch":
            self.batches += 1
            self.events.extend(response.batch.events)
            assert response.batch.cursor == response.batch.events[-1].cursor
            self.cursor = response.batch.cursor
        elif kind == "heartbeat":
            self.heartbeats.append(response.heartbeat)
            self.cursor = response.heartbeat.cursor
        return response  # type: ignore[no-any-return]

    async def live(self) -> str:
        """Wait for the first frame (a heartbeat: registered); returns its cursor."""
        first = await self.frame()
        assert first.WhichOneof("frame") == "heartbeat"
        return first.heartbeat.cursor

    async def until(self, count: int) -> list[events_pb2.Event]:
        """Read until at least ``count`` events arrived in total."""
        while len(self.events) < count:
            await self.frame()
        return self.events

    async def error(self) -> aio.AioRpcError:
        """Read until the stream fails; returns the error."""
        try:
            async with asyncio.timeout(CALL_DEADLINE_S):
                while True:
                    response: Any = await self.call.read()
                    assert response is not _EOF, "the stream ended without an error"
                    if response.WhichOneof("frame") == "batch":
                        self.events.extend(response.batch.events)
                        self.cursor = response.batch.cursor
        except aio.AioRpcError as exc:
            return exc
        raise AssertionError("unreachable")

    def cancel(self) -> None:
        self.call.cancel()


def ids(events: Sequence[events_pb2.Event]) -> list[str]:
    return [event.id for event in events]


class Commands:
    """A Stream call's client side, fed from the test; ``close`` half-closes it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[events_pb2.StreamRequest | None] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[events_pb2.StreamRequest]:
        while (item := await self.queue.get()) is not None:
            yield item

    def send(self, **frame: Any) -> None:
        self.queue.put_nowait(events_pb2.StreamRequest(**frame))

    def close(self) -> None:
        self.queue.put_nowait(None)


# -- a run's updates among events (docs/events.md, "Tokens") ------------------------------


def is_token(event: events_pb2.Event) -> bool:
    """A run's text delta: announced live, never in the log ListEvents reads."""
    return (
        event.type == events_pb2.EVENT_TYPE_RUN_UPDATED
        and event.run_updated.update.WhichOneof("update") == "delta"
    )


def run_updates(events: Iterable[events_pb2.Event], run: str) -> list[dispatcher_pb2.RunUpdate]:
    """The updates of ``run`` among ``events``, in their order."""
    return [
        e.run_updated.update
        for e in events
        if e.type == events_pb2.EVENT_TYPE_RUN_UPDATED and e.run_updated.update.run == run
    ]


def delta_text(updates: Iterable[dispatcher_pb2.RunUpdate]) -> str:
    """The text of the deltas among ``updates``, joined."""
    return "".join(u.delta.text for u in updates if u.WhichOneof("update") == "delta")


def unique(events: Iterable[events_pb2.Event]) -> list[events_pb2.Event]:
    """Events by id, the first of each (a consumer drops an id it has seen)."""
    seen: set[str] = set()
    kept = []
    for event in events:
        if event.id not in seen:
            seen.add(event.id)
            kept.append(event)
    return kept
