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

**Numbers are finite.** JSON has no NaN or infinity, and a JSON writer meets
one only as invalid text (``json.dumps`` writes ``NaN``, which SQLite's and
PostgreSQL's JSON functions refuse) or an exception (protobuf's
``MessageToDict``). So ``NaN``, ``Infinity`` and ``-Infinity`` in a text are
not JSON to ``loads`` (Python's ``json`` reads them), nor is a number too large
for a double (``1e999``, which it would read as infinity); ``check_value`` and
``check_message`` refuse a non-finite float in a parsed value or a message
(a ``Value``'s ``number_value``, and any ``double`` or ``float`` field). Every
client request is checked this way before its method runs
(``rpc.registration``); an integration's answer that holds one is a bad answer.

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
import math
import re
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson
from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

#: Most levels of nesting accepted anywhere (see the module doc for why 24).
MAX_DEPTH: Final = 24

Problem = Literal["size", "depth", "syntax", "number"]

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


#: Why a value holding NaN or an infinity is refused, after "a value " or "a message ".
NOT_FINITE: Final = "with a number that is not finite (NaN or infinity: JSON has neither)"


def not_finite() -> JsonRejected:
    return JsonRejected("number", NOT_FINITE)


class _NotFinite(ValueError):
    """Raised inside ``json.loads`` by its hooks; never leaves ``loads``."""


def _refuse_constant(name: str) -> Any:
    # json.loads calls this for ``NaN``, ``Infinity`` and ``-Infinity`` only.
    raise _NotFinite(name)


def _finite_float(text: str) -> float:
    # Called for each number with a fraction or an exponent; one past a double's
    # range (1e999) would otherwise read as infinity.
    number = float(text)
    if math.isinf(number):
        raise _NotFinite(text)
    return number


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
    (``reason`` gives the position of a syntax error, never its text). ``NaN``,
    ``Infinity``, ``-Infinity`` and a number past a double's range are not JSON
    (the module doc): refused as syntax, where Python's ``json`` reads them.
    """
    if not isinstance(data, str | bytes):
        data = bytes(data)
    check_text(data, max_bytes=max_bytes, max_depth=max_depth)
    try:
        return json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NotFinite:
        raise JsonRejected(
            "syntax", "not valid JSON (a number that is not finite: NaN or infinity)"
        ) from None
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

    What orjson refuses goes to ``loads``, which reads it as json does (a lone
    surrogate escaped, a UTF-16 body) or rejects it with the same reason (``NaN``,
    ``1e999``: neither is JSON to either), so rejections do not change. One value
    does: an integer past 64 bits reads as a float (orjson's way); no count or
    index a model sends is that large.
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
    than ``max_depth`` or holds a float that is not finite; walked with a stack of
    its own, never by recursion."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            if isinstance(item, float) and not math.isfinite(item):
                raise not_finite()
            continue
        depth += 1
        if depth > max_depth:
            raise too_deep(max_depth)
        stack.extend((child, depth) for child in children)


def check_message(message: Message, *, max_depth: int = MAX_DEPTH) -> None:
    """Raise ``JsonRejected`` if a ``Struct`` or ``ListValue`` anywhere in ``message``
    nests deeper than ``max_depth`` JSON levels (a Struct is one level, as an
    object is; other messages add no level), or a number in it is not finite (a
    ``Value``'s, or a ``double`` or ``float`` field's). Walked without recursion,
    and only into the fields that can hold either (``_plan``): every request
    that can carry one is checked (``rpc.registration``), SendMessage included,
    so the walk is kept to what it must look at. ``locate`` says where."""
    stack: list[tuple[Message, int]] = [(message, 0)]
    while stack:
        item, depth = stack.pop()
        name = item.DESCRIPTOR.full_name
        if name == _VALUE:
            kind = item.WhichOneof("kind")
            if kind == "number_value":
                if not math.isfinite(item.number_value):  # type: ignore[attr-defined]
                    raise not_finite()
            elif kind in ("struct_value", "list_value"):
                stack.append((getattr(item, kind), depth))
            continue
        if name in (_STRUCT, _LIST):
            depth += 1
            if depth > max_depth:
                raise too_deep(max_depth)
            values = item.fields.values() if name == _STRUCT else item.values  # type: ignore[attr-defined]
            stack.extend([(value, depth) for value in values])
            continue
        plan = _plan(item.DESCRIPTOR)  # type: ignore[arg-type]
        for field in plan.one:
            if item.HasField(field):
                stack.append((getattr(item, field), depth))
        for field in plan.many:
            stack.extend([(entry, depth) for entry in getattr(item, field)])
        for field in plan.map:
            stack.extend([(entry, depth) for entry in getattr(item, field).values()])
        if plan.numbers and not _all_finite(item, plan.numbers):
            raise not_finite()


def locate(message: Message, *, max_depth: int = MAX_DEPTH) -> tuple[str, JsonRejected] | None:
    """The first value of ``message`` that ``check_message`` refuses, in field order, as
    (its path, why); None if there is none.

    The path names fields as a request's field violations do (``message.parts[0].data``),
    then the keys and indexes of the JSON value down to the number
    (``message.parts[0].data.big``, ``parameters.a[2]``; a key that is not a plain
    name is quoted: ``metadata["a b"]``); for a value nested too deep, the value
    where it passed the limit. Only asked for after ``check_message`` refused, so
    it may cost what the check must not: it keeps a path for every step.
    """
    stack: list[tuple[Message, int, str]] = [(message, 0, "")]
    while stack:
        item, depth, path = stack.pop()
        name = item.DESCRIPTOR.full_name
        if name == _VALUE:
            kind = item.WhichOneof("kind")
            if kind == "number_value" and not math.isfinite(item.number_value):  # type: ignore[attr-defined]
                return path, not_finite()
            if kind in ("struct_value", "list_value"):
                stack.append((getattr(item, kind), depth, path))
            continue
        if name in (_STRUCT, _LIST):
            depth += 1
            if depth > max_depth:
                return path, too_deep(max_depth)
            if name == _STRUCT:
                fields = item.fields  # type: ignore[attr-defined]
                children = [(fields[key], depth, _key(path, key)) for key in sorted(fields)]
            else:
                values = item.values  # type: ignore[attr-defined]
                children = [(value, depth, f"{path}[{i}]") for i, value in enumerate(values)]
            stack.extend(reversed(children))
            continue
        found: list[tuple[Message, int, str]] = []
        for field, shape in _plan(item.DESCRIPTOR).fields:  # type: ignore[arg-type]
            at = f"{path}.{field}" if path else field
            if shape in _NUMBERS:
                where = _not_finite(getattr(item, field), shape, at)
                if where is not None:
                    return where, not_finite()
            else:
                found.extend(
                    (entry, depth, where) for entry, where in _entries(item, field, shape, at)
                )
        stack.extend(reversed(found))
    return None


def _entries(item: Message, field: str, shape: str, at: str) -> list[tuple[Message, str]]:
    """The messages in ``item``'s ``field`` (of a message shape), each with its path
    below ``at`` (worked out only where ``at`` is given)."""
    value = getattr(item, field)
    if shape == "one":
        return [(value, at)] if item.HasField(field) else []
    if shape == "many":
        return [(entry, f"{at}[{i}]" if at else "") for i, entry in enumerate(value)]
    return [(value[key], _key(at, key) if at else "") for key in sorted(value)]


def _not_finite(value: Any, shape: str, at: str) -> str | None:
    """Where in a float field (of a number shape) below ``at`` a value is not finite
    (``at`` itself for a singular field), or None if every one is."""
    if shape == "number":
        return None if math.isfinite(value) else at
    if shape == "numbers":
        for i, number in enumerate(value):
            if not math.isfinite(number):
                return f"{at}[{i}]"
        return None
    for key in sorted(value):
        if not math.isfinite(value[key]):
            return _key(at, key)
    return None


def nonfinite_values(message: Message) -> list[Message]:
    """Every ``Value`` in ``message`` whose number is not finite, at any depth, as the
    messages themselves (to be changed in place: ``structs.finite``); ``double`` and
    ``float`` fields are left out, protobuf's JSON writes them as ``"NaN"``."""
    found: list[Message] = []
    stack: list[Message] = [message]
    while stack:
        item = stack.pop()
        name = item.DESCRIPTOR.full_name
        if name == _VALUE:
            kind = item.WhichOneof("kind")
            if kind == "number_value" and not math.isfinite(item.number_value):  # type: ignore[attr-defined]
                found.append(item)
            elif kind in ("struct_value", "list_value"):
                stack.append(getattr(item, kind))
        elif name in (_STRUCT, _LIST):
            values = item.fields.values() if name == _STRUCT else item.values  # type: ignore[attr-defined]
            stack.extend(values)
        else:
            for field, shape in _plan(item.DESCRIPTOR).fields:  # type: ignore[arg-type]
                if shape not in _NUMBERS:
                    stack.extend(entry for entry, _ in _entries(item, field, shape, ""))
    return found


_PLAIN_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: The most of a key a path repeats (a key may be as long as the request).
_KEY_SHOWN: Final = 64


def _key(path: str, key: object) -> str:
    text = str(key)
    if _PLAIN_KEY.fullmatch(text):
        return f"{path}.{text}" if path else text
    return f"{path}[{json.dumps(text[:_KEY_SHOWN], ensure_ascii=False)}]"


_JSON_TYPES: Final = frozenset({_STRUCT, _LIST, "google.protobuf.Value"})
_VALUE: Final = "google.protobuf.Value"
_FLOATS: Final = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})
#: ``_Plan.fields``' shapes of float fields (the others hold messages).
_NUMBERS: Final = frozenset({"number", "numbers", "number_map"})


def checks(kind: Descriptor) -> bool:
    """Whether ``check_message`` has anything to look at in a ``kind`` message: a JSON
    value, or a ``double`` or ``float`` field, at any depth."""
    seen: set[str] = set()
    stack = [kind]
    while stack:
        item = stack.pop()
        if item.full_name in _JSON_TYPES:
            return True
        if item.full_name in seen:
            continue
        seen.add(item.full_name)
        for field in item.fields:
            if field.type in _FLOATS:
                return True
            if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
                stack.append(field.message_type)
    return False


@dataclass(frozen=True)
class _Plan:
    """What ``check_message`` looks at in a message type: its fields that can hold a
    JSON value or a float, by shape."""

    #: (name, shape) in declaration order: "one", "many", "map" (messages),
    #: "number", "numbers", "number_map" (floats); what ``locate`` walks.
    fields: tuple[tuple[str, str], ...]
    one: tuple[str, ...]
    many: tuple[str, ...]
    map: tuple[str, ...]
    #: The float fields, with their shapes.
    numbers: tuple[tuple[str, str], ...]


_plans: dict[str, _Plan] = {}


def _plan(kind: Descriptor) -> _Plan:
    """``kind``'s ``_Plan``, worked out once per type."""
    found = _plans.get(kind.full_name)
    if found is not None:
        return found
    fields: list[tuple[str, str]] = []
    for field in kind.fields:
        target = field.message_type
        if field.type in _FLOATS:
            fields.append((field.name, "numbers" if field.is_repeated else "number"))
        if field.type != FieldDescriptor.TYPE_MESSAGE or target is None:
            continue
        if target.GetOptions().map_entry:
            value = target.fields_by_name["value"]
            if value.type in _FLOATS:
                fields.append((field.name, "number_map"))
            elif value.message_type is not None and checks(value.message_type):
                fields.append((field.name, "map"))
        elif checks(target):
            fields.append((field.name, "many" if field.is_repeated else "one"))

    def named(shape: str) -> tuple[str, ...]:
        return tuple(name for name, each in fields if each == shape)

    numbers = tuple((name, shape) for name, shape in fields if shape in _NUMBERS)
    found = _Plan(tuple(fields), named("one"), named("many"), named("map"), numbers)
    _plans[kind.full_name] = found
    return found


def _all_finite(item: Message, numbers: tuple[tuple[str, str], ...]) -> bool:
    return all(_not_finite(getattr(item, field), shape, "") is None for field, shape in numbers)


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
