"""A real Redis Cluster for tests: three masters, three replicas, on free ports.

``redis_cluster`` (function-scoped) starts six ``redis-server --cluster-enabled yes``
nodes (``RedisServer`` with cluster options, each in its own directory), joins them
with ``redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes``, and waits,
by polling with a deadline, until every node says ``cluster_state:ok`` and every
master has its replica attached. It stops every node afterwards, killed or not.

A node's cluster bus listens on its port + 10000, so ports are searched below 55536
with both free. ``cluster-node-timeout`` is short (a failover takes a few seconds,
not fifteen), and a replica may always take over (validity factor 0).
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
import redis

from tests.infra.redis import RedisServer, find_redis_server

#: How long the cluster may take to form (or to fail over) before the test gives up.
FORM_DEADLINE_S: Final = 30.0
FAILOVER_DEADLINE_S: Final = 30.0
#: ms without an answer before a master is judged failed and its replica promoted.
NODE_TIMEOUT_MS: Final = 1000
#: A node's answer to a test's client: a bound on a hang, never a speed check (tests/
#: conftest.py's CALL_DEADLINE_S; a plugin, this module does not import conftest).
#: Nodes are only ever SIGKILLed (refused at once), never frozen; 2 s failed calls that
#: only waited for a core.
CLIENT_TIMEOUT_S: Final = 60.0
_POLL_S: Final = 0.02
_BUS_OFFSET: Final = 10_000
_PORTS: Final = (20_000, 55_000)


def _both_free(port: int) -> bool:
    for candidate in (port, port + _BUS_OFFSET):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                return False
    return True


def free_cluster_port() -> int:
    """A port that is free, and whose bus port (+10000) is free too (searched at random)."""
    for _ in range(1000):
        port = random.randint(*_PORTS)  # noqa: S311 - a port, not a secret
        if _both_free(port):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


@dataclass
class ClusterNode:
    server: RedisServer

    @property
    def port(self) -> int:
        return self.server.port

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=CLIENT_TIMEOUT_S, decode_responses=True
        )

    def role(self) -> str:
        with self.client() as c:
            return str(c.execute_command("ROLE")[0])


class Cluster:
    """Six nodes as one cluster; see the module doc."""

    def __init__(self, executable: str, directory: Path) -> None:
        for i in range(6):
            (directory / f"node{i}").mkdir()
        self.nodes = [
            ClusterNode(
                RedisServer(
                    executable,
                    directory / f"node{i}",
                    extra_args=(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(NODE_TIMEOUT_MS),
                        "--cluster-replica-validity-factor",
                        "0",
                    ),
                    free_port=free_cluster_port,
                )
            )
            for i in range(6)
        ]

    @property
    def url(self) -> str:
        """The settings' URL: any one live node seeds the client."""
        live = next(node for node in self.nodes if node.server.running)
        return f"redis+cluster://127.0.0.1:{live.port}"

    def start(self) -> None:
        for node in self.nodes:
            node.server.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=FORM_DEADLINE_S,
        )
        self.wait_ok(self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.server.stop()

    def live(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.server.running]

    def wait_ok(self, nodes: list[ClusterNode], deadline_s: float = FORM_DEADLINE_S) -> None:
        """Until every node in ``nodes`` says ``cluster_state:ok`` and agrees on three
        masters, each with a replica attached (what ``WAIT 1`` needs)."""
        deadline = time.monotonic() + deadline_s
        last = ""
        while time.monotonic() < deadline:
            try:
                if all(self._settled(node) for node in nodes):
                    return
            except (redis.RedisError, OSError) as exc:
                last = repr(exc)
            time.sleep(_POLL_S)  # polling under a deadline
        raise RuntimeError(f"the Redis Cluster did not settle in {deadline_s}s {last}")

    def _settled(self, node: ClusterNode) -> bool:
        with node.client() as c:
            info = c.execute_command("CLUSTER", "INFO")
            text = info if isinstance(info, str) else str(info)
            if "cluster_state:ok" not in text:
                return False
            if node.role() == "master":
                replication = c.info("replication")
                return bool(
                    int(replication.get("connected_slaves", 0)) >= 1
                    and replication.get("slave0", {}).get("state") == "online"
                )
            return True

    @staticmethod
    def _ok(node: ClusterNode) -> bool:
        with node.client() as c:
            return "cluster_state:ok" in str(c.execute_command("CLUSTER", "INFO"))

    def master_of(self, key: str) -> ClusterNode:
        """The live master that serves ``key``'s slot now."""
        node = self.live()[0]
        with node.client() as c:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(master[1])
                    return next(n for n in self.nodes if n.server.running and n.port == port)
        raise RuntimeError(f"no master serves {key!r}")

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        for node in self.live():
            if node is master:
                continue
            with node.client() as c:
                replication = c.info("replication")
            if (
                replication.get("role") == "slave"
                and int(replication["master_port"]) == master.port
            ):
                return node
        raise RuntimeError(f"master {master.port} has no replica")

    def wait_promoted(self, replica: ClusterNode) -> None:
        """Until ``replica`` is a master and every live node says the cluster is ok."""
        deadline = time.monotonic() + FAILOVER_DEADLINE_S
        while time.monotonic() < deadline:
            try:
                if replica.role() == "master" and all(self._ok(n) for n in self.live()):
                    return
            except (redis.RedisError, OSError):
                pass
            time.sleep(_POLL_S)  # polling under a deadline
        raise RuntimeError(f"node {replica.port} was not promoted in {FAILOVER_DEADLINE_S}s")


@pytest.fixture
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A formed three-master, three-replica Redis Cluster; stopped afterwards."""
    executable = find_redis_server()
    if executable is None:
        pytest.fail("redis-server is required for this test (apt-get install redis-server)")
    cluster = Cluster(executable, tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
