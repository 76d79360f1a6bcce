"""The scaled-out shape on a real Redis Cluster (issue 80): two `switchboard serve`
processes, A and B, on one PostgreSQL and a three-master, three-replica Redis Cluster
(``SWITCHBOARD_REDIS_URL=redis+cluster://``, tests/infra/rediscluster.py), while the
master that holds the event log's slot is SIGKILLed and its replica promoted.

- Events: subscribers on A and on B follow a user's scope while CreateApiKey publishes
  a security event through each process, before the kill, between the kill and the
  killed node's return (the promoted master has no replica then, so no append is
  acknowledged by ``WAIT 1``: they wait in the outbox), and after. Every subscriber
  then holds exactly the log after its start, in log order, each event once, and the
  log holds exactly one event per CreateApiKey that returned OK, read through either
  process (the checks of the single-Redis fault suite, ``tests/events/test_event_faults.py``).
- Runs: after the failover, runs sent through each process stream to their end, each
  watched through the other process (its updates over the cluster's channels), and the
  answers are stored.

Waiting is on what the subscribers and publishers report, or on the cluster's own
state with a deadline, never on a sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.cache import hash_tag
from tests.e2e.procs import ServeProcess, shared_secrets
from tests.events.test_event_faults import (
    PER_PHASE,
    Publisher,
    _assert_exact,
    _assert_survived,
    _mesh,
    _received_all,
)
from tests.infra.rediscluster import Cluster
from tests.kits.contextkit import Caller, all_messages, context_stub, create_conversation
from tests.kits.contextkit import create_workspace as new_workspace
from tests.kits.dispatchkit import dispatcher_stub, request, watch_all

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

#: The event log's stream on a cluster: the settings' key as a hash tag.
LOG_KEY: Final = hash_tag("switchboard:events")
#: How long a phase may take: a failover, the outbox's flush and a slow host included.
PHASE_TIMEOUT_S: Final = 60.0
#: Runs sent through each process after the failover.
RUNS_EACH: Final = 3


@pytest.fixture
def pair(
    tmp_path: Path, redis_cluster: Cluster, postgres_url: str
) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    env = {
        **shared_secrets(tmp_path),
        "SWITCHBOARD_DATABASE_URL": postgres_url,
        "SWITCHBOARD_REDIS_URL": redis_cluster.url,
        "SWITCHBOARD_MAX_API_KEYS_PER_USER": "10000",
        "PYTHONFAULTHANDLER": "1",
    }
    with ServeProcess(env=env) as a, ServeProcess(env=env) as b:
        yield a, b
        _assert_survived(a, b)


async def test_a_failed_over_master_loses_no_event_and_every_subscriber_resumes(
    pair: tuple[ServeProcess, ServeProcess], redis_cluster: Cluster
) -> None:
    async with _mesh(pair) as mesh:
        scenario = mesh.scenario
        followers = await mesh.follow([("A1", mesh.a), ("B1", mesh.b)])
        through_a = Publisher(scenario, "via-a", mesh.a, mesh.token)
        through_b = Publisher(scenario, "via-b", mesh.b, mesh.token)
        publishers = [through_a, through_b]

        async def phase(what: str) -> None:
            for _ in range(PER_PHASE):
                await asyncio.gather(through_a.create(), through_b.create())
            await scenario.until(_received_all(followers, publishers), what, PHASE_TIMEOUT_S)

        await phase("the events before the kill, everywhere")
        master = redis_cluster.master_of(LOG_KEY)
        replica = redis_cluster.replica_of(master)
        master.server.kill()
        await asyncio.to_thread(redis_cluster.wait_promoted, replica)
        # Acknowledged to the callers while the new master has no replica: the outbox
        # holds their events until an append can be acknowledged again.
        for _ in range(PER_PHASE):
            await asyncio.gather(through_a.create(), through_b.create())
        master.server.restart()
        await asyncio.to_thread(redis_cluster.wait_ok, redis_cluster.live())
        await scenario.until(
            _received_all(followers, publishers), "the events of the failover", PHASE_TIMEOUT_S
        )
        await phase("the events after the failover, everywhere")

        _assert_exact(followers, publishers, await mesh.logs(mesh.a, mesh.b))


async def test_runs_after_a_failover_stream_to_their_end_through_the_other_process(
    pair: tuple[ServeProcess, ServeProcess], redis_cluster: Cluster
) -> None:
    async with _mesh(pair) as mesh:
        caller = Caller(mesh.user.removeprefix("users/"), mesh.token)
        workspace = (await new_workspace(context_stub(mesh.a), caller, "Cluster")).name
        conversation = (await create_conversation(context_stub(mesh.a), caller, workspace)).name
        master = redis_cluster.master_of(LOG_KEY)
        replica = redis_cluster.replica_of(master)
        master.server.kill()
        await asyncio.to_thread(redis_cluster.wait_promoted, replica)
        master.server.restart()
        await asyncio.to_thread(redis_cluster.wait_ok, redis_cluster.live())

        sides = [(mesh.a, mesh.b), (mesh.b, mesh.a)]
        answers: dict[str, str] = {}
        for n in range(RUNS_EACH * len(sides)):
            sent_to, watched_on = sides[n % len(sides)]
            text = f"after the failover {n}"
            sent = await dispatcher_stub(sent_to).SendMessage(
                request(conversation, text, handler="echo"),
                metadata=caller.md,
                timeout=PHASE_TIMEOUT_S,
            )
            seen = await watch_all(dispatcher_stub(watched_on), caller, sent.run.name)
            assert seen.final.state == pb.RUN_STATE_SUCCEEDED, seen.final
            sequences = [u.sequence for u in seen.updates]
            assert sequences == sorted(set(sequences)), sequences
            answers[seen.final.output_message] = text
        stored = {
            m.name: "".join(p.text for p in m.parts)
            for m in await all_messages(context_stub(mesh.b), caller, conversation)
            if m.role == cpb.MESSAGE_ROLE_ASSISTANT
        }
        for message, text in answers.items():
            assert stored[message].startswith(text), (text, stored.get(message))
