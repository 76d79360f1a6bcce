"""The Go client's phone calls (clients/go/switchboard/calls.go) against a real
`switchboard serve` process without SIP, through the examples/calls program as a user
runs it: a workspace with no calls lists none, a call the server refuses is
INVALID_ARGUMENT naming its fields, a well-formed one is FAILED_PRECONDITION (the server
places no calls), and a call that does not exist is NOT_FOUND to read and to end. A call
placed, answered and ended over a real SIP line is the Python client's test
(tests/client/test_client_calls.py); the Go client's requests, keys, retries and paging
are its own unit tests (calls_test.go)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.goclient import Line, Quickstart, build_example
from tests.e2e.procs import ServeProcess
from tests.e2e.restarts import Caller, register
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def calls_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_example(tmp_path_factory.mktemp("go-calls"), "calls")


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    with ServeProcess("--dev") as served:
        yield served


def run(
    binary: Path, server: ServeProcess, email: str, *command: str, exit_code: int
) -> list[Line]:
    """The lines after ``signed_in`` of one run of ``command``."""
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
    assert code == exit_code, example.describe()
    assert example.lines[0]["kind"] == "signed_in", example.describe()
    return example.lines[1:]


def test_the_calls_example_against_a_server_without_sip(
    calls_example: Path, server: ServeProcess
) -> None:
    email = unique_email("go-calls")
    register(server, email)
    with Caller(server, email) as python:
        workspace = python.workspace("Go calls")

    assert run(calls_example, server, email, "list", workspace, exit_code=0) == [
        {"kind": "listed", "count": 0}
    ]
    assert run(calls_example, server, email, "list", "-live", workspace, exit_code=0) == [
        {"kind": "listed", "count": 0}
    ]

    place = ["place", "-trunk", "carrier", "-assistant", f"{workspace}/assistants/a"]
    [bad] = run(
        calls_example,
        server,
        email,
        *place,
        "-to",
        "555-1234",
        "-opening",
        "",
        workspace,
        exit_code=1,
    )
    assert (bad["kind"], bad["step"], bad["code"]) == ("error", "place", "InvalidArgument")
    assert set(bad["fields"]) == {"to_number", "opening_message"}

    [nowhere] = run(
        calls_example,
        server,
        email,
        *place,
        "-to",
        "+15551230001",
        "-opening",
        "Tell Ann her agenda for today.",
        workspace,
        exit_code=1,
    )
    assert (nowhere["step"], nowhere["code"]) == ("place", "FailedPrecondition")
    assert "SWITCHBOARD_SIP_LISTEN" in nowhere["error"]

    missing = f"{workspace}/calls/none-such"
    for command in ("show", "end"):
        [gone] = run(calls_example, server, email, command, missing, exit_code=1)
        assert (gone["step"], gone["code"], gone["reason"]) == (
            command,
            "NotFound",
            "ERROR_REASON_NOT_FOUND",
        )
    # Nothing was placed.
    assert run(calls_example, server, email, "list", workspace, exit_code=0) == [
        {"kind": "listed", "count": 0}
    ]
