"""switchboard.client.transport.methods: what the contracts say about repeating each method."""

from __future__ import annotations

import pytest

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2
from switchboard.client import Client
from switchboard.client.transport.methods import METHODS, PUBLIC, method_of, safe_to_repeat

pytestmark = pytest.mark.unit

AUTH = "/switchboard.api.auth.v1.AuthService/"
DISPATCHER = "/switchboard.api.dispatcher.v1.DispatcherService/"


def test_every_method_of_every_client_facing_service_is_known() -> None:
    expected = {
        f"/{service.full_name}/{method.name}"
        for module in (auth_pb2, context_pb2, dispatcher_pb2, integration_pb2, events_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert set(METHODS) == expected
    assert PUBLIC.issubset(expected)


def test_reads_and_idempotent_writes_may_be_repeated_others_not() -> None:
    assert method_of(AUTH + "GetPrincipal").repeatable  # NO_SIDE_EFFECTS
    assert method_of(AUTH + "Logout").repeatable  # IDEMPOTENT
    assert method_of(DISPATCHER + "CancelRun").repeatable
    assert not method_of(AUTH + "Login").repeatable  # a new session each time
    assert not method_of(AUTH + "RefreshToken").repeatable  # spends its token
    assert not method_of(DISPATCHER + "SendMessage").repeatable
    assert not method_of(DISPATCHER + "Talk").repeatable  # each turn is a message
    assert method_of((AUTH + "Login").encode()).public


def test_a_request_id_makes_a_create_safe_to_repeat() -> None:
    send = method_of(DISPATCHER + "SendMessage")
    assert send.keyed
    assert safe_to_repeat(send, dispatcher_pb2.SendMessageRequest(request_id="abc"))
    assert not safe_to_repeat(send, dispatcher_pb2.SendMessageRequest())
    append = method_of("/switchboard.api.context.v1.ContextService/AppendMessage")
    assert append.keyed
    assert safe_to_repeat(append, context_pb2.AppendMessageRequest(request_id="m-1"))
    login = method_of(AUTH + "Login")
    assert not safe_to_repeat(login, auth_pb2.LoginRequest())


def test_a_method_the_contracts_do_not_know_is_never_repeated() -> None:
    health = method_of("/grpc.health.v1.Health/Check")
    assert not health.repeatable
    assert not health.public
    assert not safe_to_repeat(health, object())


#: The RPCs the Client wraps in a method of its own (the others are reached through
#: its typed stubs): steering and schedules, issue 55; phone calls, issue 84.
WRAPPED = {
    "SteerRun": "steer",
    "CreateSchedule": "create_schedule",
    "GetSchedule": "get_schedule",
    "ListSchedules": "list_schedules",
    "UpdateSchedule": "update_schedule",
    "PauseSchedule": "pause_schedule",
    "ResumeSchedule": "resume_schedule",
    "DeleteSchedule": "delete_schedule",
    "ListScheduleFirings": "schedule_firings",
    "PlaceCall": "place_call",
    "GetCall": "get_call",
    "ListCalls": "list_calls",
    "EndCall": "end_call",
}


def test_steering_and_schedules_have_client_methods_and_their_repeat_rules() -> None:
    for rpc, attribute in WRAPPED.items():
        assert DISPATCHER + rpc in METHODS, rpc
        assert callable(getattr(Client, attribute)), attribute
    # A steer and a create carry an idempotency key: repeated only with one.
    steer = method_of(DISPATCHER + "SteerRun")
    assert steer.keyed
    assert not steer.repeatable
    assert safe_to_repeat(steer, dispatcher_pb2.SteerRunRequest(request_id="s-1"))
    assert not safe_to_repeat(steer, dispatcher_pb2.SteerRunRequest())
    assert method_of(DISPATCHER + "CreateSchedule").keyed
    for read in ("GetSchedule", "ListSchedules", "ListScheduleFirings"):
        assert method_of(DISPATCHER + read).repeatable, read
    # A pause, a resume or a delete with an etag fails the second time: sent once.
    for write in ("UpdateSchedule", "PauseSchedule", "ResumeSchedule", "DeleteSchedule"):
        assert not method_of(DISPATCHER + write).repeatable, write


def test_phone_calls_have_their_repeat_rules() -> None:
    for read in ("GetCall", "ListCalls"):
        assert method_of(DISPATCHER + read).repeatable, read
    # PlaceCall is keyed (Client.place_call always sends a key): a retry places no
    # second call.
    place = method_of(DISPATCHER + "PlaceCall")
    assert place.keyed
    assert not place.repeatable
    assert safe_to_repeat(place, dispatcher_pb2.PlaceCallRequest(request_id="c-1"))
    assert not safe_to_repeat(place, dispatcher_pb2.PlaceCallRequest())
    # The server returns an ended call as it is: the contract marks EndCall IDEMPOTENT.
    assert method_of(DISPATCHER + "EndCall").repeatable
