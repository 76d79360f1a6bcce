"""Budgets on the scaled-out shape: two `switchboard serve` replicas on one PostgreSQL
and one Redis (all started by the suite), the llm handler on the local model server
(tests/fakes/openai_server.py, in this process) with a price table, and budgets made
through CreateBudget.

- 50 messages at once, split over both replicas, against a cost cap that allows ten
  runs: what is charged (the budget's windows, and the runs' own cost) never passes
  the cap; every other message is refused (BUDGET_EXHAUSTED, the budget named in a
  QuotaFailure, when it resets) or its run paused (REQUIRES_ACTION naming the budget);
  and once the paused runs are cancelled nothing is held. (The same in one process on
  SQLite: tests/dispatcher/budgets/test_service.py.)
- A replica killed with SIGKILL while its runs' model calls hold reservations: the
  survivor takes the runs over, the dead attempts' holds are charged at what they
  reserved (a call in flight may have been billed) and the windows hold exactly what
  the survivor's calls in flight hold; when those end, nothing.
- The same kill under a cap that leaves room for one more call, the replica
  restarted at once or left dead: sampled throughout, used + held never passes the
  cap; one run asks the model again, the others wait at the cap.

The budget tables are read straight from PostgreSQL: what is held is not in any
response, and that is what is proved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.runs.core.store import TERMINAL
from switchboard.dispatcher.settings import DispatcherSettings
from switchboard.platform.store.models import BudgetHoldRow, BudgetWindowRow, RunRow
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ServeProcess, scaled_env
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.redis import RedisServer
from tests.kits.authkit import PASSWORD, detail, reason, unique_email
from tests.kits.contextkit import Caller, context_stub, create_conversation, create_workspace
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import dispatcher_stub, request, stored_running

pytestmark = pytest.mark.e2e

#: How long a test waits for runs to settle or be taken over before failing.
SETTLE_S: Final = 60.0
#: Dollars per million tokens: 2 micro-dollars an answer token. Prompts are free, so a
#: call reserves exactly what it costs: the cap allows exactly ten, and the replicas race
#: for the last of it.
PRICES: Final = {"m-1": {"input_per_mtok": 0.0, "output_per_mtok": 2.0}}
#: Answer tokens of every model call (and its max_tokens): 200 micro-dollars.
ANSWER: Final = 100
COST: Final = 2 * ANSWER
#: Ten runs' worth.
CAP: Final = 10 * COST
MESSAGES: Final = 50
#: A replica's lease: its runs are taken over this long after it dies.
LEASE_S: Final = "2"
#: The dispatcher's default lease.
PRODUCT_LEASE_S: Final = str(DispatcherSettings.model_fields["dispatcher_lease_s"].default)
RUNNING_OR_PAUSED: Final = frozenset({pb.RUN_STATE_SUCCEEDED, pb.RUN_STATE_REQUIRES_ACTION})


@pytest.fixture
def env(tmp_path: Path, postgres_url: str, redis_server: RedisServer) -> dict[str, str]:
    return {
        # The model is the fake, on loopback (which scaled_env lets the server reach).
        **scaled_env(tmp_path, postgres_url, redis_server.url),
        "SWITCHBOARD_LLM_MODEL": "m-1",
        "SWITCHBOARD_LLM_PRICES": json.dumps(PRICES),
        "SWITCHBOARD_LLM_MAX_OUTPUT_TOKENS": str(ANSWER),
        # Each call needs its whole max_tokens (the fake reports ANSWER tokens however
        # few it was asked for): a step fits or pauses, never made with fewer near the cap.
        "SWITCHBOARD_LLM_MIN_OUTPUT_TOKENS": str(ANSWER),
        "SWITCHBOARD_LLM_MAX_RETRIES": "0",
        "SWITCHBOARD_DISPATCHER_LEASE_S": LEASE_S,
        # Every message runs at once (a paused run keeps its slot), none is rate limited,
        # and a paused run waits for the test, not the approval timeout.
        "SWITCHBOARD_DISPATCHER_MAX_RUNNING_PER_WORKSPACE": str(MESSAGES),
        "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_USER": "100000",
        "SWITCHBOARD_DISPATCHER_MAX_MESSAGES_PER_MINUTE_PER_WORKSPACE": "100000",
        "SWITCHBOARD_CONTEXT_MAX_WRITES_PER_MINUTE": "100000",
        "SWITCHBOARD_DISPATCHER_APPROVAL_TIMEOUT_S": "600",
        "PYTHONFAULTHANDLER": "1",
    }


@pytest.fixture
def database(postgres_engine: AsyncEngine) -> AsyncEngine:
    """The replicas' database, read by the test."""
    return postgres_engine


@asynccontextmanager
async def replicas(
    env: dict[str, str], fake: FakeOpenAI, recovery: str = "fail", lease_s: str = LEASE_S
) -> AsyncIterator[tuple[ServeProcess, ServeProcess]]:
    """Two replicas started side by side, each killed on the way out whatever happened."""
    with ExitStack() as stack:
        started = [
            ServeProcess(
                env={
                    **env,
                    "SWITCHBOARD_INSTANCE_ID": f"replica-{i}",
                    "SWITCHBOARD_LLM_BASE_URL": fake.url,
                    "SWITCHBOARD_DISPATCHER_RECOVERY": recovery,
                    "SWITCHBOARD_DISPATCHER_LEASE_S": lease_s,
                }
            )
            for i in (1, 2)
        ]
        for process in started:
            stack.push(process)
        await asyncio.gather(*(asyncio.to_thread(p.start) for p in started))
        yield started[0], started[1]


async def sign_up(address: str) -> Caller:
    async with aio.insecure_channel(address) as channel:
        response = await auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(email=unique_email("budget"), password=PASSWORD),
            timeout=CALL_DEADLINE_S,
        )
    return Caller(response.user.name.removeprefix("users/"), response.tokens.access_token)


async def daily_budget(stub: DStub, owner: Caller, workspace: str, cap: int) -> str:
    """A workspace budget of ``cap`` micro-dollars a day, through CreateBudget; its name."""
    response = await stub.CreateBudget(
        pb.CreateBudgetRequest(
            parent=workspace,
            budget_id="cap",
            budget=pb.Budget(
                display_name="Daily cap",
                scope=workspace,
                period=pb.BUDGET_PERIOD_DAY,
                cost_limit_micros=cap,
            ),
        ),
        metadata=owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.budget.name


@dataclass(frozen=True)
class Ledger:
    """What the budget tables say about one workspace."""

    #: ``(cost used, cost held)`` of each window of its budgets.
    windows: list[tuple[int, int]]
    #: ``(hold id, run id, cost)`` of each hold.
    holds: list[tuple[str, str, int]]
    #: The stored cost of each of its runs.
    run_costs: dict[str, int]
    #: The replica that owns each of its runs.
    workers: dict[str, str]

    @property
    def used(self) -> int:
        return sum(used for used, _ in self.windows)

    @property
    def held(self) -> int:
        return sum(held for _, held in self.windows)


async def read_ledger(engine: AsyncEngine, workspace: str) -> Ledger:
    workspace_id = workspace.removeprefix("workspaces/")
    async with engine.connect() as db:
        windows = (
            await db.execute(
                select(BudgetWindowRow.cost_used, BudgetWindowRow.cost_held).where(
                    BudgetWindowRow.workspace_id == workspace_id
                )
            )
        ).all()
        holds = (
            await db.execute(
                select(BudgetHoldRow.id, BudgetHoldRow.run_id, BudgetHoldRow.cost).where(
                    BudgetHoldRow.workspace_id == workspace_id
                )
            )
        ).all()
        runs = (
            await db.execute(
                select(RunRow.id, RunRow.cost_micros, RunRow.worker).where(
                    RunRow.workspace_id == workspace_id
                )
            )
        ).all()
    return Ledger(
        windows=[(int(row[0]), int(row[1])) for row in windows],
        holds=[(str(row[0]), str(row[1]), int(row[2])) for row in holds],
        run_costs={str(row[0]): int(row[1]) for row in runs},
        workers={str(row[0]): str(row[2]) for row in runs},
    )


@dataclass
class Runs:
    """The latest state each watched run was seen in, on its WatchRun stream."""

    latest: dict[str, pb.Run] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def watch(self, stub: DStub, caller: Caller, name: str) -> None:
        self.tasks.append(asyncio.create_task(self._watch(stub, caller, name)))

    async def _watch(self, stub: DStub, caller: Caller, name: str) -> None:
        call = stub.WatchRun(pb.WatchRunRequest(name=name), metadata=caller.md, timeout=SETTLE_S)
        async for frame in call:
            update = frame.update
            if frame.WhichOneof("frame") != "update" or not update.HasField("state_change"):
                continue
            async with self.changed:
                self.latest[name] = update.state_change.run
                self.changed.notify_all()
            if update.state_change.run.state in TERMINAL:
                return

    async def until(self, settled: Callable[[], bool], what: str) -> None:
        """Return once ``settled()`` holds for what the watchers saw (or fail after SETTLE_S)."""
        try:
            async with asyncio.timeout(SETTLE_S), self.changed:
                await self.changed.wait_for(settled)
        except TimeoutError:
            states = sorted(pb.RunState.Name(r.state) for r in self.latest.values())
            pytest.fail(f"{what} never happened; runs seen as {states}")

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@asynccontextmanager
async def watching() -> AsyncIterator[Runs]:
    runs = Runs()
    try:
        yield runs
    finally:
        await runs.close()


async def test_fifty_messages_on_two_replicas_never_charge_past_the_cap(
    env: dict[str, str], database: AsyncEngine
) -> None:
    async with FakeOpenAI() as fake:
        # A few chunks at a model's pace: calls overlap, so reservations race for the last room.
        fake.default = Reply(content="fine thank you", usage=(0, ANSWER), interval_s=0.02)
        async with (
            # Nobody dies here, so the product's lease: the short one the takeover tests
            # use lapsed beside the suite's load (a replica's renewal waited for a core)
            # and the other replica failed its runs as if it had died.
            replicas(env, fake, lease_s=PRODUCT_LEASE_S) as (first, second),
            aio.insecure_channel(first.address) as on_first,
            aio.insecure_channel(second.address) as on_second,
            watching() as runs,
        ):
            caller = await sign_up(first.address)
            cstub = context_stub(on_first)
            stubs = [dispatcher_stub(on_first), dispatcher_stub(on_second)]
            workspace = (await create_workspace(cstub, caller, "Budgets")).name
            budget = await daily_budget(stubs[1], caller, workspace, CAP)
            conversations = [
                (await create_conversation(cstub, caller, workspace)).name for _ in range(MESSAGES)
            ]

            async def send_to(
                stub: DStub, conversation: str, index: int
            ) -> pb.Run | aio.AioRpcError:
                try:
                    sent = await stub.SendMessage(
                        request(conversation, f"hello {index}"),
                        metadata=caller.md,
                        timeout=CALL_DEADLINE_S,
                    )
                except aio.AioRpcError as refused:
                    return refused
                runs.watch(stub, caller, sent.run.name)
                return sent.run

            outcomes = await asyncio.gather(
                *(send_to(stubs[i % 2], conversations[i], i) for i in range(MESSAGES))
            )
            admitted = [o.name for o in outcomes if isinstance(o, pb.Run)]

            def settled() -> bool:
                """Every admitted run succeeded or is paused, and no paused run can fit
                what is left (each retries when a settle frees room, or every 2 s)."""
                seen = [runs.latest.get(name) for name in admitted]
                if any(run is None or run.state not in RUNNING_OR_PAUSED for run in seen):
                    return False
                done = [run for run in seen if run and run.state == pb.RUN_STATE_SUCCEEDED]
                asks = [
                    run.required_action.budget.cost_micros
                    for run in seen
                    if run and run.state == pb.RUN_STATE_REQUIRES_ACTION
                ]
                left = CAP - sum(run.usage.cost_micros for run in done)
                return not asks or left < min(asks)

            await runs.until(settled, "every run succeeding or pausing for good")
            final = {name: runs.latest[name] for name in admitted}
            at_rest = await read_ledger(database, workspace)
            # The budget is spent: a message to either replica is refused.
            late: list[aio.AioRpcError] = []
            for index, stub in enumerate(stubs):
                outcome = await send_to(
                    stub, (await create_conversation(cstub, caller, workspace)).name, index
                )
                assert isinstance(outcome, aio.AioRpcError), outcome
                late.append(outcome)

            # The paused runs are cancelled: nothing of theirs stays held.
            waiting = [n for n, r in final.items() if r.state == pb.RUN_STATE_REQUIRES_ACTION]
            for index, name in enumerate(waiting):
                await stubs[index % 2].CancelRun(
                    pb.CancelRunRequest(name=name), metadata=caller.md, timeout=CALL_DEADLINE_S
                )
            await runs.until(
                lambda: all(runs.latest[n].state == pb.RUN_STATE_CANCELLED for n in waiting),
                "the paused runs ending cancelled",
            )
            after = await read_ledger(database, workspace)

    succeeded = [r for r in final.values() if r.state == pb.RUN_STATE_SUCCEEDED]
    paused = [r for r in final.values() if r.state == pb.RUN_STATE_REQUIRES_ACTION]
    refused = [o for o in outcomes if isinstance(o, aio.AioRpcError)]
    charged = sum(run.usage.cost_micros for run in succeeded)
    # Never past the cap, in any window, and the windows agree with the runs.
    assert all(used <= CAP for used, _ in at_rest.windows), at_rest.windows
    assert charged == at_rest.used == sum(at_rest.run_costs.values()) <= CAP
    assert all(run.usage.cost_micros == COST for run in succeeded)
    # Exactly ten fit, whichever replica took the last of it.
    assert len(succeeded) == 10
    assert len(succeeded) + len(paused) + len(refused) == MESSAGES
    # Both replicas ran some of them (which one took the last of the cap is a race).
    assert set(at_rest.workers.values()) == {"replica-1", "replica-2"}
    for error in [*refused, *late]:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert reason(error) == "ERROR_REASON_BUDGET_EXHAUSTED"
        quota = detail(error, error_details_pb2.QuotaFailure)
        assert [v.subject for v in quota.violations] == [budget]
        assert (
            detail(error, error_details_pb2.ErrorInfo).metadata["reset_time"].endswith("T00:00:00Z")
        )
    for run in paused:
        action = run.required_action.budget
        assert list(action.budgets) == [budget]
        assert action.output_tokens == ANSWER
        assert action.cost_micros == COST
    # At rest nothing is held (paused runs hold nothing), nor after the cancels.
    assert at_rest.holds == []
    assert at_rest.held == 0
    assert after.holds == []
    assert after.held == 0
    assert after.used == at_rest.used


@pytest.mark.parametrize("recovery", ["resume", "fail"])
async def test_a_replica_killed_holding_reservations_leaks_none(
    env: dict[str, str], database: AsyncEngine, recovery: str
) -> None:
    on_dead, on_survivor = 3, 2
    gate = asyncio.Event()
    async with FakeOpenAI() as fake:
        # Every call streams one chunk, then waits for the gate: its reservation is held.
        fake.default = Reply.text(
            "one two three", usage=(0, ANSWER), hold_after_chunks=1, hold=gate
        )
        async with (
            replicas(env, fake, recovery) as (doomed, survivor),
            aio.insecure_channel(doomed.address) as on_doomed,
            aio.insecure_channel(survivor.address) as on_other,
            watching() as runs,
        ):
            caller = await sign_up(survivor.address)
            cstub = context_stub(on_other)
            stubs = [dispatcher_stub(on_doomed), dispatcher_stub(on_other)]
            workspace = (await create_workspace(cstub, caller, "Killed")).name
            await daily_budget(stubs[1], caller, workspace, 1_000 * CAP)
            names: list[str] = []
            for stub in [stubs[0]] * on_dead + [stubs[1]] * on_survivor:
                conversation = (await create_conversation(cstub, caller, workspace)).name
                sent = await stub.SendMessage(
                    request(conversation, "hello"), metadata=caller.md, timeout=CALL_DEADLINE_S
                )
                names.append(sent.run.name)
            # Each run's model call is in flight, so its reservation is made.
            await fake.wait_requests(on_dead + on_survivor)
            before = await read_ledger(database, workspace)
            dead = {
                hold_id
                for hold_id, run_id, _ in before.holds
                if before.workers[run_id] == "replica-1"
            }
            assert len(dead) == on_dead, before
            assert before.held == sum(cost for _, _, cost in before.holds)

            # Watched on the survivor from before the kill, as a client that stays would.
            for name in names:
                runs.watch(stubs[1], caller, name)
            await runs.until(lambda: all(n in runs.latest for n in names), "every run watched")
            # Stored as RUNNING (else recovery runs a QUEUED one again whatever the policy).
            for name in names[:on_dead]:
                await stored_running(stubs[1], caller, name)
            assert doomed.proc is not None
            doomed.proc.kill()  # SIGKILL while its calls hold: no release, no shutdown code
            if recovery == "resume":
                # Taken over and run again on the survivor: its calls are in flight again.
                await fake.wait_requests(2 * on_dead + on_survivor)
            else:
                await runs.until(
                    lambda: all(
                        runs.latest.get(n, pb.Run()).state == pb.RUN_STATE_FAILED
                        for n in names[:on_dead]
                    ),
                    "the dead replica's runs failing on the survivor",
                )
            taken = await read_ledger(database, workspace)

            gate.set()
            await runs.until(
                lambda: all(runs.latest.get(n, pb.Run()).state in TERMINAL for n in names),
                "every run ending",
            )
            final = {name: runs.latest[name] for name in names}
            after = await read_ledger(database, workspace)

    run_ids = [name.rsplit("/", 1)[-1] for name in names]
    # After the takeover: none of the dead attempts' holds (each charged at what it
    # reserved: its call may have been billed), and the windows hold exactly what
    # the survivor's calls in flight hold.
    assert not dead & {hold_id for hold_id, _, _ in taken.holds}
    assert all(taken.workers[run_id] == "replica-2" for _, run_id, _ in taken.holds)
    assert taken.held == sum(cost for _, _, cost in taken.holds)
    in_flight = run_ids if recovery == "resume" else run_ids[on_dead:]
    assert sorted(run_id for _, run_id, _ in taken.holds) == sorted(in_flight)
    assert taken.used == COST * on_dead
    # When they end, nothing is held; the calls that finished and the dead ones were
    # charged, and the runs report what their budgets were charged.
    assert after.holds == []
    assert after.held == 0
    finished = [r for r in final.values() if r.state == pb.RUN_STATE_SUCCEEDED]
    assert len(finished) == len(in_flight)
    assert after.used == sum(after.run_costs.values()) == COST * (len(in_flight) + on_dead)
    assert sum(run.usage.cost_micros for run in final.values()) == after.used
    if recovery == "fail":
        assert all(final[n].state == pb.RUN_STATE_FAILED for n in names[:on_dead])


#: Runs on the replica that dies (the crash test below), each with a call in flight.
DOOMED_RUNS: Final = 4
#: Room for one more call after those: one run asks again, the others wait at the cap.
CRASH_CAP: Final = (DOOMED_RUNS + 1) * COST


class Sampler:
    """The budget's window read again and again until stopped: every (used, held) seen."""

    def __init__(self, engine: AsyncEngine, workspace: str) -> None:
        self._engine = engine
        self._workspace_id = workspace.removeprefix("workspaces/")
        self.samples: list[tuple[int, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        statement = select(BudgetWindowRow.cost_used, BudgetWindowRow.cost_held).where(
            BudgetWindowRow.workspace_id == self._workspace_id
        )
        while True:
            async with self._engine.connect() as db:
                for used, held in (await db.execute(statement)).all():
                    self.samples.append((int(used), int(held)))
            await asyncio.sleep(0.01)  # a sampling interval, not synchronization

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Sampler]:
        self._task = asyncio.create_task(self._loop())
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def over(self) -> list[tuple[int, int]]:
        return [(used, held) for used, held in self.samples if used + held > CRASH_CAP]


@pytest.mark.parametrize("restart", [True, False], ids=["restarted", "taken-over"])
async def test_a_killed_replica_never_lets_the_budget_pass_its_cap(
    env: dict[str, str], database: AsyncEngine, restart: bool
) -> None:
    gate = asyncio.Event()
    async with FakeOpenAI() as fake:
        # Every call streams one chunk, then holds its reservation until the gate opens.
        fake.default = Reply.text(
            "one two three", usage=(0, ANSWER), hold_after_chunks=1, hold=gate
        )
        async with (
            replicas(env, fake, "resume") as (doomed, survivor),
            aio.insecure_channel(survivor.address) as on_other,
            watching() as runs,
        ):
            caller = await sign_up(survivor.address)
            cstub = context_stub(on_other)
            other = dispatcher_stub(on_other)
            workspace = (await create_workspace(cstub, caller, "Crash")).name
            await daily_budget(other, caller, workspace, CRASH_CAP)
            sampler = Sampler(database, workspace)
            async with (
                sampler.running(),
                aio.insecure_channel(doomed.address) as on_doomed,
                contextlib.AsyncExitStack() as stack,
            ):
                first = dispatcher_stub(on_doomed)
                names: list[str] = []

                async def send(stub: DStub) -> None:
                    conversation = (await create_conversation(cstub, caller, workspace)).name
                    sent = await stub.SendMessage(
                        request(conversation, "hello"), metadata=caller.md, timeout=CALL_DEADLINE_S
                    )
                    names.append(sent.run.name)
                    runs.watch(other, caller, sent.run.name)

                # Four calls in flight on the doomed replica, each holding its reservation.
                for _ in range(DOOMED_RUNS):
                    await send(first)
                await fake.wait_requests(DOOMED_RUNS)
                held = await read_ledger(database, workspace)
                assert held.held == DOOMED_RUNS * COST, held
                for name in names[:DOOMED_RUNS]:
                    await stored_running(other, caller, name)
                assert doomed.proc is not None
                doomed.proc.kill()  # SIGKILL while its calls hold: no release, no shutdown code
                doomed.proc.wait(timeout=CALL_DEADLINE_S)
                if restart:
                    # The same instance id: it takes its runs back as it starts.
                    stack.enter_context(ServeProcess(env=doomed.env))
                # Whoever resumes them: the dead calls are counted, so one call's room is
                # left, which one run takes (asking the model again) while the others wait.
                await runs.until(
                    lambda: (
                        sorted(runs.latest[n].state for n in names if n in runs.latest)
                        == [pb.RUN_STATE_RUNNING]
                        + [pb.RUN_STATE_REQUIRES_ACTION] * (DOOMED_RUNS - 1)
                    ),
                    "one run asking again and the others paused at the spent cap",
                )
                await fake.wait_requests(DOOMED_RUNS + 1)
                resumed = await read_ledger(database, workspace)
                gate.set()
                await runs.until(
                    lambda: pb.RUN_STATE_SUCCEEDED in {runs.latest[n].state for n in names},
                    "the run that asked again succeeding",
                )
                # Nothing more fits: the paused runs are cancelled.
                paused = [n for n in names if runs.latest[n].state == pb.RUN_STATE_REQUIRES_ACTION]
                for name in paused:
                    await other.CancelRun(
                        pb.CancelRunRequest(name=name),
                        metadata=caller.md,
                        timeout=CALL_DEADLINE_S,
                    )
                await runs.until(
                    lambda: all(runs.latest[n].state in TERMINAL for n in names),
                    "every run ending",
                )
                after = await read_ledger(database, workspace)

    assert sampler.samples
    assert sampler.over() == [], sampler.over()[:5]
    # The calls in flight at the crash are counted at what they reserved (the budget errs
    # toward its cap, never past it), and the one run that asked again holds the rest.
    assert resumed.used == DOOMED_RUNS * COST
    assert resumed.held == COST
    assert len(fake.requests) == DOOMED_RUNS + 1
    # At rest: the cap spent exactly, nothing held, and the budget's used is what its
    # runs report (each the dead call it made, the one that asked again both).
    assert after.used == CRASH_CAP
    assert after.held == 0
    assert after.holds == []
    assert sum(after.run_costs.values()) == after.used
    assert sorted(after.run_costs.values()) == [COST] * (DOOMED_RUNS - 1) + [2 * COST]
    final = {n: runs.latest[n] for n in names}
    assert sorted(run.usage.cost_micros for run in final.values()) == [COST] * (DOOMED_RUNS - 1) + [
        2 * COST
    ]
