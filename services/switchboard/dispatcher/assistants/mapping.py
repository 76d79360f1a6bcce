"""An assistant's record as the contract shows it.

As ``pb.Assistant``, and as the ASSISTANT_CHANGED event of a change to it.
"""

from __future__ import annotations

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher import mapping
from switchboard.dispatcher.assistants.store import (
    CREATED,
    ROLLED_BACK,
    AssistantRecord,
    RevisionRecord,
)
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import names
from switchboard.platform.values.resources import AssistantName


def message(record: AssistantRecord) -> pb.Assistant:
    shown = pb.Assistant.FromString(record.data)
    shown.name = str(AssistantName(record.workspace_id, record.id))
    shown.workspace_default = record.is_default
    shown.etag = names.etag_of(record.version)
    shown.create_time.FromDatetime(record.created_at)
    shown.update_time.FromDatetime(record.updated_at)
    shown.revision = record.revision
    return shown


def at_revision(current: pb.Assistant, revision: RevisionRecord) -> pb.Assistant:
    """The assistant (``current``, as ``message`` shows it) as ``revision`` configured
    it: no etag (an earlier revision is not updated; RollbackAssistant makes it
    current), the revision's time as its update."""
    if revision.revision == current.revision:
        return current
    settings = pb.Assistant.FromString(revision.data)
    settings.name = current.name
    settings.workspace_default = current.workspace_default
    settings.create_time.CopyFrom(current.create_time)
    settings.update_time.FromDatetime(revision.created_at)
    settings.revision = revision.revision
    return settings


_ORIGINS = {
    CREATED: pb.ASSISTANT_REVISION_ORIGIN_CREATED,
    ROLLED_BACK: pb.ASSISTANT_REVISION_ORIGIN_ROLLED_BACK,
}


def revision(
    name: AssistantName, current: pb.Assistant, kept: RevisionRecord
) -> pb.AssistantRevision:
    """Kept revision ``kept`` of the assistant ``name`` (``current`` as it is now)."""
    shown = pb.AssistantRevision(
        name=name.revision(kept.revision),
        revision=kept.revision,
        author=kept.author,
        origin=_ORIGINS.get(kept.origin, pb.ASSISTANT_REVISION_ORIGIN_UPDATED),
        restored_revision=kept.restored,
        assistant=at_revision(current, kept),
    )
    shown.create_time.FromDatetime(kept.created_at)
    return shown


def event(
    principal: Principal, change: events_pb2.ChangeKind.ValueType, record: AssistantRecord
) -> events_pb2.Event:
    return events_pb2.Event(
        type=events_pb2.EVENT_TYPE_ASSISTANT_CHANGED,
        actor=mapping.actor(principal),
        workspace=mapping.workspace_name(record.workspace_id),
        assistant_changed=events_pb2.AssistantChanged(change=change, assistant=message(record)),
    )
