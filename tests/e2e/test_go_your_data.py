"""The Go client's "your data" example (clients/go/examples/yourdata) against a real
`switchboard serve` process (docs/privacy.md): a person exports their data, the archive
downloaded and checked against the export's SHA-256 holds their account and the words
they wrote; then they delete their account, one workspace handed over to its other
member and every other one they owned alone deleted, and the tokens the program had are
refused. What it printed is checked against what the server holds afterwards, read
through the Python stubs. A delete the server refuses (a hand-over to someone who is no
member) changes nothing."""

from __future__ import annotations

import json
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.goclient import Line, Quickstart, build_example
from tests.e2e.procs import ServeProcess
from tests.e2e.restarts import Caller, register
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def yourdata_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_example(tmp_path_factory.mktemp("go-yourdata"), "yourdata")


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with ServeProcess("--dev") as served:
        yield served


def _run(binary: Path, server: ServeProcess, email: str, *command: str) -> tuple[int, list[Line]]:
    """The exit code of one run of ``command`` and the lines after ``signed_in``."""
    with Quickstart(
        binary,
        "-addr",
        server.address,
        "-plaintext",
        "-email",
        email,
        *command,
        env={"SB_PASSWORD": PASSWORD},
    ) as example:
        code = example.finish()
    assert example.lines[0]["kind"] == "signed_in", example.describe()
    return code, example.lines[1:]


def _add_member(owner: Caller, workspace: str, user: str) -> None:
    owner.context.AddWorkspaceMember(
        context_pb2.AddWorkspaceMemberRequest(
            parent=workspace, user=user, role=context_pb2.WORKSPACE_ROLE_EDITOR
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )


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


def test_export_then_delete_the_account(
    yourdata_example: Path, server: ServeProcess, tmp_path: Path
) -> None:
    email, other = unique_email("go-yourdata"), unique_email("go-yourdata-bob")
    register(server, email)
    bob = register(server, other)
    marker = f"the heron flies at dawn {uuid.uuid4().hex}"
    with Caller(server, email) as ada:
        scratch = ada.workspace("Scratch")
        team = ada.workspace("Team")
        _add_member(ada, team, bob)
        conversation = ada.context.CreateConversation(
            context_pb2.CreateConversationRequest(
                parent=scratch, conversation=context_pb2.Conversation(title="Kept")
            ),
            metadata=ada.md,
            timeout=CALL_DEADLINE_S,
        ).conversation.name
        ada.append(conversation, marker)

    # Refused: Bob's hand-over is fine, but "users/nobody" is no member of Scratch.
    code, refused = _run(
        yourdata_example,
        server,
        email,
        "delete",
        "-hand-over",
        f"{scratch}=users/nobody",
        "-hand-over",
        f"{team}={bob}",
    )
    assert code == 1, refused
    assert refused[-1]["kind"] == "error", refused
    assert (refused[-1]["step"], refused[-1]["code"]) == ("delete", "InvalidArgument")
    assert _signs_in(server, email) is None

    out = tmp_path / "my-data.zip"
    code, lines = _run(
        yourdata_example, server, email, "tour", "-out", str(out), "-hand-over", f"{team}={bob}"
    )
    assert code == 0, lines
    kinds = [line["kind"] for line in lines]
    assert kinds == [
        "export_started",
        "export_ready",
        "downloaded",
        "owned_alone",
        "deleted",
        "refused",
    ]
    started, ready, downloaded, owned, deleted, tokens = lines
    user = deleted["user"]
    assert started["export"].startswith(f"{user}/exports/")
    assert ready["export"] == started["export"]
    assert ready["state"] == "DATA_EXPORT_STATE_SUCCEEDED"
    assert ready["media_type"] == "application/zip"
    assert (downloaded["path"], downloaded["sha256"]) == (str(out), ready["sha256"])
    assert out.stat().st_size == ready["size_bytes"] == downloaded["size_bytes"]

    entries = {entry["name"] for entry in downloaded["entries"]}
    assert {"account.json", "memberships.json", "memory.json", "usage.json", "README.txt"} <= (
        entries
    )
    with zipfile.ZipFile(out) as archive:
        assert set(archive.namelist()) == entries
        assert email in json.dumps(json.loads(archive.read("account.json")))
        talks = [n for n in entries if n.startswith("conversations/") and n.endswith(".json")]
        assert marker in "".join(archive.read(n).decode() for n in talks)

    assert set(owned["workspaces"]) >= {scratch, team}
    choices = {c["workspace"]: (c["action"], c["new_owner"]) for c in deleted["workspaces"]}
    assert choices[team] == ("OWNED_WORKSPACE_ACTION_HAND_OVER", bob)
    assert choices[scratch] == ("OWNED_WORKSPACE_ACTION_DELETE", "")
    assert set(choices) == set(owned["workspaces"])
    assert deleted["erasure"].startswith("erasures/")
    assert deleted["state"] in ("ERASURE_STATE_RUNNING", "ERASURE_STATE_DONE")
    assert (tokens["access_token"], tokens["refresh_token"]) == (
        "Unauthenticated",
        "Unauthenticated",
    )

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
