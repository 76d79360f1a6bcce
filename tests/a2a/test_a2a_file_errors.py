"""A refused file part as an A2A caller reads it (a2a/errors.py): named by the A2A part's
field it was made from, and still of its own class (Switchboard's reason kept)."""

from __future__ import annotations

import pytest

from switchboard.a2a import errors
from switchboard.platform.errors import DestinationBlocked, FieldViolation, InvalidArgument

pytestmark = pytest.mark.unit

FIELDS = {"tenant", "message", "configuration", "metadata"}


def test_a_file_parts_fields_are_the_a2a_parts() -> None:
    for ours, theirs in [
        ("message.parts[1].file.uri", "message.parts[1].url"),
        ("message.parts[0].file.inline_data", "message.parts[0].raw"),
        ("message.parts[2].file.mime_type", "message.parts[2].media_type"),
        ("message.parts[2].file.display_name", "message.parts[2].filename"),
        ("message.parts[3].file", "message.parts[3]"),
        ("message.parts[3].file.file", "message.parts[3]"),
    ]:
        assert errors.a2a_field(ours, {}, FIELDS) == theirs


def test_a_renamed_refusal_keeps_its_class_and_reason() -> None:
    refusal = DestinationBlocked(
        "message.parts[1].file.uri 'http://169.254.169.254/' is not an allowed destination",
        [FieldViolation("message.parts[1].file.uri", "is not an allowed destination")],
        metadata={"policy": "egress.always"},
    )
    named = errors.in_a2a_terms(refusal, {}, FIELDS)
    assert isinstance(named, DestinationBlocked)
    assert named.reason == "ERROR_REASON_DESTINATION_BLOCKED"
    assert isinstance(named, InvalidArgument)
    assert [v.field for v in named.violations] == ["message.parts[1].url"]
    assert named.message == "message.parts[1].url is not an allowed destination"
    assert named.metadata == {"policy": "egress.always"}
    assert errors.tagged(named, "SendMessage", names_task=False).foreign == errors.INVALID_PARAMS
