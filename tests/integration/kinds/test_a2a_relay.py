"""How an A2A task's events become run frames (integration/kinds/a2a.py ``_Relay``): chunks as
deltas, a snapshot after a resume adding only what was missed, the end as a result."""

from __future__ import annotations

import pytest
from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format

from switchboard.api.context.v1 import context_pb2
from switchboard.integration.kinds.a2a import (
    INPUT_REQUIRED,
    AgentFailed,
    PreviousTask,
    _Relay,
    previous_task,
)

pytestmark = pytest.mark.unit


def _chunk(text: str, *, append: bool, artifact: str = "answer") -> a2a.StreamResponse:
    return a2a.StreamResponse(
        artifact_update=a2a.TaskArtifactUpdateEvent(
            task_id="t1",
            context_id="c1",
            artifact=a2a.Artifact(artifact_id=artifact, parts=[a2a.Part(text=text)]),
            append=append,
        )
    )


def _status(state: int, text: str = "") -> a2a.StreamResponse:
    status = a2a.TaskStatus(state=state)  # type: ignore[arg-type]
    if text:
        status.message.CopyFrom(a2a.Message(role=a2a.ROLE_AGENT, parts=[a2a.Part(text=text)]))
    return a2a.StreamResponse(
        status_update=a2a.TaskStatusUpdateEvent(task_id="t1", context_id="c1", status=status)
    )


def _deltas(relay: _Relay, *events: a2a.StreamResponse) -> list[str]:
    return [f.delta.text for e in events for f in relay.take(e) if f.WhichOneof("frame") == "delta"]


def test_a_snapshot_after_a_resume_adds_only_what_was_missed() -> None:
    relay = _Relay()
    assert _deltas(relay, _chunk("first", append=False), _chunk(" half", append=True)) == [
        "first",
        " half",
    ]
    snapshot = a2a.Task(
        id="t1",
        context_id="c1",
        status=a2a.TaskStatus(state=a2a.TASK_STATE_WORKING),
        artifacts=[a2a.Artifact(artifact_id="answer", parts=[a2a.Part(text="first half, more")])],
    )
    assert _deltas(relay, a2a.StreamResponse(task=snapshot)) == [", more"]
    # The same snapshot again (a second resume) adds nothing.
    assert _deltas(relay, a2a.StreamResponse(task=snapshot)) == []
    assert _deltas(relay, _status(a2a.TASK_STATE_COMPLETED)) == []
    assert relay.over
    result = relay.result("'agent'")
    assert result.parts[0].text == "first half, more"
    assert result.finish_reason == "stop"


def test_a_replacement_that_does_not_extend_the_relayed_text_adds_nothing() -> None:
    relay = _Relay()
    assert _deltas(relay, _chunk("abc", append=False), _chunk("xyz", append=False)) == ["abc"]


def test_input_required_is_an_answer_that_names_the_waiting_task() -> None:
    relay = _Relay()
    assert _deltas(relay, _status(a2a.TASK_STATE_INPUT_REQUIRED, "Your name?")) == ["Your name?"]
    result = relay.result("'agent'")
    assert result.finish_reason == INPUT_REQUIRED
    assert result.parts[0].text == "Your name?"
    window = context_pb2.ContextWindow(
        included=[
            context_pb2.ContextItem(
                message=context_pb2.Message(author="handlers/other", parts=list(result.parts))
            ),
            context_pb2.ContextItem(
                message=context_pb2.Message(author="handlers/agent", parts=list(result.parts))
            ),
        ]
    )
    assert previous_task(window, "handlers/agent") == PreviousTask("t1", "c1", "input-required")
    assert previous_task(window, "handlers/nobody") is None
    tie = json_format.MessageToDict(result.parts[-1].data)
    assert tie == {"a2a_task": {"task": "t1", "context": "c1", "state": "input-required"}}


@pytest.mark.parametrize(
    ("state", "words"),
    [
        (a2a.TASK_STATE_FAILED, "failed the task: no"),
        (a2a.TASK_STATE_REJECTED, "rejected the task: no"),
        (a2a.TASK_STATE_CANCELED, "cancelled the task: no"),
        (a2a.TASK_STATE_AUTH_REQUIRED, "asks for authorization"),
    ],
)
def test_a_task_that_did_not_succeed_is_the_agents_failure(state: int, words: str) -> None:
    relay = _Relay()
    relay.take(_status(state, "no"))
    assert relay.over
    with pytest.raises(AgentFailed, match=words):
        relay.result("'agent'")
