"""A server to benchmark, in its own process: prints "PORT TOKEN", serves until stdin closes.

python bench/target.py bare              grpc.aio + health only (no interceptor)
python bench/target.py switchboard       the real assembly (create_server, all services)
python bench/target.py switchboard-auth  the same, but GetJwks requires a bearer token
python bench/target.py switchboard-auth-nocache   ... with the verified-token cache off
python bench/target.py switchboard-events [SETTING=VALUE ...]   the assembly for bench/events.py

TOKEN is an access token of a user created at start ("-" for bare). The
"-auth" variants change one access rule in this process only, so the
authenticated and the public call are the same RPC doing the same work; the
difference is the guard.

``switchboard-events`` raises the limits that 10,000 subscriptions of one user
need (EVENT_LIMITS; SETTING=VALUE arguments override any setting, and
``gc_threshold=G0,G1,G2`` is the GC setting), creates the
workspaces ``bench`` and ``other`` owned by the token's user, and then reads
commands on stdin, one per line, each answered with one JSON line on stdout:

    publish TAG RATE SECONDS SCOPE   publish round(RATE*SECONDS) events, paced at RATE
                                     per second, through shared.bus.publish in this
                                     process; event i has id "TAG:i" and its time
                                     stamped when it is published. SCOPE is
                                     workspaces/W (the event is in the conversation
                                     workspaces/W/conversations/lobby) or a conversation
                                     name. Answers {"done": TAG, "count", "start",
                                     "end" (wall clock, s), "lag_max_ms" (how late the
                                     pacing ran), "queued_p50_ms", "queued_p99_ms"
                                     (publish to stored and queued for every
                                     subscriber, in this process), "gc_*" (this
                                     process's garbage-collector pauses meanwhile)}
                                     once every event is in the log; several
                                     publishes may run at once.
    stats                            {"subscribers": live subscriptions in the fan-out}

Closing stdin stops the server.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from switchboard.api.context.v1 import context_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.mesh import create_server
from switchboard.platform.events.bus import EventBus
from switchboard.platform.observe.logging import configure_logging
from switchboard.platform.rpc.server import tune_gc
from switchboard.platform.security import access
from switchboard.platform.security.policy import Scope
from switchboard.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.*

from bench.fixtures import BENCH_EMAIL
from bench.fixtures import PASSWORD as BENCH_PASSWORD
from bench.harness import ms

#: What 10,000 Subscribe streams of one user need (over a few connections).
EVENT_LIMITS: Final[dict[str, Any]] = {
    "events_max_subscriptions_per_principal": 100_000,
    "max_concurrent_rpcs": 100_000,
    "max_concurrent_streams": 10_000,
    "shutdown_drain_delay_s": 0,
}
#: A chat message of typical size: the payload every benchmark event carries.
_TEXT: Final = "The quarterly numbers are in; see the attached summary before Friday's review. " * 2


async def _bare() -> tuple[aio.Server, int]:
    server = aio.server()
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


def _quiet_logging() -> None:
    """Access lines are formatted exactly as in production, into a sink that costs nothing."""
    configure_logging("INFO", "json")
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sink)


def _event(tag: str, i: int, scope: str, author: str) -> events_pb2.Event:
    parts = scope.split("/")
    workspace = "/".join(parts[:2])
    conversation = scope if len(parts) == 4 else f"{workspace}/conversations/lobby"
    return events_pb2.Event(
        id=f"{tag}:{i}",
        type=events_pb2.EVENT_TYPE_MESSAGE_CREATED,
        actor=events_pb2.Actor(name=author),
        workspace=workspace,
        conversation=conversation,
        message_created=events_pb2.MessageCreated(
            message=context_pb2.Message(
                name=f"{conversation}/messages/{tag}-{i}",
                role=context_pb2.MESSAGE_ROLE_USER,
                author=author,
                parts=[context_pb2.ContentPart(text=_TEXT)],
                sequence=i + 1,
            )
        ),
    )


class _Pauses:
    """Garbage-collector pauses of this process (a latency source with many live objects).

    Measured in wall-clock time and in the collecting thread's CPU time: the
    difference is time the process was not running (other processes had the cores).
    """

    def __init__(self) -> None:
        # (end wall clock, wall seconds, thread CPU seconds, generation)
        self.pauses: list[tuple[float, float, float, int]] = []
        self._started = (0.0, 0.0)
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = (time.perf_counter(), time.thread_time())
        else:
            wall, cpu = self._started
            self.pauses.append(
                (
                    time.time(),
                    time.perf_counter() - wall,
                    time.thread_time() - cpu,
                    info["generation"],
                )
            )

    def between(self, start: float, end: float) -> dict[str, Any]:
        inside = [(w, c, g) for t, w, c, g in self.pauses if start <= t <= end]
        return {
            "gc_max_ms": round(max((w for w, _, _ in inside), default=0.0) * 1000, 3),
            "gc_total_ms": round(sum(w for w, _, _ in inside) * 1000, 3),
            "gc_cpu_max_ms": round(max((c for _, c, _ in inside), default=0.0) * 1000, 3),
            "gc_cpu_total_ms": round(sum(c for _, c, _ in inside) * 1000, 3),
            "gc_count_by_generation": [sum(1 for *_, g in inside if g == n) for n in range(3)],
            "gc_max_ms_by_generation": [
                round(max((w for w, _, g in inside if g == n), default=0.0) * 1000, 1)
                for n in range(3)
            ],
        }


class _Queued:
    """Per publish tag: seconds from ``event.time`` to the end of the fan-out's pushes
    (stored in the log and queued for every subscriber), seen by a bus listener."""

    def __init__(self, bus: EventBus) -> None:
        self.seconds: dict[str, list[float]] = {}
        bus.listen(self._on_event)

    def _on_event(self, event: events_pb2.Event) -> None:
        samples = self.seconds.get(event.id.partition(":")[0])
        if samples is not None:
            samples.append(time.time() - event.time.ToNanoseconds() / 1e9)


async def _publish(
    bus: EventBus,
    queued: _Queued,
    pauses: _Pauses,
    tag: str,
    rate: float,
    seconds: float,
    scope: str,
    author: str,
) -> None:
    """Publish at ``rate`` without waiting for each append (the log commits in groups)."""
    count = max(1, round(rate * seconds))
    loop = asyncio.get_running_loop()
    appends: list[asyncio.Task[events_pb2.Event]] = []
    samples = queued.seconds[tag] = []
    start_wall, start, lag = time.time(), loop.time(), 0.0
    try:
        for i in range(count):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the publish schedule
            else:
                lag = max(lag, -delay)
            event = _event(tag, i, scope, author)
            event.time.GetCurrentTime()  # publish time: latency is measured from here
            appends.append(asyncio.create_task(bus.publish(event)))
        await asyncio.gather(*appends)
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which fails the run
        print(json.dumps({"error": f"publish {tag}: {exc!r}"}), flush=True)
        return
    finally:
        del queued.seconds[tag]
    end_wall = time.time()
    answer = {
        "done": tag,
        "count": count,
        "start": start_wall,
        "end": end_wall,
        "lag_max_ms": round(lag * 1000, 3),
        "queued_p50_ms": ms(samples, 0.5),
        "queued_p99_ms": ms(samples, 0.99),
        **pauses.between(start_wall, end_wall),
    }
    print(json.dumps(answer), flush=True)


async def _events(overrides: Sequence[str]) -> None:
    """The ``switchboard-events`` variant: see the module docstring."""
    _quiet_logging()
    directory = tempfile.mkdtemp(prefix="switchboard-bench-")
    try:
        custom = dict(item.split("=", 1) for item in overrides)
        settings = Settings.from_values(
            host="127.0.0.1",
            port=0,
            dev_mode=True,
            database_url=f"sqlite+aiosqlite:///{directory}/bench.db",
            **{**EVENT_LIMITS, **custom},
        )
        server, port = await create_server(settings)
        tune_gc(settings.kernel)  # as `switchboard serve` does
        await server.start()
        from switchboard.auth.accounts import Accounts, ClientContext
        from switchboard.auth.store import AuthStore
        from switchboard.platform.security.policy import AuthMethod

        shared = server.shared
        accounts = shared.built(Accounts)
        assert accounts is not None  # the auth service is served
        user = await AuthStore(shared.database).create_user(BENCH_EMAIL, "Bench", None)
        sign_in = await accounts.start_session(
            user, AuthMethod.PASSWORD, ClientContext(address="127.0.0.1")
        )
        for workspace in ("bench", "other"):
            await shared.memberships.create_workspace(workspace, workspace.title(), user.id)
        print(port, sign_in.tokens.access_token, flush=True)
        author = f"users/{user.id}"
        queued = _Queued(shared.bus)
        pauses = _Pauses()
        loop = asyncio.get_running_loop()
        running: set[asyncio.Task[None]] = set()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            words = line.split()
            if words[:1] == ["publish"] and len(words) == 5:
                tag, rate, seconds, scope = words[1], float(words[2]), float(words[3]), words[4]
                task = asyncio.create_task(
                    _publish(shared.bus, queued, pauses, tag, rate, seconds, scope, author)
                )
                running.add(task)
                task.add_done_callback(running.discard)
            elif words == ["stats"]:
                print(json.dumps({"subscribers": shared.bus.fanout.count}), flush=True)
            elif words:
                print(json.dumps({"error": f"unknown command {line.strip()!r}"}), flush=True)
        for task in running:
            task.cancel()
        await server.shutdown(0)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def main(variant: str, overrides: Sequence[str] = ()) -> None:
    if variant == "switchboard-events":
        await _events(overrides)
        return
    token = "-"  # noqa: S105 - placeholder: bare has no auth
    if variant == "bare":
        server, port = await _bare()
    else:
        _quiet_logging()
        if variant.startswith("switchboard-auth"):
            access.RULES["/switchboard.api.auth.v1.AuthService/GetJwks"] = access.authenticated(
                Scope.READ
            )
        directory = tempfile.mkdtemp(prefix="switchboard-bench-")
        settings = Settings.from_values(
            host="127.0.0.1",
            port=0,
            dev_mode=True,
            database_url=f"sqlite+aiosqlite:///{directory}/bench.db",
            token_cache_size=0 if variant.endswith("nocache") else 10_000,
            # The login benchmark signs in from one address many times a second.
            login_max_attempts_per_address=1_000_000,
            login_max_failures_per_account=100_000,
        )
        wrapped, port = await create_server(settings)
        await wrapped.start()
        from switchboard.api.auth.v1 import auth_pb2
        from switchboard.auth.accounts import Accounts

        accounts = wrapped.shared.built(Accounts)
        assert accounts is not None  # the auth service is served
        sign_in = await accounts.register(
            auth_pb2.RegisterRequest(
                email=BENCH_EMAIL, password=BENCH_PASSWORD, display_name="Bench"
            ),
            "127.0.0.1",
        )
        token = sign_in.tokens.access_token
        server = wrapped.grpc_server
    print(port, token, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
