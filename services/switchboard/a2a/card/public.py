"""The public Agent Card: what any caller, signed in or not, learns about an agent.

A2A clients read ``/.well-known/agent-card.json`` (and, per agent,
``/{tenant}/.well-known/agent-card.json``) before anything else, without a
credential. Answering from the store would tell a stranger which workspaces and
assistants exist (a card for one, NOT_FOUND for another), so the public card is
the same for every well-formed tenant: where and how to call (the edge's
interfaces with that tenant), which credentials are accepted, and what the
protocol offers. The assistant's name, description and skills are in the
extended card (``GetExtendedAgentCard``), which authorizes the caller first.

The root card (no tenant) is the deployment's root agent's
(``SWITCHBOARD_A2A_ROOT_AGENT``): its interfaces name no tenant, so a generic
client built from it sends none, and the servicer gives such requests to that
agent. A deployment that names no root agent has no root card (NOT_FOUND,
saying where the agents' cards are): a card whose interfaces fail every call
would only mislead a client.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from google.api import httpbody_pb2
from google.protobuf import json_format

from a2a.types import a2a_pb2 as a2a
from switchboard.a2a import mapping
from switchboard.a2a.frontdoor import agent_card
from switchboard.platform.errors import NotFound

#: A2A's protocol version the interfaces speak (the SDK's ``PROTOCOL_VERSION_CURRENT``).
PROTOCOL_VERSION: Final = "1.0"
HTTP_JSON: Final = "HTTP+JSON"
GRPC: Final = "GRPC"
CONTENT_TYPE: Final = "application/json"
#: Where the edge listens unless told (``switchboard envoy``'s default ``--listen``).
DEFAULT_URL: Final = "http://127.0.0.1:8080"
#: A host[:port] as a Host header carries it: a name, an IPv4 or a bracketed IPv6 address.
_AUTHORITY: Final = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class Edge:
    """The edge's public URL (``SWITCHBOARD_PUBLIC_URL``): HTTP+JSON at the URL itself,
    gRPC at its host and port (a gRPC channel target, as the SDK's channel factory takes)."""

    url: str

    @property
    def http_json(self) -> str:
        return self.url.rstrip("/")

    @property
    def grpc(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or ""
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def interfaces(self, tenant: str) -> list[a2a.AgentInterface]:
        return [
            a2a.AgentInterface(
                url=url, protocol_binding=binding, tenant=tenant, protocol_version=PROTOCOL_VERSION
            )
            for binding, url in ((HTTP_JSON, self.http_json), (GRPC, self.grpc))
        ]


def forwarded(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str, str]:
    """The scheme and Host a call reached the edge with (``x-forwarded-proto``,
    ``x-forwarded-host``: Envoy sets both); empty for a call that came directly."""
    proto = host = ""
    for key, value in metadata:
        if key == "x-forwarded-proto" and isinstance(value, str):
            proto = value
        elif key == "x-forwarded-host" and isinstance(value, str):
            host = value
    return proto, host


def through_edge(configured: str, proto: str, host: str) -> Edge | None:
    """The edge a card names: ``SWITCHBOARD_PUBLIC_URL`` when set; else the scheme and
    host the request reached the edge with, so a card fetched through any listener
    names that listener; None for a call that did not come through the edge.

    A client choosing its own Host header only changes the card it gets back itself.
    """
    if configured:
        return Edge(configured)
    if proto in ("http", "https") and _AUTHORITY.fullmatch(host):
        return Edge(f"{proto}://{host}")
    return None


def edge_of(configured: str, proto: str, host: str) -> Edge:
    """``through_edge``, else ``DEFAULT_URL`` (where ``switchboard envoy`` listens)."""
    return through_edge(configured, proto, host) or Edge(DEFAULT_URL)


class PublicCards:
    def __init__(self, configured_url: str, root_agent: str = "") -> None:
        self._configured = configured_url
        self._root = root_agent

    def card(self, tenant: str, edge: Edge) -> a2a.AgentCard:
        """The card for ``tenant`` (empty: the root agent's, naming no tenant; NOT_FOUND
        when there is none). A malformed tenant is INVALID_ARGUMENT; a well-formed one
        gets the card whether or not its workspace and assistant exist."""
        if tenant:
            mapping.agent(tenant)
        elif not self._root:
            raise NotFound(
                "this deployment serves no agent at its root: each agent's card is at "
                "/{workspace}.{assistant}/.well-known/agent-card.json (an operator names a "
                "root agent with SWITCHBOARD_A2A_ROOT_AGENT)"
            )
        card = agent_card(
            name="Switchboard agent",
            description=(
                "A Switchboard assistant as an A2A agent. Its name, description and skills "
                "are in the extended agent card (GetExtendedAgentCard; sign in first)."
            ),
            interfaces=edge.interfaces(tenant),
            # The same skill for every agent: what an assistant does is not public.
            skill=a2a.AgentSkill(
                id="answer",
                name="answer",
                description="Answers a message; the extended card says what about.",
                tags=["assistant"],
            ),
        )
        card.provider.url = edge.http_json
        return card

    def document(self, tenant: str, proto: str, host: str) -> httpbody_pb2.HttpBody:
        """The card as the JSON document A2A clients read (camelCase, as A2A's JSON is),
        for a request that reached the edge with scheme ``proto`` and Host ``host``."""
        card = self.card(tenant, edge_of(self._configured, proto, host))
        text = json_format.MessageToJson(card, indent=None, sort_keys=True)
        return httpbody_pb2.HttpBody(content_type=CONTENT_TYPE, data=text.encode())
