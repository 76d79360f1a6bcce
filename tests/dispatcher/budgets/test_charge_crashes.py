"""What runs report is what their budgets were charged, whatever crash comes in a
model call (issue 67): two `switchboard serve` replicas (recovery ``resume``) on
one PostgreSQL and one Redis, the llm handler on the local model server with a
price table, a daily budget made through CreateBudget.

The replica that holds the run is killed with SIGKILL at an exact point of its
model call, found in the database: a trigger makes the write that would come
next wait on an advisory lock the test holds, the test sees that write waiting
(and what committed before it), then kills the process; the write dies with
it. The points:

- ``charged``: the model answered and its charge settled, its answer not yet
  journaled. The survivor asks the model again; with a cap that leaves no room
  for that second call the run pauses at the cap, and is cancelled.
- ``journaled``: the answer journaled, the run's end not yet stored. The
  survivor answers from the journal.
- ``answered``: the model answered, its charge not yet settled. The survivor
  charges the dead call's hold at what it reserved (the provider billed it) and
  asks again: the run reports both calls.

Then, for the workspace: the budget's used cost (GetBudget and its window),
the run's own usage (GetRun) and QueryUsage's sum are one number, and nothing
is held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import pytest
from grpc import aio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.runs.core.store import TERMINAL
from tests.conftest import CALL_DEADLINE_S
from tests.dispatcher.budgets import test_budget_faults
from tests.dispatcher.budgets.test_budget_faults import (
    ANSWER,
    COST,
    SETTLE_S,
    daily_budget,
    read_ledger,
    replicas,
    sign_up,
    watching,
)
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.kits.contextkit import context_stub, create_conversation, create_workspace
from tests.kits.dispatchkit import dispatcher_stub, eventually, request

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

# The budget fault tests' replicas: their environment, and their database as the test reads it.
env = test_budget_faults.env
database = test_budget_faults.database

#: The advisory lock the trigger's write waits on while the test holds it.
LOCK: Final = 6767
_TERMINAL_STATES: Final = ", ".join(str(int(state)) for state in sorted(TERMINAL))


@dataclass(frozen=True)
class Point:
    """Where the replica dies: the write held back (a trigger's table, event and
    condition), and what the survivor does after."""

    table: str
    event: str
    when: str
    #: The cap, in micro-units: one call and 1 more leaves room for no second
    #: call, not even one with its max_tokens lowered to fit.
    cap: int
    #: The run's state once the survivor is done with it (before any cancel).
    after: pb.RunState.ValueType
    #: Charges that committed before the kill.
    charged_before_kill: int


POINTS: Final = {
    "charged": Point(
        "runs",
        "UPDATE OF job",
        "NEW.job IS DISTINCT FROM OLD.job",
        COST + 1,
        pb.RUN_STATE_REQUIRES_ACTION,
        1,
    ),
    "journaled": Point(
        "runs",
        "UPDATE OF state",
        f"NEW.state IN ({_TERMINAL_STATES}) AND OLD.state NOT IN ({_TERMINAL_STATES})",
        10 * COST,
        pb.RUN_STATE_SUCCEEDED,
        1,
    ),
    "answered": Point(
        "budget_windows",
        "UPDATE OF cost_used",
        "NEW.cost_used > OLD.cost_used",
        10 * COST,
        pb.RUN_STATE_SUCCEEDED,
        0,
    ),
}


async def _hold_writes(db: AsyncConnection, point: Point) -> None:
    """From now on the write ``point`` names waits for the test's advisory lock."""
    await db.execute(text("SELECT pg_advisory_lock(:lock)"), {"lock": LOCK})
    await db.execute(
        text(
            "CREATE FUNCTION held_write() RETURNS trigger AS $$ BEGIN "
            f"PERFORM pg_advisory_xact_lock({LOCK}); RETURN NEW; END $$ LANGUAGE plpgsql"
        )
    )
    await db.execute(
        text(
            f"CREATE TRIGGER held_write BEFORE {point.event} ON {point.table} "
            f"FOR EACH ROW WHEN ({point.when}) EXECUTE FUNCTION held_write()"
        )
    )
    await db.commit()


async def _waiting_writes(engine: AsyncEngine) -> int:
    async with engine.connect() as db:
        found = await db.scalar(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND NOT granted AND objid = :lock"
            ),
            {"lock": LOCK},
        )
    return int(found or 0)


async def _let_writes_go(db: AsyncConnection, point: Point) -> None:
    await db.execute(text(f"DROP TRIGGER held_write ON {point.table}"))
    await db.execute(text("DROP FUNCTION held_write()"))
    await db.execute(text("SELECT pg_advisory_unlock(:lock)"), {"lock": LOCK})
    await db.commit()


@pytest.mark.parametrize("where", list(POINTS))
async def test_a_crash_at_any_point_of_a_model_call_leaves_runs_and_budgets_agreeing(
    env: dict[str, str], database: AsyncEngine, where: str
) -> None:
    point = POINTS[where]
    async with FakeOpenAI() as fake:
        fake.default = Reply.text("fine", usage=(0, ANSWER))
        async with (
            replicas(env, fake, "resume") as (doomed, survivor),
            aio.insecure_channel(doomed.address) as on_doomed,
            aio.insecure_channel(survivor.address) as on_survivor,
            watching() as runs,
            database.connect() as holder,
        ):
            caller = await sign_up(survivor.address)
            cstub = context_stub(on_survivor)
            stub = dispatcher_stub(on_survivor)
            workspace = (await create_workspace(cstub, caller, "Crashes")).name
            budget = await daily_budget(stub, caller, workspace, point.cap)
            conversation = (await create_conversation(cstub, caller, workspace)).name
            await _hold_writes(holder, point)
            sent = await dispatcher_stub(on_doomed).SendMessage(
                request(conversation, "hello"), metadata=caller.md, timeout=CALL_DEADLINE_S
            )
            name = sent.run.name
            runs.watch(stub, caller, name)
            # The replica's next write waits: everything before it committed.
            await eventually(
                lambda: _waiting_writes(database), f"the {where} write to wait", timeout_s=SETTLE_S
            )
            before = await read_ledger(database, workspace)
            assert before.used == COST * point.charged_before_kill, before
            assert doomed.proc is not None
            doomed.proc.kill()  # SIGKILL: no drain, no shutdown code
            doomed.proc.wait(timeout=CALL_DEADLINE_S)
            await _let_writes_go(holder, point)

            await runs.until(
                lambda: (
                    runs.latest.get(name, pb.Run()).state == point.after
                    and runs.latest[name].last_sequence > 2**32
                ),
                "the survivor's attempt to settle",
            )
            if point.after == pb.RUN_STATE_REQUIRES_ACTION:
                await stub.CancelRun(
                    pb.CancelRunRequest(name=name), metadata=caller.md, timeout=CALL_DEADLINE_S
                )
                await runs.until(
                    lambda: runs.latest[name].state == pb.RUN_STATE_CANCELLED, "the cancel"
                )
            run = (
                await stub.GetRun(
                    pb.GetRunRequest(name=name), metadata=caller.md, timeout=CALL_DEADLINE_S
                )
            ).run
            got = await stub.GetBudget(
                pb.GetBudgetRequest(name=budget), metadata=caller.md, timeout=CALL_DEADLINE_S
            )
            shown = got.budget
            usage = await stub.QueryUsage(
                pb.QueryUsageRequest(parent=workspace), metadata=caller.md, timeout=CALL_DEADLINE_S
            )
            after = await read_ledger(database, workspace)
            asked = len(fake.requests)

    assert run.state in TERMINAL
    assert after.held == 0
    assert after.holds == []
    reported = sum(row.cost_micros for row in usage.rows)
    assert run.usage.cost_micros == reported == shown.usage.cost_micros == after.used, (
        run.usage,
        list(usage.rows),
        shown.usage,
        after,
    )
    assert sum(row.output_tokens for row in usage.rows) == run.usage.output_tokens
    # charged: asked again, the call did not fit; journaled: answered from the
    # journal; answered: never settled before the crash, so its hold is charged at
    # what it reserved when the run is taken over, and the model asked again.
    assert after.used == COST * (2 if where == "answered" else 1)
    assert asked == {"charged": 1, "journaled": 1, "answered": 2}[where]
    expected = pb.RUN_STATE_CANCELLED if where == "charged" else pb.RUN_STATE_SUCCEEDED
    assert run.state == expected
