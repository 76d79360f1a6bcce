"""The Go client (clients/go) against real `switchboard serve` processes.

The Go sources are formatted, vetted and unit-tested by the go toolchain. The
quickstart example, built once per session, is then driven like a user runs it:
it signs in, creates a workspace and a conversation, sends a message, prints the
answer as it streams, and follows the conversation's events. Everything it saw
is one JSON line on its stdout; the tests wait on those lines (each wait with a
deadline) and compare them with what the server itself reports (ListEvents,
GetRun, GetMessage through the Python stubs).

Restarts are real: the server is stopped (SIGTERM, or SIGKILL for a crash) and
started again on the same port with the same SQLite file and the same secrets
(not dev mode, whose keys are made per process), while the example is
subscribed or watching a run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import wave
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Final

import grpc
import pytest
from google.rpc import error_details_pb2

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.platform.security.credentials.accesstokens import SigningKey, private_key_pem
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.goclient import Line, Quickstart, build_example, build_quickstart, go, gofmt
from tests.e2e.procs import ROOT, START_TIMEOUT_S, ManagedProcess, ServeProcess
from tests.e2e.restarts import (
    HEARTBEAT_S,
    Caller,
    position,
    register,
    restart_env,
    restarted,
)
from tests.infra.speech import COUNTING, says, speak
from tests.infra.tcprelay import TcpRelay
from tests.kits.authkit import PASSWORD, unique_email

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

#: How long a run or a resume may take, on two busy cores.
SETTLE_S: Final = 90.0
#: Flags that make the example resume quickly in tests (a user keeps the defaults).
FAST_RESUME: Final = ("-min-backoff", "100ms", "-max-backoff", "1s")


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_quickstart(tmp_path_factory.mktemp("go-quickstart"))


def _env(directory: Path, **extra: str) -> dict[str, str]:
    # A stop waits out the grace while the example's streams are open (docs/operations.md,
    # "Shutdown"): a short one keeps each restart short, and the run still outlasts it.
    return restart_env(directory, "go-client-e2e", SWITCHBOARD_SHUTDOWN_GRACE_S="0.5", **extra)


class AudioServerProcess(ManagedProcess):
    """The local audio server (tests/fakes/audio_server.py) as a process of its own: the
    Go example's test waits on lines in this process's thread, so the server cannot
    share its event loop. Its first stdout line is its base URL."""

    def __init__(self) -> None:
        super().__init__("audio-server-")
        self.url = ""

    def start(self) -> AudioServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.audio_server", "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT_S)
        assert ready, f"the audio server printed nothing within {START_TIMEOUT_S}s"
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), self.url
        return self

    def __exit__(self, *exc: object) -> None:
        # SIGTERM first: the server stops its recognition process before it exits.
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.terminate(timeout=CALL_DEADLINE_S)
        super().__exit__(*exc)


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    """One dev-mode server for the tests that neither stop nor restart theirs, each a
    user of its own. Its voice is the local audio server, for the talk example's tests:
    a server of their own cost them a start of several seconds on a busy machine."""
    with (
        AudioServerProcess() as audio,
        ServeProcess(
            "--dev",
            env={
                "SWITCHBOARD_EVENTS_HEARTBEAT_S": HEARTBEAT_S,
                "SWITCHBOARD_VOICE_URL": audio.url,
                "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
                # The echo answer's long note goes out ahead of playback, not waited out.
                "SWITCHBOARD_VOICE_LEAD_MS": "10000",
            },
        ) as served,
    ):
        yield served


def _example(quickstart: Path, server: ServeProcess, email: str, *args: str) -> Quickstart:
    return Quickstart(
        quickstart,
        "-addr",
        server.address,
        "-plaintext",
        "-email",
        email,
        *FAST_RESUME,
        *args,
        env={"SB_PASSWORD": PASSWORD},
    )


@pytest.fixture
def python_clients() -> Iterator[list[Caller]]:
    opened: list[Caller] = []
    yield opened
    for client in opened:
        client.close()


def _reason_of(run: dispatcher_pb2.Run) -> str:
    for detail in run.error.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError(f"no ErrorInfo in {run.error}")


def _assert_exactly_the_logged_events(example: Quickstart, logged: list[events_pb2.Event]) -> None:
    """The example delivered exactly the events the log holds after where it started:
    each once, in log order, with increasing cursors."""
    delivered = example.of_kind("event")
    assert [e["id"] for e in delivered] == [e.id for e in logged], example.describe()
    assert [e["cursor"] for e in delivered] == [e.cursor for e in logged]
    positions = [position(e["cursor"]) for e in delivered]
    assert positions == sorted(set(positions)), "cursors not strictly increasing"


def _event_of(message: str) -> Callable[[Line], bool]:
    return lambda line: line["kind"] == "event" and line.get("message") == message


def _wait_events(example: Quickstart, messages: list[str]) -> None:
    """Wait until the example printed the MESSAGE_CREATED event of each message."""
    for name in messages:
        example.wait_for(_event_of(name), f"the event of {name}", SETTLE_S)


def _last_cursor_before(example: Quickstart, line: Line) -> str:
    """The last position the example reported before ``line``."""
    before = example.lines[: example.lines.index(line)]
    return str([entry for entry in before if entry["kind"] == "cursor"][-1]["cursor"])


# -- the toolchain -------------------------------------------------------------------


def test_go_sources_are_gofmt_clean() -> None:
    done = gofmt("-l", ".")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "", f"not gofmt-formatted:\n{done.stdout}"


def test_go_vet_passes() -> None:
    done = go("vet", "./...")
    assert done.returncode == 0, done.stdout + done.stderr


def test_go_unit_tests_pass_under_the_race_detector() -> None:
    """Backoff, cursor tracking, the answer transcript, error decoding and the
    single-flight token refresh (the last one under -race)."""
    done = go("test", "-race", "-count=1", "./...")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok  \tswitchboard.dev/go/switchboard" in done.stdout


# -- the quickstart against a server ---------------------------------------------------


def test_quickstart_signs_in_sends_watches_and_follows(
    quickstart: Path, server: ServeProcess, python_clients: list[Caller]
) -> None:
    email = unique_email("go-quickstart")
    message = "hello from the go quickstart"
    with _example(quickstart, server, email, "-register", "-message", message) as example:
        signed_in = example.wait_kind("signed_in")
        conversation = example.wait_kind("conversation")["name"]
        sent = example.wait_kind("sent")
        done = example.wait_kind("run_done", SETTLE_S)
        subscribed = example.wait_kind("subscribed")
        python = Caller(server, email)
        python_clients.append(python)
        appended = [python.append(conversation, f"note {i}") for i in range(3)]
        _wait_events(example, appended)
        example.signal(signal.SIGTERM)
        assert example.finish() == 0, example.describe()
        stored_answer = python.text_of(done["output_message"])
        logged = python.logged(conversation, subscribed["cursor"])

    assert signed_in["method"] == "register"
    assert signed_in["user"].startswith("users/")
    assert sent["run"].startswith(conversation + "/runs/")
    updates = example.of_kind("run_update")
    # Gapless: each update (a merged delta covers first_sequence .. sequence) follows the last.
    assert [u["first_sequence"] for u in updates] == [1, *(u["sequence"] + 1 for u in updates[:-1])]
    assert updates[0]["state"] == "RUN_STATE_QUEUED"
    assert updates[-1]["state"] == "RUN_STATE_SUCCEEDED"
    streamed = "".join(u["text"] for u in updates if u["update"] == "delta")
    assert done["run"] == sent["run"]
    assert done["state"] == "RUN_STATE_SUCCEEDED"
    # The echo handler repeats the message and signs its answer.
    assert streamed.startswith(message)
    assert "(answered by handlers/echo" in streamed
    assert done["answer"] == streamed == stored_answer
    assert subscribed["after_cursor"] == ""
    _assert_exactly_the_logged_events(example, logged)
    assert [e["message"] for e in example.of_kind("event") if "message" in e] == appended
    assert example.lines[-1]["kind"] == "done"


def test_quickstart_reports_errors_decoded_from_status_details(
    quickstart: Path, server: ServeProcess
) -> None:
    """ErrorInfo and BadRequest come out of the gRPC status as errdetails types: the Go
    module uses genproto's google.rpc, not a second generated copy of it."""
    with _example(
        quickstart, server, unique_email("go-bad"), "-register", "-workspace-id", "Not An Id!"
    ) as bad:
        invalid = bad.wait_kind("error")
        assert bad.finish() == 1
    # An API key of the right shape that the server never issued.
    forged = "sbk_" + "a" * 8 + "_" + "A" * 43
    with Quickstart(
        quickstart,
        "-addr",
        server.address,
        "-plaintext",
        env={"SB_API_KEY": forged},
    ) as anonymous:
        refused = anonymous.wait_kind("error")
        assert anonymous.finish() == 1

    assert invalid["step"] == "set_up"
    assert invalid["code"] == "InvalidArgument"
    assert invalid["reason"] == "ERROR_REASON_INVALID_ARGUMENT"
    assert [v["field"] for v in invalid["violations"]] == ["workspace_id"]
    assert refused["step"] == "sign_in"
    assert refused["code"] == "Unauthenticated"
    assert refused["reason"] == "ERROR_REASON_UNAUTHENTICATED"
    assert "signed_out" not in refused  # an API key is not refreshed


def test_quickstart_steers_a_run_that_is_going(
    quickstart: Path, server: ServeProcess, python_clients: list[Caller]
) -> None:
    """``-steer`` calls ``Client.SteerRun`` while the run goes: the steer is accepted at
    once with its own run, and, the echo handler having no step boundary to take it at,
    it is requeued when the run ends and answers the message itself (never lost)."""
    email = unique_email("go-steer")
    with _example(
        quickstart,
        server,
        email,
        "-register",
        "-message",
        "count one two three four",
        "-param",
        "delay_ms=300",
        "-steer",
        "and then stop",
        "-follow=false",
    ) as example:
        sent = example.wait_kind("sent")
        steered = example.wait_kind("steered")
        done = example.wait_kind("run_done", SETTLE_S)
        steer_done = example.wait_kind("steer_done", SETTLE_S)
        assert example.finish() == 0, example.describe()
        python = Caller(server, email)
        python_clients.append(python)
        steer_message = python.text_of(steered["message"])
        steer_run = python.run(steered["run"])

    assert steered["target"] == sent["run"]
    assert (steered["state"], steered["steer_state"]) == (
        "RUN_STATE_QUEUED",
        "STEER_STATE_ACCEPTED",
    )
    assert steer_message == "and then stop"
    # The steered run says what became of the steer in its own updates.
    told = [
        (u["steer_state"], u["steer_run"])
        for u in example.of_kind("run_update")
        if u["run"] == sent["run"] and u["update"] == "steer"
    ]
    assert told[-1] == ("STEER_STATE_REQUEUED", steered["run"])
    assert done["state"] == "RUN_STATE_SUCCEEDED"
    assert done["answer"].startswith("count one two three four")
    assert (steer_done["run"], steer_done["state"]) == (steered["run"], "RUN_STATE_SUCCEEDED")
    assert steer_done["steer_state"] == "STEER_STATE_REQUEUED"
    assert steer_done["answer"].startswith("and then stop")
    assert steer_run.steer.state == dispatcher_pb2.STEER_STATE_REQUEUED
    assert example.lines[-1]["kind"] == "done"


@contextmanager
def _echo_model() -> Iterator[str]:
    """The local OpenAI-protocol server (tests/fakes/openai_server.py) in a process of its
    own: its echo model answers with the message, or with the tool calls a
    ``call NAME {json}`` line asks for, and after tool results with what they returned."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_server", "--port", "0", "--quiet"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            pytest.fail(f"the OpenAI-protocol server did not start: {url!r}")
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=SETTLE_S)
        if proc.stdout is not None:
            proc.stdout.close()


def test_quickstart_follows_a_delegating_runs_children_and_lists_its_tree(
    quickstart: Path, python_clients: list[Caller]
) -> None:
    """docs/delegation.md through the Go client: ``-assistant`` sends to a planner whose
    delegates are pricing and stock; the echo model makes one ``ask_`` call for each, so
    the run has two children. ``WatchOptions.OnChild`` names them on the parent's stream,
    each is followed with ``WatchRun`` to its end, and ``Client.Tree`` (GetRun, then
    ``Children``: ListRuns by parent_run) lists the tree, as the server stores it."""
    email = unique_email("go-tree")
    with ExitStack() as stack:
        model = stack.enter_context(_echo_model())
        server = stack.enter_context(
            ServeProcess(
                "--dev",
                env={
                    "SWITCHBOARD_LLM_BASE_URL": model,
                    "SWITCHBOARD_LLM_MODEL": "echo",
                    "SWITCHBOARD_LLM_MAX_RETRIES": "0",
                    "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
                },
            )
        )
        register(server, email)
        python = Caller(server, email)
        python_clients.append(python)
        workspace = python.workspace("Trees")
        assistants: dict[str, str] = {}
        plan: tuple[tuple[str, tuple[str, ...]], ...] = (
            ("pricing", ()),
            ("stock", ()),
            ("planner", ("pricing", "stock")),
        )
        for assistant_id, delegates in plan:
            assistants[assistant_id] = python.dispatcher.CreateAssistant(
                dispatcher_pb2.CreateAssistantRequest(
                    parent=workspace,
                    assistant_id=assistant_id,
                    assistant=dispatcher_pb2.Assistant(
                        display_name=assistant_id.title(),
                        delegates=[
                            dispatcher_pb2.AssistantDelegate(
                                assistant=f"{workspace}/assistants/{d}"
                            )
                            for d in delegates
                        ],
                    ),
                ),
                metadata=python.md,
                timeout=CALL_DEADLINE_S,
            ).assistant.name
        message = "\n".join(
            (
                'call ask_pricing {"input": "price of a kayak"}',
                'call ask_stock {"input": "kayaks in stock"}',
            )
        )
        with _example(
            quickstart,
            server,
            email,
            "-workspace",
            workspace,
            "-assistant",
            assistants["planner"],
            "-message",
            message,
            "-tree",
            "-follow=false",
        ) as example:
            sent = example.wait_kind("sent")
            done = example.wait_kind("run_done", SETTLE_S)
            tree = example.wait_kind("tree", SETTLE_S)
            assert example.finish() == 0, example.describe()
        stored = {r: python.run(r) for r in (line["run"] for line in tree["runs"])}

    parent = sent["run"]
    assert done["state"] == "RUN_STATE_SUCCEEDED", example.describe()
    assert (done["parent"], done["depth"]) == ("", 0)
    named = [
        u
        for u in example.of_kind("run_update")
        if u["run"] == parent and u["update"] == "child_run"
    ]
    started = [u for u in named if u["child_state"] in ("RUN_STATE_QUEUED", "RUN_STATE_RUNNING")]
    ended = [u for u in named if u["child_state"] == "RUN_STATE_SUCCEEDED"]
    assert len(started) == len(ended) == 2, example.describe()
    assert {u["child"] for u in started} == {u["child"] for u in ended}
    by_assistant = {u["assistant"]: u for u in started}
    assert set(by_assistant) == {assistants["pricing"], assistants["stock"]}
    # Each child was followed to its end with its own watch: the echo of its question.
    followed = {line["run"]: line for line in example.of_kind("child_done")}
    assert list(followed) == [u["child"] for u in started]
    for assistant, question in (
        (assistants["pricing"], "price of a kayak"),
        (assistants["stock"], "kayaks in stock"),
    ):
        child = followed[by_assistant[assistant]["child"]]
        assert child["state"] == "RUN_STATE_SUCCEEDED"
        assert child["answer"] == question
        assert (child["parent"], child["depth"]) == (parent, 1)
    # The parent's model got both answers back as the tools' results.
    assert "Tool ask_pricing returned: price of a kayak" in done["answer"]
    assert "Tool ask_stock returned: kayaks in stock" in done["answer"]
    # The tree the Go client listed is the one the server stores.
    runs = tree["runs"]
    assert runs[0]["run"] == parent
    assert [r["depth"] for r in runs] == [0, 1, 1]
    assert {r["run"] for r in runs[1:]} == set(followed)
    for line in runs[1:]:
        run = stored[line["run"]]
        assert (line["parent"], line["parent_tool_call"]) == (run.parent, run.parent_tool_call)
        assert run.parent == parent
        assert line["parent_tool_call"] == next(
            u["tool_call_id"] for u in started if u["child"] == line["run"]
        )
    assert example.lines[-1]["kind"] == "done"


# -- restarts --------------------------------------------------------------------------


def test_following_resumes_after_a_server_restart_with_every_event_once(
    quickstart: Path, tmp_path: Path, python_clients: list[Caller]
) -> None:
    env = _env(tmp_path)
    email = unique_email("go-follow")
    with ExitStack() as stack:
        first = stack.enter_context(ServeProcess(env=env))
        example = stack.enter_context(_example(quickstart, first, email, "-register"))
        conversation = example.wait_kind("conversation")["name"]
        start = example.wait_kind("subscribed")["cursor"]
        python = Caller(first, email)
        python_clients.append(python)
        before = [python.append(conversation, f"before {i}") for i in range(3)]
        _wait_events(example, before)
        # Heartbeats carry the example's position past events of other scopes.
        elsewhere = python.event_elsewhere()
        example.wait_for(
            lambda line: (
                line["kind"] == "cursor" and position(line["cursor"]) >= position(elsewhere)
            ),
            "a heartbeat past an event of another scope",
            SETTLE_S,
        )

        assert first.terminate() == 0
        broken = example.wait_kind("follow_retry", SETTLE_S)
        # Hold the example away until events were published that it can only get by
        # resuming after its cursor (the replay, not the live feed).
        example.signal(signal.SIGSTOP)
        try:
            second = restarted(stack, first, env)
            python = Caller(second, email)
            python_clients.append(python)
            away = [python.append(conversation, f"away {i}") for i in range(3)]
        finally:
            example.signal(signal.SIGCONT)
        resumed = example.wait_for(
            lambda line: line["kind"] == "subscribed" and line["after_cursor"] != "",
            "the subscription resumed",
            SETTLE_S,
        )
        _wait_events(example, away)
        after = [python.append(conversation, f"after {i}") for i in range(3)]
        _wait_events(example, after)
        example.signal(signal.SIGTERM)
        assert example.finish() == 0, example.describe()
        logged = python.logged(conversation, start)

    assert resumed["after_cursor"] == broken["after_cursor"] == _last_cursor_before(example, broken)
    assert position(resumed["after_cursor"]) >= position(elsewhere)
    assert [line["kind"] for line in example.lines].count("subscribed") == 2
    delivered = example.of_kind("event")
    assert [e["message"] for e in delivered if "message" in e] == before + away + after
    assert all(example.lines.index(e) > example.lines.index(resumed) for e in delivered[-6:])
    _assert_exactly_the_logged_events(example, logged)


@pytest.mark.parametrize(
    ("recovery", "stop", "end"),
    [
        ("requeue", signal.SIGTERM, "RUN_STATE_SUCCEEDED"),
        ("fail", signal.SIGTERM, "RUN_STATE_FAILED"),
        # A crash may come before RUNNING is stored (it is stored alongside the first
        # words, service.py _begin): the restart then runs the run as one that never
        # started. Either end is right; the watcher must reach the one stored.
        ("fail", signal.SIGKILL, None),
    ],
    ids=["stopped-and-requeued", "stopped-and-failed", "crashed"],
)
def test_a_watched_run_resumes_across_a_restart_to_its_end(
    quickstart: Path,
    tmp_path: Path,
    python_clients: list[Caller],
    recovery: str,
    stop: signal.Signals,
    end: str | None,
) -> None:
    """docs/dispatcher.md, Restarts: a stopping server requeues its running runs with
    ``requeue`` and fails them (RUN_INTERRUPTED) with ``fail``; after a crash the
    restarted server applies the policy. The watcher resumes after its last sequence,
    on the restarted server, and sees the end that was stored."""
    env = _env(tmp_path, SWITCHBOARD_DISPATCHER_RECOVERY=recovery)
    email = unique_email("go-run")
    # The echo handler waits between words: a run that is still going when stopped.
    words = " ".join(f"word{i}" for i in range(40))
    args = ("-register", "-message", words, "-param", "delay_ms=200", "-follow=false")
    with ExitStack() as stack:
        first = stack.enter_context(ServeProcess(env=env))
        example = stack.enter_context(_example(quickstart, first, email, *args))
        run = example.wait_kind("sent")["run"]
        example.wait_for(
            lambda line: line["kind"] == "run_update" and line.get("update") == "delta",
            "the first words of the answer",
        )
        assert first.proc is not None
        first.proc.send_signal(stop)
        first.proc.wait(timeout=SETTLE_S)
        retry = example.wait_kind("watch_retry", SETTLE_S)
        second = restarted(stack, first, env)
        done = example.wait_kind("run_done", SETTLE_S)
        assert example.finish() == 0, example.describe()
        python = Caller(second, email)
        python_clients.append(python)
        stored = python.run(run)
        stored_answer = python.text_of(stored.output_message) if stored.output_message else ""

    updates = example.of_kind("run_update")
    sequences = [u["sequence"] for u in updates]
    assert sequences == sorted(set(sequences)), "sequences not strictly increasing"
    seen_before = [u for u in updates if example.lines.index(u) < example.lines.index(retry)]
    assert retry["after_sequence"] == seen_before[-1]["sequence"]
    assert done["run"] == run
    assert done["state"] == dispatcher_pb2.RunState.Name(stored.state)
    assert done["state"] == (end or done["state"])
    if done["state"] == "RUN_STATE_SUCCEEDED":
        # Run again from the start by the restarted server, numbered in the next block
        # (RunUpdate.sequence); the answer is whole, never spliced from two attempts.
        assert sequences[-1] > 2**32
        assert done["answer"].startswith(words)
        assert done["answer"] == stored_answer
    else:
        assert done["state"] == "RUN_STATE_FAILED"
        # Decoded in Go from Run.error (a google.rpc.Status) with status.FromProto.
        assert done["reason"] == "ERROR_REASON_RUN_INTERRUPTED"
        assert done["reason"] == _reason_of(stored)


def test_a_saved_session_survives_a_key_rotation_and_ends_when_its_token_is_reused(
    quickstart: Path, tmp_path: Path, python_clients: list[Caller]
) -> None:
    """The server restarts with a new signing key only, so the saved access token is
    refused: the client refreshes once (the refresh token is checked against the
    database, not the key) and retries. Presenting the refresh token it replaced
    revokes the session: the client's refresh is then refused, and it is signed out."""
    env = _env(tmp_path)
    rotated = tmp_path / "rotated"
    rotated.mkdir()
    (rotated / "k2.pem").write_bytes(private_key_pem(SigningKey.generate("k2")))
    rotated_env = {**env, "SWITCHBOARD_SIGNING_KEYS": str(rotated / "k2.pem")}
    session = tmp_path / "session.json"
    email = unique_email("go-session")
    with ExitStack() as stack:
        first = stack.enter_context(ServeProcess(env=env))
        with _example(
            quickstart, first, email, "-register", "-tokens-file", str(session), "-follow=false"
        ) as signing_up:
            conversation = signing_up.wait_kind("conversation")["name"]
            assert signing_up.finish() == 0, signing_up.describe()
        spent = json.loads(session.read_text())["refreshToken"]
        assert first.terminate() == 0

        second = stack.enter_context(ServeProcess(env=rotated_env))
        resumed = stack.enter_context(
            Quickstart(
                quickstart,
                "-addr",
                second.address,
                "-plaintext",
                "-tokens-file",
                str(session),
                "-conversation",
                conversation,
                "-message",
                "after the rotation",
                *FAST_RESUME,
            )
        )
        refreshed = resumed.wait_kind("new_tokens")
        signed_in = resumed.wait_kind("signed_in")
        sent = resumed.wait_kind("sent")
        done = resumed.wait_kind("run_done", SETTLE_S)
        resumed.wait_kind("subscribed")
        current = json.loads(session.read_text())["refreshToken"]

        # Someone presents the spent refresh token: the server revokes the session.
        channel = stack.enter_context(grpc.insecure_channel(second.address))
        with pytest.raises(grpc.RpcError) as reused:
            auth_pb2_grpc.AuthServiceStub(channel).RefreshToken(
                auth_pb2.RefreshTokenRequest(refresh_token=spent), timeout=CALL_DEADLINE_S
            )
        error = resumed.wait_kind("error", SETTLE_S)
        assert resumed.finish() == 1

    assert signing_up.of_kind("new_tokens") != []
    assert refreshed["access_token_expire_time"]
    assert signed_in["method"] == "saved_session"
    assert resumed.lines.index(refreshed) < resumed.lines.index(signed_in)
    assert sent["run"].startswith(conversation + "/runs/")
    assert resumed.of_kind("workspace") == resumed.of_kind("conversation") == []
    assert done["state"] == "RUN_STATE_SUCCEEDED"
    assert current != spent, "the rotated refresh token was not saved"
    assert reused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error["step"] == "follow"
    assert error["signed_out"] is True
    assert error["code"] == "Unauthenticated"


def test_the_files_example_uploads_and_downloads_the_same_bytes(
    tmp_path_factory: pytest.TempPathFactory, server: ServeProcess
) -> None:
    """UploadPath (one client stream, the SHA-256 computed while sending) and
    DownloadFile through the examples/files program, against a real server."""
    directory = tmp_path_factory.mktemp("go-files")
    binary = build_example(directory, "files")
    # Three chunks and a bit, so chunking and the offsets of the download show.
    content = os.urandom(3 * 1024 * 1024 + 4321)
    source, copy = directory / "photo-roll.bin", directory / "copy.bin"
    source.write_bytes(content)
    email = unique_email("go-files")
    with Quickstart(
        binary,
        "-addr",
        server.address,
        "-plaintext",
        "-email",
        email,
        "-register",
        "-file",
        str(source),
        "-out",
        str(copy),
        env={"SB_PASSWORD": PASSWORD},
    ) as example:
        uploaded = example.wait_kind("uploaded")
        downloaded = example.wait_kind("downloaded")
        assert example.finish() == 0, example.describe()
    digest = hashlib.sha256(content).hexdigest()
    assert uploaded["name"].startswith("workspaces/")
    assert "/files/" in uploaded["name"]
    assert uploaded["display_name"] == "photo-roll.bin"
    assert uploaded["size_bytes"] == len(content)
    assert uploaded["sha256"] == digest
    assert downloaded["name"] == uploaded["name"]
    assert downloaded["sha256"] == digest
    assert copy.read_bytes() == content


# -- voice: examples/talk ---------------------------------------------------------------


@pytest.fixture(scope="module")
def talk_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_example(tmp_path_factory.mktemp("go-talk"), "talk")


def _talk(binary: Path, address: str, email: str, *args: str) -> Quickstart:
    return Quickstart(
        binary,
        "-addr",
        address,
        "-plaintext",
        "-email",
        email,
        "-register",
        *FAST_RESUME,
        *args,
        env={"SB_PASSWORD": PASSWORD},
    )


def _stored_run(server: ServeProcess, email: str, run: str) -> list[dispatcher_pb2.RunUpdate]:
    """The run's updates as the server keeps them, watched from the start."""
    with Caller(server, email) as python:
        stream = python.dispatcher.WatchRun(
            dispatcher_pb2.WatchRunRequest(name=run), metadata=python.md, timeout=SETTLE_S
        )
        return [frame.update for frame in stream if frame.HasField("update")]


def _spoken(updates: list[dispatcher_pb2.RunUpdate]) -> bytes:
    return b"".join(u.speech.audio for u in updates if u.HasField("speech"))


def _check_turn(example: Quickstart, stored: list[dispatcher_pb2.RunUpdate]) -> None:
    """The example got the turn's transcript and then each of the run's updates once, in
    order, numbered from the turn (TalkResponse.sequence)."""
    frames = example.of_kind("frame")
    numbered = [f["sequence"] for f in frames if f["sequence"]]
    assert numbered == sorted(set(numbered)), "a frame came twice, or out of order"
    turn = frames[0]["turn"]
    assert numbered == [turn << 40] + [(turn << 40) + u.sequence for u in stored]


def test_the_talk_example_sends_a_wav_as_a_turn_and_writes_the_spoken_answer(
    talk_example: Path, server: ServeProcess, tmp_path: Path
) -> None:
    question, answer = tmp_path / "question.wav", tmp_path / "answer.wav"
    question.write_bytes(speak(COUNTING))
    email = unique_email("go-talk")
    with _talk(
        talk_example, server.address, email, "-wav", str(question), "-out", str(answer)
    ) as example:
        session = example.wait_kind("session")
        heard = example.wait_for(
            lambda line: line["kind"] == "transcript" and line["final"], "the transcript", SETTLE_S
        )
        done = example.wait_kind("answer", SETTLE_S)
        assert example.finish() == 0, example.describe()
    stored = _stored_run(server, email, done["run"])

    assert session["name"].endswith("/voiceSessions/" + session["name"].rsplit("/", 1)[1])
    assert says(heard["text"]), heard["text"]
    assert heard["recording"].startswith("workspaces/")
    assert done["transcript"] == heard["text"]
    assert done["state"] == "RUN_STATE_SUCCEEDED"
    assert done["text"].startswith(heard["text"])
    assert done["resumes"] == 0
    _check_turn(example, stored)
    # The WAV holds exactly the speech the server sent, at the session's output rate.
    with wave.open(str(answer), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24_000)
        assert wav.readframes(wav.getnframes()) == _spoken(stored)
    assert done["speech_bytes"] == len(_spoken(stored)) > 0
    assert example.lines[-1]["kind"] == "done"


def test_the_talk_example_resumes_a_session_cut_mid_answer(
    talk_example: Path, server: ServeProcess, tmp_path: Path
) -> None:
    answer = tmp_path / "answer.wav"
    email = unique_email("go-talk-cut")
    said = "one two three. four five six. seven eight nine."
    with (
        TcpRelay(server.port) as relay,
        _talk(
            talk_example, f"127.0.0.1:{relay.port}", email, "-say", said, "-out", str(answer)
        ) as example,
    ):
        example.wait_for(
            lambda line: line["kind"] == "frame" and line.get("update") == "speech",
            "the answer's first speech",
            SETTLE_S,
        )
        # The network goes with the answer half spoken; the session resumes by itself.
        assert relay.cut() >= 1
        retry = example.wait_kind("retry", SETTLE_S)
        resumed = example.wait_kind("resumed", SETTLE_S)
        done = example.wait_kind("answer", SETTLE_S)
        assert example.finish() == 0, example.describe()
    stored = _stored_run(server, email, done["run"])

    assert retry["code"] == "Unavailable"
    assert resumed["after_sequence"] == retry["after_sequence"]
    assert resumed["lost_turns"] == 0
    assert done["resumes"] >= 1
    assert done["state"] == "RUN_STATE_SUCCEEDED"
    _check_turn(example, stored)
    with wave.open(str(answer), "rb") as wav:
        assert wav.readframes(wav.getnframes()) == _spoken(stored)
