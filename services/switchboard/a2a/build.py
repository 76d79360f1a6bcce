"""The A2A front door as a process builds it.

It reaches the dispatcher and the context service through ``ports``: their
domains when they are served by this process (the embedded shape), their
stubs at ``SWITCHBOARD_DISPATCHER_ADDRESS`` and ``SWITCHBOARD_CONTEXT_ADDRESS``
when they run elsewhere (the front door as its own process).
"""

from __future__ import annotations

from switchboard.a2a import servicer
from switchboard.a2a.card import servicer as cardservicer
from switchboard.a2a.card.public import HTTP_JSON, PROTOCOL_VERSION, PublicCards, through_edge
from switchboard.a2a.frontdoor import FrontDoor, Interface, Runs, Texts
from switchboard.a2a.ports import LocalRuns, LocalTexts, RemoteRuns, RemoteTexts
from switchboard.a2a.push.configs import PushConfigs
from switchboard.a2a.push.store import PushStore
from switchboard.a2a.settings import A2ASettings
from switchboard.context.build import context_domain
from switchboard.dispatcher.service import Dispatcher
from switchboard.platform.config import ConfigError
from switchboard.platform.process import Shared, setting
from switchboard.platform.rpc.outbound.peers import PeerSettings
from switchboard.platform.rpc.server import ServiceRegistration, advertise_address
from switchboard.platform.security.egress import EgressPolicy, EgressSettings


async def _runs(peers: PeerSettings, shared: Shared) -> Runs:
    dispatcher = shared.built(Dispatcher)
    if dispatcher is not None:
        return LocalRuns(dispatcher)
    if not peers.dispatcher_address:
        raise ConfigError(
            "SWITCHBOARD_DISPATCHER_ADDRESS: required when a2a is served without the "
            "dispatcher (its host:port)"
        )
    remote = RemoteRuns(peers.dispatcher_address, shared.tokens)
    shared.resources.push_async_callback(remote.close)
    return remote


async def _texts(peers: PeerSettings, shared: Shared) -> Texts:
    # As the dispatcher reaches it: the context service's process when one is
    # named and this process does not serve it, else the domain here.
    if peers.context_address and "context" not in shared.settings.services:
        remote = RemoteTexts(peers.context_address, shared.tokens)
        shared.resources.push_async_callback(remote.close)
        return remote
    return LocalTexts(await context_domain(shared))


async def build(shared: Shared) -> tuple[ServiceRegistration, ...]:
    """The A2A service and, beside it, the public Agent Card's."""
    settings, peers = shared.section(A2ASettings), shared.section(PeerSettings)
    runs = await _runs(peers, shared)
    texts = await _texts(peers, shared)
    address: list[Interface] = []

    async def bound(port: int) -> None:
        address[:] = [Interface(url=advertise_address(shared.settings, port))]

    def interfaces(proto: str, host: str) -> list[Interface]:
        """The extended card's: the edge's gRPC and HTTP+JSON (only the edge transcodes)
        for a call that came through it or when its URL is configured; else where this
        process is reached, gRPC only."""
        edge = through_edge(settings.public_url, proto, host)
        if edge is None:
            return list(address)
        return [
            Interface(url=edge.grpc),
            Interface(url=edge.http_json, binding=HTTP_JSON, version=PROTOCOL_VERSION),
        ]

    with setting("SWITCHBOARD_EGRESS_ALLOW_CIDRS"):
        egress = EgressPolicy.from_settings(shared.section(EgressSettings))
    # Configs go to the shared database wherever this runs; the integration
    # service's webhook engine delivers them (docs/a2a.md, "Push notifications").
    push = PushConfigs(
        PushStore(shared.database),
        runs,
        shared.policy,
        shared.secret_box,
        egress,
        shared.page_tokens,
        allow_plain_http=egress.allow_loopback or egress.allow_private,
    )
    front_door = FrontDoor(runs, texts, shared.policy, shared.access, interfaces, push)
    root = settings.a2a_root_agent
    return (
        ServiceRegistration(
            servicer.SERVICE,
            servicer.A2AServiceServicer(front_door, root),
            on_bound=bound,
            checks_json_depth=True,
        ),
        ServiceRegistration(
            cardservicer.SERVICE,
            cardservicer.AgentCardServiceServicer(PublicCards(settings.public_url, root)),
        ),
    )
