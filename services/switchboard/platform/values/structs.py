"""A protobuf ``Struct`` value as plain Python, the way Switchboard writes it as JSON.

JSON has no NaN or infinity (docs/contracts.md "Malformed input"): a client's
request holding one is refused (``rpc.registration``), but a ``Struct`` stored
before that rule, or relayed from elsewhere, may still hold one. What is
written as JSON from a ``Value`` goes through here and never holds one: such a
number is written as ``null``, so the JSON stays valid for whoever reads it
(SQL's JSON functions, a webhook's receiver, a model).
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from switchboard.platform.values.jsonbounds import nonfinite_values

_M = TypeVar("_M", bound=Message)


def plain(value: struct_pb2.Value) -> object:
    """A ``Value`` as plain Python, for JSON; a number that is not finite is ``None``.

    Hand-rolled rather than ``json_format.MessageToDict``: that renders every
    number as a float (``3`` becomes ``3.0``, costing tokens and confusing
    models) and raises on NaN and infinity, which a stored ``Struct`` can hold.
    """
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            return None
        # Integral doubles up to 2**53 are exact integers; print them as such.
        if number.is_integer() and abs(number) <= 2**53:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {key: plain(item) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [plain(item) for item in value.list_value.values]
    return None


def plain_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A ``Struct`` as a plain ``dict`` (its values as ``plain`` writes them)."""
    return {key: plain(item) for key, item in struct.fields.items()}


def finite(message: _M) -> _M:
    """``message``, or a copy of it whose JSON values' numbers that are not finite are
    ``null``: what protobuf's JSON mapping can write (it raises on them). Asked for
    when protobuf has refused (``message_dict``), so the copy is walked, once."""
    copy = type(message)()
    copy.CopyFrom(message)
    found = nonfinite_values(copy)
    if not found:
        return message
    for value in found:
        value.null_value = struct_pb2.NULL_VALUE  # type: ignore[attr-defined]
    return copy


def message_dict(message: Message, **options: Any) -> dict[str, Any]:
    """``json_format.MessageToDict(message, **options)`` that cannot fail on a number:
    one that is not finite in a JSON value is written as ``null`` (``finite``).

    The walk is done only when protobuf has refused: the common message pays nothing.
    """
    try:
        return json_format.MessageToDict(message, **options)
    except (json_format.Error, ValueError):
        return json_format.MessageToDict(finite(message), **options)
