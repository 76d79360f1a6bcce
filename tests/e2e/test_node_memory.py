"""The Node.js client's memory example (clients/node/memory.mjs) against a real
`switchboard serve` process.

The user's memory is made the way a person's is through the contracts (the Python
stubs here): a fact, then a newer one that supersedes it, and a note in the workspace
that must not show in the user's list. ``memory.mjs`` signs in, lists the user's
current memory in the workspace, shows each item's history, and forgets one; what it
printed is checked against what the server holds afterwards.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any, Final

import grpc
import pytest
from google.protobuf import timestamp_pb2

from switchboard.api.context.v1 import context_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ROOT, ServeProcess, tool
from tests.e2e.restarts import Caller, register
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MEMORY: Final = ROOT / "clients" / "node" / "memory.mjs"
#: How long one run of the example may take, on two busy cores.
SETTLE_S: Final = 60.0


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with ServeProcess("--dev") as served:
        yield served


def _memory(server: ServeProcess, email: str, workspace: str, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [
            tool("node"),
            str(MEMORY),
            server.address,
            "--email",
            email,
            "--password",
            PASSWORD,
            "--workspace",
            workspace,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=SETTLE_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _remember(
    caller: Caller, parent: str, content: str, *, supersedes: str = "", valid_seconds: int = 0
) -> context_pb2.MemoryItem:
    item = context_pb2.MemoryItem(
        kind=context_pb2.MEMORY_KIND_FACT, content=content, supersedes=supersedes
    )
    if valid_seconds:
        item.valid_time.CopyFrom(timestamp_pb2.Timestamp(seconds=valid_seconds))
    return caller.context.CreateMemoryItem(
        context_pb2.CreateMemoryItemRequest(parent=parent, memory_item=item),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    ).memory_item


def test_memory_mjs_lists_a_users_memory_with_its_history_and_forgets_an_item(
    server: ServeProcess,
) -> None:
    email = unique_email("node-memory")
    user = register(server, email)
    with Caller(server, email) as python:
        workspace = python.workspace("Node memory")
        paris = _remember(python, user, "lives in Paris", valid_seconds=1_767_225_600)
        berlin = _remember(python, user, "lives in Berlin", supersedes=paris.name)
        tea = _remember(python, user, "prefers tea")
        # The workspace's own memory is not the user's.
        _remember(python, workspace, "the office closes at six")

    shown = _memory(server, email, workspace)
    assert shown["user"] == user
    assert [item["name"] for item in shown["items"]] == [tea.name, berlin.name]
    assert shown["items"][1]["supersedes"] == paris.name
    assert shown["items"][1]["invalidTime"] is None
    assert all(item["workspace"] == "" for item in shown["items"])  # written by people
    history = shown["histories"][berlin.name]
    assert sorted((v["memoryItem"], v["version"], v["change"]) for v in history) == sorted(
        [
            (paris.name, 1, "MEMORY_CHANGE_CREATED"),
            (paris.name, 2, "MEMORY_CHANGE_RETIRED"),
            (berlin.name, 1, "MEMORY_CHANGE_CREATED"),
        ]
    )
    assert {v["editor"] for v in history} == {user}
    assert [(v["version"], v["change"]) for v in shown["histories"][tea.name]] == [
        (1, "MEMORY_CHANGE_CREATED")
    ]
    assert shown["forgotten"] is None

    retired = _memory(server, email, workspace, "--validity", "retired")
    assert [item["name"] for item in retired["items"]] == [paris.name]
    assert retired["items"][0]["supersededBy"] == berlin.name
    assert retired["items"][0]["invalidReason"] == "superseded"

    forgot = _memory(server, email, workspace, "--forget", tea.name)
    assert forgot["forgotten"] == tea.name
    assert [item["name"] for item in forgot["after"]] == [berlin.name, paris.name]

    with Caller(server, email) as python:
        with pytest.raises(grpc.RpcError) as missing:
            python.context.GetMemoryItem(
                context_pb2.GetMemoryItemRequest(name=tea.name),
                metadata=python.md,
                timeout=CALL_DEADLINE_S,
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        kept = python.context.ListMemoryItems(
            context_pb2.ListMemoryItemsRequest(
                parent=user, validity=context_pb2.MEMORY_VALIDITY_ALL
            ),
            metadata=python.md,
            timeout=CALL_DEADLINE_S,
        )
    assert [item.name for item in kept.memory_items] == [berlin.name, paris.name]


def test_memory_mjs_refuses_another_users_item(server: ServeProcess) -> None:
    """Forgetting is for one's own memory: another user's item is not found, and stays."""
    owner, stranger = unique_email("node-owner"), unique_email("node-stranger")
    register(server, owner)
    register(server, stranger)
    with Caller(server, owner) as python:
        owners = python.user
        secret = _remember(python, owners, "keeps a spare key under the mat")
    with Caller(server, stranger) as python:
        workspace = python.workspace("Elsewhere")
    done = subprocess.run(
        [
            tool("node"),
            str(MEMORY),
            server.address,
            "--email",
            stranger,
            "--password",
            PASSWORD,
            "--workspace",
            workspace,
            "--forget",
            secret.name,
        ],
        capture_output=True,
        text=True,
        timeout=SETTLE_S,
        check=False,
    )
    assert done.returncode == 1
    assert f"{grpc.StatusCode.NOT_FOUND.value[0]} " in done.stderr, done.stderr
    with Caller(server, owner) as python:
        still = python.context.GetMemoryItem(
            context_pb2.GetMemoryItemRequest(name=secret.name),
            metadata=python.md,
            timeout=CALL_DEADLINE_S,
        )
    assert still.memory_item.content == "keeps a spare key under the mat"
