"""The Node.js client's revisions example (clients/node/revisions.mjs) against a real
`switchboard serve` process.

An assistant is made and changed twice the way a person does it through the contracts
(the Python stubs here). ``revisions.mjs`` signs in, lists its three revisions newest
first, reads the first and compares it with the current one, asks a question with the
first revision rather than the current one, and rolls the assistant back to it: a
fourth revision. What it printed is checked against what the server holds afterwards.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any, Final

import grpc
import pytest

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ROOT, ServeProcess, tool
from tests.e2e.restarts import Caller, register
from tests.e2e.revisionkit import ENGLISH, FRENCH, GERMAN, three_revisions, update_assistant
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REVISIONS: Final = ROOT / "clients" / "node" / "revisions.mjs"
#: How long one run of the example may take, on two busy cores.
SETTLE_S: Final = 60.0


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with ServeProcess("--dev") as served:
        yield served


def _revisions(
    server: ServeProcess, email: str, assistant: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            tool("node"),
            str(REVISIONS),
            server.address,
            "--email",
            email,
            "--password",
            PASSWORD,
            "--assistant",
            assistant,
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


def test_revisions_mjs_lists_reads_pins_and_rolls_back(server: ServeProcess) -> None:
    email = unique_email("node-revisions")
    user = register(server, email)
    with Caller(server, email) as python:
        made = three_revisions(python, "Node revisions")
        conversation, name = made.conversation, made.name
        created, second, third = made.created, made.second, made.third
    assert (created.revision, second.revision, third.revision) == (1, 2, 3)

    shown = _shown(
        _revisions(
            server,
            email,
            name,
            "--at",
            "1",
            "--conversation",
            conversation,
            "--send",
            "bonjour tout le monde",
        )
    )
    assert shown["user"] == user
    listed = shown["revisions"]
    assert [r["revision"] for r in listed] == [3, 2, 1]
    assert [r["name"] for r in listed] == [f"{name}/revisions/{n}" for n in (3, 2, 1)]
    assert [r["origin"] for r in listed] == [
        "ASSISTANT_REVISION_ORIGIN_UPDATED",
        "ASSISTANT_REVISION_ORIGIN_UPDATED",
        "ASSISTANT_REVISION_ORIGIN_CREATED",
    ]
    assert {r["author"] for r in listed} == {user}
    assert [r["assistant"]["instructions"] for r in listed] == [GERMAN, FRENCH, ENGLISH]

    first = shown["at"]
    assert (first["name"], first["revision"], first["instructions"]) == (name, 1, ENGLISH)
    assert first["etag"] == ""  # an earlier revision is not updated: it is rolled back to
    assert (shown["diff"]["from"], shown["diff"]["to"]) == (1, 3)
    assert shown["diff"]["changes"] == [
        {"field": "displayName", "from": "Helper", "to": "Helper (German)"},
        {"field": "instructions", "from": ENGLISH, "to": GERMAN},
    ]
    run = shown["run"]
    assert (run["state"], run["assistant"], run["assistantRevision"]) == (
        "RUN_STATE_SUCCEEDED",
        name,
        1,
    )
    assert run["text"].startswith("bonjour tout le monde")
    assert shown["rolledBack"] is None

    # A revision the assistant does not keep is not found.
    missing = _revisions(server, email, name, "--at", "9")
    assert missing.returncode == 1
    assert f"{grpc.StatusCode.NOT_FOUND.value[0]} " in missing.stderr, missing.stderr
    # A rollback with the etag of a revision since changed undoes nothing unseen.
    stale = _revisions(server, email, name, "--rollback", "1", "--etag", created.etag)
    assert stale.returncode == 1
    assert f"{grpc.StatusCode.ABORTED.value[0]} " in stale.stderr, stale.stderr
    assert "ERROR_REASON_ETAG_MISMATCH" in stale.stderr

    rolled = _shown(_revisions(server, email, name, "--rollback", "1", "--etag", third.etag))
    assert [r["revision"] for r in rolled["revisions"]] == [3, 2, 1]
    back = rolled["rolledBack"]
    assert (back["revision"], back["instructions"], back["displayName"]) == (4, ENGLISH, "Helper")
    after = rolled["after"]
    assert [r["revision"] for r in after] == [4, 3, 2, 1]
    assert (after[0]["origin"], after[0]["restoredRevision"], after[0]["author"]) == (
        "ASSISTANT_REVISION_ORIGIN_ROLLED_BACK",
        1,
        user,
    )
    assert [r["restoredRevision"] for r in after[1:]] == [0, 0, 0]

    # What the server holds, read through the Python stubs.
    with Caller(server, email) as python:
        held = python.dispatcher.GetAssistant(
            dispatcher_pb2.GetAssistantRequest(name=name),
            metadata=python.md,
            timeout=CALL_DEADLINE_S,
        ).assistant
        assert (held.revision, held.instructions, held.etag) == (4, ENGLISH, back["etag"])
        assert python.run(run["name"]).assistant_revision == 1


def test_revisions_mjs_rolls_back_for_owners_only(server: ServeProcess) -> None:
    """An editor of the workspace reads the revisions but may not roll back; a stranger
    does not find the assistant. The owner's assistant stays as it was."""
    owner, editor, stranger = (
        unique_email(f"node-{who}") for who in ("owner", "editor", "stranger")
    )
    register(server, owner)
    editor_user = register(server, editor)
    register(server, stranger)
    with Caller(server, owner) as python:
        workspace = python.workspace("Shared")
        python.context.AddWorkspaceMember(
            context_pb2.AddWorkspaceMemberRequest(
                parent=workspace, user=editor_user, role=context_pb2.WORKSPACE_ROLE_EDITOR
            ),
            metadata=python.md,
            timeout=CALL_DEADLINE_S,
        )
        created = python.dispatcher.CreateAssistant(
            dispatcher_pb2.CreateAssistantRequest(
                parent=workspace,
                assistant_id="shared",
                assistant=dispatcher_pb2.Assistant(
                    display_name="Shared", instructions=ENGLISH, handler="handlers/echo"
                ),
            ),
            metadata=python.md,
            timeout=CALL_DEADLINE_S,
        ).assistant
        changed = update_assistant(
            python,
            dispatcher_pb2.Assistant(name=created.name, etag=created.etag, instructions=FRENCH),
            "instructions",
        )

    read = _shown(_revisions(server, editor, created.name))
    assert [r["revision"] for r in read["revisions"]] == [2, 1]
    refused = _revisions(server, editor, created.name, "--rollback", "1")
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert f"{grpc.StatusCode.PERMISSION_DENIED.value[0]} " in refused.stderr, refused.stderr
    unknown = _revisions(server, stranger, created.name)
    assert unknown.returncode == 1
    assert f"{grpc.StatusCode.NOT_FOUND.value[0]} " in unknown.stderr, unknown.stderr

    with Caller(server, owner) as python:
        held = python.dispatcher.GetAssistant(
            dispatcher_pb2.GetAssistantRequest(name=created.name),
            metadata=python.md,
            timeout=CALL_DEADLINE_S,
        ).assistant
    assert (held.revision, held.instructions, held.etag) == (2, FRENCH, changed.etag)
