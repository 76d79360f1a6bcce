"""Search filters: the AIP-160 subset of ``SearchContextRequest.filter``, parsed into
``ports.SearchFilter``.

Grammar (``AND`` is case-sensitive, as in AIP-160)::

    filter     := comparison ("AND" comparison)*
    comparison := field op value
    field      := source | kind | role | conversation | file | create_time | metadata.KEY
    op         := "=" | "!=" | "<" | "<=" | ">" | ">="
    value      := a quoted string ("..." or '...', backslash escapes) | a bare word

Comparisons on the same field are ANDed: ``source = memory AND source = message``
matches nothing (``ParsedFilter.impossible``), which is not an error. Every
problem is ``InvalidArgument`` with one violation on the request's filter field
saying what is wrong; nothing else is ever raised for any input.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Final, Literal, get_args

from switchboard.context.mapping import KINDS, MESSAGE_ROLES
from switchboard.context.semantic.ports import SOURCE_KINDS, Comparison, SearchFilter, SourceKind
from switchboard.platform.errors import FieldViolation, InvalidArgument
from switchboard.platform.values.resources import ConversationName, FileName

MAX_FILTER_CHARS: Final = 1000
MAX_COMPARISONS: Final = 16

Op = Literal["=", "!=", "<", "<=", ">", ">="]
_OPS: Final = frozenset(get_args(Op))
_EQUALITY: Final = ("=", "!=")
_ORDER: Final = ("<", "<=", ">", ">=")
MEMORY_KINDS: Final = frozenset(KINDS.values())
ROLES: Final = frozenset(MESSAGE_ROLES.values())
_FIELDS: Final = ("source", "kind", "role", "conversation", "file", "create_time")
_METADATA_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_RFC3339: Final = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)
_NUMBER: Final = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
# Characters that end a bare word (besides whitespace).
_SPECIAL: Final = frozenset("\"'()=!<>")


@dataclass(frozen=True)
class ParsedFilter:
    """A parsed filter; ``impossible`` when its comparisons contradict each other."""

    filter: SearchFilter = field(default_factory=SearchFilter)
    impossible: bool = False
    #: The fields it names (for callers refusing some: SearchMemoryItems and `role`).
    fields: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Token:
    kind: Literal["word", "string", "op"]
    text: str
    at: int


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _string(text: str, start: int) -> tuple[str, int]:
    """The quoted string starting at ``start`` (backslash escapes), and where it ends."""
    quote, i = text[start], start + 1
    chars: list[str] = []
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            chars.append(text[i + 1])
            i += 2
        elif text[i] == quote:
            return "".join(chars), i + 1
        else:
            chars.append(text[i])
            i += 1
    raise _Refused(f"the string starting at position {start + 1} is not closed")


def _tokens(text: str) -> list[_Token]:
    found: list[_Token] = []
    i, size = 0, len(text)
    while i < size:
        char = text[i]
        if char.isspace():
            i += 1
        elif char in "\"'":
            value, end = _string(text, i)
            found.append(_Token("string", value, i))
            i = end
        elif char in "=!<>":
            op = text[i : i + 2] if text[i : i + 2] in _OPS else char
            if op not in _OPS:
                raise _Refused(f"`{char}` at position {i + 1} is not an operator (use `!=`)")
            found.append(_Token("op", op, i))
            i += len(op)
        elif char in "()":
            raise _Refused("parentheses are not supported: join comparisons with AND")
        else:
            start = i
            while i < size and not text[i].isspace() and text[i] not in _SPECIAL:
                i += 1
            found.append(_Token("word", text[start:i], start))
    return found


def _comparisons(tokens: list[_Token]) -> list[tuple[str, Op, _Token]]:
    result: list[tuple[str, Op, _Token]] = []
    i = 0
    while True:
        if i >= len(tokens):
            raise _Refused("expected a comparison such as `kind = fact` after `AND`")
        name = tokens[i]
        if name.kind != "word":
            raise _Refused(f"expected a field name at position {name.at + 1}")
        if name.text in ("OR", "NOT", "and", "or", "not"):
            raise _Refused("only comparisons joined by `AND` (in capitals) are supported")
        if i + 1 >= len(tokens) or tokens[i + 1].kind != "op":
            raise _Refused(f"expected an operator after `{_short(name.text)}`")
        op = tokens[i + 1]
        if i + 2 >= len(tokens) or tokens[i + 2].kind == "op":
            raise _Refused(f"expected a value after `{_short(name.text)} {op.text}`")
        value = tokens[i + 2]
        result.append((name.text, op.text, value))  # type: ignore[arg-type]
        if len(result) > MAX_COMPARISONS:
            raise _Refused(f"has more than {MAX_COMPARISONS} comparisons")
        i += 3
        if i == len(tokens):
            return result
        joiner = tokens[i]
        if joiner.kind != "word" or joiner.text != "AND":
            if joiner.kind == "word" and joiner.text in ("OR", "or", "and", "NOT", "not"):
                raise _Refused("only comparisons joined by `AND` (in capitals) are supported")
            raise _Refused(f"expected `AND` at position {joiner.at + 1}")
        i += 1


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:40] + "..."


def _timestamp(value: str) -> dt.datetime:
    found = _RFC3339.fullmatch(value)
    if found is None:
        raise _Refused(f"`{_short(value)}` is not an RFC 3339 time, e.g. 2026-01-31T09:00:00Z")
    date, time, fraction, offset = found.groups()
    micros = (fraction or "").ljust(6, "0")[:6]
    zone = "+00:00" if offset in ("Z", "z") else offset
    try:
        return dt.datetime.fromisoformat(f"{date}T{time}.{micros}{zone}")
    except ValueError:
        raise _Refused(f"`{_short(value)}` is not a valid time") from None


def _metadata_value(token: _Token) -> str | float | bool:
    if token.kind == "string":
        return token.text
    if token.text in ("true", "false"):
        return token.text == "true"
    if _NUMBER.fullmatch(token.text):
        number = float(token.text)
        if not math.isfinite(number):
            raise _Refused(f"`{_short(token.text)}` is not a finite number")
        return number
    return token.text


class _Builder:
    def __init__(self, workspace_id: str | None) -> None:
        self.workspace_id = workspace_id
        self.impossible = False
        self.sets: dict[str, frozenset[str] | None] = {
            "sources": None,
            "labels": None,
            "conversation_ids": None,
            "files": None,
        }
        self.excluded: dict[str, set[str]] = {
            "sources": set(),
            "labels": set(),
            "conversation_ids": set(),
            "files": set(),
        }
        self.after: tuple[dt.datetime, bool] | None = None
        self.before: tuple[dt.datetime, bool] | None = None
        self.metadata: list[Comparison] = []
        self.fields: set[str] = set()

    def one_of(self, slot: str, op: Op, value: str) -> None:
        if op == "!=":
            self.excluded[slot].add(value)
            return
        current = self.sets[slot]
        self.sets[slot] = frozenset({value}) if current is None else current & {value}
        if not self.sets[slot]:
            self.impossible = True

    def add(self, name: str, op: Op, token: _Token) -> None:
        value = token.text
        if name.startswith("metadata."):
            key = name.removeprefix("metadata.")
            if not _METADATA_KEY.fullmatch(key):
                raise _Refused(
                    f"`{_short(name)}`: a metadata key is 1-64 letters, digits, `_` or `-`, "
                    "starting with a letter or `_`"
                )
            self._equality(name, op)
            self.metadata.append(Comparison(key, op, _metadata_value(token)))  # type: ignore[arg-type]
            self.fields.add("metadata")
            return
        if name not in _FIELDS:
            raise _Refused(
                f"unknown field `{_short(name)}` (fields: source, kind, role, conversation, "
                "file, create_time, metadata.KEY)"
            )
        self.fields.add(name)
        if name == "create_time":
            if op not in _ORDER:
                raise _Refused(f"operator `{op}` is not allowed on `create_time` (<, <=, >, >=)")
            self._time(op, _timestamp(value))
            return
        self._equality(name, op)
        self._named(name, op, value)

    def _named(self, name: str, op: Op, value: str) -> None:
        """An equality on ``source``, ``kind``, ``role``, ``conversation`` or ``file``."""
        if name == "source":
            if value not in SOURCE_KINDS:
                raise _Refused(f"unknown source `{_short(value)}` (memory, message or document)")
            self.one_of("sources", op, value)
        elif name == "kind":
            kind = value.lower()
            if kind not in MEMORY_KINDS:
                raise _Refused(
                    f"unknown memory kind `{_short(value)}` "
                    "(fact, preference, summary, entity or note)"
                )
            self.one_of("labels", op, kind)
        elif name == "role":
            role = value.lower()
            if role not in ROLES:
                raise _Refused(
                    f"unknown message role `{_short(value)}` (user, assistant, system or tool)"
                )
            self.one_of("labels", op, role)
        elif name == "conversation":
            conversation = ConversationName.parse_or_none(value)
            if conversation is None:
                raise _Refused(
                    f"`{_short(value)}` is not a conversation name "
                    "(workspaces/{workspace}/conversations/{conversation})"
                )
            self._same_workspace(conversation.workspace, "conversation")
            self.one_of("conversation_ids", op, conversation.conversation)
        else:
            file = FileName.parse_or_none(value)
            if file is None:
                raise _Refused(
                    f"`{_short(value)}` is not a file name "
                    "(workspaces/{workspace}/files/{file})"
                )
            self._same_workspace(file.workspace, "file")
            self.one_of("files", op, value)

    def _equality(self, name: str, op: Op) -> None:
        if op not in _EQUALITY:
            raise _Refused(f"operator `{op}` is not allowed on `{_short(name)}` (= or !=)")

    def _same_workspace(self, workspace_id: str, what: str) -> None:
        if self.workspace_id is None or workspace_id != self.workspace_id:
            raise _Refused(f"the {what} named is not in the workspace searched")

    def _time(self, op: Op, when: dt.datetime) -> None:
        inclusive = op in ("<=", ">=")
        if op in (">", ">="):
            bound = self.after
            if bound is None or when > bound[0] or (when == bound[0] and not inclusive):
                self.after = (when, inclusive)
        else:
            bound = self.before
            if bound is None or when < bound[0] or (when == bound[0] and not inclusive):
                self.before = (when, inclusive)

    def build(self) -> ParsedFilter:
        impossible = self.impossible
        for slot, chosen in self.sets.items():
            if chosen is not None and chosen <= self.excluded[slot]:
                impossible = True
        if self.after is not None and self.before is not None:
            (low, low_in), (high, high_in) = self.after, self.before
            if low > high or (low == high and not (low_in and high_in)):
                impossible = True
        sources = self.sets["sources"]
        parsed = SearchFilter(
            sources=_kinds(sources) if sources is not None else None,
            exclude_sources=_kinds(self.excluded["sources"]),
            labels=self.sets["labels"],
            exclude_labels=frozenset(self.excluded["labels"]),
            conversation_ids=self.sets["conversation_ids"],
            exclude_conversation_ids=frozenset(self.excluded["conversation_ids"]),
            files=self.sets["files"],
            exclude_files=frozenset(self.excluded["files"]),
            created_after=self.after[0] if self.after else None,
            created_after_inclusive=self.after[1] if self.after else False,
            created_before=self.before[0] if self.before else None,
            created_before_inclusive=self.before[1] if self.before else False,
            metadata=tuple(self.metadata),
        )
        return ParsedFilter(parsed, impossible, frozenset(self.fields))


def _kinds(values: Iterable[str]) -> frozenset[SourceKind]:
    return frozenset(v for v in SOURCE_KINDS if v in set(values))


def _check_size(text: str) -> None:
    if len(text) > MAX_FILTER_CHARS:
        raise _Refused(f"is longer than {MAX_FILTER_CHARS} characters")


def parse_filter(text: str, *, workspace_id: str | None, field: str = "filter") -> ParsedFilter:
    """``text`` parsed; ``workspace_id`` is the searched workspace (None for a user's
    memory, where no conversation or file can be named). InvalidArgument on ``field``."""
    if not text.strip():
        return ParsedFilter()
    try:
        _check_size(text)
        builder = _Builder(workspace_id)
        for name, op, value in _comparisons(_tokens(text)):
            builder.add(name, op, value)
        return builder.build()
    except _Refused as refused:
        raise InvalidArgument(
            f"{field}: {refused.reason}", [FieldViolation(field, refused.reason)]
        ) from None


def restrict_sources(parsed: ParsedFilter, allowed: Iterable[SourceKind]) -> ParsedFilter:
    """``parsed`` with its sources narrowed to ``allowed`` (impossible if none is left)."""
    allowed_set = frozenset(allowed)
    current = parsed.filter.sources
    chosen = allowed_set if current is None else current & allowed_set
    chosen = chosen - parsed.filter.exclude_sources
    return replace(
        parsed,
        filter=replace(parsed.filter, sources=chosen, exclude_sources=frozenset()),
        impossible=parsed.impossible or not chosen,
    )
