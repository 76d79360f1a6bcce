"""ListRuns across a workspace (``parent`` a workspace), by assistant and by when a run's
state last changed, with the total over every page: what A2A's ListTasks is built on
(docs/a2a.md), on SQLite and on PostgreSQL."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.kits.contextkit import (
    World,
    context_stub,
    create_conversation,
    ctx_world,
    refused,
    violations,
)
from tests.kits.dispatchkit import dispatcher_stub, finished, request, send

pytestmark = pytest.mark.service


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url=database_url, instance_id="test-run-listing")


async def _assistant(dstub: object, world: World, assistant_id: str) -> str:
    made = await dstub.CreateAssistant(  # type: ignore[attr-defined]
        pb.CreateAssistantRequest(
            parent=world.name,
            assistant_id=assistant_id,
            assistant=pb.Assistant(display_name=assistant_id, handler="handlers/echo"),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    name: str = made.assistant.name
    return name


async def test_a_workspaces_runs_by_assistant_and_state_time_with_their_total(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    world = await ctx_world(mesh, context_stub(channel))
    dstub = dispatcher_stub(channel)
    helper = await _assistant(dstub, world, "helper")
    other = await _assistant(dstub, world, "other")
    first, second = [
        (await create_conversation(context_stub(channel), world.editor, world.name)).name
        for _ in range(2)
    ]
    runs: list[pb.Run] = []
    for conversation, assistant in ((first, helper), (second, helper), (second, other)):
        sent_request = request(conversation, "hello")
        sent_request.assistant = assistant
        sent = await send(dstub, world.editor, sent_request)
        runs.append(await finished(dstub, world.editor, sent.run.name))

    async def listed(**fields: Any) -> pb.ListRunsResponse:
        response: pb.ListRunsResponse = await dstub.ListRuns(
            pb.ListRunsRequest(**fields), metadata=world.viewer.md, timeout=CALL_DEADLINE_S
        )
        return response

    everything = await listed(parent=world.name)
    assert [run.name for run in everything.runs] == [run.name for run in reversed(runs)]
    assert everything.total_size == 3
    helpers = await listed(parent=world.name, assistant=helper, page_size=1)
    assert [run.name for run in helpers.runs] == [runs[1].name]
    assert helpers.total_size == 2
    rest = await listed(
        parent=world.name, assistant=helper, page_size=1, page_token=helpers.next_page_token
    )
    assert ([run.name for run in rest.runs], rest.next_page_token) == ([runs[0].name], "")
    in_one = await listed(parent=second, assistant=helper)
    assert ([run.name for run in in_one.runs], in_one.total_size) == ([runs[1].name], 1)
    # State time: the end of each (they all ended), strictly after the given time.
    later = pb.ListRunsRequest(parent=world.name)
    later.state_changed_after.CopyFrom(runs[0].end_time)
    changed = await listed(parent=world.name, state_changed_after=later.state_changed_after)
    assert {run.name for run in changed.runs} == {runs[1].name, runs[2].name}
    assert changed.total_size == 2
    # Names out of place, and a viewer elsewhere.
    error = await refused(
        dstub.ListRuns(
            pb.ListRunsRequest(parent=world.name, assistant="workspaces/other/assistants/x"),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violations(error) == ["assistant"]
    await refused(
        dstub.ListRuns(
            pb.ListRunsRequest(parent=world.name),
            metadata=world.outsider.md,
            timeout=CALL_DEADLINE_S,
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_every_member_lists_a_workspaces_runs_and_a_stranger_finds_no_workspace(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    world = await ctx_world(mesh, context_stub(channel))
    dstub = dispatcher_stub(channel)
    conversation = (await create_conversation(context_stub(channel), world.editor, world.name)).name
    sent = await send(dstub, world.editor, request(conversation, "hello"))
    await finished(dstub, world.editor, sent.run.name)
    for member in (world.owner, world.editor, world.viewer):
        listed = await dstub.ListRuns(
            pb.ListRunsRequest(parent=world.name), metadata=member.md, timeout=CALL_DEADLINE_S
        )
        assert ([run.name for run in listed.runs], listed.total_size) == ([sent.run.name], 1)
    await refused(
        dstub.ListRuns(
            pb.ListRunsRequest(parent=world.name),
            metadata=world.outsider.md,
            timeout=CALL_DEADLINE_S,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
