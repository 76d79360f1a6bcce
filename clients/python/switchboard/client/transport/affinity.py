"""The routing header: the conversation a call is about, for the edge's consistent hash.

Envoy in front of several whole-run processes picks the process by a hash of
``switchboard-affinity`` (docs/operations.md, "Affinity at the edge"), so every call
about one conversation (its SendMessage, the WatchRun of its runs, a CancelRun, a
Talk) reaches the process where its runs live and need not be followed over Redis.
The servers never read the header: a call without it, or with a stale one, is
served the same, only with more work behind it.
"""

from __future__ import annotations

from typing import Final

from google.protobuf.message import Message

AFFINITY_HEADER: Final = "switchboard-affinity"
#: The fields whose value may be (or start with) a conversation's name: a send's
#: conversation, a run's, message's or voice session's name, a list's parent, a steer's run,
#: a regenerated answer.
_NAMED_BY: Final = frozenset({"conversation", "name", "run", "parent", "session", "message"})


def affinity(request: object) -> str:
    """``workspaces/{w}/conversations/{c}`` of what ``request`` names, or '' if none.

    ``request`` is a resource name or a request message: its own fields named above,
    else those of the message its oneof holds (a Converse action, a Talk start or
    resume). A run's name gives its conversation's.
    """
    if isinstance(request, str):
        parts = request.split("/", 4)
        shaped = len(parts) >= 4 and parts[0] == "workspaces" and parts[2] == "conversations"
        return "/".join(parts[:4]) if shaped and parts[1] and parts[3] else ""
    if not isinstance(request, Message):
        return ""
    for field, value in request.ListFields():
        named = field.name in _NAMED_BY and isinstance(value, str)
        held = field.containing_oneof is not None and isinstance(value, Message)
        if (named or held) and (key := affinity(value)):
            return key
    return ""


__all__ = ["AFFINITY_HEADER", "affinity"]
