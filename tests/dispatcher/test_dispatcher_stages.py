"""The dispatcher's stages: a SendMessage walks them forward only.

docs/dispatcher.md orders the stages as a message travels: the servicer, the
composition (``service.py``), admission, the scheduler, execution, publishing.
A stage may call a later one (hand the run on) but never an earlier one: a
call back up (execution telling the scheduler, publishing calling into
execution) is a return to a module the message already left, which is what
made the dispatcher hard to follow. The walk is observed, not declared: a
profile hook records every call between the stage modules while one message
is admitted, run to its end and published.
"""

from __future__ import annotations

import sys
from collections import Counter
from types import FrameType
from typing import Any

import pytest
from grpc import aio

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.conftest import make_settings
from tests.kits.contextkit import Stub, World, context_stub, create_conversation, ctx_world
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import dispatcher_stub, request, send, watch_all

pytestmark = pytest.mark.service

#: The stages in the order a message travels them.
STAGES = ("servicer", "service", "admission", "scheduler", "execution", "publishing")
#: Where each stage lives: the servicer and the service at the top of dispatcher/, the
#: pipeline's stages in its runs/ room (admission in intake/, the scheduler and publishing
#: in core/, execution in a room of its own).
_MODULES = ("", "", "runs.intake.", "runs.core.", "runs.execution.", "runs.core.")
_ORDER = {
    f"switchboard.dispatcher.{room}{name}": index
    for index, (room, name) in enumerate(zip(_MODULES, STAGES, strict=True))
}


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url=database_url, instance_id="test-stages")


class Walk:
    """The calls between stage modules seen while the hook was on."""

    def __init__(self) -> None:
        self.edges: Counter[tuple[str, str]] = Counter()

    def hook(self, frame: FrameType, event: str, _arg: Any) -> None:
        if event != "call":
            return
        callee = _ORDER.get(frame.f_globals.get("__name__", ""))
        if callee is None:
            return
        caller_frame = frame.f_back
        # The nearest stage frame below: helpers (store, feed, lifecycle) in
        # between do not hide who handed the run on.
        while caller_frame is not None:
            caller = _ORDER.get(caller_frame.f_globals.get("__name__", ""))
            if caller is not None:
                if caller != callee:
                    self.edges[(STAGES[caller], STAGES[callee])] += 1
                return
            caller_frame = caller_frame.f_back

    def backward(self) -> dict[tuple[str, str], int]:
        return {(a, b): n for (a, b), n in self.edges.items() if STAGES.index(b) < STAGES.index(a)}


async def test_a_message_walks_the_stages_forward_only(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    stub: Stub = context_stub(channel)
    dstub: DStub = dispatcher_stub(channel)
    world: World = await ctx_world(mesh, stub)
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    walk = Walk()
    sys.setprofile(walk.hook)
    try:
        sent = await send(dstub, world.editor, request(conversation, "one two three"))
        seen = await watch_all(dstub, world.editor, sent.run.name)
    finally:
        sys.setprofile(None)

    assert seen.states[-1] == pb.RUN_STATE_SUCCEEDED
    # It did walk the stages: each hands the run to the next.
    for earlier, later in (
        ("servicer", "service"),
        ("service", "admission"),
        ("execution", "publishing"),
    ):
        assert walk.edges[(earlier, later)] > 0, (earlier, later, dict(walk.edges))
    assert walk.backward() == {}, dict(walk.edges)
