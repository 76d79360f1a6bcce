"""Consolidation: a workspace's memory kept tidy after forming touched it, bounded.

A job per workspace (``consolidate:{workspace}``) is asked for after each applied
exchange, due ``SWITCHBOARD_MEMORY_CONSOLIDATE_DELAY_S`` later (asking again never
pushes it back). It reads the current items of the workspace's scope and of the
user scopes forming touched (only the items formed in this workspace), at most
``MAX_ITEMS`` per scope and ``MAX_SCOPES`` scopes a pass, and

* retires each item past its ``expire_time`` at that time ("expired", EXPIRE);
* merges near-duplicates of one kind (``similarity.merges``): the newer formed
  item is retired into the older ("merged into {name}", MERGE).

Nothing is deleted, and each step is idempotent (an item retired meanwhile is
passed over), so a pass cut by a crash is simply run again.
"""

from __future__ import annotations

from typing import Final

from google.protobuf import field_mask_pb2, timestamp_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.dispatcher.memory.apply import decided_event
from switchboard.dispatcher.memory.plans.plan import Exchange
from switchboard.dispatcher.memory.plans.similarity import Item, merges
from switchboard.dispatcher.memory.store import Job
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.platform.errors import FailedPrecondition, NotFound
from switchboard.platform.events.bus import EventBus
from switchboard.platform.security.policy import Principal
from switchboard.platform.values.names import now

#: Items read per scope, and scopes, in one pass at most.
MAX_ITEMS: Final = 200
MAX_SCOPES: Final = 20
_PAGE: Final = 100


class Consolidator:
    def __init__(self, context: ContextPort, bus: EventBus, *, timeout_s: float) -> None:
        self._context = context
        self._bus = bus
        self._timeout_s = timeout_s

    async def run(self, job: Job) -> list[str]:
        """One pass: the workspace's scope and the first users' (their ids, returned;
        the job keeps the others for its next pass)."""
        users = [turn.run for turn in Exchange.loads(job.exchange).turns][: MAX_SCOPES - 1]
        workspace = f"workspaces/{job.workspace_id}"
        await self._scope(Principal.acting_for(job.user_id), workspace, "")
        for user_id in users:
            await self._scope(Principal.acting_for(user_id), f"users/{user_id}", workspace)
        return users

    async def _items(
        self, principal: Principal, scope: str, workspace: str
    ) -> list[cpb.MemoryItem]:
        items: list[cpb.MemoryItem] = []
        token = ""
        while len(items) < MAX_ITEMS:
            page = await self._context.list_memory(
                principal,
                cpb.ListMemoryItemsRequest(
                    parent=scope,
                    page_size=min(_PAGE, MAX_ITEMS - len(items)),
                    page_token=token,
                    validity=cpb.MEMORY_VALIDITY_CURRENT,
                    workspace=workspace,
                ),
                timeout_s=self._timeout_s,
            )
            items.extend(page.memory_items)
            token = page.next_page_token
            if not token:
                break
        return items

    async def _scope(self, principal: Principal, scope: str, workspace: str) -> None:
        try:
            items = await self._items(principal, scope, workspace)
        except NotFound:
            return
        current = now()
        alive: list[Item] = []
        for item in items:
            if item.HasField("expire_time") and item.expire_time.ToDatetime() <= current.replace(
                tzinfo=None
            ):
                if await self._retire(principal, item.name, item.expire_time, "expired"):
                    await self._bus.publish(
                        decided_event(scope, "expire", replaces=item.name, reason="expired")
                    )
                continue
            learned = item.valid_time if item.HasField("valid_time") else item.create_time
            alive.append(
                Item(
                    name=item.name,
                    kind=item.kind,
                    content=item.content,
                    order=(learned.ToDatetime().timestamp(), item.name),
                    formed=item.HasField("formation"),
                )
            )
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(current)
        for kept, retired in merges(alive):
            reason = f"merged into {kept.name}"
            if await self._retire(principal, retired.name, stamp, reason):
                await self._bus.publish(
                    decided_event(
                        scope, "merge", item=kept.name, replaces=retired.name, reason=reason
                    )
                )

    async def _retire(
        self, principal: Principal, name: str, when: timestamp_pb2.Timestamp, reason: str
    ) -> bool:
        item = cpb.MemoryItem(name=name, invalid_reason=reason[:200])
        item.invalid_time.CopyFrom(when)
        try:
            await self._context.update_memory(
                principal,
                cpb.UpdateMemoryItemRequest(
                    memory_item=item,
                    update_mask=field_mask_pb2.FieldMask(paths=["invalid_time", "invalid_reason"]),
                ),
                timeout_s=self._timeout_s,
            )
        except (FailedPrecondition, NotFound):
            return False
        return True


__all__ = ["MAX_ITEMS", "MAX_SCOPES", "Consolidator"]
