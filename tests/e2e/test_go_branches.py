"""The Go client's conversation branches (clients/go/switchboard/branches.go) against a
real `switchboard serve` process, through the examples/branches program as a user runs
it: a message sent, edited (a second version on branch 2) and its answer regenerated (a
second answer on branch 3), each shown "2 / 2"; the first version switched back to and
its answer deleted. Then the same calls one by one across an owner, an editor and a
viewer: who may edit, send and delete what. What the program printed (one JSON line
each) is checked against what the server holds, read through the Python stubs: the
siblings of each message, the active branch, the deleted messages gone and their
tombstones in the event log. Last a fork: an editor forks at the first answer while the
edit's branch is active, sends in the fork and reads it (the shared messages under the
source's names, then the fork's own); a viewer may not fork."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
from tests.e2e.goclient import Line, Quickstart, build_example
from tests.e2e.procs import ServeProcess
from tests.e2e.restarts import Caller, register
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

ASKED = "what is a branch"
EDITED = "what is a branch, really"
FORKED = "and what is a fork"


@pytest.fixture(scope="module")
def branches_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_example(tmp_path_factory.mktemp("go-branches"), "branches")


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with ServeProcess("--dev") as served:
        yield served


class Branches:
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

    def one(self, kind: str, *command: str) -> Line:
        """The one ``kind`` line of ``command``."""
        [line] = [line for line in self.run(*command) if line["kind"] == kind]
        return line

    def refused(self, *command: str) -> str:
        """The gRPC code of the error ``command`` ended with."""
        lines = self.run(*command, expect_exit=1)
        assert lines[-1]["kind"] == "error", lines
        code: str = lines[-1]["code"]
        return code


def _shown(line: Line) -> list[tuple[str, str, list[str]]]:
    """A "branch" line's messages: name, position and siblings."""
    return [(m["name"], m["position"], m["siblings"]) for m in line["messages"]]


def _answered(line: Line, branch: int, text: str) -> str:
    assert (line["state"], line["branch"]) == ("RUN_STATE_SUCCEEDED", branch), line
    # The echo handler repeats the message and signs its answer.
    assert line["text"].startswith(text), line
    answer: str = line["answer"]
    return answer


def test_the_tour_edits_regenerates_switches_back_and_deletes(
    branches_example: Path, server: ServeProcess
) -> None:
    email = unique_email("go-branches")
    register(server, email)
    with Caller(server, email) as python:
        conversation = new_conversation(python, "Go branches")
    example = Branches(branches_example, server, email)

    lines = example.run("tour", "-conversation", conversation, ASKED, EDITED)
    kinds = [line["kind"] for line in lines]
    assert kinds == [
        *("sent", "answered", "edited", "answered", "regenerated", "answered"),
        *("branch", "switched", "branch", "deleted", "branch"),
    ]
    sent, first, edited, second, regenerated, third = lines[:6]
    active, switched, back, deleted, after = lines[6:]

    asked = sent["message"]["name"]
    assert asked.startswith(conversation + "/messages/")
    assert (sent["message"]["role"], sent["message"]["text"]) == ("MESSAGE_ROLE_USER", ASKED)
    first_answer = _answered(first, 1, ASKED)

    version = edited["message"]["name"]
    assert (edited["replaces"], edited["message"]["text"], edited["branch"]) == (asked, EDITED, 2)
    assert version not in (asked, first_answer)
    second_answer = _answered(second, 2, EDITED)

    # The regenerated run answers the edit again, beside the edit's answer.
    assert (regenerated["replaces"], regenerated["message"]["name"]) == (second_answer, version)
    assert regenerated["branch"] == 3
    third_answer = _answered(third, 3, EDITED)
    assert len({first_answer, second_answer, third_answer}) == 3

    assert active["branch"] == 3
    assert _shown(active) == [
        (version, "2 / 2", [asked, version]),
        (third_answer, "2 / 2", [second_answer, third_answer]),
    ]
    assert active["messages"][0]["previous"] == asked
    assert active["messages"][1]["previous"] == second_answer
    assert (switched["active_branch"], switched["branch_count"]) == (1, 3)
    assert back["branch"] == 1
    assert _shown(back) == [(asked, "1 / 2", [asked, version]), (first_answer, "", [])]
    assert back["messages"][0]["next"] == version
    assert (deleted["deleted"], deleted["active_branch"]) == ([first_answer], 1)
    assert after["branch"] == 1
    assert _shown(after) == [(asked, "1 / 2", [asked, version])]

    # What the server holds, read through the Python stubs.
    with Caller(server, email) as python:
        held = held_conversation(python, conversation)
        assert (held.active_branch, held.branch_count) == (1, 3)
        assert read_branch(python, conversation) == read_branch(python, conversation, 1)
        one, on_first = read_branch(python, conversation, 1)
        assert one == 1
        assert placed(on_first) == [(asked, [asked, version], 1)]
        _, on_second = read_branch(python, conversation, 2)
        assert placed(on_second) == [
            (version, [asked, version], 2),
            (second_answer, [second_answer, third_answer], 1),
        ]
        assert [m.branch for m in on_second] == [2, 2]
        _, on_third = read_branch(python, conversation, 3)
        assert placed(on_third) == [
            (version, [asked, version], 2),
            (third_answer, [second_answer, third_answer], 2),
        ]
        assert [m.branch for m in on_third] == [2, 3]
        assert is_gone(python, first_answer)
        assert not is_gone(python, asked)
        assert tombstones(python, conversation) == [(first_answer, 1)]
        assert [python.run(line["run"]).branch for line in (first, second, third)] == [1, 2, 3]


def test_the_commands_keep_to_who_may_edit_send_and_delete(
    branches_example: Path, server: ServeProcess
) -> None:
    shared = shared_conversation(server, "go-branch")
    conversation = shared.conversation
    owner, editor, viewer = (
        Branches(branches_example, server, email)
        for email in (shared.owner, shared.editor, shared.viewer)
    )

    sent = owner.run("send", "-conversation", conversation, ASKED)
    asked = sent[0]["message"]["name"]
    first_answer = _answered(sent[1], 1, ASKED)
    # Only its author edits a message; a viewer sends nothing.
    assert editor.refused("edit", asked, EDITED) == "PermissionDenied"
    assert viewer.refused("send", "-conversation", conversation, "may I?") == "PermissionDenied"
    edited = owner.run("edit", asked, EDITED)
    version = edited[0]["message"]["name"]
    second_answer = _answered(edited[1], 2, EDITED)

    shown = owner.one("branch", "show", "-branch", "1", conversation)
    assert shown["branch"] == 1
    assert _shown(shown) == [
        (asked, "1 / 2", [asked, version]),
        (first_answer, "", []),
    ]
    # Everyone reads the active branch, the edit's.
    viewed = viewer.one("branch", "show", conversation)
    assert viewed["branch"] == 2
    assert [m["name"] for m in viewed["messages"]] == [version, second_answer]

    switched = owner.one("switched", "switch", "-branch", "1", conversation)
    assert (switched["active_branch"], switched["branch_count"]) == (1, 2)
    # An editor deletes answers, not someone else's message.
    assert editor.refused("delete", asked) == "PermissionDenied"
    gone = editor.one("deleted", "delete", first_answer)
    assert gone["deleted"] == [first_answer]
    back = owner.one("switched", "switch", "-message", version, conversation)
    assert back["active_branch"] == 2
    pruned = owner.one("deleted", "delete", "-with-later", version)
    assert pruned["deleted"] == [version, second_answer]

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


def test_a_fork_shares_the_history_up_to_a_message_and_goes_on_alone(
    branches_example: Path, server: ServeProcess
) -> None:
    shared = shared_conversation(server, "go-fork")
    conversation = shared.conversation
    owner, editor, viewer = (
        Branches(branches_example, server, email)
        for email in (shared.owner, shared.editor, shared.viewer)
    )
    sent = owner.run("send", "-conversation", conversation, ASKED)
    asked, first_answer = sent[0]["message"]["name"], _answered(sent[1], 1, ASKED)
    edited = owner.run("edit", asked, EDITED)
    version, second_answer = edited[0]["message"]["name"], _answered(edited[1], 2, EDITED)

    assert viewer.refused("fork", first_answer, "The viewer's") == "PermissionDenied"
    # The history shared is the first answer's branch, though the edit's is active.
    forked = editor.one("forked", "fork", first_answer, "The editor's")
    fork = forked["conversation"]
    assert fork.startswith(conversation.partition("/conversations/")[0] + "/conversations/")
    assert fork != conversation
    assert (forked["forked_from"], forked["title"], forked["message_count"]) == (
        first_answer,
        "The editor's",
        2,
    )
    in_fork = editor.run("send", "-conversation", fork, FORKED)
    own = in_fork[0]["message"]["name"]
    own_answer = _answered(in_fork[1], 1, FORKED)
    assert own.startswith(fork + "/messages/")
    assert own_answer.startswith(fork + "/messages/")
    shown = editor.one("branch", "show", fork)
    assert _shown(shown) == [
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
        # The viewer's refused fork left nothing behind.
        assert workspace_conversations(python, conversation) == {conversation, fork}
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
