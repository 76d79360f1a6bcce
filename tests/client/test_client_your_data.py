"""switchboard.client against a real in-process server: a person's own data
(docs/privacy.md), on SQLite and PostgreSQL.

Deleting the account: the client lists the workspaces owned alone, a wrong email and a
request that leaves one of them out are refused (the refusal names it), a hand-over to
someone who is no member is refused on its field; then the account goes with one
workspace deleted and one handed over to its member, and the client has signed itself
out: its next call, and any call with the tokens it had, is UNAUTHENTICATED.

Exporting: the client starts an export, waits for it, downloads the archive checked
against the export's SHA-256, and the ZIP holds the account (its email), the message the
test wrote, the answer to it, and the file uploaded. An archive that is not what the
export says is refused as ``DataLoss``.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.client import (
    Client,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.settings import Settings
from tests.client.test_clientkit import PASSWORD, new_conversation, new_workspace, unique_email
from tests.conftest import CALL_DEADLINE_S, make_settings, started

pytestmark = pytest.mark.service


@dataclass
class Person:
    client: Client
    email: str
    user: str
    #: Every pair ``on_tokens`` was told of (None: signed out).
    told: list[auth_pb2.TokenPair | None] = field(default_factory=list)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url=database_url)


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[SwitchboardServer]:
    async with started(settings) as served:
        yield served


@pytest.fixture
async def people(server: SwitchboardServer) -> AsyncIterator[tuple[Person, Person]]:
    ada_told: list[auth_pb2.TokenPair | None] = []
    async with (
        Client(server.address, timeout_s=CALL_DEADLINE_S, on_tokens=ada_told.append) as ada,
        Client(server.address, timeout_s=CALL_DEADLINE_S) as bob,
    ):
        ada_email, bob_email = unique_email("ada"), unique_email("bob")
        ada_user = (await ada.register(ada_email, PASSWORD)).user.name
        bob_user = (await bob.register(bob_email, PASSWORD)).user.name
        yield Person(ada, ada_email, ada_user, ada_told), Person(bob, bob_email, bob_user)


def _fields(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.violations]


async def test_deleting_the_account_names_each_workspace_owned_alone_then_signs_out(
    people: tuple[Person, Person],
) -> None:
    ada, bob = people
    client = ada.client
    before = set(await client.owned_alone())
    scratch = await new_workspace(client, "Scratch")
    team = await new_workspace(client, "Team")
    await client.context.AddWorkspaceMember(
        cpb.AddWorkspaceMemberRequest(parent=team, user=bob.user, role=cpb.WORKSPACE_ROLE_EDITOR)
    )
    # Bob's own workspace, where Ada is a second owner: not hers alone, so not named.
    shared = await new_workspace(bob.client, "Shared")
    await bob.client.context.AddWorkspaceMember(
        cpb.AddWorkspaceMemberRequest(parent=shared, user=ada.user, role=cpb.WORKSPACE_ROLE_OWNER)
    )
    owned = await client.owned_alone()
    assert set(owned) == before | {scratch, team}
    assert shared not in owned
    others = sorted(before)

    with pytest.raises(InvalidArgument) as wrong_email:
        await client.delete_my_account(bob.email, delete=owned)
    assert _fields(wrong_email.value) == ["confirm_email"]

    with pytest.raises(FailedPrecondition) as left_out:
        await client.delete_my_account(ada.email, delete=[scratch, *others])
    assert team in left_out.value.message
    assert scratch not in left_out.value.message

    with pytest.raises(InvalidArgument) as not_a_member:
        await client.delete_my_account(
            ada.email, delete=[scratch, *others], hand_over={team: "users/nobody"}
        )
    assert _fields(not_a_member.value) == [f"workspaces[{1 + len(others)}].new_owner"]
    with pytest.raises(InvalidArgument) as not_alone:
        await client.delete_my_account(
            ada.email, delete=[scratch, shared, *others], hand_over={team: bob.user}
        )
    assert _fields(not_alone.value) == ["workspaces[1].workspace"]
    with pytest.raises(ValueError, match="not both"):
        await client.delete_my_account(ada.email, delete=[team], hand_over={team: bob.user})
    # Refused, the account and its session are as they were.
    assert client.tokens.kind == "session"
    assert set(await client.owned_alone()) == set(owned)

    kept = client.tokens.pair
    assert kept is not None
    erasure = await client.delete_my_account(
        ada.email.upper(), delete=[scratch, *others], hand_over={team: bob.user}
    )
    assert erasure.name.startswith("erasures/")
    assert erasure.user == ada.user
    assert erasure.state in (auth_pb2.ERASURE_STATE_RUNNING, auth_pb2.ERASURE_STATE_DONE)
    assert erasure.HasField("create_time")

    # The client signed itself out, and told the application so.
    assert client.tokens.pair is None
    assert client.tokens.current() == ""
    assert ada.told[-1] is None
    with pytest.raises(Unauthenticated):
        await client.context.ListWorkspaces(cpb.ListWorkspacesRequest())
    # The tokens it had are refused too, wherever they are presented.
    async with Client(bob.client.target, timeout_s=CALL_DEADLINE_S) as stale:
        stale.use_tokens(kept)
        with pytest.raises(Unauthenticated):
            await stale.context.ListWorkspaces(cpb.ListWorkspacesRequest())
    with pytest.raises(Unauthenticated):
        await client.sign_in(ada.email, PASSWORD)

    # Bob owns the team now; the scratch workspace is gone; Ada left the shared one.
    members = await bob.client.context.ListWorkspaceMembers(
        cpb.ListWorkspaceMembersRequest(parent=team)
    )
    assert [(m.user, m.role) for m in members.members] == [(bob.user, cpb.WORKSPACE_ROLE_OWNER)]
    with pytest.raises((NotFound, PermissionDenied)):
        await bob.client.context.GetWorkspace(cpb.GetWorkspaceRequest(name=scratch))
    in_shared = await bob.client.context.ListWorkspaceMembers(
        cpb.ListWorkspaceMembersRequest(parent=shared)
    )
    assert [m.user for m in in_shared.members] == [bob.user]


def _json(archive: zipfile.ZipFile, name: str) -> object:
    return json.loads(archive.read(name))


async def test_an_export_is_waited_for_downloaded_and_checked(
    people: tuple[Person, Person], tmp_path: Path
) -> None:
    ada, _ = people
    client = ada.client
    workspace = await new_workspace(client, "Export")
    conversation = await new_conversation(client, workspace, "Kept")
    marker = f"remember the heron {uuid.uuid4().hex}"
    answered = await client.ask(conversation, marker, handler="echo")
    note = b"the notes I uploaded\n"
    await client.upload_file(workspace, note, display_name="notes.txt")

    started_export = await client.export_my_data()
    assert started_export.name.startswith(f"{ada.user}/exports/")
    export = await client.wait_for_export(started_export, timeout_s=CALL_DEADLINE_S)
    assert export.name == started_export.name
    assert export.state == cpb.DATA_EXPORT_STATE_SUCCEEDED
    assert export.media_type == "application/zip"
    assert export.HasField("expire_time")
    assert (await client.data_export(export.name)) == export

    path = tmp_path / "my-data.zip"
    downloaded = await client.download_export(export.name, path)
    assert (downloaded.sha256, downloaded.size_bytes) == (export.sha256, export.size_bytes)
    assert path.stat().st_size == export.size_bytes

    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        for expected in ("account.json", "memberships.json", "memory.json", "usage.json"):
            assert expected in names, names
        assert "README.txt" in names
        assert ada.email in json.dumps(_json(archive, "account.json"))
        _, workspace_id, _, conversation_id = conversation.split("/")
        talk = _json(archive, f"conversations/{workspace_id}/{conversation_id}.json")
        assert isinstance(talk, dict)
        # The message the test wrote, and the answer to the run it started.
        messages = talk["messages"]
        assert [m["name"] for m in messages] == [
            answered.run.input_message,
            answered.run.output_message,
        ]
        assert marker in json.dumps(messages[0])
        files = [n for n in names if n.startswith("files/")]
        assert len(files) == 1
        assert files[0].endswith("-notes.txt")
        assert archive.read(files[0]) == note

    # An archive that is not the one the export describes is refused, not kept quietly.
    wrong = cpb.DataExport()
    wrong.CopyFrom(export)
    wrong.sha256 = "0" * 64
    with pytest.raises(DataLoss):
        await client.download_export(wrong, io.BytesIO())
