"""A ``Struct`` as plain Python and as protobuf's JSON (platform/values/structs.py): a number JSON
cannot hold (NaN, an infinity, in a Struct stored before such numbers were refused) is
written as null, never as invalid JSON and never as an exception."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.values import structs

pytestmark = pytest.mark.unit


def _value(data: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.struct_value.update({"v": data})
    return value.struct_value.fields["v"]


def test_plain_writes_integers_as_integers_and_what_json_cannot_hold_as_none() -> None:
    assert structs.plain(_value(3)) == 3
    assert structs.plain(_value(2.5)) == 2.5
    assert structs.plain(_value(2**60)) == float(2**60)
    for number in (math.nan, math.inf, -math.inf):
        assert structs.plain(_value(number)) is None
    nested = structs.plain(_value({"a": [1, math.nan, {"b": -math.inf}], "s": "NaN"}))
    assert nested == {"a": [1, None, {"b": None}], "s": "NaN"}
    # What json.dumps then writes is JSON (allow_nan=False would raise on a NaN).
    assert (
        json.dumps(nested, allow_nan=False, sort_keys=True)
        == '{"a": [1, null, {"b": null}], "s": "NaN"}'
    )


def _event() -> events_pb2.Event:
    event = events_pb2.Event(id="e1")
    data = event.message_created.message.parts.add().data
    data.update({"n": math.nan, "l": [1, math.inf], "ok": 2})
    return event


def test_message_dict_writes_null_and_leaves_the_message_as_it_was() -> None:
    event = _event()
    with pytest.raises(json_format.SerializeToJsonError, match="Fail to serialize"):
        json_format.MessageToDict(event)
    written = structs.message_dict(event, preserving_proto_field_name=True)
    data = written["message_created"]["message"]["parts"][0]["data"]
    assert data == {"n": None, "l": [1.0, None], "ok": 2.0}
    assert math.isnan(event.message_created.message.parts[0].data.fields["n"].number_value)


def test_finite_copies_only_when_it_must() -> None:
    clean = events_pb2.Event(id="e2")
    clean.message_created.message.parts.add().data.update({"ok": 1})
    assert structs.finite(clean) is clean
    event = _event()
    copy = structs.finite(event)
    assert copy is not event
    assert copy.message_created.message.parts[0].data["n"] is None
    assert copy.id == "e1"
