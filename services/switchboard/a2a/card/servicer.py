"""Transport for ``switchboard.api.agentcard.v1.AgentCardService``: the public Agent Card.

Public (``platform/security/access.py``): the card holds nothing a stranger may not know
(``public.py``). The edge's gRPC-JSON transcoder serves it as plain JSON at
``/.well-known/agent-card.json`` and ``/{tenant}/.well-known/agent-card.json``,
forwarding the scheme and Host the request came with (the card names that edge).
"""

from __future__ import annotations

from google.api import httpbody_pb2
from grpc import aio

from switchboard.a2a import errors
from switchboard.a2a.card.public import PublicCards, forwarded
from switchboard.api.agentcard.v1 import agentcard_pb2 as pb
from switchboard.api.agentcard.v1 import agentcard_pb2_grpc
from switchboard.platform.errors import InvalidArgument

SERVICE = pb.DESCRIPTOR.services_by_name["AgentCardService"]

Context = aio.ServicerContext[object, object]


class AgentCardServiceServicer(agentcard_pb2_grpc.AgentCardServiceServicer):
    def __init__(self, cards: PublicCards) -> None:
        self._cards = cards

    async def GetPublicAgentCard(
        self, request: pb.GetPublicAgentCardRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        proto, host = forwarded(context.invocation_metadata() or ())
        try:
            return self._cards.document(request.tenant, proto, host)
        except InvalidArgument as error:
            # A2A clients read the card's errors as they read the agent's. (No root
            # agent is no card at all: a plain NOT_FOUND.)
            raise errors.tagged(error, "GetPublicAgentCard", names_task=False) from None
