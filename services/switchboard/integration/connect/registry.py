"""One connector per kind: which client speaks to an integration.

gRPC domain experts get a HandlerService channel (``kinds/experts.py``), MCP servers
an MCP session through the official SDK (``kinds/mcp.py``), A2A agents the A2A SDK's
client over the interface their card names (``kinds/a2a.py``), webhooks that
declare tools in their config a signed POST per call (``kinds/webhooktools.py``), and
other webhooks no connector at all (they are only ever sent events, by
``webhooks/delivery.py``). Every connector dials through the egress policy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

from switchboard.api.integration.v1 import integration_pb2 as pb
from switchboard.integration.connect.connections import ConnectorFactory
from switchboard.integration.kinds.a2a import A2AAgent, A2AAgentConnector
from switchboard.integration.kinds.experts import GrpcExpertConnector
from switchboard.integration.kinds.mcp import (
    McpConnector,
    StdioServer,
    parse_stdio_servers,
    raw_limit,
)
from switchboard.integration.kinds.webhooktools import (
    WebhookToolsConnector,
    declared,
    signing_secrets,
)
from switchboard.integration.mapping import name_of
from switchboard.integration.ports.connectors import Connector
from switchboard.integration.settings import IntegrationSettings
from switchboard.integration.store import IntegrationRecord
from switchboard.platform.rpc.outbound.channels import RemoteHandlerSettings, parse_remotes
from switchboard.platform.security.credentials.secretbox import SecretBox
from switchboard.platform.security.egress import EgressPolicy

#: Built-in handler ids a workspace's expert may not take.
BUILTIN_HANDLERS = frozenset({"echo", "llm"})


def reserved_handler_ids(settings: RemoteHandlerSettings) -> frozenset[str]:
    """Operator-level handler ids: built-ins and the statically configured experts."""
    static = {handler_id for handler_id, _ in parse_remotes(settings.dispatcher_remote_handlers)}
    return BUILTIN_HANDLERS | static


def stdio_servers(settings: IntegrationSettings) -> Mapping[str, StdioServer]:
    """The operator's stdio MCP servers by id (ValueError if the setting is malformed)."""
    if not settings.integration_mcp_stdio_servers.strip():
        return {}
    return parse_stdio_servers(settings.integration_mcp_stdio_servers)


def connector_factory(
    settings: IntegrationSettings,
    egress: EgressPolicy,
    stdio: Mapping[str, StdioServer],
    tools_changed: Callable[[str], None],
    *,
    secrets: SecretBox | None = None,
) -> ConnectorFactory:
    """``secrets`` opens a webhook's previous signing secret (its calls are signed
    with both during a rotation, as its deliveries are); without it, only the current."""
    connect_timeout_s = min(settings.integration_default_call_timeout_s, 10.0)

    def build(record: IntegrationRecord, credential: str | None) -> Connector | None:
        name = name_of(record)
        if record.kind == pb.INTEGRATION_KIND_MCP_SERVER:
            headers = {"Authorization": f"Bearer {credential}"} if credential else {}
            server = None
            if record.endpoint.startswith("stdio:"):
                server = stdio[record.endpoint.removeprefix("stdio:")]
            return McpConnector(
                record.endpoint,
                headers=headers,
                egress=egress,
                connect_timeout_s=connect_timeout_s,
                on_tools_changed=lambda: tools_changed(name),
                stdio=server,
                # A result up to the limit must arrive whole, to be judged by it.
                max_message_bytes=max(16 << 20, raw_limit(settings.integration_max_result_bytes)),
            )
        if record.kind == pb.INTEGRATION_KIND_GRPC_HANDLER:
            return GrpcExpertConnector(record.endpoint, egress, credential=credential or "")
        if record.kind == pb.INTEGRATION_KIND_A2A_AGENT:
            agent = A2AAgent(
                record.endpoint,
                egress,
                credential=credential or "",
                timeout_s=connect_timeout_s,
                allow_plain_http=egress.allow_loopback or egress.allow_private,
            )
            return A2AAgentConnector(agent)
        if record.kind == pb.INTEGRATION_KIND_WEBHOOK:
            tools = declared(record.config)
            if not tools:
                return None
            previous: Callable[[], str] | None = None
            if secrets is not None and record.previous_credential is not None:
                previous = functools.partial(secrets.open, record.previous_credential, purpose=name)
            return WebhookToolsConnector(
                record.endpoint,
                tools,
                secrets=signing_secrets(credential, previous, record.previous_until),
                egress=egress,
                connect_timeout_s=connect_timeout_s,
            )
        return None

    return build
