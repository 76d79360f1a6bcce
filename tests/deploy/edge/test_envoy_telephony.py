"""The carriers' route through Envoy (``deploy/edge/telephony.py``): without telephony
upstreams the configuration is what it was; with them ``/telephony/`` goes first, to an
HTTP/1.1 cluster of those servers, with no route timeout and the WebSocket upgrade
enabled on that route only (the connection manager lists it disabled); a port 0 is
refused; ``switchboard envoy --telephony`` renders it, and Envoy accepts it; each of a
mesh's dispatchers serves the streams on a port of its own. (A call
through a real Envoy: tests/dispatcher/talk/streams/test_streams.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from switchboard.cli import main as cli_main
from switchboard.deploy.edge.envoy import EdgeSpec, HostPort, SpecError, render
from switchboard.deploy.processes import EVERY_SERVICE, Host, Service
from tests.e2e.envoy import envoy_validate

pytestmark = pytest.mark.unit

LOCAL = HostPort("127.0.0.1", 50051)
STREAMS = (HostPort("127.0.0.1", 8081), HostPort("127.0.0.1", 8082))


def _config(spec: EdgeSpec) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(render(spec))
    return loaded


def _manager(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    manager: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager


def test_without_telephony_nothing_changes() -> None:
    config = _config(EdgeSpec.all_in_one(LOCAL))
    assert "upgrade_configs" not in _manager(config)
    assert "telephony" not in {c["name"] for c in config["static_resources"]["clusters"]}
    routes = _manager(config)["route_config"]["virtual_hosts"][0]["routes"]
    assert not any(r["match"].get("prefix") == "/telephony/" for r in routes)


def test_telephony_is_an_http1_route_with_websockets_only_there() -> None:
    config = _config(EdgeSpec.all_in_one(LOCAL, telephony=STREAMS))
    manager = _manager(config)
    assert manager["upgrade_configs"] == [{"upgrade_type": "websocket", "enabled": False}]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    first = routes[0]
    assert first["match"] == {"prefix": "/telephony/"}
    assert first["route"]["cluster"] == "telephony"
    assert first["route"]["timeout"] == "0s"
    assert first["route"]["upgrade_configs"] == [{"upgrade_type": "websocket", "enabled": True}]
    assert not any("upgrade_configs" in r.get("route", {}) for r in routes[1:])
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "telephony")
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http_protocol_options" in options["explicit_http_config"]
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints]
    assert ports == [8081, 8082]


def test_a_telephony_port_0_is_refused() -> None:
    with pytest.raises(SpecError, match=r"telephony upstream 127\.0\.0\.1:0 has port 0"):
        render(EdgeSpec.all_in_one(LOCAL, telephony=(HostPort("127.0.0.1", 0),)))


def test_the_envoy_command_renders_telephony_and_envoy_accepts_it(tmp_path: Path) -> None:
    out = tmp_path / "envoy.yaml"
    code = cli_main(
        [
            "envoy",
            "--upstream=127.0.0.1:50051",
            "--telephony=127.0.0.1:8081",
            "--telephony=streams.internal:8081",
            f"--output={out}",
        ]
    )
    assert code == 0
    config = yaml.safe_load(out.read_text())
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "telephony")
    assert cluster["type"] == "STRICT_DNS"
    done = envoy_validate(out)
    assert done.returncode == 0, done.stderr[-2000:]


class _Host:
    """What ``Service.environment`` reads of the mesh that runs it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.base_env = env

    def context_for(self, index: int) -> Service:
        return Service(cast(Host, self), "context", "context", 1)

    def dispatcher_for(self, index: int) -> Service:
        return Service(cast(Host, self), "dispatcher", "dispatcher", 1)


def test_each_mesh_dispatcher_serves_streams_on_a_port_of_its_own() -> None:
    host = cast(Host, _Host({"SWITCHBOARD_STREAMS_LISTEN": "0.0.0.0:8081"}))
    first, second = (Service(host, f"dispatcher-{i}", "dispatcher", i) for i in (1, 2))
    whole = Service(host, "switchboard-1", EVERY_SERVICE, 1)
    context = Service(host, "context", "context", 1)
    listens = [s.environment()["SWITCHBOARD_STREAMS_LISTEN"] for s in (first, second, whole)]
    ports = [first.streams_port, second.streams_port, whole.streams_port]
    assert all(ports)
    assert len(set(ports)) == 3
    assert listens == [f"127.0.0.1:{port}" for port in ports]
    # The same port across a restart: Envoy's cluster names it.
    assert first.environment()["SWITCHBOARD_STREAMS_LISTEN"] == listens[0]
    assert "SWITCHBOARD_STREAMS_LISTEN" not in context.environment()
    assert context.streams_port == 0
    # Without the setting, no process serves streams.
    quiet = Service(cast(Host, _Host({})), "dispatcher", "dispatcher", 1)
    assert "SWITCHBOARD_STREAMS_LISTEN" not in quiet.environment()
    assert quiet.streams_port == 0
