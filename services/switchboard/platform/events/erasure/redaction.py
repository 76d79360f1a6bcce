"""Redacting the log for an erasure (docs/privacy.md).

An event *names* an erased person when its actor or user is them, or when its bytes
name them or a resource their erasure removed (a message, a run, a memory item, a
file): a message's MESSAGE_CREATED, a run's updates, a file's FILE_CHANGED. Such an
event keeps its place (id, cursor, type, time, workspace, conversation) and loses the
rest, with ``redacted`` set, so consumers' cursors and the log's order hold. A
SECURITY event is an audit record: it keeps its kind, session and key, and loses the
client's address and details. A MESSAGE_DELETED tombstone is kept as it is: it names
what went and holds none of its words.

This module does not import grpc.
"""

from __future__ import annotations

from collections.abc import Iterable

from switchboard.api.events.v1 import events_pb2


class Redaction:
    """What to redact for one erasure: ``match`` gives the redacted event, or None."""

    def __init__(self, user_id: str, names: Iterable[str], workspaces: Iterable[str] = ()) -> None:
        """``user_id`` "": no person, only ``names`` (a deleted message's redaction).
        ``workspaces``: only the events of those workspaces (a member's words erased
        there, RemoveWorkspaceMember with ``erase``); none: every event."""
        self.user = f"users/{user_id}" if user_id else ""
        self._workspaces = frozenset(f"workspaces/{w}" for w in workspaces)
        self._needles = [
            *([self.user.encode()] if self.user else []),
            *(name.encode() for name in names),
        ]

    def names(self, event: events_pb2.Event, data: bytes | None = None) -> bool:
        if self.user and self.user in (event.user, event.actor.name):
            return True
        raw = data if data is not None else event.SerializeToString()
        # ``users/u`` would also be found in ``users/u2``'s bytes: a name is followed by
        # a byte that cannot be in an id, or ends the field (checked on the text).
        return any(_holds(raw, needle) for needle in self._needles)

    def concerns(self, event: events_pb2.Event, data: bytes | None = None) -> bool:
        """Whether the event is in scope and names the person or what was removed."""
        if self._workspaces and event.workspace not in self._workspaces:
            return False
        return self.names(event, data)

    def match(self, event: events_pb2.Event, data: bytes | None = None) -> events_pb2.Event | None:
        if event.redacted or event.type in _KEPT or not self.concerns(event, data):
            return None
        if event.type == events_pb2.EVENT_TYPE_SECURITY:
            if not (event.security.client_address or event.security.HasField("client_info")):
                return None
            kept = events_pb2.Event()
            kept.CopyFrom(event)
            kept.security.client_address = ""
            kept.security.ClearField("client_info")
            return kept
        return redacted(event)


#: Events kept whole: a deletion's tombstone names what went and says nothing of it.
_KEPT = frozenset({events_pb2.EVENT_TYPE_MESSAGE_DELETED})


def redacted(event: events_pb2.Event) -> events_pb2.Event:
    """``event`` with only its place kept."""
    return events_pb2.Event(
        id=event.id,
        cursor=event.cursor,
        type=event.type,
        time=event.time,
        workspace=event.workspace,
        conversation=event.conversation,
        redacted=True,
    )


_ID_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def _holds(raw: bytes, needle: bytes) -> bool:
    start = raw.find(needle)
    while start >= 0:
        end = start + len(needle)
        if end == len(raw) or raw[end] not in _ID_BYTES:
            return True
        start = raw.find(needle, start + 1)
    return False
