"""The A2A front door as a process builds it: on the dispatcher and context of this process.

It serves where the dispatcher and the context service are served (the
embedded shape; in the mesh, beside the dispatcher's replicas): it reaches
them through their domains' own request and response messages, as an
in-process dispatcher reaches the context service (decisions 19).
"""

from __future__ import annotations

from switchboard.a2a import mapping, servicer
from switchboard.a2a.agents import Agents, Interface
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.context.build import context_domain
from switchboard.context.domain import ContextDomain
from switchboard.dispatcher.service import Dispatcher
from switchboard.platform.config import ConfigError, Settings
from switchboard.platform.policy import Principal
from switchboard.platform.server import ServiceRegistration, advertise_address
from switchboard.shared import Shared


class _LocalRuns:
    """The dispatcher of this process, through its domain calls."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self.send_message = dispatcher.send_message
        self.get_run = dispatcher.get_run
        self.list_runs = dispatcher.list_runs
        self.watch = dispatcher.watch

    async def cancel_run(self, principal: Principal, name: str, reason: str) -> pb.Run:
        return await self._dispatcher.cancel_run(principal, name, reason)


class _LocalTexts:
    """The context service of this process: new conversations, messages' text."""

    def __init__(self, domain: ContextDomain) -> None:
        self._domain = domain

    async def create_conversation(self, principal: Principal, parent: str, request_id: str) -> str:
        made = await self._domain.conversations.create(
            principal,
            cpb.CreateConversationRequest(
                parent=parent, conversation=cpb.Conversation(title="A2A"), request_id=request_id
            ),
        )
        return made.name

    async def text(self, message: str) -> str:
        return mapping.text_of(await self._domain.messages.get(message))


async def build(settings: Settings, shared: Shared) -> ServiceRegistration:
    dispatcher = shared.built(Dispatcher)
    if dispatcher is None or "context" not in settings.services:
        raise ConfigError(
            "SWITCHBOARD_SERVICES: a2a is served beside the dispatcher and context services "
            "(add dispatcher,context to the process that serves a2a)"
        )
    domain = await context_domain(shared)
    address: list[Interface] = []

    async def bound(port: int) -> None:
        address[:] = [Interface(url=advertise_address(settings, port))]

    agents = Agents(
        _LocalRuns(dispatcher),
        _LocalTexts(domain),
        dispatcher.assistants,
        shared.policy,
        shared.access,
        lambda: list(address),
    )
    return ServiceRegistration(
        servicer.SERVICE, servicer.A2AServiceServicer(agents), on_bound=bound
    )
