"""How a steer looks on A2A (``a2a/mapping.py``): the message in the steered task's
history, and each of its run updates as a status update that keeps the task's state."""

from __future__ import annotations

import pytest
from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format

from switchboard.a2a import errors, mapping
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.errors import RunEnded

pytestmark = pytest.mark.unit

TARGET = "workspaces/w/conversations/c1/runs/r1"
STEER_RUN = "workspaces/w/conversations/c1/runs/r2"
MESSAGE = "workspaces/w/conversations/c1/messages/m2"


def test_a_steer_in_the_history_is_the_users_message_naming_its_own_task() -> None:
    stored = cpb.Message(name=MESSAGE, parts=[cpb.ContentPart(text="use the other account")])
    found = mapping.steer_message(TARGET, stored, STEER_RUN)
    assert (found.message_id, found.task_id, found.context_id) == ("m2", "c1.r1", "c1")
    assert found.role == a2a.ROLE_USER
    assert [part.text for part in found.parts] == ["use the other account"]
    assert json_format.MessageToDict(found.metadata) == {"switchboard.steer": {"task_id": "c1.r2"}}


@pytest.mark.parametrize(
    ("state", "words", "details"),
    [
        (pb.STEER_STATE_ACCEPTED, "accepted", {"state": "accepted"}),
        (pb.STEER_STATE_CONSUMED, "before step 2", {"state": "consumed", "step": 2}),
        (pb.STEER_STATE_REQUEUED, "task c1.r2 answers it", {"state": "requeued"}),
    ],
)
def test_a_steer_update_is_a_status_update_in_the_tasks_state(
    state: int, words: str, details: dict[str, object]
) -> None:
    update = pb.SteerUpdate(steer_run=STEER_RUN, message=MESSAGE, state=state, step=2)  # type: ignore[arg-type]
    event = mapping.steer_event(TARGET, update, a2a.TASK_STATE_WORKING, (7, 0))
    status = event.status_update
    assert (status.task_id, status.context_id) == ("c1.r1", "c1")
    # The task's state as it was: a steer changes nothing a client reads as progress.
    assert status.status.state == a2a.TASK_STATE_WORKING
    assert status.metadata["switchboard.sequence"] == "7"
    said = status.status.message
    assert said.role == a2a.ROLE_AGENT
    assert words in said.parts[0].text
    data = json_format.MessageToDict(said.parts[1].data)["steer"]
    assert data == {"message_id": "m2", "task_id": "c1.r2", **details}
    assert said.parts[1].media_type == "application/json"


def test_a_cut_model_call_says_from_where_its_chunks_are_void() -> None:
    update = pb.SteerUpdate(
        steer_run=STEER_RUN,
        message=MESSAGE,
        state=pb.STEER_STATE_CONSUMED,
        step=3,
        discarded_from_sequence=12,
    )
    event = mapping.steer_event(TARGET, update, a2a.TASK_STATE_WORKING, (20, 0))
    data = json_format.MessageToDict(event.status_update.status.message.parts[1].data)["steer"]
    assert data["discarded_from_sequence"] == "12"


def test_a_steer_of_a_run_that_ended_is_a2as_terminal_task_refusal() -> None:
    error = errors.tagged(RunEnded(f"{TARGET} has ended"), "SendMessage", names_task=True)
    assert error.foreign == errors.UNSUPPORTED_OPERATION
    assert errors.in_a2a_terms(error, {}, set()).message == "task c1.r1 has ended"
