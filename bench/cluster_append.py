"""What ``WAIT 1`` costs the event log's appends on a Redis Cluster (issue 80).

Starts one redis-server and a three-master, three-replica cluster (the test suite's
helpers, on free ports), then times, one after another:

* the log's appends (``RedisLog.append``, one at a time, and ``append_many`` of ten) on
  one Redis and on the cluster, where each append waits for a replica (``WAIT 1``);
* the raw append script in a pipeline on the cluster, with and without ``WAIT 1``,
  twice each, interleaved: the difference is WAIT's own cost.

    python bench/cluster_append.py [APPENDS]      # 2000 by default

Latencies in microseconds; on a busy machine compare the medians of one run.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.*

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.cache import binary_client
from switchboard.platform.events.eventlog import _APPEND_SCRIPT, RedisLog
from tests.infra.redis import RedisServer, find_redis_server
from tests.infra.rediscluster import Cluster


def _event(serial: int) -> events_pb2.Event:
    event = events_pb2.Event(
        id=f"bench-{time.time_ns()}-{serial}",
        type=events_pb2.EVENT_TYPE_WORKSPACE_CHANGED,
        workspace="workspaces/w",
    )
    event.time.GetCurrentTime()
    return event


def _report(name: str, samples: list[float]) -> None:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    print(
        f"{name:44s} n={len(ordered):5d}  mean {statistics.mean(ordered) * 1e6:6.0f}"
        f"  p50 {at(0.5):6.0f}  p99 {at(0.99):6.0f}"
    )


async def _log_appends(url: str, label: str, count: int) -> None:
    log = RedisLog(
        url,
        key="bench:events",
        timeout_s=2.0,
        retention=1_000_000,
        retention_s=86_400,
        memory=10,
        outbox_limit=10,
        dedupe_window_s=60,
    )
    try:
        for serial in range(50):  # warm: connections, slots, the script loaded
            await log.append(_event(serial))
        one: list[float] = []
        for serial in range(count):
            started = time.perf_counter()
            event = await log.append(_event(serial))
            one.append(time.perf_counter() - started)
            if not event.cursor:
                raise RuntimeError("an append was not acknowledged")
        _report(f"{label}: append", one)
        ten: list[float] = []
        for serial in range(count // 10):
            batch = [_event(serial * 10 + i) for i in range(10)]
            started = time.perf_counter()
            await log.append_many(batch)
            ten.append(time.perf_counter() - started)
        _report(f"{label}: append_many(10)", ten)
    finally:
        await log.close()


async def _raw(url: str, count: int) -> None:
    client = binary_client(url, timeout_s=2.0, max_connections=4)
    try:
        sha = await client.script_load(_APPEND_SCRIPT)
        key = "{bench:raw}"
        for wait in (False, True, False, True):
            samples: list[float] = []
            for serial in range(count):
                keys = [key, f"{key}:id:{time.time_ns()}-{serial}", f"{key}:horizon"]
                started = time.perf_counter()
                async with client.pipeline(transaction=False) as pipe:
                    pipe.execute_command("EVALSHA", sha, 3, *keys, 60_000, 10**6, b"x" * 120, 10**4)
                    if wait:
                        node = client.get_node_from_key(key)  # type: ignore[union-attr]
                        pipe.execute_command("WAIT", 1, 2000, target_nodes=node)
                    await pipe.execute()
                samples.append(time.perf_counter() - started)
            _report(f"cluster, raw pipeline {'with' if wait else 'without'} WAIT 1", samples)
    finally:
        await client.aclose()


async def main(count: int) -> None:
    executable = find_redis_server()
    if executable is None:
        raise SystemExit("redis-server is needed (apt-get install redis-server)")
    single = RedisServer(executable)
    cluster = Cluster(executable, Path(tempfile.mkdtemp(prefix="bench-cluster-")))
    single.start()
    try:
        cluster.start()
        await _log_appends(single.url, "one Redis", count)
        await _log_appends(cluster.url, "cluster (WAIT 1)", count)
        await _raw(cluster.url, count)
    finally:
        single.stop()
        cluster.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
