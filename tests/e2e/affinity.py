"""Steering a call to a chosen process through Envoy: the routing header's value that
Envoy's hash sends to each one (docs/operations.md, "Affinity at the edge").

Which process served a call comes from its ``rpc finished`` log line, found by the
request id the server returns in the call's trailers (``x-request-id``: Envoy makes a
fresh one per request, so it names exactly one call).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.deploy.edge.envoy import AFFINITY_HEADER

#: Probes to find a value for each process: with two, the chance that this many all
#: land on one is 2^-63.
MAX_PROBES: Final = 64
CALL_TIMEOUT_S: Final = 30.0


class JsonLogs(Protocol):
    """The processes' JSON log lines, waited on (tests/e2e/test_tokens_mesh.py's ``Logs``)."""

    def wait(
        self, match: Callable[[dict[str, Any]], bool], count: int = 1
    ) -> list[tuple[str, dict[str, Any]]]: ...


def steer(key: str) -> tuple[tuple[str, str], ...]:
    """The metadata that routes a call by ``key``."""
    return ((AFFINITY_HEADER, key),)


async def request_id(call: Any) -> str:
    """The request id of a finished call (its ``x-request-id`` trailer)."""
    trailers = dict(await call.trailing_metadata() or ())
    return str(trailers["x-request-id"])


async def handled_by(logs: JsonLogs, call: Any, count: int) -> list[str]:
    """The first ``count`` processes that logged ``call``'s request id (finished): a call
    a process forwards to another (a CancelRun for a run it does not own) keeps its id."""
    wanted = await request_id(call)
    found = await asyncio.to_thread(
        logs.wait,
        lambda e: e.get("message") == "rpc finished" and e.get("request_id") == wanted,
        count,
    )
    return [name for name, _ in found]


async def served_by(logs: JsonLogs, call: Any) -> str:
    """The process that served ``call`` (finished), for a call no process forwards."""
    [name] = await handled_by(logs, call, 1)
    return name


async def keys_to(channel: aio.Channel, logs: JsonLogs, processes: Sequence[str]) -> dict[str, str]:
    """A conversation-shaped key that Envoy sends to each of ``processes``, found by
    asking (a public unary call per probe) and reading where each landed."""
    found: dict[str, str] = {}
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    for n in range(MAX_PROBES):
        key = f"workspaces/probe/conversations/c{n}"
        call = stub.GetJwks(auth_pb2.GetJwksRequest(), metadata=steer(key), timeout=CALL_TIMEOUT_S)
        await call
        found.setdefault(await served_by(logs, call), key)
        if set(found) >= set(processes):
            return found
    raise AssertionError(f"no key reached each of {processes} in {MAX_PROBES} probes: {found}")
