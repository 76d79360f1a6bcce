"""The carriers' way in through Envoy: ``/telephony/`` to the dispatchers' media-streams
servers (``SWITCHBOARD_STREAMS_LISTEN``, docs/telephony.md).

A carrier's voice webhook (a form POST) and its media stream (a WebSocket) are HTTP/1.1,
not gRPC: they go to a cluster of their own over HTTP/1.1, with no route timeout (a
stream lasts the call; the listener's stream idle timeout still cuts a dead one, and a
live one sends audio every 20 ms). The WebSocket upgrade is allowed on this route only:
the connection manager lists it disabled, and this route enables it. The path reaches
the server unchanged, so the carriers' signatures over the public URL still hold.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Final

from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
)
from envoy_data_plane.envoy.config.core.v3 import Http1ProtocolOptions
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.config.route.v3 import (
    Route,
    RouteAction,
    RouteActionUpgradeConfig,
    RouteMatch,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManagerUpgradeConfig,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage

TELEPHONY_CLUSTER: Final = "telephony"
TELEPHONY_PREFIX: Final = "/telephony/"
WEBSOCKET: Final = "websocket"


def manager_upgrades() -> list[HttpConnectionManagerUpgradeConfig]:
    """The connection manager's: WebSocket known, and off unless a route turns it on."""
    return [HttpConnectionManagerUpgradeConfig(upgrade_type=WEBSOCKET, enabled=False)]


def route() -> Route:
    return Route(
        match=RouteMatch(prefix=TELEPHONY_PREFIX),
        route=RouteAction(
            cluster=TELEPHONY_CLUSTER,
            timeout=dt.timedelta(0),
            upgrade_configs=[RouteActionUpgradeConfig(upgrade_type=WEBSOCKET, enabled=True)],
        ),
    )


def cluster(
    endpoints: ClusterLoadAssignment, *, dns: bool, connect_timeout: dt.timedelta
) -> Cluster:
    """The media-streams servers, over HTTP/1.1 (``endpoints``: their addresses)."""
    found = Cluster(
        name=TELEPHONY_CLUSTER,
        type=ClusterDiscoveryType.STRICT_DNS if dns else ClusterDiscoveryType.STATIC,
        connect_timeout=connect_timeout,
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": AnyMessage.pack(
                HttpProtocolOptions(
                    explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                        http_protocol_options=Http1ProtocolOptions()
                    )
                )
            )
        },
        load_assignment=endpoints,
    )
    if dns:
        found.dns_lookup_family = ClusterDnsLookupFamily.V4_PREFERRED
    return found


def any_dns(hosts: Sequence[bool]) -> bool:
    """Whether some of the servers are DNS names (``hosts``: whether each is an IP)."""
    return not all(hosts)
