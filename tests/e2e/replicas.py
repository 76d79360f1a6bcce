"""Dispatcher replicas on the scaled-out shape (one PostgreSQL, one Redis), as the
fault tests drive them: a `switchboard serve` process under a fixed instance id,
SIGKILLed or stopped and started again as the same replica; a user signed up on
one of them; the wait for a dead replica's runs to be taken over."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

from grpc import aio
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.store.models import RunRow
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ServeProcess
from tests.kits.authkit import PASSWORD, unique_email
from tests.kits.contextkit import Caller
from tests.kits.dispatchkit import Stub, dispatcher_stub

ACTIVE: Final = (pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING)


class Replica:
    """One `switchboard serve` process under a fixed instance id, killed and started
    again (a new process, a new port) by the test."""

    def __init__(self, name: str, env: dict[str, str], stack: contextlib.ExitStack) -> None:
        self.name = name
        self._env = {**env, "SWITCHBOARD_INSTANCE_ID": name}
        self._stack = stack
        self.process: ServeProcess | None = None
        self.channel: aio.Channel | None = None
        self._old: list[aio.Channel] = []
        self.up = False

    async def start(self) -> None:
        process = ServeProcess(env=self._env)
        self._stack.push(process)
        await asyncio.to_thread(process.start)
        self.process = process
        if self.channel is not None:
            self._old.append(self.channel)
        self.channel = aio.insecure_channel(process.address)
        self.up = True

    def kill(self) -> None:
        assert self.process is not None
        assert self.process.proc is not None
        self.up = False
        self.process.proc.kill()  # SIGKILL: no drain, no shutdown code
        self.process.proc.wait(timeout=CALL_DEADLINE_S)

    async def stop(self) -> int:
        """SIGTERM, as a deployment stops it: its exit code."""
        assert self.process is not None
        self.up = False
        return await asyncio.to_thread(self.process.terminate)

    @property
    def stub(self) -> Stub:
        assert self.channel is not None
        return dispatcher_stub(self.channel)

    async def close(self) -> None:
        for channel in [*self._old, *([self.channel] if self.channel else [])]:
            await channel.close(None)


async def sign_up(address: str, who: str) -> Caller:
    """A new user (``who`` starts the email), registered on the server at ``address``."""
    async with aio.insecure_channel(address) as channel:
        response = await auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(email=unique_email(who), password=PASSWORD),
            timeout=CALL_DEADLINE_S,
        )
    return Caller(response.user.name.removeprefix("users/"), response.tokens.access_token)


async def taken_over(database: AsyncEngine, instance: str, within_s: float) -> None:
    """Return once no queued or running run is stored as ``instance``'s."""
    deadline = time.monotonic() + within_s
    while True:
        async with database.connect() as db:
            held = (
                await db.execute(
                    select(func.count())
                    .select_from(RunRow)
                    .where(RunRow.worker == instance, RunRow.state.in_(ACTIVE))
                )
            ).scalar_one()
        if not held:
            return
        assert time.monotonic() < deadline, f"{held} runs of {instance} never taken over"
        await asyncio.sleep(0.1)  # polling a stored state, under a deadline
