"""Steers reach the replica that runs their target, whichever replica they land on.

Two real dispatcher processes (A and B) on one PostgreSQL and one Redis, as behind
Envoy. A run starts on A; a SteerRun sent to B, and a SendMessage with
CONCURRENCY_POLICY_STEER sent to B, are admitted on A (forwarded with the caller's
own credential), queued there behind the target. The target is the built-in echo
handler, which has no step boundary: when it ends (cancelled here), each steer runs
on A as an ordinary queued run (REQUEUED) and answers once.
"""

from __future__ import annotations

import grpc
import pytest

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from tests.conftest import CALL_DEADLINE_S
from tests.dispatcher.runs.test_dispatcher_forwarding import (
    code_of,
    env,
    front,
    people,
    replica,
    slow_run,
    stubs,
)
from tests.e2e.procs import ServeProcess
from tests.kits.dispatchkit import cancel, finished, get_run

pytestmark = pytest.mark.e2e

__all__ = ["env", "front"]  # the fixtures this module uses


def _message(text: str) -> cpb.Message:
    return cpb.Message(parts=[cpb.ContentPart(text=text)])


async def test_steers_sent_to_another_replica_queue_behind_the_run_where_it_runs(
    front: ServeProcess, env: dict[str, str]
) -> None:
    who = await people(front)
    with replica(env, "replica-a") as a, replica(env, "replica-b") as b:
        async with stubs(a, b) as (on_a, on_b):
            run = await slow_run(on_a, who.editor, who.conversation)

            steered = await on_b.SteerRun(
                pb.SteerRunRequest(run=run, message=_message("one more thing")),
                metadata=who.editor.md,
                timeout=CALL_DEADLINE_S,
            )
            assert steered.run.state == pb.RUN_STATE_QUEUED
            assert steered.run.steer.target == run
            assert steered.run.steer.state == pb.STEER_STATE_ACCEPTED
            assert steered.run.handler == "handlers/echo"
            sent = await on_b.SendMessage(
                pb.SendMessageRequest(
                    conversation=who.conversation,
                    message=_message("and another"),
                    concurrency_policy=pb.CONCURRENCY_POLICY_STEER,
                ),
                metadata=who.editor.md,
                timeout=CALL_DEADLINE_S,
            )
            assert sent.run.steer.target == run
            # A viewer may not steer, through B either.
            refused = on_b.SteerRun(
                pb.SteerRunRequest(run=run, message=_message("no")),
                metadata=who.viewer.md,
                timeout=CALL_DEADLINE_S,
            )
            assert await code_of(refused) == grpc.StatusCode.PERMISSION_DENIED

            # The echo handler has no step boundary: the steers wait for its end.
            await cancel(on_b, who.editor, run)
            for name in (steered.run.name, sent.run.name):
                ended = await finished(on_a, who.editor, name)
                assert ended.state == pb.RUN_STATE_SUCCEEDED, ended.error
                assert ended.steer.state == pb.STEER_STATE_REQUEUED
                assert ended.output_message
                stored = await get_run(on_b, who.editor, name)
                assert stored.steer.state == pb.STEER_STATE_REQUEUED
                assert ended.routing_reason == f"steers {run}"
            # The target has ended: steering it now is RUN_ENDED, on either replica.
            for stub in (on_a, on_b):
                late = stub.SteerRun(
                    pb.SteerRunRequest(run=run, message=_message("too late")),
                    metadata=who.editor.md,
                    timeout=CALL_DEADLINE_S,
                )
                assert await code_of(late) == grpc.StatusCode.FAILED_PRECONDITION
