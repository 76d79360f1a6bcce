"""The routing header (``switchboard-affinity``): derived from what a request names, and
sent by the client's own interceptors on every call that names a conversation.

That Envoy then keeps a conversation's calls on one process is tested end to end
(tests/e2e/test_affinity_mesh.py).
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import struct_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.client import AFFINITY_HEADER, Client, affinity
from switchboard.deploy.edge.envoy import AFFINITY_HEADER as EDGE_HEADER

pytestmark = pytest.mark.unit

CONVERSATION = "workspaces/w1/conversations/c1"
RUN = f"{CONVERSATION}/runs/r1"


def test_the_client_sends_the_header_the_edge_hashes() -> None:
    assert AFFINITY_HEADER == EDGE_HEADER


@pytest.mark.parametrize(
    "request_",
    [
        CONVERSATION,
        RUN,
        pb.SendMessageRequest(conversation=CONVERSATION, request_id="x"),
        pb.WatchRunRequest(name=RUN, after_sequence=3),
        pb.GetRunRequest(name=RUN),
        pb.CancelRunRequest(name=RUN),
        pb.SteerRunRequest(run=RUN),
        pb.ListRunsRequest(parent=CONVERSATION),
        pb.DescribeConversationRequest(conversation=CONVERSATION),
        cpb.GetConversationRequest(name=CONVERSATION),
        # A bidirectional call's actions and a voice session's first frame.
        pb.ConverseRequest(send_message=pb.SendMessageRequest(conversation=CONVERSATION)),
        pb.ConverseRequest(watch_run=pb.WatchRunRequest(name=RUN)),
        pb.TalkRequest(start=pb.TalkStart(conversation=CONVERSATION)),
        pb.TalkRequest(resume=pb.TalkResume(session=f"{CONVERSATION}/voiceSessions/s1")),
        pb.ConnectTalkRequest(start=pb.TalkStart(conversation=CONVERSATION)),
    ],
)
def test_a_request_about_a_conversation_is_routed_by_it(request_: object) -> None:
    assert affinity(request_) == CONVERSATION


def test_a_request_about_no_one_conversation_has_no_key() -> None:
    parameters = struct_pb2.Struct()
    parameters.update({"see": CONVERSATION})
    for request_ in (
        "",
        "workspaces/w1",
        "workspaces//conversations/c1",
        "workspaces/w1/conversations/",
        "workspaces/w1/files/f1",
        "users/u1",
        cpb.CreateConversationRequest(parent="workspaces/w1"),
        events_pb2.SubscribeRequest(scopes=[events_pb2.Scope(conversation=CONVERSATION)]),
        # A value elsewhere in the request is the user's, never a route.
        pb.SendMessageRequest(parameters=parameters),
        None,
        iter(()),
    ):
        assert affinity(request_) == "", request_


class _Stop(Exception):
    """Raised in place of sending: the test looks at the call as it would go out."""


class _Capture(aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.metadata: list[dict[str, Any]] = []

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        self.metadata.append(dict(client_call_details.metadata or ()))
        raise _Stop


async def test_the_client_adds_the_header_to_calls_that_name_a_conversation() -> None:
    capture = _Capture()
    async with Client("127.0.0.1:9", interceptors=[capture]) as client:
        client.use_api_key("sb_test_key")
        with pytest.raises(_Stop):
            await client.dispatcher.CancelRun(pb.CancelRunRequest(name=RUN))
        with pytest.raises(_Stop):
            await client.context.CreateConversation(
                cpb.CreateConversationRequest(parent="workspaces/w1")
            )
        # The caller's own value wins (it may know better, or want no affinity at all).
        with pytest.raises(_Stop):
            await client.dispatcher.SendMessage(
                pb.SendMessageRequest(conversation=CONVERSATION),
                metadata=((AFFINITY_HEADER, "workspaces/w2/conversations/c2"),),
            )
    cancelled, created, sent = capture.metadata
    assert cancelled[AFFINITY_HEADER] == CONVERSATION
    assert cancelled["authorization"].startswith("Bearer ")
    assert AFFINITY_HEADER not in created
    assert sent[AFFINITY_HEADER] == "workspaces/w2/conversations/c2"
