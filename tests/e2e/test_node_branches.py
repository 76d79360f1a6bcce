"""The Node.js client's branches example (clients/node/branches.mjs) against a real
`switchboard serve` process.

``branches.mjs`` signs in, sends a message, edits it (a second version on branch 2) and
regenerates the edit's answer (a second answer on branch 3): the active branch shows
each "2 / 2". Run again, it switches back to the first version and deletes its answer.
Then across an owner, an editor and a viewer: who may edit, send and delete what. What
it printed is checked against what the server holds afterwards, read through the Python
stubs: the siblings of each message, the active branch, the deleted messages gone and
their tombstones in the event log. Last forks: at the last message shown or a given one
(the first answer, while the edit's branch is active); a message sent in the fork reads
after the shared ones, named under the source; a viewer may not fork.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any, Final

import grpc
import pytest

from tests.e2e.branchkit import (
    held_conversation,
    is_gone,
    new_conversation,
    placed,
    read_branch,
    shared_conversation,
    tombstones,
    workspace_conversations,
)
from tests.e2e.procs import ROOT, ServeProcess, tool
from tests.e2e.restarts import Caller, register
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BRANCHES: Final = ROOT / "clients" / "node" / "branches.mjs"
#: How long one run of the example may take (three runs answered), on two busy cores.
SETTLE_S: Final = 120.0
ASKED: Final = "what is a branch"
EDITED: Final = "what is a branch, really"
FORKED: Final = "and what is a fork"
DENIED: Final = f"{grpc.StatusCode.PERMISSION_DENIED.value[0]} "


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with ServeProcess("--dev") as served:
        yield served


def _branches(
    server: ServeProcess, email: str, conversation: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            tool("node"),
            str(BRANCHES),
            server.address,
            "--email",
            email,
            "--password",
            PASSWORD,
            "--conversation",
            conversation,
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


def _denied(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 1, done.stdout
    assert done.stdout == ""
    assert DENIED in done.stderr, done.stderr


def _placed(branch: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """A shown branch's messages: name, position and siblings."""
    return [(m["name"], m["position"], m["siblings"]) for m in branch["messages"]]


def _answer(step: dict[str, Any], branch: int, text: str) -> str:
    assert (step["state"], step["branch"]) == ("RUN_STATE_SUCCEEDED", branch), step
    # The echo handler repeats the message and signs its answer.
    assert step["text"].startswith(text), step
    answer: str = step["answer"]
    return answer


def test_branches_mjs_edits_regenerates_switches_back_and_deletes(server: ServeProcess) -> None:
    email = unique_email("node-branches")
    user = register(server, email)
    with Caller(server, email) as python:
        conversation = new_conversation(python, "Node branches")

    made = _shown(
        _branches(server, email, conversation, "--send", ASKED, "--edit", EDITED, "--regenerate")
    )
    assert made["user"] == user
    assert (made["switched"], made["deleted"]) == (None, None)
    sent, edited, regenerated = made["sent"], made["edited"], made["regenerated"]
    asked = sent["message"]["name"]
    assert (sent["message"]["role"], sent["message"]["text"]) == ("MESSAGE_ROLE_USER", ASKED)
    first_answer = _answer(sent, 1, ASKED)
    version = edited["message"]["name"]
    assert (edited["replaces"], edited["message"]["text"]) == (asked, EDITED)
    second_answer = _answer(edited, 2, EDITED)
    # The regenerated run answers the edit again, beside the edit's answer.
    assert (regenerated["replaces"], regenerated["message"]["name"]) == (second_answer, version)
    third_answer = _answer(regenerated, 3, EDITED)
    assert len({asked, version, first_answer, second_answer, third_answer}) == 5
    assert made["branch"]["branch"] == 3
    assert _placed(made["branch"]) == [
        (version, "2 / 2", [asked, version]),
        (third_answer, "2 / 2", [second_answer, third_answer]),
    ]

    pruned = _shown(
        _branches(server, email, conversation, "--switch", asked, "--delete", first_answer)
    )
    assert (pruned["sent"], pruned["edited"], pruned["regenerated"]) == (None, None, None)
    assert pruned["switched"] == {"activeBranch": 1, "branchCount": 3}
    assert pruned["deleted"] == {"deleted": [first_answer], "activeBranch": 1}
    assert pruned["branch"]["branch"] == 1
    assert _placed(pruned["branch"]) == [(asked, "1 / 2", [asked, version])]

    # What the server holds, read through the Python stubs.
    with Caller(server, email) as python:
        held = held_conversation(python, conversation)
        assert (held.active_branch, held.branch_count) == (1, 3)
        _, on_first = read_branch(python, conversation, 1)
        assert placed(on_first) == [(asked, [asked, version], 1)]
        _, on_third = read_branch(python, conversation, 3)
        assert placed(on_third) == [
            (version, [asked, version], 2),
            (third_answer, [second_answer, third_answer], 2),
        ]
        assert is_gone(python, first_answer)
        assert not is_gone(python, second_answer)
        assert tombstones(python, conversation) == [(first_answer, 1)]
        runs = [step["run"] for step in (sent, edited, regenerated)]
        assert [python.run(run).branch for run in runs] == [1, 2, 3]


def test_branches_mjs_keeps_to_who_may_edit_send_and_delete(server: ServeProcess) -> None:
    shared = shared_conversation(server, "node-branch")
    conversation = shared.conversation
    sent = _shown(_branches(server, shared.owner, conversation, "--send", ASKED))["sent"]
    asked, first_answer = sent["message"]["name"], _answer(sent, 1, ASKED)

    # Only its author edits a message; a viewer sends nothing; an editor deletes answers,
    # not someone else's message.
    _denied(_branches(server, shared.editor, conversation, "--message", asked, "--edit", EDITED))
    _denied(_branches(server, shared.viewer, conversation, "--send", "may I?"))
    _denied(_branches(server, shared.editor, conversation, "--delete", asked))
    edited = _shown(
        _branches(server, shared.owner, conversation, "--message", asked, "--edit", EDITED)
    )["edited"]
    version, second_answer = edited["message"]["name"], _answer(edited, 2, EDITED)
    viewed = _shown(_branches(server, shared.viewer, conversation))
    assert viewed["branch"]["branch"] == 2
    assert [m["name"] for m in viewed["branch"]["messages"]] == [version, second_answer]

    answer_gone = _shown(
        _branches(server, shared.editor, conversation, "--branch", "1", "--delete", first_answer)
    )
    assert answer_gone["switched"]["activeBranch"] == 1
    assert answer_gone["deleted"]["deleted"] == [first_answer]
    pruned = _shown(
        _branches(
            server,
            shared.owner,
            conversation,
            "--switch",
            version,
            "--delete",
            version,
            "--with-later",
        )
    )
    assert pruned["switched"]["activeBranch"] == 2
    assert pruned["deleted"]["deleted"] == [version, second_answer]

    with Caller(server, shared.owner) as python:
        for name in (first_answer, version, second_answer):
            assert is_gone(python, name), name
        _, on_first = read_branch(python, conversation, 1)
        # A deleted version leaves the switcher of the one it stood beside.
        assert placed(on_first) == [(asked, [], 0)]
        assert tombstones(python, conversation) == [
            (first_answer, 1),
            (version, 2),
            (second_answer, 2),
        ]


def test_branches_mjs_forks_at_a_message_and_the_fork_goes_on_alone(server: ServeProcess) -> None:
    shared = shared_conversation(server, "node-fork")
    conversation = shared.conversation
    made = _shown(_branches(server, shared.owner, conversation, "--send", ASKED, "--edit", EDITED))
    sent, edited = made["sent"], made["edited"]
    asked, first_answer = sent["message"]["name"], _answer(sent, 1, ASKED)
    version, second_answer = edited["message"]["name"], _answer(edited, 2, EDITED)

    _denied(_branches(server, shared.viewer, conversation, "--fork", "The viewer's"))
    # By default at the last message shown: the edit's answer, on the active branch.
    latest = _shown(_branches(server, shared.owner, conversation, "--fork", "The owner's"))
    assert [m["name"] for m in latest["branch"]["messages"]] == [version, second_answer]
    assert (latest["forked"]["forkedFrom"], latest["forked"]["title"]) == (
        second_answer,
        "The owner's",
    )
    # At a given message: the history shared is its branch's, not the active one's.
    forked = _shown(
        _branches(
            server, shared.editor, conversation, "--fork", "The editor's", "--at", first_answer
        )
    )["forked"]
    fork = forked["name"]
    assert fork.startswith(conversation.partition("/conversations/")[0] + "/conversations/")
    assert fork not in (conversation, latest["forked"]["name"])
    assert (forked["forkedFrom"], forked["title"], forked["messageCount"]) == (
        first_answer,
        "The editor's",
        "2",
    )
    in_fork = _shown(_branches(server, shared.editor, fork, "--send", FORKED))
    own, own_answer = in_fork["sent"]["message"]["name"], _answer(in_fork["sent"], 1, FORKED)
    assert own.startswith(fork + "/messages/")
    assert own_answer.startswith(fork + "/messages/")
    assert _placed(in_fork["branch"]) == [
        (asked, "", []),
        (first_answer, "", []),
        (own, "", []),
        (own_answer, "", []),
    ]

    with Caller(server, shared.owner) as python:
        held = held_conversation(python, fork)
        assert (held.forked_from, held.title, held.message_count) == (
            first_answer,
            "The editor's",
            4,
        )
        assert held_conversation(python, latest["forked"]["name"]).forked_from == second_answer
        # The viewer's refused fork left nothing behind.
        assert workspace_conversations(python, conversation) == {
            conversation,
            latest["forked"]["name"],
            fork,
        }
        _, in_the_fork = read_branch(python, fork)
        assert [m.name for m in in_the_fork] == [asked, first_answer, own, own_answer]
        assert [python.text_of(m.name) for m in in_the_fork[::2]] == [ASKED, FORKED]
        # The source goes on without the fork's messages.
        assert held_conversation(python, conversation).forked_from == ""
        active, in_the_source = read_branch(python, conversation)
        assert active == 2
        assert [m.name for m in in_the_source] == [version, second_answer]
        _, on_first = read_branch(python, conversation, 1)
        assert [m.name for m in on_first] == [asked, first_answer]
