"""Numbers JSON cannot hold in what integrations answer (docs/integration.md "Answers from
outside"): an answer holding NaN or an infinity is a bad answer, refused as one too deep
is, and what is only read from such a value reads it as null, never as an exception.

JSON text from a peer (a model's stream, an MCP message, an agent card) is read by
``jsonbounds.loads``, which refuses ``NaN`` and the infinities as not JSON
(tests/platform/values/test_json_bounds.py); here, the messages a peer's SDK or protobuf decoder
made, in which protobuf can carry them.
"""

from __future__ import annotations

import math

import pytest
from a2a.types import a2a_pb2 as a2a
from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.remote import _refusal
from switchboard.integration.kinds.a2a import TASK_KEY, USAGE_KEY, _Relay, previous_task
from switchboard.integration.kinds.experts import _decoded
from switchboard.integration.ports.connectors import Malformed
from switchboard.platform.values import jsonbounds

pytestmark = pytest.mark.unit


def _data(**values: object) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.struct_value.update(values)  # type: ignore[arg-type]
    return value


def test_an_a2a_agent_answering_data_with_nan_is_a_bad_answer() -> None:
    answer = a2a.StreamResponse(
        message=a2a.Message(
            role=a2a.ROLE_AGENT, parts=[a2a.Part(text="see"), a2a.Part(data=_data(n=math.nan))]
        )
    )
    with pytest.raises(Malformed, match="the agent answered with data with a number that is"):
        _Relay().take(answer)


def test_usage_with_an_infinite_count_reads_as_none() -> None:
    status = a2a.TaskStatusUpdateEvent(
        task_id="t1", context_id="c1", status=a2a.TaskStatus(state=a2a.TASK_STATE_COMPLETED)
    )
    status.metadata.update({USAGE_KEY: {"input_tokens": math.inf, "output_tokens": 3}})
    relay = _Relay()
    relay.take(a2a.StreamResponse(status_update=status))
    assert relay.usage == {USAGE_KEY: {"input_tokens": None, "output_tokens": 3.0}}


def test_a_stored_answer_holding_nan_still_names_its_task() -> None:
    message = context_pb2.Message(author="handlers/agent")
    data = message.parts.add().data
    data.update({TASK_KEY: {"task": "t1", "context": "c1", "state": "completed", "n": math.nan}})
    window = context_pb2.ContextWindow()
    window.included.add().message.CopyFrom(message)
    found = previous_task(window, "handlers/agent")
    assert found is not None
    assert found.task_id == "t1"


def test_an_expert_answering_nan_is_a_bad_answer() -> None:
    frame = handler_pb2.HandleResponse()
    frame.result.parts.add().data.update({"big": -math.inf})
    assert _refusal(frame) == jsonbounds.NOT_FINITE
    with pytest.raises(Malformed, match="holds a value with a number that is not finite"):
        _decoded(frame, "tool")
