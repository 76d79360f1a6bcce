"""Memory forming as a process builds it (``dispatcher/build.py`` starts it after the
dispatcher and closes it before): its settings are the dispatcher's
``SWITCHBOARD_MEMORY_*`` fields, handed in by ``dispatcher/build.py``."""

from __future__ import annotations

from typing import Protocol

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.dispatcher.assistants.catalog import Assistants
from switchboard.dispatcher.budgets.ledger import Ledger
from switchboard.dispatcher.handlers.router import Registry
from switchboard.dispatcher.llm.handler import LlmHandler
from switchboard.dispatcher.memory.apply import Applier
from switchboard.dispatcher.memory.consolidate import Consolidator
from switchboard.dispatcher.memory.feed import Policies
from switchboard.dispatcher.memory.forming import Former
from switchboard.dispatcher.memory.model import FormingModel
from switchboard.dispatcher.memory.store import JobStore
from switchboard.dispatcher.memory.worker import FormingLimits, MemoryForming, Parts
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.platform.errors import NotFound
from switchboard.platform.process import Shared


class FormingSettings(Protocol):
    """The dispatcher's ``SWITCHBOARD_MEMORY_*`` settings (``DispatcherSettings``), as
    forming reads them (by their shape: this room is below the dispatcher's settings)."""

    @property
    def memory_forming(self) -> bool: ...
    @property
    def memory_poll_s(self) -> float: ...
    @property
    def memory_lease_s(self) -> float: ...
    @property
    def memory_claim_s(self) -> float: ...
    @property
    def memory_call_timeout_s(self) -> float: ...
    @property
    def memory_max_output_tokens(self) -> int: ...
    @property
    def memory_context_tokens(self) -> int: ...
    @property
    def memory_similar(self) -> int: ...
    @property
    def memory_max_attempts(self) -> int: ...
    @property
    def memory_paused_retry_s(self) -> float: ...
    @property
    def memory_consolidate_delay_s(self) -> float: ...


def memory_forming(
    shared: Shared,
    settings: FormingSettings,
    context: ContextPort,
    registry: Registry,
    assistants: Assistants,
) -> MemoryForming | None:
    """The feeder and workers of this process; None where forming is off here."""
    if not settings.memory_forming:
        return None
    llm = registry.get("llm")
    handler = llm if isinstance(llm, LlmHandler) else None
    timeout_s = settings.memory_call_timeout_s

    async def assistant(name: str) -> pb.Assistant | None:
        try:
            return await assistants.get(name)
        except NotFound:
            return None

    model = FormingModel(
        handler,
        Ledger(shared.database),
        max_tokens=settings.memory_max_output_tokens,
        timeout_s=timeout_s,
    )
    parts = Parts(
        former=Former(
            context,
            model,
            timeout_s=timeout_s,
            similar=settings.memory_similar,
            context_tokens=settings.memory_context_tokens,
        ),
        applier=Applier(context, shared.bus, JobStore(shared.database), timeout_s=timeout_s),
        consolidator=Consolidator(context, shared.bus, timeout_s=timeout_s),
        policies=Policies(context, assistant, timeout_s=timeout_s),
        access=shared.policy,
    )
    return MemoryForming(
        shared.database,
        shared.bus,
        parts,
        FormingLimits(
            poll_s=settings.memory_poll_s,
            lease_s=settings.memory_lease_s,
            claim_s=settings.memory_claim_s,
            max_attempts=settings.memory_max_attempts,
            paused_retry_s=settings.memory_paused_retry_s,
            consolidate_delay_s=settings.memory_consolidate_delay_s,
        ),
        instance_id=shared.instance_id,
    )


__all__ = ["FormingSettings", "memory_forming"]
