"""A run's answer and its end in one transaction (``runs/core/answers.py``, decision 72),
against a real mesh's context domain and run store, on SQLite and PostgreSQL: the end's
save runs inside the answer's append under the name the run gave it; a save refused
(the run not this process's) rolls the answer back; an answer an earlier attempt stored
under the same request id is named instead (``Renamed``), and nothing is written twice."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest
from grpc import aio
from sqlalchemy.orm import Session

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.context.domain import ContextDomain
from switchboard.dispatcher.ports.context import LocalContext
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.core.answers import Renamed, answering
from switchboard.dispatcher.service import Dispatcher
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.policy import AuthMethod, Principal, Scope
from switchboard.platform.values import names
from switchboard.platform.values.resources import ConversationName, MessageName
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, built, make_settings
from tests.kits.contextkit import (
    Caller,
    all_messages,
    context_stub,
    create_conversation,
    ctx_world,
)

pytestmark = pytest.mark.service


class _NotOurs(Exception):
    """The save's refusal."""


class Place:
    def __init__(self, server: SwitchboardServer, conversation: str, editor: Caller) -> None:
        self.context = LocalContext(built(server, ContextDomain))
        self.store = built(server, Dispatcher)._store
        self.conversation = conversation
        self.editor = editor
        self.principal = Principal(
            user_id=editor.id, auth_method=AuthMethod.PASSWORD, scopes=frozenset(Scope)
        )

    def active(self, request_id: str, message_id: str) -> Active:
        """What ``answering`` reads of a live run: its answer, its name for it, its user."""
        parsed = ConversationName.parse(self.conversation, "conversation")
        answer = cpb.AppendMessageRequest(
            parent=self.conversation,
            message=cpb.Message(
                role=cpb.MESSAGE_ROLE_ASSISTANT,
                author="handlers/echo",
                parts=[cpb.ContentPart(text="the answer")],
            ),
            request_id=request_id,
        )
        run = SimpleNamespace(
            output_message=str(MessageName(parsed.workspace, parsed.conversation, message_id))
        )
        return cast(
            Active,
            SimpleNamespace(answer=(answer, message_id), run=run, principal=self.principal),
        )


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url=database_url)


@pytest.fixture
async def place(mesh: SwitchboardServer, channel: aio.Channel) -> Place:
    stub = context_stub(channel)
    world = await ctx_world(mesh, stub)
    conversation = (await create_conversation(stub, world.editor, world.name)).name
    return Place(mesh, conversation, world.editor)


async def test_the_end_is_saved_inside_the_answers_append_under_its_name(
    place: Place, channel: aio.Channel, mesh: SwitchboardServer
) -> None:
    active = place.active("run-a1", names.new_id())
    around = answering(active, place.context, place.store)
    assert around is not None
    seen: list[str] = []

    def work(db: Session) -> bool:
        seen.append("saved")
        return True

    assert await around(work) is True
    assert seen == ["saved"]
    stored = await place.context.message(
        place.principal, active.run.output_message, timeout_s=CALL_DEADLINE_S
    )
    assert stored.parts[0].text == "the answer"


async def test_a_save_refused_rolls_the_answer_back(
    place: Place, channel: aio.Channel, mesh: SwitchboardServer
) -> None:
    active = place.active("run-a2", names.new_id())
    around = answering(active, place.context, place.store)
    assert around is not None

    def fenced(db: Session) -> bool:
        # As ``RunStore.save`` does when the run is no longer this process's.
        raise _NotOurs

    with pytest.raises(_NotOurs):
        await around(fenced)
    assert await all_messages(context_stub(channel), place.editor, place.conversation) == []


async def test_an_answer_stored_before_under_its_request_id_is_named_instead(
    place: Place, channel: aio.Channel, mesh: SwitchboardServer
) -> None:
    first = place.active("run-a3", names.new_id())
    stored = await place.context.append_message(
        place.principal,
        cast(tuple[cpb.AppendMessageRequest, str], first.answer)[0],
        timeout_s=CALL_DEADLINE_S,
    )
    # A second attempt at the same run: the same request, a name of its own.
    again = place.active("run-a3", names.new_id())
    around = answering(again, place.context, place.store)
    assert around is not None
    seen: list[str] = []

    def work(db: Session) -> bool:
        seen.append("saved")
        return True

    with pytest.raises(Renamed) as renamed:
        await around(work)
    assert renamed.value.name == stored.name != again.run.output_message
    assert seen == []
    messages = await all_messages(context_stub(channel), place.editor, place.conversation)
    assert [m.name for m in messages] == [stored.name]
