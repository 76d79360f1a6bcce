"""Bounded JSON: the one way JSON from outside the process is read.

Python's ``json`` and everything that walks what it returns (protobuf's
``json_format``, ``Struct.update``, ``MessageToDict``, ``jsonschema``) recurse
once per level of nesting. A megabyte of ``[`` makes ``json.loads`` raise
``RecursionError``; a document that does parse 900 levels deep makes the next
walker raise it instead, wherever that is. Neither is an answer a caller can
use, so every document that comes from outside (an agent card, an MCP or A2A
message, a model's stream, a tool's result, an ID token) is measured
**before** anything recurses over it: its size, and its depth by a scan that
does not recurse (string contents are cut out and the brackets left are
summed, all in C, with no loop per token in Python). A document over either limit, or not JSON,
raises ``JsonRejected``, a ``ValueError`` whose text says which limit it broke
and never quotes the document; each caller maps it to its own status.

**Depth** counts open arrays and objects: ``1`` is 0 deep, ``[]`` 1,
``{"a": [1]}`` 2. ``MAX_DEPTH`` is 24 and is not a setting: what is accepted
ends up in protobuf ``Struct`` values, where one JSON level is up to three
message levels (the Struct, its map entry, the Value), and protobuf decoders
refuse messages nested deeper than 100 levels (upb, which the Python client
and this server use). The deepest Struct the API carries sits 12 messages
down (a tool call's arguments in a ``SubscribeResponse``), so 29 levels is
the most every client can still read back; 24 leaves room for envelopes yet
to come. ``check_value`` and ``check_message`` apply the same limit to values
already parsed by someone else (an SDK's pydantic models, a protobuf message
from a remote gRPC expert, whose own decoder allows about 33 levels).

**Streams** (a response body read piece by piece, server-sent events) are
measured as they arrive by ``StreamGauge``, line by line: a JSON string never
holds a raw line break, so whatever line a string starts on, it ends on.

This module imports nothing of the server's.
"""

from __future__ import annotations

import itertools
import json
from array import array
from collections.abc import Iterable
from typing import Any, Final, Literal

import orjson
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

#: Most levels of nesting accepted anywhere (see the module doc for why 24).
MAX_DEPTH: Final = 24

Problem = Literal["size", "depth", "syntax"]

# After strings are cut out, each bracket becomes a signed byte (+1 or -1) and
# everything else is deleted, so the running sum is the depth.
_SIGNS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_STRUCT: Final = struct_pb2.Struct.DESCRIPTOR.full_name
_LIST: Final = struct_pb2.ListValue.DESCRIPTOR.full_name


class JsonRejected(ValueError):
    """A document (or value) that is too large, nested too deep, or not JSON.

    ``str()`` is the reason in a few words ("nested deeper than 24 levels"),
    safe to show: it never quotes the document. ``problem`` says which check.
    """

    def __init__(self, problem: Problem, reason: str) -> None:
        super().__init__(reason)
        self.problem: Problem = problem
        self.reason = reason


def too_deep(max_depth: int) -> JsonRejected:
    return JsonRejected("depth", f"nested deeper than {max_depth} levels")


def too_large(max_bytes: int) -> JsonRejected:
    return JsonRejected("size", f"larger than {max_bytes} bytes")


def _over(data: str | bytes, max_bytes: int) -> bool:
    # A character is at most 4 bytes of UTF-8: most texts need no encoding to tell.
    if isinstance(data, str) and len(data) * 4 > max_bytes:
        return len(data.encode("utf-8", "surrogatepass")) > max_bytes
    return len(data) > max_bytes


def _outside_strings(data: bytes) -> tuple[bytes, bool]:
    """``data`` without the contents of its strings, and whether a string ran
    past the end of a line (a line whose string is not closed).

    With the two escapes that matter to quotes removed (``\\\\`` first, so
    ``\\\\"`` still ends a string), every quote left opens or closes a
    string, and splitting at quotes puts the strings at the odd places.
    Everything here runs in C: no regular expression, no loop per token.
    """
    if b'"' not in data:
        return data, False
    if b"\\" in data:
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    pieces = data.split(b'"')
    crossed = b"\n" in b"".join(pieces[1::2])
    return b"".join(pieces[::2]), crossed


def _signs(data: bytes) -> tuple[array[int], bool]:
    """The brackets outside strings as +1/-1 in order, and ``_outside_strings``' flag."""
    outside, crossed = _outside_strings(data)
    return array("b", outside.translate(_SIGNS, _NOT_BRACKETS)), crossed


def _opens(data: bytes | str) -> int:
    if isinstance(data, str):
        return data.count("[") + data.count("{")
    return data.count(b"[") + data.count(b"{")


def check_text(
    data: str | bytes | bytearray | memoryview, *, max_bytes: int, max_depth: int = MAX_DEPTH
) -> None:
    """Raise ``JsonRejected`` if ``data`` is larger than ``max_bytes`` or, read as one
    JSON document, nested deeper than ``max_depth``; for text someone else parses."""
    if not isinstance(data, str | bytes):
        data = bytes(data)
    if _over(data, max_bytes):
        raise too_large(max_bytes)
    # Fewer brackets than the limit cannot nest deeper than it: most documents stop here.
    if _opens(data) <= max_depth:
        return
    # One document, read by a strict parser: it stops at the first close with
    # nothing open and at a raw line break in a string, so what the running sum
    # gets wrong after either is what no parser reaches.
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    signs, _ = _signs(raw)
    if max(itertools.accumulate(signs), default=0) > max_depth:
        raise too_deep(max_depth)


def loads(
    data: str | bytes | bytearray | memoryview, *, max_bytes: int, max_depth: int = MAX_DEPTH
) -> Any:
    """``json.loads(data)`` once ``data`` is known to be within both limits.

    Raises ``JsonRejected`` for a document too large, too deep or not JSON
    (``reason`` gives the position of a syntax error, never its text).
    """
    if not isinstance(data, str | bytes):
        data = bytes(data)
    check_text(data, max_bytes=max_bytes, max_depth=max_depth)
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise JsonRejected(
            "syntax", f"not valid JSON (line {exc.lineno} column {exc.colno})"
        ) from None
    except UnicodeDecodeError:
        raise JsonRejected("syntax", "not valid JSON (not UTF-8)") from None
    except ValueError:
        # An integer of more digits than Python converts, and the like.
        raise JsonRejected("syntax", "not valid JSON (a value out of range)") from None


def loads_fast(
    data: str | bytes | bytearray | memoryview, *, max_bytes: int, max_depth: int = MAX_DEPTH
) -> Any:
    """``loads`` through orjson, for documents read by the thousand (a model's stream:
    a chunk a token), where json's decoder is most of the cost.

    What orjson refuses goes to ``loads``, which reads it as json does (``NaN``, a
    lone surrogate escaped, a UTF-16 body) or rejects it with the same reason, so
    rejections do not change. One value does: an integer past 64 bits reads as a
    float (orjson's way); no count or index a model sends is that large.
    """
    if not isinstance(data, str | bytes):
        data = bytes(data)
    check_text(data, max_bytes=max_bytes, max_depth=max_depth)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return loads(data, max_bytes=max_bytes, max_depth=max_depth)


def check_value(value: object, *, max_depth: int = MAX_DEPTH) -> None:
    """Raise ``JsonRejected`` if a parsed value (dicts, lists, scalars) nests deeper
    than ``max_depth``; walked with a stack of its own, never by recursion."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        depth += 1
        if depth > max_depth:
            raise too_deep(max_depth)
        stack.extend((child, depth) for child in children)


def check_message(message: Message, *, max_depth: int = MAX_DEPTH) -> None:
    """Raise ``JsonRejected`` if a ``Struct`` or ``ListValue`` anywhere in ``message``
    nests deeper than ``max_depth`` JSON levels (a Struct is one level, as an
    object is); other messages add no level. Walked without recursion, and only
    into the fields that can hold a JSON value (``_json_fields``): every request
    that can carry one is checked (``rpc.registration``), SendMessage included."""
    stack: list[tuple[Message, int]] = [(message, 0)]
    while stack:
        item, depth = stack.pop()
        name = item.DESCRIPTOR.full_name
        if name == _VALUE:
            kind = item.WhichOneof("kind")
            if kind in ("struct_value", "list_value"):
                stack.append((getattr(item, kind), depth))
            continue
        if name in (_STRUCT, _LIST):
            depth += 1
            if depth > max_depth:
                raise too_deep(max_depth)
            values = item.fields.values() if name == _STRUCT else item.values  # type: ignore[attr-defined]
            stack.extend((value, depth) for value in values)
            continue
        for field, shape in _json_fields(item.DESCRIPTOR):  # type: ignore[arg-type]
            if shape == "one":
                if item.HasField(field):
                    stack.append((getattr(item, field), depth))
            elif shape == "many":
                stack.extend((entry, depth) for entry in getattr(item, field))
            else:
                stack.extend((entry, depth) for entry in getattr(item, field).values())


_JSON_TYPES: Final = frozenset({_STRUCT, _LIST, "google.protobuf.Value"})
_VALUE: Final = "google.protobuf.Value"
_json_fields_of: dict[str, tuple[tuple[str, str], ...]] = {}


def carries_json(kind: Descriptor) -> bool:
    """Whether a ``kind`` message can hold a JSON value, at any depth."""
    seen: set[str] = set()
    stack = [kind]
    while stack:
        item = stack.pop()
        if item.full_name in _JSON_TYPES:
            return True
        if item.full_name in seen:
            continue
        seen.add(item.full_name)
        stack.extend(
            field.message_type
            for field in item.fields
            if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None
        )
    return False


def _json_fields(kind: Descriptor) -> tuple[tuple[str, str], ...]:
    """The fields of ``kind`` that can hold a JSON value, each as (name, "one" | "many" |
    "map"); worked out once per message type."""
    found = _json_fields_of.get(kind.full_name)
    if found is not None:
        return found
    fields: list[tuple[str, str]] = []
    for field in kind.fields:
        target = field.message_type
        if field.type != FieldDescriptor.TYPE_MESSAGE or target is None:
            continue
        if target.GetOptions().map_entry:
            value = target.fields_by_name["value"].message_type
            if value is not None and carries_json(value):
                fields.append((field.name, "map"))
        elif carries_json(target):
            fields.append((field.name, "many" if field.is_repeated else "one"))
    found = _json_fields_of[kind.full_name] = tuple(fields)
    return found


class StreamGauge:
    """Measures JSON as it arrives: one document, or server-sent events.

    ``feed`` each piece of the body; it raises ``JsonRejected`` as soon as an
    open bracket goes past ``max_depth`` or a line grows past
    ``max_line_bytes`` (a line is held until it is complete, so that is also
    what it may buffer). Depth carries from line to line (a document may span
    lines) and never goes below zero, so the events of a stream are measured
    one after the other.
    """

    __slots__ = ("_depth", "_max_depth", "_max_line_bytes", "_partial")

    def __init__(self, *, max_line_bytes: int, max_depth: int = MAX_DEPTH) -> None:
        self._max_depth = max_depth
        self._max_line_bytes = max_line_bytes
        self._depth = 0
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        limit = self._max_line_bytes
        end = chunk.rfind(b"\n")
        if end < 0:
            self._partial += chunk
            if len(self._partial) > limit:
                raise too_large(limit)
            return
        lines = self._partial + chunk[: end + 1]
        self._partial = chunk[end + 1 :]
        if len(self._partial) > limit or (
            len(lines) > limit and max(map(len, lines.split(b"\n"))) > limit
        ):
            raise too_large(limit)
        self._measure(lines)

    def close(self) -> None:
        """The body ended: measure what is left of its last line."""
        partial, self._partial = self._partial, b""
        self._measure(partial)

    def _measure(self, lines: bytes) -> None:
        signs, crossed = _signs(lines)
        if not crossed:
            if not signs:
                return
            sums = list(itertools.accumulate(signs, initial=self._depth))
            if min(sums) >= 0:
                # The common case, every string and bracket closed where it should be.
                if max(sums) > self._max_depth:
                    raise too_deep(self._max_depth)
                self._depth = sums[-1]
                return
        # A broken document ends where it breaks (a string not closed on its
        # line, a close with nothing open) and the next starts on a later line
        # (an event never starts mid-line): measured line by line, the depth
        # floored at zero between them.
        for line in lines.split(b"\n"):
            signs, _ = _signs(line)
            if not signs:
                continue
            sums = list(itertools.accumulate(signs, initial=self._depth))
            if max(sums) > self._max_depth:
                raise too_deep(self._max_depth)
            self._depth = max(sums[-1], 0)
