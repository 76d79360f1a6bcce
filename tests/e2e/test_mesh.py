"""``switchboard mesh`` end to end: the scaled-out shape from one command, through Envoy.

Both shapes: one process per service (the default: the two dispatcher replicas own the
runs), and two whole-run processes (``--processes 2``: each serves every service, so the
killed one takes its auth, context and events with it).

The launcher runs as a user would run it (a subprocess, a fresh data
directory, every port 0, a short Envoy health interval). A client speaks native
gRPC to Envoy's plain listener only: it signs up, opens an event subscription,
starts slow runs until both dispatcher replicas own one, and keeps chatting
while one replica is killed with SIGKILL. Then:

- SendMessage keeps succeeding through Envoy, also while the replica is down,
  with at most ``MAX_UNAVAILABLE`` UNAVAILABLE answers, retried by the client
  with the same request id;
- the killed replica's runs end FAILED ``RUN_INTERRUPTED`` (recovery policy
  ``fail``, set for this test: a run that fails says which replica died), the
  other replica's runs succeed, and every watcher sees
  sequences strictly increasing across its resumes;
- the launcher restarts the replica (a new pid in mesh.json, the same port,
  SERVING);
- the event stream, resumed from its cursor, has every event ListEvents has,
  once each, in order;
- CancelRun through Envoy cancels runs of both replicas, whichever replica Envoy
  picks (the other forwards it to the run's owner);
- SIGINT stops the launcher with exit code 0 and no process left.

Which replica owns a run comes from the launcher's output: the run's
SendMessage answer carries the request id (``x-request-id`` trailer) that the
owner logs in its access line, printed under its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from a2a.types import a2a_pb2 as a2a
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.deploy.launcher import usable_cores
from tests.a2a.test_a2a import stub as a2a_stub
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import cli
from tests.infra.webhookreceiver import WebhookReceiver, running_receiver, until
from tests.kits.authkit import PASSWORD, unique_email
from tests.kits.contextkit import Caller, context_stub, create_conversation, create_workspace
from tests.kits.dispatchkit import (
    Stub,
    dispatcher_stub,
    reason_of,
    request,
    stored_running,
)
from tests.kits.eventkit import is_token
from tests.kits.integrationkit import webhook_secret

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(480)]

#: How long a mesh may take to say it is ready: a hang guard, not a budget. On a quiet
#: two-core machine the docs' mesh test took 45 s in all; on a slow CI host beside the
#: suite's other e2e files, readiness alone took over 150 s.
READY_TIMEOUT_S = 300.0
RESTART_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 90.0
#: Slow runs: the first word at once, the last after this; still running when the replica dies.
SLOW_DELAY_MS = 10_000
MAX_UNAVAILABLE = 3
#: Messages the chatter may send before the replica is back (a bound, not a pace).
MAX_CHATTER = 600
MAX_STREAM_BREAKS = 5
#: Slow runs cancelled through Envoy at the end (on both replicas). A CancelRun without
#: the routing header goes to a replica at random, so at least one is forwarded unless
#: every one lands on its run's owner: 1 in 64 with six (seen once in a full run), 1 in
#: 4,096 with twelve.
CANCELS = 12
SHARED = {"postgres", "redis", "edge-health", "envoy"}


@dataclass(frozen=True)
class Shape:
    """A shape of the mesh: the launcher's options, its processes, and the two that own
    runs (the test kills the first)."""

    args: tuple[str, ...]
    processes: frozenset[str]
    owners: tuple[str, str]


#: One process per service (the default), and whole-run processes (``--processes 2``):
#: every service in each, so killing one takes its events, auth and context with it.
SHAPES = {
    "per-service": Shape(
        (),
        frozenset(
            {
                *SHARED,
                "auth",
                "context",
                "integration",
                "events-1",
                "events-2",
                "dispatcher-1",
                "dispatcher-2",
                "a2a",
            }
        ),
        ("dispatcher-1", "dispatcher-2"),
    ),
    "whole-run": Shape(
        ("--processes=2",),
        frozenset({*SHARED, "switchboard-1", "switchboard-2"}),
        ("switchboard-1", "switchboard-2"),
    ),
}
TERMINAL = {
    pb.RUN_STATE_SUCCEEDED,
    pb.RUN_STATE_FAILED,
    pb.RUN_STATE_CANCELLED,
    pb.RUN_STATE_DEADLINE_EXCEEDED,
}


class MeshProcess:
    """``switchboard mesh`` in a subprocess: its output lines, its state file, SIGINT."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.args = args
        self.extra_env = env or {}
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self.proc: subprocess.Popen[str] | None = None
        self.pids: set[int] = set()

    def __enter__(self) -> MeshProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        # Reaches every service: the chatter sends faster than a person would.
        env["SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_USER"] = "100000"
        # The A2A push receiver listens on loopback.
        env["SWITCHBOARD_EGRESS_ALLOW_LOOPBACK"] = "true"
        env.update(self.extra_env)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "switchboard.cli",
                "mesh",
                f"--data-dir={self.data_dir}",
                "--listen=127.0.0.1:0",
                "--admin=127.0.0.1:0",
                "--health-interval=0.5",
                *self.args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        # Whatever happened: stop it, and leave no process behind.
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        with contextlib.suppress(OSError, ValueError):
            self.remember_pids()
        for pid in self.pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _pump(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_line(self, match: Callable[[str], bool], timeout: float) -> str:
        """The first output line (from the start) that ``match`` accepts; blocks until it comes."""
        deadline = time.monotonic() + timeout
        checked = 0
        with self._changed:
            while True:
                for line in self.lines[checked:]:
                    if match(line):
                        return line
                checked = len(self.lines)
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    tail = "\n".join(self.lines[-60:])
                    pytest.fail(f"no such line from switchboard mesh; its last lines:\n{tail}")
                self._changed.wait(remaining)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.data_dir / "mesh.json").read_text())
        return state

    def remember_pids(self) -> None:
        self.pids |= {
            process["pid"] for process in self.state()["processes"].values() if process["pid"]
        }

    def interrupt(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=STOP_TIMEOUT_S)


T = TypeVar("T")


class Background:
    """Tasks of one test; whatever still runs at the end (a failed test) is cancelled."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coroutine)
        self._tasks.append(task)
        return task

    async def __aenter__(self) -> Background:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not read its status yet.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def broken(error: aio.AioRpcError) -> bool:
    """Whether a stream broke because the replica behind it went away (resume it).

    Before the answer began, Envoy says UNAVAILABLE; once it has begun, Envoy can
    only reset the stream (RST_STREAM INTERNAL_ERROR), which gRPC reports as INTERNAL.
    """
    return error.code() == grpc.StatusCode.UNAVAILABLE or (
        error.code() == grpc.StatusCode.INTERNAL and "RST_STREAM" in (error.details() or "")
    )


def owner_of(mesh: MeshProcess, request_id: str) -> str:
    """The process whose access line logged this SendMessage (``dispatcher-2 | ...``)."""
    line = mesh.wait_line(
        lambda line: f"request_id={request_id}" in line and "/SendMessage" in line, CALL_DEADLINE_S
    )
    return line.split("|", 1)[0].strip()


async def conversations(contexts: Any, caller: Caller, workspace: str, count: int) -> list[Any]:
    return [await create_conversation(contexts, caller, workspace) for _ in range(count)]


async def send(stub: Stub, caller: Caller, req: pb.SendMessageRequest) -> tuple[str, str]:
    """SendMessage; the run's name and the request id the server used."""
    call = stub.SendMessage(req, metadata=caller.md, timeout=CALL_DEADLINE_S)
    response = await call
    trailers = dict(await call.trailing_metadata() or ())
    return response.run.name, str(trailers["x-request-id"])


@dataclass
class Followed:
    run: pb.Run
    sequences: list[int]
    breaks: int


async def follow(stub: Stub, caller: Caller, run: str) -> Followed:
    """Watch ``run`` to its end, resuming after its last sequence when the stream breaks."""
    sequences: list[int] = []
    breaks = 0
    while True:
        call = stub.WatchRun(
            pb.WatchRunRequest(name=run, after_sequence=sequences[-1] if sequences else 0),
            metadata=caller.md,
            timeout=60,
        )
        try:
            async for frame in call:
                if frame.WhichOneof("frame") != "update":
                    continue
                update = frame.update
                sequences.append(update.sequence)
                if update.WhichOneof("update") == "state_change" and (
                    update.state_change.run.state in TERMINAL
                ):
                    return Followed(update.state_change.run, sequences, breaks)
        except aio.AioRpcError as exc:
            # The replica behind this stream died: resume elsewhere from the cursor.
            if not broken(exc):
                raise
        breaks += 1
        assert breaks <= MAX_STREAM_BREAKS, f"{run}: the watch broke {breaks} times"


@dataclass
class Events:
    """A Subscribe on one scope that resumes from its last cursor whenever it is reopened."""

    stub: Any
    caller: Caller
    scope: events_pb2.Scope
    cursor: str = ""
    start_cursor: str = ""
    events: list[events_pb2.Event] = field(default_factory=list)
    #: Which opening of the stream delivered each of ``events``.
    openings: list[int] = field(default_factory=list)
    opened: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while True:
            self.opened += 1
            call = self.stub.Subscribe(
                events_pb2.SubscribeRequest(scopes=[self.scope], after_cursor=self.cursor),
                metadata=self.caller.md,
                timeout=120,
            )
            try:
                async for frame in call:
                    if frame.WhichOneof("frame") == "batch":
                        self.events.extend(frame.batch.events)
                        self.openings.extend([self.opened] * len(frame.batch.events))
                        self.cursor = frame.batch.cursor
                    else:
                        self.cursor = frame.heartbeat.cursor
                    self.start_cursor = self.start_cursor or self.cursor
                    self.changed.set()
            except aio.AioRpcError as exc:
                if not broken(exc) or self.opened > MAX_STREAM_BREAKS:
                    raise
            finally:
                call.cancel()

    async def until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(CALL_DEADLINE_S):
            while not done():
                self.changed.clear()
                await self.changed.wait()


@dataclass
class Chatter:
    """A client that keeps sending messages (their answers are checked afterwards)."""

    stub: Stub
    caller: Caller
    conversation: str
    stop: asyncio.Event
    runs: list[str] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    unavailable: int = 0
    first: asyncio.Event = field(default_factory=asyncio.Event)
    #: The mesh's output so far, to explain an unexpected status with what the server logged.
    output: Callable[[], list[str]] = list

    async def run(self) -> None:
        after_stop = 0
        for n in range(MAX_CHATTER):
            req = request(self.conversation, f"chatter {n}", request_id=f"chatter-{n}")
            while True:
                try:
                    run, _ = await send(self.stub, self.caller, req)
                    break
                except aio.AioRpcError as exc:
                    # Retried with the same request id: the first run comes back.
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise AssertionError(logged_for(exc, self.output())) from exc
                    self.unavailable += 1
                    assert self.unavailable <= MAX_UNAVAILABLE, "too many UNAVAILABLE"
            self.runs.append(run)
            self.sent_at.append(time.monotonic())
            self.first.set()
            if self.stop.is_set():
                after_stop += 1
                if after_stop == 3:
                    return
        raise AssertionError(f"no restart within {MAX_CHATTER} messages")


def logged_for(error: aio.AioRpcError, lines: list[str]) -> str:
    """An unexpected status, with every output line that names its request id and the
    stack a line of it may start (an INTERNAL's cause is only in the server's log)."""
    trailers: Any = error.trailing_metadata() or ()
    request_id = next((str(value) for key, value in trailers if key == "x-request-id"), "")
    said = [f"{error.code().name}: {error.details()} (request id {request_id or 'none'})"]
    if request_id:
        for number, line in enumerate(lines):
            if request_id in line:
                said.extend(
                    lines[number : number + 40]
                    if "Traceback" in "".join(lines[number : number + 3])
                    else [line]
                )
    return "\n".join(said)


async def list_events(stub: Any, caller: Caller, scope: events_pb2.Scope, after: str) -> list[str]:
    ids: list[str] = []
    token = ""
    for _ in range(100):
        page = await stub.ListEvents(
            events_pb2.ListEventsRequest(
                scopes=[scope], after_cursor=after, page_size=500, page_token=token
            ),
            metadata=caller.md,
            timeout=CALL_DEADLINE_S,
        )
        ids += [event.id for event in page.events]
        token = page.next_page_token
        if not token:
            return ids
    raise AssertionError("more than 100 pages of events")


async def serving(address: str, service: str) -> int:
    async with aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=CALL_DEADLINE_S
        )
    return int(reply.status)


async def _an_a2a_task_through_the_edge(
    channel: aio.Channel, caller: Caller, workspace: str, edge: str, receiver: WebhookReceiver
) -> None:
    """The a2a process behind Envoy: an echo assistant answers an A2A message, pushes its
    statuses to a receiver, and the same task reads back over A2A's HTTP+JSON binding
    (Envoy's transcoder) beside its public card."""
    await dispatcher_stub(channel).CreateAssistant(
        pb.CreateAssistantRequest(
            parent=workspace,
            assistant_id="echoer",
            assistant=pb.Assistant(display_name="Echoer", handler="handlers/echo"),
        ),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    request = a2a.SendMessageRequest(
        tenant=workspace.removeprefix("workspaces/") + ".echoer",
        message=a2a.Message(
            message_id="mesh-a2a-1", role=a2a.ROLE_USER, parts=[a2a.Part(text="via envoy")]
        ),
    )
    # A push config: the a2a process stores it, the integration process's webhook
    # engine delivers the task's statuses, signed.
    secret = webhook_secret()
    endpoint = receiver.endpoint("mesh-task", [secret])
    push = request.configuration.task_push_notification_config
    push.url = receiver.url("mesh-task")
    push.authentication.scheme = "StandardWebhooks"
    push.authentication.credentials = secret
    sent = await a2a_stub(channel).SendMessage(request, metadata=caller.md, timeout=CALL_DEADLINE_S)
    assert sent.task.status.state == a2a.TASK_STATE_COMPLETED
    assert sent.task.artifacts[0].parts[0].text.startswith("via envoy")

    def pushed_states() -> list[str]:
        return [item.body["statusUpdate"]["status"]["state"] for item in endpoint.accepted]

    await until(lambda: "TASK_STATE_COMPLETED" in pushed_states(), "the completed status pushed")
    assert pushed_states() == ["TASK_STATE_SUBMITTED", "TASK_STATE_WORKING", "TASK_STATE_COMPLETED"]
    assert endpoint.bad == []  # each verified with the secret
    tenant = workspace.removeprefix("workspaces/") + ".echoer"
    async with httpx.AsyncClient(base_url=f"http://{edge}", timeout=CALL_DEADLINE_S) as http:
        card = await http.get(f"/{tenant}/.well-known/agent-card.json")
        assert card.status_code == 200, card.text
        assert card.json()["supportedInterfaces"][0]["url"] == f"http://{edge}"
        got = await http.get(
            f"/{tenant}/tasks/{sent.task.id}", headers={"authorization": f"Bearer {caller.token}"}
        )
        assert got.status_code == 200, got.text
        assert got.json()["status"]["state"] == "TASK_STATE_COMPLETED"


def switchboard(*args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args, env={k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--admin=0.0.0.0:9901"], "the admin interface must listen on loopback"),
        (["--replicas=dispatcher=0"], "--replicas dispatcher: between 1 and 16"),
        (["--replicas=mail=2"], "--replicas expects SERVICE=N"),
        (["--listen=8080"], "expected HOST:PORT"),
        (["--health-interval=0"], "--health-interval must be above 0"),
        (["--processes=0"], "--processes must be at least 1"),
        (["--processes=two"], "--processes expects a number or auto"),
        ([f"--processes={usable_cores() + 1}"], f"--processes {usable_cores() + 1} is more"),
        (
            ["--processes=1", "--replicas=dispatcher=2"],
            "--processes runs every service in each process",
        ),
    ],
)
def test_bad_options_exit_2_before_anything_starts(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = switchboard("mesh", f"--data-dir={tmp_path / 'mesh'}", *args)
    assert done.returncode == 2
    assert done.stderr.startswith(f"switchboard mesh: {message}"), done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mesh").exists()


def test_a_taken_port_stops_the_mesh_before_anything_starts(data_dir: Path) -> None:
    """Envoy starts last: its admin port held by another process (here this one) is
    named with its holder at once, before PostgreSQL, Redis or any service starts."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = switchboard(
            "mesh",
            f"--data-dir={data_dir}",
            "--listen=127.0.0.1:0",
            f"--admin=127.0.0.1:{port}",
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        f"switchboard mesh: 127.0.0.1:{port}, Envoy's admin interface (--admin), is not free"
    ), done.stderr
    assert f"pid {os.getpid()} (" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""  # no process started, not even PostgreSQL's initdb
    assert not (data_dir / "mesh.json").exists()
    assert not (data_dir / "postgres" / "data").exists()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: under root PostgreSQL runs as the postgres user,
    # who cannot enter pytest's owner-only base directory.
    path = Path(tempfile.mkdtemp(prefix="switchboard-mesh-"))
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False, timeout=60)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
async def test_the_mesh_keeps_serving_while_a_dispatcher_replica_is_killed(
    data_dir: Path, shape: Shape
) -> None:
    victim, survivor = shape.owners
    # `fail`, not the default `resume`: the killed replica's runs are told apart by their end.
    with MeshProcess(
        data_dir, *shape.args, env={"SWITCHBOARD_DISPATCHER_RECOVERY": "fail"}
    ) as mesh:
        ready = await asyncio.to_thread(
            mesh.wait_line,
            lambda line: line.startswith("mesh ") and "| ready:" in line,
            READY_TIMEOUT_S,
        )
        state = mesh.state()
        mesh.remember_pids()
        assert state["state"] == "ready"
        assert set(state["processes"]) == shape.processes
        assert all(p["status"] == "serving" for p in state["processes"].values())
        assert all(alive(pid) for pid in mesh.pids)
        edge = state["edge"]["grpc"]
        assert edge in ready
        # Logs come prefixed by their process's name.
        mesh.wait_line(lambda line: line.startswith(f"{survivor} | "), 1)

        async with aio.insecure_channel(edge) as channel, Background() as background:
            # One launcher per data directory: a second one, tried while the test goes on
            # (its seconds are the imports of a command that stops at the lock).
            second_launcher = background.start(
                asyncio.to_thread(
                    switchboard, "mesh", f"--data-dir={data_dir}", "--listen=127.0.0.1:0"
                )
            )
            registered = await auth_pb2_grpc.AuthServiceStub(channel).Register(
                auth_pb2.RegisterRequest(email=unique_email("mesh"), password=PASSWORD),
                timeout=CALL_DEADLINE_S,
            )
            caller = Caller(
                registered.user.name.removeprefix("users/"), registered.tokens.access_token
            )
            contexts, dispatcher = context_stub(channel), dispatcher_stub(channel)
            workspace = await create_workspace(contexts, caller, "Mesh")
            async with running_receiver() as receiver:
                await _an_a2a_task_through_the_edge(channel, caller, workspace.name, edge, receiver)
            scope = events_pb2.Scope(workspace=workspace.name)
            events = Events(events_pb2_grpc.EventServiceStub(channel), caller, scope)
            following = background.start(events.run())
            await events.until(lambda: bool(events.start_cursor))

            # Slow runs until each replica owns at least one. These sends carry no routing
            # header, so Envoy picks a replica at random for each: 24 conversations all on
            # one replica would take a chance of 2^-23.
            owners: dict[str, str] = {}
            for conversation in await conversations(contexts, caller, workspace.name, 24):
                run, request_id = await send(
                    dispatcher,
                    caller,
                    request(conversation.name, "first last", delay_ms=SLOW_DELAY_MS),
                )
                owners[run] = await asyncio.to_thread(owner_of, mesh, request_id)
                if set(shape.owners) <= set(owners.values()):
                    break
            assert set(owners.values()) == set(shape.owners), owners
            watching = {run: background.start(follow(dispatcher, caller, run)) for run in owners}

            chatting = await create_conversation(contexts, caller, workspace.name, "chatter")
            restarted = asyncio.Event()
            chatter = Chatter(
                dispatcher, caller, chatting.name, restarted, output=lambda: list(mesh.lines)
            )
            chatting_task = background.start(chatter.run())
            async with asyncio.timeout(CALL_DEADLINE_S):
                await chatter.first.wait()

            # Only a run stored as RUNNING fails by the recovery policy; one
            # killed before that lands is still QUEUED and runs again.
            for run, owner in owners.items():
                if owner == victim:
                    await stored_running(dispatcher, caller, run)
            before = state["processes"][victim]
            os.kill(before["pid"], signal.SIGKILL)
            killed_at = time.monotonic()
            await asyncio.to_thread(
                mesh.wait_line,
                lambda line: line.startswith("mesh ") and f"| {victim} restarted" in line,
                RESTART_TIMEOUT_S,
            )
            restarted_at = time.monotonic()
            restarted.set()
            after = mesh.state()["processes"][victim]
            mesh.remember_pids()
            assert after["pid"] != before["pid"]
            assert after["port"] == before["port"]
            assert after["status"] == "serving"
            assert after["restarts"] == 1
            assert alive(after["pid"])
            assert (
                await serving(after["address"], "switchboard.api.dispatcher.v1.DispatcherService")
                == health_pb2.HealthCheckResponse.SERVING
            )

            # The client drops its event stream and resumes from its cursor.
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following
            following = background.start(events.run())

            followed = {run: await task for run, task in watching.items()}
            await chatting_task
            answered = asyncio.Semaphore(16)

            async def answer(run: str) -> Followed:
                async with answered:
                    return await follow(dispatcher, caller, run)

            ends = await asyncio.gather(*(answer(run) for run in chatter.runs))

            listed = await list_events(events.stub, caller, scope, events.start_cursor)
            await events.until(lambda: set(listed) <= {event.id for event in events.events})
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following

            # CancelRun through Envoy: whichever replica Envoy picks, the run's own
            # replica cancels it (the other forwards the call there).
            cancelling: dict[str, str] = {}
            for conversation in await conversations(contexts, caller, workspace.name, 3 * CANCELS):
                run, request_id = await send(
                    dispatcher,
                    caller,
                    request(conversation.name, "first last", delay_ms=SLOW_DELAY_MS),
                )
                cancelling[run] = await asyncio.to_thread(owner_of, mesh, request_id)
                if len(cancelling) >= CANCELS and len(set(cancelling.values())) == 2:
                    break
            assert set(cancelling.values()) == set(shape.owners), cancelling
            cancels: dict[str, tuple[pb.Run, str]] = {}
            # In the reverse order: Envoy's turns do not line up with the sends'.
            for run in reversed(list(cancelling)):
                call = dispatcher.CancelRun(
                    pb.CancelRunRequest(name=run), metadata=caller.md, timeout=CALL_DEADLINE_S
                )
                answer_run = (await call).run
                cancels[run] = (
                    answer_run,
                    str(dict(await call.trailing_metadata() or ())["x-request-id"]),
                )
            second = await second_launcher

        assert second.returncode == 2
        assert f"another switchboard mesh (pid {state['launcher_pid']})" in second.stderr

        # SendMessage kept succeeding through Envoy, also while the replica was away.
        assert any(killed_at < at < restarted_at for at in chatter.sent_at), (
            killed_at,
            restarted_at,
            chatter.sent_at,
        )
        assert chatter.unavailable <= MAX_UNAVAILABLE
        for end in ends:
            assert end.run.state == pb.RUN_STATE_SUCCEEDED or (
                end.run.state == pb.RUN_STATE_FAILED
                and reason_of(end.run) == "ERROR_REASON_RUN_INTERRUPTED"
            ), end.run
        assert sum(end.run.state == pb.RUN_STATE_SUCCEEDED for end in ends) >= len(ends) - 1
        # The killed replica's runs failed by the recovery policy; the others finished.
        for run, end in followed.items():
            if owners[run] == victim:
                assert end.run.state == pb.RUN_STATE_FAILED, end.run
                assert reason_of(end.run) == "ERROR_REASON_RUN_INTERRUPTED"
            else:
                assert end.run.state == pb.RUN_STATE_SUCCEEDED, end.run
            assert end.sequences == sorted(set(end.sequences)), end.sequences
        # The resumed stream missed nothing and repeated nothing logged: every logged
        # event once, in the log's order. A token (not logged: docs/events.md, "Tokens")
        # resumed on another replica than the one that sent it may come again, as the
        # same event under the same id, for the client to drop.
        logged_seen = [event.id for event in events.events if not is_token(event)]
        assert len(logged_seen) == len(set(logged_seen))
        assert logged_seen[: len(listed)] == listed
        _tokens_repeat_only_on_resume(events)
        assert events.opened >= 2
        assert any(event.run_updated.update.sequence for event in events.events)

        assert mesh.interrupt() == 0
        assert mesh.wait_line(lambda line: line.startswith("mesh ") and "| stopped" in line, 1)
        assert mesh.state()["state"] == "stopped"
        assert [pid for pid in mesh.pids if alive(pid)] == []
        # Every cancel succeeded, answered with the ended run, done by the run's owner;
        # those that Envoy gave the other replica were forwarded (both logged them).
        forwarded = 0
        for run, (cancelled, request_id) in cancels.items():
            assert cancelled.state == pb.RUN_STATE_CANCELLED, cancelled
            assert cancelled.error.message == f"cancelled (by {caller.name})"
            handled = [
                line.split("|", 1)[0].strip()
                for line in mesh.lines
                if f"request_id={request_id}" in line and "/CancelRun" in line and "code=OK" in line
            ]
            assert cancelling[run] in handled, (run, cancelling[run], handled)
            forwarded += len(handled) == 2
        assert forwarded, "Envoy gave every cancel to the run's own replica"


def _tokens_repeat_only_on_resume(events: Events) -> None:
    """A token that came twice came in two openings of the stream, the same both times."""
    first: dict[str, tuple[events_pb2.Event, int]] = {}
    for event, opening in zip(events.events, events.openings, strict=True):
        if is_token(event):
            earlier, earlier_opening = first.setdefault(event.id, (event, opening))
            assert earlier.run_updated == event.run_updated
            assert earlier is event or earlier_opening != opening
