"""Errors an A2A caller gets name what it sent (a2a/errors.py ``in_a2a_terms``): every
field of every Switchboard request the front door makes for an A2A method is either named
by the A2A field it came from, or (the caller never sent it) by nothing at all."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format
from google.protobuf.message import Message

from switchboard.a2a import errors, mapping, servicer
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.errors import (
    BudgetExhausted,
    FieldViolation,
    InvalidArgument,
    ModelNotPriced,
    NotFound,
)

pytestmark = pytest.mark.unit

_DATA = a2a.Part()
_DATA.data.struct_value.update({"approvals": []})
_SEND = a2a.SendMessageRequest(
    message=a2a.Message(task_id="c.r", parts=[a2a.Part(text="why"), _DATA])
)
_LIST = a2a.ListTasksRequest(context_id="c")
_RUN: tuple[type[Message], ...] = (pb.GetRunRequest,)
#: Each A2A method, its request, the renames the servicer uses for it, and the
#: Switchboard requests the front door makes for it (frontdoor.py, push/configs.py, ports.py).
_METHODS: list[tuple[str, Message, Mapping[str, str], tuple[type[Message], ...]]] = [
    (
        "SendMessage",
        _SEND,
        servicer._send_renames(_SEND),
        (
            cpb.CreateConversationRequest,
            pb.SendMessageRequest,
            pb.GetRunRequest,
            pb.SubmitToolApprovalsRequest,
            pb.SteerRunRequest,
            pb.WatchRunRequest,
        ),
    ),
    (
        "ListTasks",
        _LIST,
        servicer._list_renames(_LIST),
        (pb.ListRunsRequest, pb.GetAssistantRequest),
    ),
    ("GetTask", a2a.GetTaskRequest(), servicer._RENAMES["GetTask"], _RUN),
    (
        "CancelTask",
        a2a.CancelTaskRequest(),
        servicer._RENAMES["CancelTask"],
        (pb.CancelRunRequest,),
    ),
    (
        "SubscribeToTask",
        a2a.SubscribeToTaskRequest(),
        servicer._RENAMES["SubscribeToTask"],
        (pb.GetRunRequest, pb.WatchRunRequest),
    ),
    (
        "GetExtendedAgentCard",
        a2a.GetExtendedAgentCardRequest(),
        servicer._RENAMES["GetExtendedAgentCard"],
        (pb.GetAssistantRequest,),
    ),
    (
        "CreateTaskPushNotificationConfig",
        a2a.TaskPushNotificationConfig(),
        servicer._RENAMES["CreateTaskPushNotificationConfig"],
        _RUN,
    ),
]


def _a2a_fields(request: Message) -> set[str]:
    return {field.name for field in request.DESCRIPTOR.fields} | {mapping.AFTER_HEADER}


@pytest.mark.parametrize(("method", "sent", "renames", "made"), _METHODS)
def test_no_switchboard_field_reaches_an_a2a_caller(
    method: str, sent: Message, renames: Mapping[str, str], made: tuple[type[Message], ...]
) -> None:
    known = _a2a_fields(sent)
    for message in made:
        for field in message.DESCRIPTOR.fields:
            for path in (field.name, f"{field.name}.inner", f"{field.name}[2].x"):
                named = errors.a2a_field(path, renames, known)
                root = named.split(".", 1)[0].split("[", 1)[0]
                assert named == "" or root in known, (method, message.__name__, path, named)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("request_id", "message.message_id"),
        ("conversation", "message.context_id"),
        ("parameters.delay_ms", "metadata.delay_ms"),
        ("approvals[0].decision", "message.parts[1].data.approvals[0].decision"),
        ("name", "message.task_id"),
        # SteerRun, for a message on a working task.
        ("run", "message.task_id"),
        ("timeout", ""),
        ("message.parts[0]", "message.parts[0]"),
        ("configuration.accepted_output_modes", "configuration.accepted_output_modes"),
    ],
)
def test_a_send_names_the_fields_of_the_a2a_message(field: str, expected: str) -> None:
    assert errors.a2a_field(field, servicer._send_renames(_SEND), _a2a_fields(_SEND)) == expected


def test_a_renamed_violation_renames_the_message_and_keeps_the_reason() -> None:
    raised = InvalidArgument(
        "request_id was already used for a different request",
        [FieldViolation("request_id", "was already used for a different request")],
    )
    named = errors.in_a2a_terms(raised, servicer._send_renames(_SEND), _a2a_fields(_SEND))
    assert isinstance(named, InvalidArgument)
    assert named.message == "message.message_id was already used for a different request"
    assert named.violations == (
        FieldViolation("message.message_id", "was already used for a different request"),
    )
    assert errors.tagged(named, "SendMessage", names_task=False).foreign == errors.INVALID_PARAMS


def test_resource_names_become_a2a_ids() -> None:
    missing = NotFound("workspaces/acme/conversations/c1/runs/r1 not found")
    assert errors.in_a2a_terms(missing, {}, set()).message == "task c1.r1 not found"
    assert (
        errors.a2a_text("workspaces/acme/conversations/c1 and workspaces/acme/assistants/calc")
        == "context c1 and agent acme.calc"
    )
    assert errors.a2a_text("workspaces/acme not found") == "the agent's workspace acme not found"


def test_spending_errors_keep_only_switchboards_reason_and_name_the_budget() -> None:
    spent = BudgetExhausted(
        "the message was refused: workspaces/acme/budgets/daily has no room left",
        subject="workspaces/acme/budgets/daily",
    )
    named = errors.tagged(errors.in_a2a_terms(spent, {}, set()), "SendMessage", names_task=True)
    assert named.foreign is None
    assert named.message == (
        "the message was refused: budget daily of the agent's workspace acme has no room left"
    )
    unpriced = ModelNotPriced("a cost budget applies and primary/m-1 has no price")
    # Not UNSUPPORTED_OPERATION: it says nothing about the task's state.
    assert errors.tagged(unpriced, "SendMessage", names_task=True).foreign is None


def test_a_task_waiting_for_room_in_its_budgets_says_so() -> None:
    run = pb.Run(
        name="workspaces/acme/conversations/c1/runs/r1", state=pb.RUN_STATE_REQUIRES_ACTION
    )
    run.required_action.budget.budgets.append("workspaces/acme/budgets/daily")
    run.required_action.budget.cost_micros = 215
    run.required_action.expire_time.FromSeconds(1_800_000_000)
    status = mapping.status(run)
    assert status.state == a2a.TASK_STATE_INPUT_REQUIRED
    text, data = status.message.parts
    assert "budgets" in text.text
    action = json_format.MessageToDict(data.data)["budget_action"]
    assert action["budgets"] == ["budget daily of the agent's workspace acme"]
    assert action["cost_micros"] == 215
