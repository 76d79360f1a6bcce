"""The context domain without gRPC: a real SQLite file, the embedded bus and cache.

``open_domain`` builds what the embedded default builds (the database migrated
on a file, the in-memory cache, the event bus over the database log with its
outbox) and the context domain over it, with the limits a test chooses.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.context.common import Limits
from switchboard.context.domain import ContextDomain, Plugins
from switchboard.context.text.entities import BuiltinEntityExtractor
from switchboard.context.text.summarizer import ExtractiveSummarizer
from switchboard.context.text.tokencount import ApproxTokenCounter
from switchboard.context.windows.cache import WindowCache
from switchboard.platform.cache import Cache
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import LocalLog
from switchboard.platform.security.policy import AuthMethod, Principal, Scope
from switchboard.platform.store.db import Database, open_database
from switchboard.platform.store.models import UserRow
from switchboard.platform.store.outbox import Outbox
from switchboard.platform.store.pagination import PageTokens
from switchboard.platform.values.names import new_id, now
from tests.conftest import CALL_DEADLINE_S, TEST_DATABASE_TIMEOUT_S


@dataclass
class Kit:
    domain: ContextDomain
    database: Database
    #: Every event the domain published, in order.
    events: list[events_pb2.Event] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def heard(self, event: events_pb2.Event) -> None:
        self.events.append(event)
        self._arrived.set()

    async def event_where(
        self, wanted: Callable[[events_pb2.Event], bool], timeout_s: float = CALL_DEADLINE_S
    ) -> events_pb2.Event:
        """The first event published that is ``wanted``, waiting for it if need be."""
        async with asyncio.timeout(timeout_s):
            while True:
                found = next((e for e in self.events if wanted(e)), None)
                if found is not None:
                    return found
                self._arrived.clear()
                await self._arrived.wait()

    async def user(self) -> Principal:
        """A new user, signed in with every scope."""
        user_id = new_id()
        stamp = now()
        async with self.database.sessions.begin() as db:
            db.add(
                UserRow(
                    id=user_id,
                    email=f"{user_id}@example.com",
                    display_name="A user",
                    created_at=stamp,
                    updated_at=stamp,
                    version=1,
                )
            )
        return Principal(user_id=user_id, auth_method=AuthMethod.PASSWORD, scopes=frozenset(Scope))

    async def workspace(self, owner: Principal) -> pb.Workspace:
        return await self.domain.workspaces.create(
            owner, pb.CreateWorkspaceRequest(workspace=pb.Workspace(display_name="Team"))
        )

    async def conversation(self, owner: Principal) -> pb.Conversation:
        workspace = await self.workspace(owner)
        return await self.domain.conversations.create(
            owner, pb.CreateConversationRequest(parent=workspace.name)
        )

    async def say(self, caller: Principal, conversation: str, text: str) -> pb.Message:
        message = pb.Message(role=pb.MESSAGE_ROLE_USER, parts=[pb.ContentPart(text=text)])
        return await self.domain.messages.append(
            caller, pb.AppendMessageRequest(parent=conversation, message=message)
        )


@contextlib.asynccontextmanager
async def open_domain(tmp_path: pathlib.Path, limits: Limits | None = None) -> AsyncIterator[Kit]:
    database = await open_database(
        f"sqlite+aiosqlite:///{tmp_path / 'context.db'}",
        timeout_s=TEST_DATABASE_TIMEOUT_S,
        migrate=True,
    )
    outbox = Outbox(database)
    bus = EventBus(
        LocalLog(database, retention=10_000, retention_s=3600, memory=1000, outbox=outbox),
        memory=1000,
        outbox=outbox,
    )
    counters = Cache("", timeout_s=1.0, lease_s=1.0)
    await counters.start()
    await bus.start()
    domain = ContextDomain(
        database,
        bus,
        WindowCache("", timeout_s=1.0, ttl_s=60, max_entries=100, max_bytes=1 << 20),
        counters,
        plugins=Plugins(ApproxTokenCounter(), ExtractiveSummarizer(), BuiltinEntityExtractor()),
        limits=limits or Limits(),
        page_tokens=PageTokens("unit-test-secret"),
    )
    await domain.start(maintain=False)
    kit = Kit(domain, database)
    stop = bus.listen(kit.heard)
    try:
        yield kit
    finally:
        stop()
        await domain.close()
        await bus.close()
        await counters.close()
        await database.close()
