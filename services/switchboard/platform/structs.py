"""A protobuf ``Struct`` value as plain Python, the way Switchboard writes it as JSON."""

from __future__ import annotations

import math

from google.protobuf import struct_pb2


def plain(value: struct_pb2.Value) -> object:
    """A ``Value`` as plain Python, for JSON.

    Hand-rolled rather than ``json_format.MessageToDict``: that renders every
    number as a float (``3`` becomes ``3.0``, costing tokens and confusing
    models) and raises on NaN and infinity, which a stored ``Struct`` can hold.
    """
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        # Integral doubles up to 2**53 are exact integers; print them as such.
        if math.isfinite(number) and number.is_integer() and abs(number) <= 2**53:
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
