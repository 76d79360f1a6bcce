"""The Go client's memory calls (clients/go/switchboard/memory.go) against a real
`switchboard serve` process, through the examples/memory program as a user runs it:
remember a fact, replace it with a newer one, list the user's memory by validity and
at a time, read an item's history, correct it with its etag, forget it (and the item it
replaced with it). What the program printed (one JSON line each) is checked against what
the server holds, read through the Python stubs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import grpc
import pytest

from switchboard.api.context.v1 import context_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.goclient import Line, Quickstart, build_example
from tests.e2e.procs import ServeProcess
from tests.e2e.restarts import Caller
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

JANUARY: Final = "2026-01-01T00:00:00Z"
MARCH: Final = "2026-03-01T00:00:00Z"


@pytest.fixture(scope="module")
def memory_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_example(tmp_path_factory.mktemp("go-memory"), "memory")


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with ServeProcess("--dev") as served:
        yield served


class Memory:
    """The example, run once per command as one user."""

    def __init__(self, binary: Path, server: ServeProcess) -> None:
        self.binary = binary
        self.server = server
        self.email = unique_email("go-memory")
        self.registered = False

    def run(self, *command: str, expect_exit: int = 0) -> list[Line]:
        """The lines after ``signed_in`` of one run of ``command``."""
        sign_in = () if self.registered else ("-register",)
        self.registered = True
        with Quickstart(
            self.binary,
            "-addr",
            self.server.address,
            "-plaintext",
            "-email",
            self.email,
            *sign_in,
            *command,
            env={"SB_PASSWORD": PASSWORD},
        ) as example:
            code = example.finish()
        assert code == expect_exit, example.describe()
        if expect_exit == 0:
            assert example.lines[0]["kind"] == "signed_in", example.describe()
            return example.lines[1:]
        return example.lines

    def items(self, *command: str) -> list[dict[str, Any]]:
        return [line["item"] for line in self.run(*command) if line["kind"] == "item"]


def _names(items: list[dict[str, Any]]) -> list[str]:
    return [item["name"] for item in items]


def test_the_memory_example_lists_by_validity_corrects_and_forgets(
    memory_example: Path, server: ServeProcess
) -> None:
    memory = Memory(memory_example, server)
    assert memory.run("list") == [{"kind": "listed", "count": 0}]

    [paris] = memory.items(
        "remember", "-valid-time", JANUARY, "-id", "home-paris", "lives in Paris"
    )
    assert paris["name"].endswith("/memories/home-paris")
    assert paris["name"].startswith("users/")
    [berlin] = memory.items("remember", "-supersedes", paris["name"], "lives in Berlin")
    assert berlin["supersedes"] == paris["name"]

    assert _names(memory.items("list")) == [berlin["name"]]
    [retired] = memory.items("list", "-validity", "retired")
    assert retired["name"] == paris["name"]
    assert retired["supersededBy"] == berlin["name"]
    assert retired["invalidReason"] == "superseded"
    assert "invalidTime" in retired
    assert _names(memory.items("list", "-validity", "all")) == [berlin["name"], paris["name"]]
    assert _names(memory.items("list", "-at", MARCH)) == [paris["name"]]

    [corrected] = memory.items(
        "correct", "-etag", berlin["etag"], berlin["name"], "lives in Berlin, Kreuzberg"
    )
    assert corrected["content"] == "lives in Berlin, Kreuzberg"
    assert corrected["version"] == 2
    stale = memory.run(
        "correct", "-etag", berlin["etag"], berlin["name"], "lives in Hamburg", expect_exit=1
    )
    assert stale[-1]["kind"] == "error"
    assert stale[-1]["reason"] == "ERROR_REASON_ETAG_MISMATCH"

    lines = memory.run("history", berlin["name"])
    assert lines[0]["item"]["content"] == "lives in Berlin, Kreuzberg"
    versions = [line["version"] for line in lines if line["kind"] == "version"]
    assert sorted((v["memoryItem"], v["version"], v["change"]) for v in versions) == sorted(
        [
            (paris["name"], 1, "MEMORY_CHANGE_CREATED"),
            (paris["name"], 2, "MEMORY_CHANGE_RETIRED"),
            (berlin["name"], 1, "MEMORY_CHANGE_CREATED"),
            (berlin["name"], 2, "MEMORY_CHANGE_EDITED"),
        ]
    )

    # Forgetting the newest item forgets its whole history: the item it replaced too.
    assert memory.run("forget", berlin["name"]) == [{"kind": "forgotten", "name": berlin["name"]}]
    assert memory.items("list", "-validity", "all") == []
    for name in (berlin["name"], paris["name"]):
        gone = memory.run("history", name, expect_exit=1)
        assert gone[-1]["code"] == "NotFound"

    # What the server holds, read through the Python stubs.
    with Caller(server, memory.email) as python:
        listed = python.context.ListMemoryItems(
            context_pb2.ListMemoryItemsRequest(
                parent=python.user, validity=context_pb2.MEMORY_VALIDITY_ALL
            ),
            metadata=python.md,
            timeout=CALL_DEADLINE_S,
        )
        assert list(listed.memory_items) == []
        with pytest.raises(grpc.RpcError) as missing:
            python.context.GetMemoryItem(
                context_pb2.GetMemoryItemRequest(name=paris["name"]),
                metadata=python.md,
                timeout=CALL_DEADLINE_S,
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_memory_example_sets_a_workspace_policy_and_retires(
    memory_example: Path, server: ServeProcess
) -> None:
    memory = Memory(memory_example, server)
    memory.run("list")
    with Caller(server, memory.email) as python:
        workspace = python.workspace("Memory policy")
    [line] = memory.run("policy", "-mode", "user_and_workspace", "-idle-minutes", "10", workspace)
    policy = line["set"]["memoryPolicy"]
    assert policy == {"mode": "MEMORY_FORMING_MODE_USER_AND_WORKSPACE", "idleMinutes": 10}
    refused = memory.run("policy", "-idle-minutes", "99999", workspace, expect_exit=1)
    assert refused[-1]["code"] == "InvalidArgument"

    [note] = memory.items("-scope", workspace, "remember", "-kind", "note", "closes at six")
    [retired] = memory.items("retire", note["name"], "closes at seven now")
    assert retired["invalidReason"] == "closes at seven now"
    assert memory.items("-scope", workspace, "list") == []
    assert _names(memory.items("-scope", workspace, "list", "-validity", "retired")) == [
        note["name"]
    ]
    with Caller(server, memory.email) as python:
        read = python.context.GetWorkspace(
            context_pb2.GetWorkspaceRequest(name=workspace),
            metadata=python.md,
            timeout=CALL_DEADLINE_S,
        )
    assert read.workspace.memory_policy.idle_minutes == 10
