"""An assistant's record as the contract shows it.

As ``pb.Assistant``, and as the ASSISTANT_CHANGED event of a change to it.
"""

from __future__ import annotations

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.dispatcher import mapping
from switchboard.dispatcher.assistants.store import AssistantRecord
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
