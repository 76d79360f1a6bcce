"""The Go client's assistant revisions (clients/go/switchboard/assistants.go) against a
real `switchboard serve` process, through the examples/revisions program as a user runs
it: an assistant made and changed twice through the Python stubs is listed (three
revisions, newest first), read at its first revision, compared across two, asked a
question with its first revision, and rolled back to it, a fourth revision. What the
program printed (one JSON line each) is checked against what the server holds, read
through the Python stubs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.goclient import Line, Quickstart, build_example
from tests.e2e.procs import ServeProcess
from tests.e2e.restarts import Caller, register
from tests.e2e.revisionkit import ENGLISH, FRENCH, GERMAN, three_revisions
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def revisions_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_example(tmp_path_factory.mktemp("go-revisions"), "revisions")


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with ServeProcess("--dev") as served:
        yield served


class Revisions:
    """The example, run once per command as one user (registered already)."""

    def __init__(self, binary: Path, server: ServeProcess, email: str) -> None:
        self.binary = binary
        self.server = server
        self.email = email

    def run(self, *command: str, expect_exit: int = 0) -> list[Line]:
        """The lines after ``signed_in`` of one run of ``command``."""
        with Quickstart(
            self.binary,
            "-addr",
            self.server.address,
            "-plaintext",
            "-email",
            self.email,
            *command,
            env={"SB_PASSWORD": PASSWORD},
        ) as example:
            code = example.finish()
        assert code == expect_exit, example.describe()
        assert example.lines[0]["kind"] == "signed_in", example.describe()
        return example.lines[1:]

    def of_kind(self, kind: str, *command: str) -> list[Line]:
        return [line for line in self.run(*command) if line["kind"] == kind]

    def assistant(self, *command: str) -> dict[str, Any]:
        """The one assistant ``command`` printed."""
        [line] = self.of_kind("assistant", *command)
        shown: dict[str, Any] = line["assistant"]
        return shown


def _numbers(revisions: list[dict[str, Any]]) -> list[int]:
    # The JSON mapping writes int64 as a string.
    return [int(revision["revision"]) for revision in revisions]


def test_the_revisions_example_lists_reads_pins_and_rolls_back(
    revisions_example: Path, server: ServeProcess
) -> None:
    email = unique_email("go-revisions")
    register(server, email)
    with Caller(server, email) as python:
        user = python.user
        made = three_revisions(python, "Go revisions")
        conversation, name = made.conversation, made.name
        created, second, third = made.created, made.second, made.third
    assert (created.revision, second.revision, third.revision) == (1, 2, 3)
    example = Revisions(revisions_example, server, email)

    lines = example.run("list", name)
    assert lines[-1] == {"kind": "listed", "count": 3}
    listed = [line["revision"] for line in lines if line["kind"] == "revision"]
    assert _numbers(listed) == [3, 2, 1]
    assert [revision["name"] for revision in listed] == [f"{name}/revisions/{n}" for n in (3, 2, 1)]
    assert [revision["origin"] for revision in listed] == [
        "ASSISTANT_REVISION_ORIGIN_UPDATED",
        "ASSISTANT_REVISION_ORIGIN_UPDATED",
        "ASSISTANT_REVISION_ORIGIN_CREATED",
    ]
    assert {revision["author"] for revision in listed} == {user}
    assert [revision["assistant"]["instructions"] for revision in listed] == [
        GERMAN,
        FRENCH,
        ENGLISH,
    ]

    first = example.assistant("show", "-revision", "1", name)
    assert (first["name"], first["revision"], first["instructions"]) == (name, "1", ENGLISH)
    assert first["displayName"] == "Helper"
    assert "etag" not in first  # an earlier revision is not updated: it is rolled back to
    current = example.assistant("show", name)
    assert (current["revision"], current["etag"]) == ("3", third.etag)
    missing = example.run("show", "-revision", "9", name, expect_exit=1)
    assert missing[-1]["code"] == "NotFound"

    [diff] = example.of_kind("diff", "diff", "-from", "1", "-to", "3", name)
    assert (diff["from"], diff["to"]) == (1, 3)
    assert diff["changes"] == [
        {"field": "display_name", "from": "Helper", "to": "Helper (German)"},
        {"field": "instructions", "from": ENGLISH, "to": GERMAN},
    ]
    [since] = example.of_kind("diff", "diff", "-from", "2", name)
    assert since["to"] == 3
    assert [change["field"] for change in since["changes"]] == ["display_name", "instructions"]

    asked = example.run(
        "send", "-revision", "1", "-conversation", conversation, name, "bonjour tout le monde"
    )
    [sent] = [line for line in asked if line["kind"] == "sent"]
    [answered] = [line for line in asked if line["kind"] == "answered"]
    assert int(sent["run"]["assistantRevision"]) == 1
    pinned = answered["run"]
    assert (pinned["state"], pinned["assistant"], int(pinned["assistantRevision"])) == (
        "RUN_STATE_SUCCEEDED",
        name,
        1,
    )
    assert answered["text"].startswith("bonjour tout le monde")
    [unpinned] = example.of_kind(
        "answered", "send", "-conversation", conversation, name, "and now?"
    )
    assert int(unpinned["run"]["assistantRevision"]) == 3

    # A rollback with the etag of a revision since changed undoes nothing unseen.
    stale = example.run("rollback", "-revision", "1", "-etag", created.etag, name, expect_exit=1)
    assert stale[-1]["kind"] == "error"
    assert stale[-1]["reason"] == "ERROR_REASON_ETAG_MISMATCH"
    rolled = example.assistant("rollback", "-revision", "1", "-etag", third.etag, name)
    assert (rolled["revision"], rolled["instructions"], rolled["displayName"]) == (
        "4",
        ENGLISH,
        "Helper",
    )
    after = [line["revision"] for line in example.of_kind("revision", "list", name)]
    assert _numbers(after) == [4, 3, 2, 1]
    assert after[0]["origin"] == "ASSISTANT_REVISION_ORIGIN_ROLLED_BACK"
    assert int(after[0]["restoredRevision"]) == 1
    assert after[0]["author"] == user

    # What the server holds, read through the Python stubs.
    with Caller(server, email) as python:
        held = python.dispatcher.GetAssistant(
            dispatcher_pb2.GetAssistantRequest(name=name),
            metadata=python.md,
            timeout=CALL_DEADLINE_S,
        ).assistant
        assert (held.revision, held.instructions, held.etag) == (4, ENGLISH, rolled["etag"])
        assert python.run(pinned["name"]).assistant_revision == 1
        assert python.run(unpinned["run"]["name"]).assistant_revision == 3
