"""Files and uploads as the contract shows them, and their events."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.files.store import FileRecord, UploadRecord
from switchboard.context.mapping import struct, timestamp
from switchboard.platform.values.names import etag_of
from switchboard.platform.values.resources import FileName, UploadName, WorkspaceName

if TYPE_CHECKING:
    from typing import TypeAlias

    _Change: TypeAlias = events_pb2.ChangeKind.ValueType

KINDS: Final[dict[pb.FileKind.ValueType, str]] = {
    pb.FILE_KIND_IMAGE: "image",
    pb.FILE_KIND_DOCUMENT: "document",
    pb.FILE_KIND_AUDIO: "audio",
    pb.FILE_KIND_OTHER: "other",
}
_KIND_PROTOS: Final = {name: value for value, name in KINDS.items()}
TEXT_STATES: Final[dict[pb.FileTextState.ValueType, str]] = {
    pb.FILE_TEXT_STATE_NONE: "none",
    pb.FILE_TEXT_STATE_PENDING: "pending",
    pb.FILE_TEXT_STATE_READY: "ready",
    pb.FILE_TEXT_STATE_FAILED: "failed",
}
_TEXT_STATE_PROTOS: Final = {name: value for value, name in TEXT_STATES.items()}


def file_proto(row: FileRecord, *, full: bool = False) -> pb.File:
    return pb.File(
        name=str(FileName(row.workspace_id, row.id)),
        display_name=row.display_name,
        media_type=row.media_type,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        kind=_KIND_PROTOS.get(row.kind, pb.FILE_KIND_OTHER),
        text_state=_TEXT_STATE_PROTOS.get(row.text_state, pb.FILE_TEXT_STATE_NONE),
        text=row.text if full else "",
        text_token_count=row.text_tokens,
        text_error=row.text_error,
        metadata=struct(row.meta),
        creator=row.creator,
        create_time=timestamp(row.created_at),
        source_uri=row.source_uri,
        etag=etag_of(row.version),
    )


def upload_proto(row: UploadRecord) -> pb.Upload:
    return pb.Upload(
        name=str(UploadName(row.workspace_id, row.id)),
        display_name=row.display_name,
        media_type=row.media_type,
        size_bytes=row.size_bytes,
        committed_size=row.committed_size,
        expire_time=timestamp(row.expires_at),
        create_time=timestamp(row.created_at),
        creator=row.creator,
        metadata=struct(row.meta),
    )


def file_event(actor: events_pb2.Actor, change: _Change, row: FileRecord) -> events_pb2.Event:
    """A FILE_CHANGED event on the file's workspace; ``actor`` is who changed it
    (``users/u``, ``handlers/h``, or "system" for the service's own work)."""
    return events_pb2.Event(
        type=events_pb2.EVENT_TYPE_FILE_CHANGED,
        actor=actor,
        workspace=str(WorkspaceName(row.workspace_id)),
        file_changed=events_pb2.FileChanged(change=change, file=file_proto(row)),
    )
