"""The edge's share of A2A: what the transcoder is given, the public card's URL, the setting."""

from __future__ import annotations

import json

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from switchboard import mesh
from switchboard.a2a.card.public import DEFAULT_URL, Edge, PublicCards, edge_of
from switchboard.deploy.edge.envoy import (
    COMPANION_API,
    TRANSCODED,
    EdgeSpec,
    HostPort,
    ServerLimits,
    bootstrap,
    transcoder_descriptors,
)
from switchboard.platform.config import ConfigError
from switchboard.platform.errors import InvalidArgument, NotFound
from switchboard.settings import Settings
from tests.conftest import make_settings

pytestmark = pytest.mark.unit


def test_envoy_routes_the_companions_the_processes_serve() -> None:
    assert {name: tuple(d.full_name for d in ds) for name, ds in COMPANION_API.items()} == {
        name: tuple(d.full_name for d in ds) for name, ds in mesh.COMPANIONS.items()
    }


def test_the_transcoder_gets_every_file_it_needs_and_subscribe_by_post() -> None:
    files = descriptor_pb2.FileDescriptorSet.FromString(transcoder_descriptors()).file
    names = [f.name for f in files]
    # Dependencies before the files that import them, as Envoy builds its pool.
    for position, file in enumerate(files):
        assert set(file.dependency) <= set(names[:position]), file.name
    assert {s.file.name for s in TRANSCODED} <= set(names)
    assert "google/rpc/error_details.proto" in names
    [a2a_file] = [f for f in files if f.package == "lf.a2a.v1"]
    [subscribe] = [m for m in a2a_file.service[0].method if m.name == "SubscribeToTask"]
    rule = subscribe.options.Extensions[annotations_pb2.http]
    posts = {binding.post for binding in rule.additional_bindings if binding.post}
    assert posts == {"/tasks/{id=*}:subscribe", "/{tenant}/tasks/{id=*}:subscribe"}


@pytest.mark.parametrize(
    ("configured", "proto", "host", "expected"),
    [
        ("https://agents.example.com", "http", "evil.example", "https://agents.example.com"),
        ("", "https", "edge.example:8443", "https://edge.example:8443"),
        ("", "http", "[::1]:8080", "http://[::1]:8080"),
        ("", "http", "bad host/path", DEFAULT_URL),
        ("", "ftp", "edge.example", DEFAULT_URL),
        ("", "", "", DEFAULT_URL),
    ],
)
def test_the_card_names_the_configured_edge_else_the_one_asked(
    configured: str, proto: str, host: str, expected: str
) -> None:
    assert edge_of(configured, proto, host).http_json == expected


def test_grpc_is_at_the_edges_host_and_port() -> None:
    assert Edge("https://agents.example.com").grpc == "agents.example.com:443"
    assert Edge("http://127.0.0.1:8080").grpc == "127.0.0.1:8080"


def test_the_card_is_the_same_for_every_tenant_and_refuses_a_malformed_one() -> None:
    cards = PublicCards("")
    one = cards.document("acme.helper", "http", "edge:8080").data.decode()
    other = cards.document("nobody.nothing", "http", "edge:8080").data.decode()
    assert one.replace("acme.helper", "nobody.nothing") == other
    with pytest.raises(InvalidArgument):
        cards.document("no-dot", "http", "edge:8080")


@pytest.mark.parametrize(
    "url", ["edge:8080", "ftp://edge", "http://edge/a2a", "http://edge?x=1", "http://u@edge"]
)
def test_a_public_url_that_is_not_an_edge_root_is_refused(url: str) -> None:
    with pytest.raises((ConfigError, ValueError)):
        make_settings(public_url=url)


def test_a_public_url_loses_its_trailing_slash() -> None:
    settings: Settings = make_settings(public_url="https://agents.example.com/")
    assert settings.a2a.public_url == "https://agents.example.com"


def test_the_root_card_is_the_root_agents_and_names_no_tenant() -> None:
    with pytest.raises(NotFound):
        PublicCards("").document("", "http", "edge:8080")
    card = json.loads(PublicCards("", "acme.helper").document("", "http", "edge:8080").data)
    # A client sends the tenant the interface names: none, so its calls go to the root agent.
    assert [i.get("tenant", "") for i in card["supportedInterfaces"]] == ["", ""]


@pytest.mark.parametrize("root", ["acme", "acme.helper.x", "Acme.helper", "acme/helper", ".x"])
def test_a_root_agent_that_is_not_a_tenant_is_refused(root: str) -> None:
    with pytest.raises((ConfigError, ValueError)):
        make_settings(a2a_root_agent=root)


def test_only_http_json_is_held_to_the_body_limit() -> None:
    """The buffer filter refuses a body over the servers' message limit (413); every route,
    so every gRPC and grpc-web call, turns it off: streams are never held."""
    limits = ServerLimits(max_receive_message_bytes=1234)
    config = bootstrap(EdgeSpec.all_in_one(HostPort("127.0.0.1", 50051), limits=limits))
    assert config.static_resources is not None
    manager = config.static_resources.listeners[0].filter_chains[0].filters[0].typed_config
    assert manager is not None
    dumped = json.dumps(manager.to_dict())
    assert '"maxRequestBytes": 1234' in dumped
    host = json.loads(dumped)["routeConfig"]["virtualHosts"][0]
    per_route = host["typedPerFilterConfig"]["envoy.filters.http.buffer"]
    assert per_route["disabled"] is True
    names = [f["name"] for f in json.loads(dumped)["httpFilters"]]
    # The Lua filter first of the three: it sees the buffer's and the transcoder's answers.
    lua, buffer, transcoder = (
        names.index("envoy.filters.http.lua"),
        names.index("envoy.filters.http.buffer"),
        names.index("envoy.filters.http.grpc_json_transcoder"),
    )
    assert lua < buffer < transcoder
