"""WatchRun of a run recovered after its replica stopped mid tool call (issue 67): on
the process that recovered it, and on a process started after the run ended.

What a watch from the start must show wherever it lands (docs/dispatcher.md, "Restarts
and crashes"; the RunUpdate contract): sequences that only go up, a first update that
follows the watcher's place or is a state change that stands for what came before (a
recovered attempt opens with its state change back to QUEUED), one end and only as the
last update, and stamps that never go back. Issue 67 saw the recovering process send
the run's SUCCEEDED first (numbered 2^32, stamped at the recovery), then the whole
attempt again and SUCCEEDED a second time.

Real parts: the llm handler against the local OpenAI-compatible server, the reference
MCP server whose slow tool is in flight at the stop, the replica stopped (it stores the
run QUEUED again) and restarted on the same database (``test_run_journal.py``'s harness).
The same after a SIGKILL, on PostgreSQL and Redis: ``test_run_streams_sigkill.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.runs.core.active.live import SEQUENCE_BLOCK
from switchboard.dispatcher.runs.core.store import TERMINAL
from tests.dispatcher.tools.test_run_journal import _decide, restarted, stopped_mid_call
from tests.dispatcher.tools.test_tool_runs import _paused
from tests.infra.mcpeverything import EverythingServer
from tests.kits.dispatchkit import Watched, watch_all

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def everything() -> Iterator[EverythingServer]:
    with EverythingServer() as server:
        yield server


def _ends(update: pb.RunUpdate) -> bool:
    return (
        update.WhichOneof("update") == "state_change" and update.state_change.run.state in TERMINAL
    )


def assert_watchable(seen: Watched, after: int = 0) -> None:
    """The contract every WatchRun stream keeps, on any replica."""
    updates = seen.updates
    assert updates, "the stream sent nothing"
    sequences = seen.sequences
    assert sequences == sorted(set(sequences)), f"sequences not increasing: {sequences}"
    assert sequences[0] > after
    first = updates[0]
    assert first.sequence == after + 1 or first.WhichOneof("update") == "state_change", first
    ends = [i for i, u in enumerate(updates) if _ends(u)]
    assert ends == [len(updates) - 1], f"ends at {ends} of {len(updates)}: {_trail(updates)}"
    stamps = [u.time.ToNanoseconds() for u in updates]
    assert stamps == sorted(stamps), f"stamps went back: {_trail(updates)}"
    # Each newer attempt a stream shows opens with a state change (the sign to start over).
    blocks: set[int] = set()
    for update in updates:
        block = update.sequence // SEQUENCE_BLOCK
        if block not in blocks:
            blocks.add(block)
            assert update.WhichOneof("update") == "state_change", _trail(updates)


def _trail(updates: list[pb.RunUpdate]) -> list[str]:
    out = []
    for u in updates:
        kind = u.WhichOneof("update")
        what = pb.RunState.Name(u.state_change.run.state) if kind == "state_change" else kind
        out.append(f"{u.sequence} {what}")
    return out


async def test_a_run_recovered_after_a_stop_replays_its_attempt_from_its_opening_state_change(
    everything: EverythingServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="switchboard.dispatcher")
    async with stopped_mid_call(everything, tmp_path) as stopped:
        tools, run = stopped.tools, stopped.run
        async with restarted(stopped):
            call, _ = await _paused(tools, run)
            call.cancel()
            await _decide(
                tools, run, pb.TOOL_APPROVAL_DECISION_COMPLETE, result_text="it finished: 3 steps"
            )
            # On the process that recovered it: while it goes on, and once it has ended
            # (its feed kept). Stopped (not killed), the replica stored the run QUEUED
            # again, so the attempt opens with RUNNING (after a SIGKILL, with QUEUED:
            # test_run_streams_sigkill.py, beside this file); nothing comes before it.
            live = await watch_all(tools.dstub, tools.world.editor, run)
            seen = await watch_all(tools.dstub, tools.world.editor, run)
            for watched in (live, seen):
                assert_watchable(watched)
                assert watched.sequences[0] == SEQUENCE_BLOCK + 1
                assert watched.states == [
                    pb.RUN_STATE_RUNNING,
                    pb.RUN_STATE_REQUIRES_ACTION,
                    pb.RUN_STATE_RUNNING,
                    pb.RUN_STATE_SUCCEEDED,
                ], _trail(watched.updates)
                assert watched.text == "The tool said: it finished: 3 steps"
            assert seen.sequences == live.sequences
            # A watcher that resumes inside the first attempt gets the same.
            resumed = await watch_all(tools.dstub, tools.world.editor, run, after=3)
            assert_watchable(resumed, after=3)
            assert resumed.sequences == seen.sequences
            ended = seen.final
        recovered = [r for r in caplog.records if r.getMessage() == "run recovered"]
        assert [(r.state, r.action) for r in recovered] == [("RUN_STATE_QUEUED", "queued")]  # type: ignore[attr-defined]
        # A process started after the end: from what it holds, or the run as stored.
        async with restarted(stopped):
            fresh = await watch_all(tools.dstub, tools.world.editor, run)
            assert_watchable(fresh)
            assert fresh.final == ended
