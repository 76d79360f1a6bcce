"""A budget handed across a hop, and the usage reported back (docs/budgets.md, "Across hops").

A run that calls a domain expert or an A2A agent hands it what is left of its
budgets: only the caps that apply, each a non-negative integer. Two shapes,
one meaning:

* gRPC metadata ``x-switchboard-budget``:
  ``cost_micros=<n>;input_tokens=<n>;output_tokens=<n>;total_tokens=<n>``
  (sent to ``HandlerService`` experts, and by the A2A front door to the
  dispatcher's ``SendMessage``);
* the A2A extension ``BUDGET_EXTENSION``: the message metadata's key of that
  name holds an object with the same fields.

The callee reports what it spent as ``usage`` (``input_tokens``,
``output_tokens``, ``cost_micros``; OpenAI's ``prompt_tokens`` and
``completion_tokens`` are read too). What is read here is bounded: a value
that is not a non-negative integer of at most ``MAX_VALUE`` is refused
(handed budgets) or ignored (reported usage, which is the callee's word).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final

from switchboard.platform.errors import FieldViolation, InvalidArgument

#: The gRPC metadata key of a handed budget.
HEADER: Final = "x-switchboard-budget"
#: The A2A extension that carries a handed budget (declared on Switchboard's agent card).
BUDGET_EXTENSION: Final = "https://switchboard.dev/a2a/extensions/budget/v1"
#: The metadata key (of an A2A task, message or status update) with the usage reported back.
USAGE_KEY: Final = "usage"
#: Largest value of one field (micro-dollars or tokens): far beyond any real budget,
#: and within a signed 64-bit integer and a JSON number's exact range.
MAX_VALUE: Final = (1 << 53) - 1
#: Longest header accepted (four fields of 16 digits with their names fit well within).
MAX_HEADER_CHARS: Final = 256


@dataclass(frozen=True)
class Handed:
    """Caps handed to a callee (None: that dimension is not capped)."""

    cost_micros: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None

    def __bool__(self) -> bool:
        return any(value is not None for value in self.values().values())

    def values(self) -> dict[str, int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def capped(self) -> dict[str, int]:
        """The fields that apply, in the documented order."""
        return {name: value for name, value in self.values().items() if value is not None}

    def empty(self) -> bool:
        """Whether a cap that applies has nothing left (no step can fit)."""
        return any(value <= 0 for value in self.capped().values())


_FIELDS: Final = tuple(f.name for f in fields(Handed))


def header_value(handed: Handed) -> str:
    """``handed`` as the ``x-switchboard-budget`` metadata value."""
    return ";".join(f"{name}={value}" for name, value in handed.capped().items())


def extension_value(handed: Handed) -> dict[str, int]:
    """``handed`` as the budget extension's object in an A2A message's metadata."""
    return handed.capped()


def _bad(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field}: {description}", [FieldViolation(field=field, description=description)]
    )


def _checked(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _bad(field, "must be a non-negative integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise _bad(field, "must be a non-negative integer")
        value = int(value)
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit() or len(value) > 16:
            raise _bad(field, f"must be a non-negative integer of at most {MAX_VALUE}")
        value = int(value)
    if value < 0 or value > MAX_VALUE:
        raise _bad(field, f"must be a non-negative integer of at most {MAX_VALUE}")
    return value


def parse_header(value: str, field: str = HEADER) -> Handed:
    """A handed budget from ``x-switchboard-budget``; InvalidArgument naming
    ``field`` (and the item) when it is malformed, repeats or names an unknown cap."""
    if len(value) > MAX_HEADER_CHARS:
        raise _bad(field, f"longer than {MAX_HEADER_CHARS} characters")
    found: dict[str, int] = {}
    for raw in value.split(";"):
        item = raw.strip()
        if not item:
            continue
        name, sep, number = item.partition("=")
        name = name.strip()
        if not sep or name not in _FIELDS:
            raise _bad(field, f"expected name=value with a name of {', '.join(_FIELDS)}")
        if name in found:
            raise _bad(f"{field}.{name}", "given more than once")
        found[name] = _checked(f"{field}.{name}", number.strip())
    if not found:
        raise _bad(field, "names no cap")
    return Handed(**found)


def parse_extension(value: object, field: str) -> Handed:
    """A handed budget from the extension's object in A2A message metadata."""
    if not isinstance(value, Mapping):
        raise _bad(field, "must be an object")
    if len(value) > len(_FIELDS) or any(key not in _FIELDS for key in value):
        raise _bad(field, f"may name only {', '.join(_FIELDS)}")
    found = {key: _checked(f"{field}.{key}", item) for key, item in value.items()}
    if not found:
        raise _bad(field, "names no cap")
    return Handed(**found)


@dataclass(frozen=True)
class Reported:
    """Usage a callee reported."""

    cost_micros: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def __bool__(self) -> bool:
        return bool(self.cost_micros or self.input_tokens or self.output_tokens)


def _count(value: object) -> int:
    """A reported count, or 0 when it is not a non-negative integer in range."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_VALUE:
        return value
    return 0


def reported_usage(metadata: Mapping[str, Any] | None) -> Reported:
    """The usage in an A2A task's, message's or status update's metadata: its
    ``usage`` object, else the budget extension's ``usage`` (empty if neither)."""
    if not metadata:
        return Reported()
    usage = metadata.get(USAGE_KEY)
    if not isinstance(usage, Mapping):
        extension = metadata.get(BUDGET_EXTENSION)
        usage = extension.get(USAGE_KEY) if isinstance(extension, Mapping) else None
    if not isinstance(usage, Mapping):
        return Reported()
    return Reported(
        cost_micros=_count(usage.get("cost_micros")),
        input_tokens=_count(usage.get("input_tokens", usage.get("prompt_tokens"))),
        output_tokens=_count(usage.get("output_tokens", usage.get("completion_tokens"))),
    )


def usage_value(cost_micros: int, input_tokens: int, output_tokens: int) -> dict[str, int]:
    """The ``usage`` object a Switchboard callee reports back."""
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cost_micros": cost_micros,
    }
