"""The Node.js client's "your data" example (clients/node/yourdata.mjs) against a real
`switchboard serve` process (docs/privacy.md).

``yourdata.mjs`` signs in, exports the person's data, downloads the archive (checked
against the export's size and SHA-256) and lists the ZIP's entries from its central
directory; then deletes the account, one workspace handed over to its other member and
every other one owned alone deleted, and presents the tokens it had again: both refused.
What it printed is checked against the archive itself (opened with Python's zipfile) and
against what the server holds afterwards, read through the Python stubs. A delete the
server refuses (a hand-over to someone who is no member) changes nothing, and the
error on stderr names the field.
"""

from __future__ import annotations

import json
import subprocess
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import grpc
import pytest

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ROOT, ServeProcess, tool
from tests.e2e.restarts import Caller, register
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

YOURDATA: Final = ROOT / "clients" / "node" / "yourdata.mjs"
#: How long one run of the example may take, on two busy cores.
SETTLE_S: Final = 120.0
INVALID: Final = f"yourdata: {grpc.StatusCode.INVALID_ARGUMENT.value[0]} "


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with ServeProcess("--dev") as served:
        yield served


def _yourdata(server: ServeProcess, email: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            tool("node"),
            str(YOURDATA),
            server.address,
            *("--email", email, "--password", PASSWORD),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=SETTLE_S,
        check=False,
    )


def _shown(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _signs_in(server: ServeProcess, email: str) -> grpc.StatusCode | None:
    """None if ``email`` signs in with the test password, else the refusal's code."""
    with grpc.insecure_channel(server.address) as channel:
        try:
            auth_pb2_grpc.AuthServiceStub(channel).Login(
                auth_pb2.LoginRequest(
                    password=auth_pb2.PasswordCredential(email=email, password=PASSWORD)
                ),
                timeout=CALL_DEADLINE_S,
            )
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()
            return code
    return None


def test_yourdata_mjs_exports_then_deletes_the_account(
    server: ServeProcess, tmp_path: Path
) -> None:
    email, other = unique_email("node-yourdata"), unique_email("node-yourdata-bob")
    user = register(server, email)
    bob = register(server, other)
    marker = f"the kestrel hovers {uuid.uuid4().hex}"
    with Caller(server, email) as ada:
        scratch = ada.workspace("Scratch")
        team = ada.workspace("Team")
        ada.context.AddWorkspaceMember(
            context_pb2.AddWorkspaceMemberRequest(
                parent=team, user=bob, role=context_pb2.WORKSPACE_ROLE_VIEWER
            ),
            metadata=ada.md,
            timeout=CALL_DEADLINE_S,
        )
        conversation = ada.context.CreateConversation(
            context_pb2.CreateConversationRequest(
                parent=scratch, conversation=context_pb2.Conversation(title="Kept")
            ),
            metadata=ada.md,
            timeout=CALL_DEADLINE_S,
        ).conversation.name
        written = ada.append(conversation, marker)

    # Refused: Scratch handed over to a user who is no member of it.
    stranger = f"users/{uuid.uuid4().hex}"
    refused = _yourdata(server, email, "--no-export", "--hand-over", f"{scratch}={stranger}")
    assert refused.returncode == 1, refused.stdout
    assert refused.stdout == ""
    assert refused.stderr.startswith(INVALID), refused.stderr
    assert ".new_owner" in refused.stderr, refused.stderr
    assert _signs_in(server, email) is None

    out = tmp_path / "my-data.zip"
    shown = _shown(_yourdata(server, email, "--out", str(out), "--hand-over", f"{team}={bob}"))
    assert shown["user"] == user
    export, downloaded = shown["export"], shown["downloaded"]
    assert export["name"].startswith(f"{user}/exports/")
    assert (export["state"], export["mediaType"]) == (
        "DATA_EXPORT_STATE_SUCCEEDED",
        "application/zip",
    )
    assert (downloaded["path"], downloaded["sha256"]) == (str(out), export["sha256"])
    assert out.stat().st_size == downloaded["sizeBytes"] == int(export["sizeBytes"])

    with zipfile.ZipFile(out) as archive:
        listed = {(i.filename, i.file_size) for i in archive.infolist()}
        assert {(e["name"], e["sizeBytes"]) for e in downloaded["entries"]} == listed
        names = {name for name, _ in listed}
        assert {
            "account.json",
            "memberships.json",
            "memory.json",
            "usage.json",
            "README.txt",
        } <= names
        assert email in json.dumps(json.loads(archive.read("account.json")))
        _, workspace_id, _, conversation_id = conversation.split("/")
        talk = json.loads(archive.read(f"conversations/{workspace_id}/{conversation_id}.json"))
        [message] = talk["messages"]
        assert message["name"] == written
        assert marker in json.dumps(message)

    assert set(shown["ownedAlone"]) >= {scratch, team}
    deleted = shown["deleted"]
    assert deleted["user"] == user
    assert deleted["erasure"].startswith("erasures/")
    assert deleted["state"] in ("ERASURE_STATE_RUNNING", "ERASURE_STATE_DONE")
    assert set(deleted["workspaces"]) == set(shown["ownedAlone"])
    assert shown["refused"] == {"accessToken": "UNAUTHENTICATED", "refreshToken": "UNAUTHENTICATED"}

    # What the server holds: Ada signs in no more; Bob owns the team; Scratch is gone.
    assert _signs_in(server, email) == grpc.StatusCode.UNAUTHENTICATED
    with Caller(server, other) as b:
        members = b.context.ListWorkspaceMembers(
            context_pb2.ListWorkspaceMembersRequest(parent=team),
            metadata=b.md,
            timeout=CALL_DEADLINE_S,
        ).members
        assert [(m.user, m.role) for m in members] == [(bob, context_pb2.WORKSPACE_ROLE_OWNER)]
        with pytest.raises(grpc.RpcError) as gone:
            b.context.GetWorkspace(
                context_pb2.GetWorkspaceRequest(name=scratch),
                metadata=b.md,
                timeout=CALL_DEADLINE_S,
            )
        assert gone.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
