"""DeleteMyAccount end to end (issue 83, docs/privacy.md), on the embedded default and on
the scaled-out stores (PostgreSQL, Redis, an S3 bucket): the credentials stop at once,
an open stream ends, the workspaces owned alone go as the person chose, and once every
service has done its part a marker the person wrote is in no store, while another
member's words stay and the log keeps the redacted events' places."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import grpc
import pytest
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.auth.store import AuthStore
from switchboard.platform.events.erasure.store import ErasureStore
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S
from tests.kits.authkit import bearer
from tests.kits.contextkit import (
    Caller,
    Chat,
    add_member,
    append,
    context_stub,
    create_conversation,
    create_workspace,
    refused,
    remember,
    violations,
    window,
)
from tests.kits.dispatchkit import dispatcher_stub, eventually, finished, request
from tests.kits.eventkit import Subscriber, ws
from tests.kits.privacykit import Person, person, stores_fixture, stores_settings_fixture
from tests.kits.storesearch import find_marker, new_marker
from tests.privacy.test_storesearch import upload_text

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

BUDGET = 4000


stores_settings, stores = stores_settings_fixture, stores_fixture


def auth_stub(channel: aio.Channel) -> Any:
    """The AuthService stub (its generated types are the synchronous stub's)."""
    return auth_pb2_grpc.AuthServiceStub(channel)


async def delete_account(
    channel: aio.Channel, who: Person, *workspaces: auth_pb2.OwnedWorkspace, email: str = ""
) -> auth_pb2.DeleteMyAccountResponse:
    response: auth_pb2.DeleteMyAccountResponse = await auth_stub(channel).DeleteMyAccount(
        auth_pb2.DeleteMyAccountRequest(
            confirm_email=email or who.email.upper(), workspaces=list(workspaces)
        ),
        metadata=who.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return response


def deleting(workspace: str) -> auth_pb2.OwnedWorkspace:
    return auth_pb2.OwnedWorkspace(
        workspace=workspace, action=auth_pb2.OWNED_WORKSPACE_ACTION_DELETE
    )


def handing(workspace: str, to: Caller) -> auth_pb2.OwnedWorkspace:
    return auth_pb2.OwnedWorkspace(
        workspace=workspace, action=auth_pb2.OWNED_WORKSPACE_ACTION_HAND_OVER, new_owner=to.name
    )


async def history(
    channel: aio.Channel, caller: Caller, workspace_id: str
) -> list[events_pb2.Event]:
    stub = events_pb2_grpc.EventServiceStub(channel)
    found: list[events_pb2.Event] = []
    token = ""
    while True:
        page = await stub.ListEvents(
            events_pb2.ListEventsRequest(
                scopes=[ws(workspace_id)], page_size=200, page_token=token
            ),
            metadata=caller.md,
            timeout=CALL_DEADLINE_S,
        )
        found.extend(page.events)
        token = page.next_page_token
        if not token:
            return found


async def erased(server: SwitchboardServer, name: str) -> None:
    store = ErasureStore(server.shared.database)
    erasure_id = name.removeprefix("erasures/")

    async def done() -> bool:
        record = await store.get(erasure_id)
        return record is not None and record.done_at is not None

    await eventually(done, f"{name} done")


async def test_an_erased_account_leaves_nothing_of_its_words_and_others_keep_theirs(
    stores: tuple[SwitchboardServer, aio.Channel],
) -> None:
    server, channel = stores
    stub, dispatch = context_stub(channel), dispatcher_stub(channel)
    erin, olga = await person(server), await person(server)
    mark, kept = new_marker(), new_marker()
    # Olga's workspace, where Erin is an editor: both write there.
    shared = await create_workspace(stub, olga.caller, "Shared", workspace_id=f"s-{mark[:12]}")
    await add_member(stub, olga.caller, shared.name, erin.caller, pb.WORKSPACE_ROLE_EDITOR)
    talk = await create_conversation(stub, olga.caller, shared.name, "talk")
    await append(stub, olga.caller, talk.name, f"olga says {kept}")
    sent = await dispatch.SendMessage(
        request(talk.name, f"erin says {mark}", handler="handlers/echo"),
        metadata=erin.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    run = await finished(dispatch, erin.caller, sent.run.name)
    assert run.state == dpb.RUN_STATE_SUCCEEDED
    await remember(stub, erin.caller, erin.caller.name, f"erin likes {mark}")
    await remember(stub, erin.caller, shared.name, f"the team knows erin's {mark}")
    await upload_text(Chat(stub, erin.caller, shared.name, talk.name), f"{mark}\n".encode())
    await window(stub, olga.caller, talk.name, BUDGET)  # cached (in Redis when there is one)
    # Two workspaces Erin owns alone: one to delete, one for Olga.
    own = await create_workspace(stub, erin.caller, "Own", workspace_id=f"o-{mark[:12]}")
    mine = await create_conversation(stub, erin.caller, own.name, "notes")
    await append(stub, erin.caller, mine.name, f"private {mark}")
    team = await create_workspace(stub, erin.caller, "Team", workspace_id=f"t-{mark[:12]}")
    await add_member(stub, erin.caller, team.name, olga.caller, pb.WORKSPACE_ROLE_VIEWER)
    key = await auth_stub(channel).CreateApiKey(
        auth_pb2.CreateApiKeyRequest(
            display_name=f"key {mark}", scopes=["read", "write", "manage"]
        ),
        metadata=erin.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    watching = Subscriber(channel, erin.caller.token, scopes=[ws(shared.name.split("/")[1])])
    await watching.live()
    assert await find_marker(server, mark, raw_files=False)

    # Refused precisely: the email, the workspaces owned alone, an API key.
    error = await refused(
        delete_account(channel, erin, email="someone@example.com"),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violations(error) == ["confirm_email"]
    error = await refused(delete_account(channel, erin), grpc.StatusCode.FAILED_PRECONDITION)
    assert own.name in (error.details() or "")
    assert team.name in (error.details() or "")
    error = await refused(
        delete_account(channel, erin, deleting(own.name), handing(team.name, erin.caller)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violations(error) == ["workspaces[1].new_owner"]
    error = await refused(
        delete_account(channel, erin, deleting(shared.name)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert violations(error) == ["workspaces[0].workspace"]
    error = await refused(
        auth_stub(channel).DeleteMyAccount(
            auth_pb2.DeleteMyAccountRequest(confirm_email=erin.email),
            metadata=bearer(key.secret),
            timeout=CALL_DEADLINE_S,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "session" in (error.details() or "")

    deleted = await delete_account(
        channel, erin, deleting(own.name), handing(team.name, olga.caller)
    )
    assert deleted.erasure.user == erin.caller.name
    assert deleted.erasure.name.startswith("erasures/")

    # At once: the session, the key and the open stream.
    await refused(
        stub.ListWorkspaces(
            pb.ListWorkspacesRequest(), metadata=erin.caller.md, timeout=CALL_DEADLINE_S
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    await refused(
        stub.ListWorkspaces(
            pb.ListWorkspacesRequest(), metadata=bearer(key.secret), timeout=CALL_DEADLINE_S
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert (await watching.error()).code() == grpc.StatusCode.UNAUTHENTICATED
    # The team is Olga's now.
    members = await stub.ListWorkspaceMembers(
        pb.ListWorkspaceMembersRequest(parent=team.name),
        metadata=olga.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    assert [(m.user, m.role) for m in members.members] == [
        (olga.caller.name, pb.WORKSPACE_ROLE_OWNER)
    ]

    await erased(server, deleted.erasure.name)
    left = await find_marker(server, mark, raw_files=False)
    assert left == [], "\n".join(left)
    if server.shared.database.dialect_name == "sqlite":
        # Deleted rows are overwritten (secure_delete) and the WAL checkpointed: the
        # database's files on disk hold nothing of them either.
        assert await find_marker(server, mark) == []
    assert await find_marker(server, kept, raw_files=False)
    await refused(
        stub.GetWorkspace(
            pb.GetWorkspaceRequest(name=own.name), metadata=olga.caller.md, timeout=CALL_DEADLINE_S
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    # Olga's message stays; Erin's, and the answer to her run, are gone.
    listed = await stub.ListMessages(
        pb.ListMessagesRequest(parent=talk.name), metadata=olga.caller.md, timeout=CALL_DEADLINE_S
    )
    assert [m.parts[0].text for m in listed.messages] == [f"olga says {kept}"]
    # The log keeps the places of what it redacted: Olga reads the workspace's history.
    events = await history(channel, olga.caller, shared.name.split("/")[1])
    redacted = [e for e in events if e.redacted]
    assert redacted
    assert all(not e.HasField("actor") and not e.user for e in redacted)
    assert all(e.WhichOneof("payload") is None for e in redacted)
    assert not [e for e in events if mark in str(e)]
    assert [e for e in events if kept in str(e)]
    # The account itself is a tombstone: its email and name are gone.
    user = await AuthStore(server.shared.database).user_by_id(erin.caller.id)
    assert user is not None
    assert (user.email, user.display_name, user.password_hash) == (
        f"{erin.caller.id}@erased.invalid",
        "",
        None,
    )


async def test_a_deleted_message_leaves_the_log_too(
    stores: tuple[SwitchboardServer, aio.Channel],
) -> None:
    """DeleteMessage leaves a tombstone, and its MESSAGE_CREATED is redacted in the log
    (the embedded table or Redis Streams) in the background: its words are nowhere."""
    server, channel = stores
    stub = context_stub(channel)
    erin = await person(server)
    mark, kept = new_marker(), new_marker()
    workspace = await create_workspace(stub, erin.caller, "Mine", workspace_id=f"d-{mark[:12]}")
    talk = await create_conversation(stub, erin.caller, workspace.name, "talk")
    gone = await append(stub, erin.caller, talk.name, f"say {mark} once")
    await append(stub, erin.caller, talk.name, f"and {kept} stays")
    await window(stub, erin.caller, talk.name, BUDGET)
    await stub.DeleteMessage(
        pb.DeleteMessageRequest(name=gone.name), metadata=erin.caller.md, timeout=CALL_DEADLINE_S
    )
    store = ErasureStore(server.shared.database)

    async def redacted_all() -> bool:
        return all(e.done_at is not None for e in await store.list())

    await eventually(redacted_all, "the deleted message's events redacted")
    left = await find_marker(server, mark, raw_files=False)
    assert left == [], "\n".join(left)
    assert await find_marker(server, kept, raw_files=False)
    events = await history(channel, erin.caller, workspace.name.split("/")[1])
    created = [e for e in events if e.type == events_pb2.EVENT_TYPE_MESSAGE_CREATED]
    assert [e.redacted for e in created] == [True, False]
    assert created[1].message_created.message.parts[0].text == f"and {kept} stays"
    deleted = [e for e in events if e.type == events_pb2.EVENT_TYPE_MESSAGE_DELETED]
    assert [e.message_deleted.message for e in deleted] == [gone.name]


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``switchboard`` in a process of its own, on the server's database."""
    env = {
        **os.environ,
        "SWITCHBOARD_DATABASE_URL": database_url,
        "SWITCHBOARD_DEV_MODE": "true",
        "SWITCHBOARD_LOG_LEVEL": "WARNING",
    }
    return subprocess.run(
        [sys.executable, "-m", "switchboard.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=CALL_DEADLINE_S,
        check=False,
    )


async def test_an_operator_erases_an_account_from_the_command_line(
    stores: tuple[SwitchboardServer, aio.Channel],
) -> None:
    """``switchboard erase-user`` refuses and deletes as DeleteMyAccount does; the serving
    processes learn of it through the outbox and do the erasure's parts."""
    server, channel = stores
    stub = context_stub(channel)
    erin = await person(server)
    mark = new_marker()
    own = await create_workspace(stub, erin.caller, "Own", workspace_id=f"c-{mark[:12]}")
    talk = await create_conversation(stub, erin.caller, own.name, "talk")
    await append(stub, erin.caller, talk.name, f"erin says {mark}")
    url = server.settings.database_url.get_secret_value()

    refused_run = await asyncio.to_thread(cli, url, "erase-user", erin.caller.name)
    assert refused_run.returncode == 3, refused_run.stderr
    assert own.name in refused_run.stderr
    done = await asyncio.to_thread(cli, url, "erase-user", erin.caller.name, "--delete", own.name)
    assert done.returncode == 0, done.stderr
    begun = json.loads(done.stdout)
    assert begun["user"] == erin.caller.name

    async def signed_out() -> bool:
        try:
            await stub.ListWorkspaces(
                pb.ListWorkspacesRequest(), metadata=erin.caller.md, timeout=CALL_DEADLINE_S
            )
        except aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    await eventually(signed_out, "the session revoked through the outbox")
    await erased(server, begun["name"])
    assert await find_marker(server, mark, raw_files=False) == []
    listed = await asyncio.to_thread(cli, url, "erasures")
    assert listed.returncode == 0, listed.stderr
    shown = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {"name": begun["name"], "state": "ERASURE_STATE_DONE"}.items() <= next(
        e for e in shown if e["name"] == begun["name"]
    ).items()


async def test_an_owner_erases_what_a_member_wrote_in_the_workspace(
    stores: tuple[SwitchboardServer, aio.Channel],
) -> None:
    """RemoveWorkspaceMember with ``erase``: the member's words in that workspace go (their
    messages, the answers to their runs, their files and memory there, their events there
    redacted); what they wrote elsewhere stays, and so does their account. Only an owner
    may ask it for another member; a member may for themselves."""
    server, channel = stores
    stub, dispatch = context_stub(channel), dispatcher_stub(channel)
    erin, olga, ivan = await person(server), await person(server), await person(server)
    here, elsewhere = new_marker(), new_marker()
    team = await create_workspace(stub, olga.caller, "Team", workspace_id=f"m-{here[:12]}")
    await add_member(stub, olga.caller, team.name, erin.caller, pb.WORKSPACE_ROLE_EDITOR)
    await add_member(stub, olga.caller, team.name, ivan.caller, pb.WORKSPACE_ROLE_EDITOR)
    talk = await create_conversation(stub, olga.caller, team.name, "talk")
    sent = await dispatch.SendMessage(
        request(talk.name, f"erin says {here}", handler="handlers/echo"),
        metadata=erin.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    assert (await finished(dispatch, erin.caller, sent.run.name)).state == dpb.RUN_STATE_SUCCEEDED
    await remember(stub, erin.caller, team.name, f"erin's team note {here}")
    await upload_text(Chat(stub, erin.caller, team.name, talk.name), f"{here}\n".encode())
    own = await create_workspace(stub, erin.caller, "Own", workspace_id=f"n-{here[:12]}")
    mine = await create_conversation(stub, erin.caller, own.name, "notes")
    await append(stub, erin.caller, mine.name, f"kept {elsewhere}")
    member = f"{team.name}/members/{erin.caller.id}"

    # Another editor may not; the owner may.
    await refused(
        stub.RemoveWorkspaceMember(
            pb.RemoveWorkspaceMemberRequest(name=member, erase=True),
            metadata=ivan.caller.md,
            timeout=CALL_DEADLINE_S,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await stub.RemoveWorkspaceMember(
        pb.RemoveWorkspaceMemberRequest(name=member, erase=True),
        metadata=olga.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    store = ErasureStore(server.shared.database)

    async def done() -> bool:
        return all(e.done_at is not None for e in await store.list())

    await eventually(done, "the member's erasure done")
    left = await find_marker(server, here, raw_files=False)
    assert left == [], "\n".join(left)
    assert await find_marker(server, elsewhere, raw_files=False)
    # Her account and her own workspace are untouched.
    listed = await stub.ListWorkspaces(
        pb.ListWorkspacesRequest(), metadata=erin.caller.md, timeout=CALL_DEADLINE_S
    )
    assert [w.name for w in listed.workspaces] == [own.name]
    events = await history(channel, olga.caller, team.name.split("/")[1])
    assert [e for e in events if e.redacted]
    assert not [e for e in events if here in str(e)]
    # A member may erase their own words on leaving.
    await add_member(stub, olga.caller, team.name, erin.caller, pb.WORKSPACE_ROLE_EDITOR)
    again = new_marker()
    await append(stub, erin.caller, talk.name, f"erin again {again}")
    await stub.RemoveWorkspaceMember(
        pb.RemoveWorkspaceMemberRequest(name=member, erase=True),
        metadata=erin.caller.md,
        timeout=CALL_DEADLINE_S,
    )
    await eventually(done, "her own erasure done")
    assert await find_marker(server, again, raw_files=False) == []
