"""The dispatcher's resource names, and its messages and events built from what it holds.

Like every service's ``mapping.py``: the stages decide, this module spells the
result as the contract shows it (a run's updates as RUN_UPDATED events, a
handler as ``pb.Handler``, a refusal as ``google.rpc.Status``); an assistant's
record is spelled in its own room (``assistants/mapping.py``).
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Final

from google.rpc import status_pb2

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher.handlers.base import Handler
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.rpc.status import to_status_proto
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import names
from switchboard.platform.values.resources import (
    AssistantName,
    ConversationName,
    HandlerName,
    WorkspaceName,
)

# The names below as text, for the callers that have not moved to the typed values.


def workspace_name(workspace_id: str) -> str:
    return str(WorkspaceName(workspace_id))


def conversation_name(workspace_id: str, conversation_id: str) -> str:
    return str(ConversationName(workspace_id, conversation_id))


def handler_name(handler_id: str) -> str:
    return str(HandlerName(handler_id))


def assistant_name(workspace_id: str, assistant_id: str) -> str:
    return str(AssistantName(workspace_id, assistant_id))


@functools.lru_cache(maxsize=1024)
def _event_names(workspace_id: str, conversation_id: str) -> tuple[str, str]:
    """A run's workspace and conversation names, written once per conversation rather
    than for each of the events a streamed token makes."""
    conversation = ConversationName(workspace_id, conversation_id)
    return str(conversation.parent), str(conversation)


def actor(principal: Principal) -> events_pb2.Actor:
    return events_pb2.Actor(
        name=principal.user_name,
        credential=principal.session_name or principal.api_key_name,
    )


def error_status(error: SwitchboardError) -> status_pb2.Status:
    return to_status_proto(error, "")


def run_event(workspace_id: str, conversation_id: str, update: pb.RunUpdate) -> events_pb2.Event:
    """``update`` as the RUN_UPDATED event on its workspace and conversation."""
    workspace, conversation = _event_names(workspace_id, conversation_id)
    event = events_pb2.Event(
        type=events_pb2.EVENT_TYPE_RUN_UPDATED, workspace=workspace, conversation=conversation
    )
    # Set in place: an ``Actor`` passed in is built, then copied (a streamed token
    # makes one of these; in place is about two thirds of the CPU, measured).
    event.actor.name = "system"
    event.run_updated.update.CopyFrom(update)
    return event


def snapshot(run: pb.Run, *, not_after_ns: int | None = None) -> pb.RunUpdate:
    """A state change carrying the whole run, at the run's own ``last_sequence``.

    Stamped when the run reached the state it carries (its latest of create, start
    and end), not when it was read: a replica that does not own the run sends this
    before the owner's later updates, which were stamped earlier than the read
    (the console showed "-50 ms" in the mesh). ``not_after_ns``: the stamp of the
    update the watcher gets next, which the snapshot must not pass.
    """
    update = pb.RunUpdate(run=run.name, sequence=run.last_sequence)
    stamp = state_time_ns(run)
    if not_after_ns is not None:
        stamp = min(stamp, not_after_ns)
    update.time.seconds, update.time.nanos = divmod(stamp, 1_000_000_000)
    update.state_change.run.CopyFrom(run)
    return update


def state_time(run: pb.Run) -> dt.datetime:
    """When the run's state last changed: its end, else its start, else its creation.

    The run store keeps it in a column that ListRuns filters and orders by, and a
    snapshot is stamped with it, so both read this one definition."""
    for field in ("end_time", "start_time", "create_time"):
        if run.HasField(field):
            stamp: dt.datetime = getattr(run, field).ToDatetime(dt.UTC)
            return stamp
    return names.now()


def state_time_ns(run: pb.Run) -> int:
    """``state_time`` in ns since the epoch."""
    return (state_time(run) - _EPOCH) // _MICROSECOND * 1000


_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND: Final = dt.timedelta(microseconds=1)


def filtered_event(
    principal: Principal,
    conversation: str,
    filter_name: str,
    reason: str,
    flags: list[str],
    run: str,
) -> events_pb2.Event:
    """The MESSAGE_FILTERED event: what a content filter refused (``reason``) or flagged."""
    workspace = conversation.split("/conversations/", maxsplit=1)[0]
    event = events_pb2.Event(
        type=events_pb2.EVENT_TYPE_MESSAGE_FILTERED,
        actor=actor(principal),
        user=principal.user_name,
        workspace=workspace,
        conversation=conversation,
    )
    payload = event.message_filtered
    payload.conversation = conversation
    payload.filter = filter_name
    payload.rejected = bool(reason)
    if reason:
        payload.reason = reason  # type: ignore[assignment]
    payload.flags.extend(flags)
    payload.run = run
    return event


def handler(found: Handler) -> pb.Handler:
    return pb.Handler(
        name=handler_name(found.capabilities.id),
        kind=found.kind,
        capabilities=found.capabilities,
        available=found.available(),
        # Set for a workspace's own experts (operator-level handlers have none).
        integration=getattr(found, "integration", ""),
    )
