"""The Envoy configuration generator (switchboard/deploy/envoy.py) and `switchboard dev-cert`.

What Envoy itself makes of a configuration is tested end to end in
tests/e2e/test_edge.py (its /config_dump); here: what the generator refuses,
how the mesh shape differs from all-in-one, that Envoy accepts what it renders
(``envoy --mode validate``, offline), and that the examples in docs/envoy are
what the commands documented beside them print today.
"""

from __future__ import annotations

import datetime as dt
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from cryptography import x509

from switchboard.cli import main as cli_main
from switchboard.deploy.devcert import CertError, make_dev_cert
from switchboard.deploy.envoy import (
    API,
    EdgeSpec,
    HostPort,
    ServerLimits,
    SpecError,
    Tls,
    render,
)
from tests.e2e.envoy import envoy_binary

ROOT: Final = Path(__file__).resolve().parents[2]
#: Each example in docs/envoy and the command that renders it (docs/edge.md shows them).
EXAMPLES: Final = {
    "all-in-one.yaml": [
        "envoy",
        "--listen=127.0.0.1:8080",
        "--tls-listen=127.0.0.1:8443",
        "--tls-cert=.mesh/dev-cert.pem",
        "--tls-key=.mesh/dev-key.pem",
        "--upstream=127.0.0.1:50051",
    ],
    "mesh.yaml": [
        "envoy",
        "--shape=mesh",
        "--listen=0.0.0.0:8080",
        "--service=auth=auth:50051",
        "--service=context=context:50051",
        "--service=dispatcher=dispatcher-1:50051,dispatcher-2:50051",
        "--service=integration=integration:50051",
        "--service=events=events-1:50051,events-2:50051",
    ],
}
LOCAL: Final = HostPort("127.0.0.1", 50051)


def _mesh(**replicas: tuple[HostPort, ...]) -> dict[str, tuple[HostPort, ...]]:
    upstreams: dict[str, tuple[HostPort, ...]] = {
        name: (HostPort("127.0.0.1", 50100 + i),) for i, name in enumerate(API)
    }
    upstreams.update(replicas)
    return upstreams


def _config(spec: EdgeSpec) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(render(spec))
    return config


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def _routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    [listener] = config["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes: list[dict[str, Any]] = manager["route_config"]["virtual_hosts"][0]["routes"]
    return routes


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"admin": HostPort("0.0.0.0", 9901)}, "admin interface must listen on loopback"),
        ({"admin": HostPort("10.0.0.1", 9901)}, "admin interface must listen on loopback"),
        ({"stream_idle_timeout_s": 10.0}, "above the server's heartbeat"),
        ({"unary_share": 1.0}, "unary_share"),
        ({"unary_timeout_s": 0.0}, "unary timeout"),
    ],
)
def test_unsafe_or_unworkable_specs_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        render(EdgeSpec.all_in_one(LOCAL, **change))


def test_every_service_needs_replicas_with_real_ports() -> None:
    upstreams = _mesh()
    del upstreams["events"]
    with pytest.raises(SpecError, match="no upstream for events"):
        render(EdgeSpec(upstreams=upstreams))
    with pytest.raises(SpecError, match="unknown services billing"):
        render(EdgeSpec(upstreams={**_mesh(), "billing": (LOCAL,)}))
    with pytest.raises(SpecError, match="has no replicas"):
        render(EdgeSpec(upstreams=_mesh(auth=())))
    with pytest.raises(SpecError, match="port 0"):
        render(EdgeSpec(upstreams=_mesh(auth=(HostPort("127.0.0.1", 0),))))


def test_the_admin_interface_may_be_ipv6_loopback_or_localhost() -> None:
    for admin in (HostPort("::1", 9901), HostPort("localhost", 9901)):
        assert _config(EdgeSpec.all_in_one(LOCAL, admin=admin))["admin"]


def test_the_mesh_routes_each_service_to_its_own_replicas() -> None:
    dispatchers = (HostPort("127.0.0.1", 7001), HostPort("127.0.0.1", 7002))
    config = _config(EdgeSpec(upstreams=_mesh(dispatcher=dispatchers)))
    clusters = _clusters(config)
    assert set(clusters) == {f"{name}{kind}" for name in API for kind in ("", "_streams")}
    for name, service in API.items():
        for kind in ("", "_streams"):
            cluster = clusters[name + kind]
            [check] = cluster["health_checks"]
            # Each replica is healthy when the service it serves is, not the process.
            assert check["grpc_health_check"]["service_name"] == service.full_name
    routes = _routes(config)
    for name, service in API.items():
        mine = [
            r
            for r in routes
            if r["match"]
            .get("path", r["match"].get("prefix", ""))
            .startswith(f"/{service.full_name}/")
        ]
        assert mine
        assert {r["route"]["cluster"].removesuffix("_streams") for r in mine} == {name}

    # Two dispatcher replicas: twice the breaker room of a one-replica service.
    def requests(name: str) -> int:
        value: int = clusters[name]["circuit_breakers"]["thresholds"][0]["max_requests"]
        return value

    assert requests("dispatcher_streams") == 2 * requests("auth_streams")
    assert requests("dispatcher") == 2 * requests("auth")
    endpoints = clusters["dispatcher"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [
        7001,
        7002,
    ]


def test_dns_names_are_resolved_by_envoy_into_every_replica() -> None:
    named = (HostPort("events.switchboard.svc.cluster.local", 50051),)
    clusters = _clusters(_config(EdgeSpec(upstreams=_mesh(events=named))))
    assert clusters["events"]["type"] == "STRICT_DNS"
    assert clusters["auth"]["type"] == "STATIC"
    # One name, three pods behind it: the breakers make room for three.
    sized = _clusters(_config(EdgeSpec(upstreams=_mesh(events=named), replicas={"events": 3})))

    def requests(found: dict[str, dict[str, Any]], name: str) -> int:
        value: int = found[name]["circuit_breakers"]["thresholds"][0]["max_requests"]
        return value

    assert requests(sized, "events_streams") == 3 * requests(clusters, "events_streams")
    with pytest.raises(SpecError, match="unknown service billing"):
        render(EdgeSpec(upstreams=_mesh(), replicas={"billing": 2}))
    with pytest.raises(SpecError, match="between 1 and"):
        render(EdgeSpec(upstreams=_mesh(), replicas={"events": 0}))


def test_breakers_follow_the_servers_limits() -> None:
    limits = ServerLimits(max_concurrent_rpcs=2_000, max_concurrent_streams=50)
    clusters = _clusters(_config(EdgeSpec.all_in_one(LOCAL, limits=limits)))
    unary = clusters["switchboard"]["circuit_breakers"]["thresholds"][0]
    streams = clusters["switchboard_streams"]["circuit_breakers"]["thresholds"][0]
    assert unary["max_requests"] + streams["max_requests"] == 2_000
    assert streams["max_requests"] > unary["max_requests"]
    # Upstream connections enough for every stream at the server's streams per connection.
    assert streams["max_connections"] * 50 >= streams["max_requests"]
    http2 = clusters["switchboard"]["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]["explicit_http_config"]["http2_protocol_options"]
    assert http2["max_concurrent_streams"] == 50


def test_server_limits_come_from_the_servers_variables() -> None:
    env = {
        "SWITCHBOARD_MAX_CONCURRENT_RPCS": "500",
        "SWITCHBOARD_MAX_METADATA_BYTES": "8192",
        "SWITCHBOARD_EVENTS_HEARTBEAT_S": "40",
    }
    limits = ServerLimits.from_environment(env)
    assert limits.max_concurrent_rpcs == 500
    assert limits.max_metadata_bytes == 8192
    assert limits.heartbeat_s == 40
    assert limits.max_concurrent_streams == ServerLimits().max_concurrent_streams
    with pytest.raises(SpecError, match="SWITCHBOARD_MAX_CONCURRENT_RPCS"):
        ServerLimits.from_environment({"SWITCHBOARD_MAX_CONCURRENT_RPCS": "many"})
    # The idle timeout must then clear the longer heartbeat.
    with pytest.raises(SpecError, match="heartbeat"):
        render(EdgeSpec.all_in_one(LOCAL, limits=limits, stream_idle_timeout_s=30))


def test_envoy_accepts_both_shapes(tmp_path: Path) -> None:
    cert = make_dev_cert(tmp_path / "tls")
    specs = {
        "all-in-one": EdgeSpec.all_in_one(
            LOCAL,
            tls=Tls(HostPort("127.0.0.1", 8443), str(cert.cert_file), str(cert.key_file)),
            allow_origins=("https://app.example.com",),
        ),
        "mesh": EdgeSpec(
            upstreams=_mesh(
                dispatcher=(HostPort("dispatcher-1", 50051), HostPort("dispatcher-2", 50051))
            )
        ),
    }
    for name, spec in specs.items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(render(spec))
        done = subprocess.run(
            [envoy_binary(), "--mode", "validate", "--config-path", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"configuration '{config}' OK" in done.stdout + done.stderr


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_the_documented_examples_are_current(example: str) -> None:
    rendered = subprocess.run(
        [sys.executable, "-m", "switchboard.cli", *EXAMPLES[example]],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    committed = (ROOT / "docs" / "envoy" / example).read_text()
    command = " ".join(["switchboard", *EXAMPLES[example], f"-o docs/envoy/{example}"])
    assert rendered == committed, f"docs/envoy/{example} is stale; run: {command}"


def test_the_envoy_command_explains_what_it_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["envoy", "--admin", "0.0.0.0:9901"]) == 2
    assert "must listen on loopback" in capsys.readouterr().err
    assert cli_main(["envoy", "--tls-listen", "127.0.0.1:8443"]) == 2
    assert "go together" in capsys.readouterr().err
    assert cli_main(["envoy", "--shape", "mesh", "--service", "auth"]) == 2
    assert "NAME=HOST:PORT" in capsys.readouterr().err
    assert cli_main(["envoy", "--upstream", "nowhere"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_the_dev_certificate_serves_tls_for_local_names(tmp_path: Path) -> None:
    made = make_dev_cert(tmp_path, hosts=("localhost", "127.0.0.1", "dev.example"), days=7)
    assert stat.S_IMODE(made.key_file.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(made.cert_file.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "dev.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=6) < lifetime <= dt.timedelta(days=7)
    # A server can load the pair, and a client that trusts the certificate accepts it.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(made.cert_file, made.key_file)
    ssl.create_default_context(cafile=str(made.cert_file))
    # An existing pair is kept unless replacing it was asked for.
    with pytest.raises(CertError, match="--force"):
        make_dev_cert(tmp_path)
    assert make_dev_cert(tmp_path, force=True).cert_file == made.cert_file
    with pytest.raises(CertError, match="days"):
        make_dev_cert(tmp_path / "other", days=1000)
