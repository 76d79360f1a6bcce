"""Ids, the clock, resource names (AIP-122) and other client-chosen identifiers.

The one place that says what an id looks like (``new_id`` makes them, ``ID``
matches them), what time it is (``now``, always aware UTC), and every name
pattern with its matcher. Code reads and writes names through the typed values
of ``resources.py``, which wrap these patterns and ``match``.

Every pattern here is matched against the whole string (``fullmatch``):
``re.match`` with ``$`` also accepts a final newline, and ``workspaces/acme\\n``
must not be a name of ``workspaces/acme``. A malformed name is the caller's
mistake, so matching raises INVALID_ARGUMENT with a violation on the field
that held it.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
import time
from typing import Final, Protocol

from switchboard.platform.errors import FieldViolation, InvalidArgument

#: One segment's id: lower case, digits and dashes, as the services generate them.
ID: Final = r"[a-z0-9][a-z0-9-]{0,62}"


#: Random bytes read from the OS at once, per thread (256 ids).
_ID_BYTES: Final = 16
_RANDOM_CHUNK: Final = 256 * _ID_BYTES
_random = threading.local()


def _forget_random() -> None:
    global _random  # noqa: PLW0603 - a forked child must not reuse its parent's bytes
    _random = threading.local()


os.register_at_fork(after_in_child=_forget_random)


def new_id() -> str:
    """A fresh server-chosen id: 32 lower-case hex digits (128 random bits), within ``ID``.

    The bits are the OS's (``os.urandom``, as ``secrets`` uses), read 4 KiB at a
    time per thread: each read releases the interpreter lock, and a run makes
    dozens of ids (events, outbox rows) on threads that then wait to get it back.
    """
    buffer: bytes = getattr(_random, "buffer", b"")
    offset: int = getattr(_random, "offset", 0)
    if offset + _ID_BYTES > len(buffer):
        buffer, offset = os.urandom(_RANDOM_CHUNK), 0
        _random.buffer = buffer
    _random.offset = offset + _ID_BYTES
    return buffer[offset : offset + _ID_BYTES].hex()


def now() -> dt.datetime:
    """The current time, aware and in UTC: every stored and compared timestamp is."""
    return dt.datetime.now(dt.UTC)


class Stamp(Protocol):
    """A ``google.protobuf.Timestamp`` (without importing protobuf here)."""

    seconds: int
    nanos: int


def stamp_after(stamp: Stamp, after_ns: int) -> int:
    """Set ``stamp`` to now, or to ``after_ns`` if the clock reads earlier (a wall clock
    stepped back, another host's clock): a sequence of stamps never goes backwards.
    Returns the stamp in ns since the epoch, to the microsecond."""
    stamp_ns = max(time.time_ns() // 1000 * 1000, after_ns)  # inline: once per token
    stamp.seconds, stamp.nanos = divmod(stamp_ns, 1_000_000_000)
    return stamp_ns


def stamp_now(stamp: Stamp) -> None:
    """Set ``stamp`` to now, to the microsecond, as ``stamp.FromDatetime(now())`` does in
    five times the CPU: it runs twice for every streamed token (decisions 44)."""
    micros = time.time_ns() // 1000
    stamp.seconds, rest = divmod(micros, 1_000_000)
    stamp.nanos = rest * 1000


WORKSPACE: Final = re.compile(rf"workspaces/({ID})")
CONVERSATION: Final = re.compile(rf"workspaces/({ID})/conversations/({ID})")
MESSAGE: Final = re.compile(rf"workspaces/({ID})/conversations/({ID})/messages/({ID})")
RUN: Final = re.compile(rf"workspaces/({ID})/conversations/({ID})/runs/({ID})")
VOICE_SESSION: Final = re.compile(rf"workspaces/({ID})/conversations/({ID})/voiceSessions/({ID})")
MEMBER: Final = re.compile(rf"workspaces/({ID})/members/({ID})")
ASSISTANT: Final = re.compile(rf"workspaces/({ID})/assistants/({ID})")
INTEGRATION: Final = re.compile(rf"workspaces/({ID})/integrations/({ID})")
BUDGET: Final = re.compile(rf"workspaces/({ID})/budgets/({ID})")
FILE: Final = re.compile(rf"workspaces/({ID})/files/({ID})")
UPLOAD: Final = re.compile(rf"workspaces/({ID})/uploads/({ID})")
#: A workspace's quotas: a singleton under it (AIP-156).
WORKSPACE_QUOTA: Final = re.compile(rf"workspaces/({ID})/quota")
#: A workspace's semantic index settings: a singleton under it.
SEMANTIC_INDEX: Final = re.compile(rf"workspaces/({ID})/semanticIndex")
#: A tool name as the MCP specification (2025-11-25) says it should be: 1-128 ASCII
#: letters, digits, ``_``, ``-`` and ``.``, case-sensitive.
TOOL_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,128}")
#: A tool's segment in a resource name: its name with every UTF-8 byte outside the
#: MCP set (``~`` included) written ``~XX`` (upper-case hex), 1-128 such units; a
#: name that follows the specification is its own segment (``tool_segment``).
TOOL_SEGMENT: Final = re.compile(r"(?:[A-Za-z0-9_.-]|~[0-9A-F]{2}){1,128}")
TOOL: Final = re.compile(rf"workspaces/({ID})/integrations/({ID})/tools/({TOOL_SEGMENT.pattern})")
USER: Final = re.compile(rf"users/({ID})")
SESSION: Final = re.compile(rf"users/({ID})/sessions/({ID})")
DATA_EXPORT: Final = re.compile(rf"users/({ID})/exports/({ID})")
API_KEY: Final = re.compile(rf"users/({ID})/apiKeys/({ID})")
#: Where memory lives: a user, a workspace or a conversation.
MEMORY_SCOPE: Final = re.compile(rf"(users/{ID}|workspaces/{ID}(?:/conversations/{ID})?)")
MEMORY_ITEM: Final = re.compile(
    rf"(users/{ID}|workspaces/{ID}(?:/conversations/{ID})?)/memories/({ID})"
)
#: Any name under a workspace or a user (the owner is the first segment pair); a
#: tool's name ends in its segment, and a singleton (the quota, the semantic index)
#: in its own word.
UNDER_WORKSPACE: Final = re.compile(
    rf"workspaces/({ID})(?:/[A-Za-z]+/{ID})*(?:/tools/{TOOL_SEGMENT.pattern}|/quota|/semanticIndex)?"
)
UNDER_USER: Final = re.compile(rf"users/({ID})(?:/[A-Za-z]+/{ID})*")


class IdRule:
    """What an id a client or an operator chooses may be, built from its bounds: the
    pattern the server matches and the same rule in words, which every refusal says
    (a regular expression is not an explanation). The console's hints and input
    patterns come from the same bounds (clients/web/src/idrules.json, checked against
    ``CHOSEN_IDS`` by tests/platform/values/test_id_rules.py), as do the contracts' comments."""

    __slots__ = ("longest", "must", "regex", "shortest", "words")

    def __init__(self, shortest: int, longest: int = 63) -> None:
        self.shortest: Final = shortest
        self.longest: Final = longest
        self.regex: Final = re.compile(rf"[a-z][a-z0-9-]{{{shortest - 1},{longest - 1}}}")
        #: The rule in words, e.g. "3 to 63 characters: lowercase letters, digits and
        #: hyphens, starting with a letter".
        self.words: Final = (
            f"{shortest} to {longest} characters: lowercase letters, digits and hyphens, "
            "starting with a letter"
        )
        #: What a refusal says after the field's name.
        self.must: Final = f"must be {self.words}"


#: An id a client may choose for a resource it creates (assistants, integrations) or
#: that an operator names (handlers, stdio servers): 2 to 63 characters.
CLIENT_ID_RULE: Final = IdRule(2)
CLIENT_ID: Final = CLIENT_ID_RULE.regex
#: A client-chosen workspace id: as ``CLIENT_ID``, at least three characters.
WORKSPACE_ID_RULE: Final = IdRule(3)
WORKSPACE_ID: Final = WORKSPACE_ID_RULE.regex
#: A client-chosen memory item id: 3 to 32 characters (the id column's width).
MEMORY_ID_RULE: Final = IdRule(3, 32)
#: Every id a client chooses, by the request field that carries it.
CHOSEN_IDS: Final = {
    "workspace_id": WORKSPACE_ID_RULE,
    "memory_item_id": MEMORY_ID_RULE,
    "assistant_id": CLIENT_ID_RULE,
    "integration_id": CLIENT_ID_RULE,
}
#: A client's label that the server echoes back (``x-request-id``, a subscription id).
CLIENT_LABEL: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
#: A client-chosen idempotency key (``request_id`` fields): 1-64 ASCII letters,
#: digits, ``-`` or ``_``. The proto comments of every ``request_id`` say the same.
REQUEST_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: An etag we issued: ``"N"`` or ``W/"N"`` with N a version counter (quotes optional).
ETAG: Final = re.compile(r'(?:W/)?"?([0-9]{1,18})"?')


_TOOL_BYTE: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def tool_segment(name: str) -> str | None:
    """The resource-name segment of the tool an integration calls ``name``; None
    when it has none (empty, more than 128 UTF-8 bytes, or not text).

    Reversible (``tool_from_segment``): MCP servers may use names the
    specification only advises against (spaces, ``/``, other scripts), and each
    must still be callable under exactly one name.
    """
    try:
        data = name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON allows it, UTF-8 does not
        return None
    if not 0 < len(data) <= 128:
        return None
    return "".join(chr(byte) if byte in _TOOL_BYTE else f"~{byte:02X}" for byte in data)


def tool_from_segment(segment: str) -> str | None:
    """The tool name ``segment`` stands for; None unless it is a segment
    ``tool_segment`` writes (so each name has one segment, and back)."""
    if not TOOL_SEGMENT.fullmatch(segment):
        return None
    data = bytearray()
    index = 0
    while index < len(segment):
        if segment[index] == "~":
            data.append(int(segment[index + 1 : index + 3], 16))
            index += 3
        else:
            data.append(ord(segment[index]))
            index += 1
    try:
        name = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name if tool_segment(name) == segment else None


#: The ids of a name (``ID``) in words, for a refusal that shows the name's form.
ID_WORDS: Final = "ids: lowercase letters, digits and hyphens"


def match(pattern: re.Pattern[str], value: str, field: str, form: str) -> re.Match[str]:
    """``pattern``'s match of the whole of ``value``, or INVALID_ARGUMENT naming ``field``
    and ``form``, the pattern as a person reads it (``workspaces/{workspace}``)."""
    found = pattern.fullmatch(value)
    if found is None:
        raise invalid_name(value, field, form)
    return found


def name_refusal(value: str, form: str) -> str:
    """What a field holding ``value`` is told when it must be a name of ``form``.

    The form is said, as every other field's refusal says what it must be: "not a
    valid resource name" alone left a caller guessing which name, and how written.
    """
    if not value:
        return "is required"
    return f"must be a resource name of the form {form} ({ID_WORDS})"


def invalid_name(value: str, field: str, form: str) -> InvalidArgument:
    """The refusal of ``value`` in ``field``, which is no name of ``form``."""
    description = name_refusal(value, form)
    return InvalidArgument(f"{field} {description}", [FieldViolation(field, description)])


def etag_version(etag: str) -> int | None:
    """The version an etag we issued names; None for anything else.

    ASCII digits only and at most 18 of them: ``str.isdigit`` also accepts
    superscripts that ``int`` rejects, and a longer number overflows a column.
    """
    found = ETAG.fullmatch(etag)
    return int(found.group(1)) if found else None


def checked_etag(etag: str, field: str) -> str:
    """``etag`` if it is empty or one we issued (``"N"`` or ``W/"N"``); else INVALID_ARGUMENT."""
    if etag and etag_version(etag) is None:
        raise InvalidArgument(f"{field} is malformed", [FieldViolation(field, "is malformed")])
    return etag


def etag_of(version: int) -> str:
    """The etag of a resource at ``version``."""
    return f'"{version}"'


#: The highest revision number (Assistant.revision) anything may name: the columns that
#: hold one are 32-bit integers on every backend.
MAX_REVISION: Final = 2**31 - 1


def is_revision(number: int) -> bool:
    """Whether ``number`` can name a revision (1 to ``MAX_REVISION``)."""
    return 0 < number <= MAX_REVISION
