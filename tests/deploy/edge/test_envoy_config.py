"""The Envoy configuration generator (switchboard/deploy/edge/envoy.py) and `switchboard dev-cert`.

What Envoy itself makes of a configuration is tested end to end in
tests/e2e/test_edge.py (its /config_dump); here: what the generator refuses,
how the mesh shape differs from all-in-one, that Envoy accepts what it renders
(``envoy --mode validate``, offline), and that the examples in docs/envoy are
what the commands documented beside them print today.
"""

from __future__ import annotations

import argparse
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
from envoy_data_plane.envoy.config.route.v3 import Route, RouteConfiguration
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
)

from switchboard.cli import main as cli_main
from switchboard.deploy.edge.devcert import CertError, make_dev_cert
from switchboard.deploy.edge.envoy import (
    AFFINITY_HEADER,
    API,
    CONSOLE_CSP,
    MAX_CONSOLE_FILE_BYTES,
    Console,
    EdgeSpec,
    HostPort,
    ServerLimits,
    SpecError,
    Tls,
    bootstrap,
    render,
)
from switchboard.deploy.launcher import Options
from switchboard.deploy.machine import MeshError
from switchboard.deploy.meshargs import add_mesh_parser
from tests.e2e.envoy import envoy_validate

pytestmark = pytest.mark.unit

ROOT: Final = Path(__file__).resolve().parents[3]
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
        "--service=a2a=a2a:50051",
        "--edge-health=edge-health:50051",
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


@pytest.mark.parametrize("shape", ["all-in-one", "mesh"])
def test_every_service_route_hashes_the_affinity_header_onto_maglev(shape: str) -> None:
    replicas = (HostPort("127.0.0.1", 7001), HostPort("127.0.0.1", 7002))
    spec = (
        EdgeSpec.all_in_one(replicas[0], allow_origins=("https://console.example",))
        if shape == "all-in-one"
        else EdgeSpec(
            upstreams=_mesh(dispatcher=replicas),
            edge_health=HostPort("127.0.0.1", 50999),
            allow_origins=("https://console.example",),
        )
    )
    config = _config(spec)
    clusters = _clusters(config)
    services = {name for name in clusters if name != "edge_health"}
    assert services
    for name in services:
        assert clusters[name]["lb_policy"] == "MAGLEV", name
    # Its own answer for the deployment: nothing to keep together there.
    assert "lb_policy" not in clusters.get("edge_health", {})
    hashed = 0
    for route in _routes(config):
        action = route.get("route")
        if action is None or action["cluster"] not in services:
            continue
        assert action["hash_policy"] == [{"header": {"header_name": AFFINITY_HEADER}}], route
        hashed += 1
    assert hashed > len(API)
    # The browser console sends it cross-origin too (grpc-web): the preflight allows it.
    [listener] = config["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    host = manager["route_config"]["virtual_hosts"][0]
    cors = host["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert AFFINITY_HEADER in [h.strip() for h in cors["allow_headers"].split(",")]


def test_health_and_reflection_go_to_edge_health_when_the_mesh_has_it() -> None:
    paths = {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/",
        "/grpc.reflection.v1alpha.ServerReflection/",
    }

    def targets(spec: EdgeSpec) -> dict[str, tuple[str, str]]:
        return {
            where: (r["route"]["cluster"], r["route"]["timeout"])
            for r in _routes(_config(spec))
            if (where := r["match"].get("path", r["match"].get("prefix", ""))) in paths
        }

    edge = HostPort("127.0.0.1", 50999)
    config = _config(EdgeSpec(upstreams=_mesh(), edge_health=edge))
    cluster = _clusters(config)["edge_health"]
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"]["port_value"] == 50999
    # Its "" says whether the deployment serves, not whether it answers: not a health check.
    assert "health_checks" not in cluster
    assert targets(EdgeSpec(upstreams=_mesh(), edge_health=edge)) == {
        "/grpc.health.v1.Health/Check": ("edge_health", "60s"),
        "/grpc.health.v1.Health/Watch": ("edge_health", "0s"),
        "/grpc.reflection.v1.ServerReflection/": ("edge_health", "0s"),
        "/grpc.reflection.v1alpha.ServerReflection/": ("edge_health", "0s"),
    }
    # Without it (and all-in-one, whose one server serves everything): the dispatcher's.
    assert {cluster for cluster, _ in targets(EdgeSpec(upstreams=_mesh())).values()} == {
        "dispatcher",
        "dispatcher_streams",
    }
    with pytest.raises(SpecError, match="port 0"):
        render(EdgeSpec(upstreams=_mesh(), edge_health=HostPort("127.0.0.1", 0)))


def test_file_routes_stream_downloads_and_let_a_chunk_through() -> None:
    limits = ServerLimits(max_receive_message_bytes=3 * 1024 * 1024)
    routes = {
        r["match"]["path"]: r
        for r in _routes(_config(EdgeSpec.all_in_one(LOCAL, limits=limits)))
        if "path" in r["match"]
    }
    context = "/switchboard.api.context.v1.ContextService"
    # The download is a server stream: the streams cluster, no route timeout (the
    # listener's stream idle timeout cuts a dead one), like WatchRun and Subscribe.
    download = routes[f"{context}/DownloadFile"]["route"]
    assert download["cluster"] == "switchboard_streams"
    assert download["timeout"] == "0s"
    assert download == routes["/switchboard.api.dispatcher.v1.DispatcherService/WatchRun"]["route"]
    # A request carrying a chunk may be buffered whole for the unsent-request retry:
    # a 1 MiB chunk and its framing fit, up to what the server takes.
    for method in ("AppendUpload", "UploadFile"):
        assert int(routes[f"{context}/{method}"]["request_body_buffer_limit"]) == 3 * 1024 * 1024
        assert "retry_policy" not in routes[f"{context}/{method}"]["route"]
    assert routes[f"{context}/AppendUpload"]["route"]["cluster"] == "switchboard"
    assert routes[f"{context}/UploadFile"]["route"]["cluster"] == "switchboard_streams"
    # Unsafe unary steps keep the prefix route (no retry after they reached a server).
    assert f"{context}/FinishUpload" not in routes


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
            ),
            edge_health=HostPort("edge-health", 50051),
        ),
    }
    for name, spec in specs.items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(render(spec))
        done = envoy_validate(config)
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


# The browser console (clients/web), served by Envoy itself.

#: A console build as clients/web/build.mjs writes it (contents do not matter here).
CONSOLE_FILES: Final = {
    "index.html": b"<!doctype html><title>console</title>",
    "app.js": b"console.log(1);" * 100,
    "app.css": b"body{}",
    "favicon.svg": b"<svg/>",
}


def _console_dir(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, body in CONSOLE_FILES.items():
        (directory / name).write_bytes(body)
    return directory


def _route_configs(spec: EdgeSpec) -> list[RouteConfiguration]:
    """Each listener's route configuration, read through the typed messages."""
    configs = []
    resources = bootstrap(spec).static_resources
    assert resources is not None
    for listener in resources.listeners:
        packed = listener.filter_chains[0].filters[0].typed_config
        assert packed is not None
        manager = packed.unpack()
        assert isinstance(manager, HttpConnectionManager)
        assert manager.route_config is not None
        configs.append(manager.route_config)
    return configs


def _direct(config: RouteConfiguration) -> dict[str, Route]:
    direct: dict[str, Route] = {}
    for route in config.virtual_hosts[0].routes:
        if route.direct_response is not None:
            assert route.match is not None
            assert route.match.path
            direct[route.match.path] = route
    return direct


def test_without_a_console_nothing_is_answered_by_envoy_itself() -> None:
    [config] = _route_configs(EdgeSpec.all_in_one(LOCAL))
    assert _direct(config) == {}
    assert config.max_direct_response_body_size_bytes is None
    # Every route still goes to a cluster (the documented renders check the bytes).
    assert all(route.route is not None for route in config.virtual_hosts[0].routes)


def test_the_console_files_are_get_routes_with_security_headers(tmp_path: Path) -> None:
    console_dir = _console_dir(tmp_path / "dist")
    (console_dir / ".hidden").write_text("never served")
    cert = make_dev_cert(tmp_path / "tls")
    tls = Tls(HostPort("127.0.0.1", 8443), str(cert.cert_file), str(cert.key_file))
    plain = EdgeSpec.all_in_one(LOCAL, tls=tls)
    spec = EdgeSpec.all_in_one(LOCAL, tls=tls, console=Console.from_directory(console_dir))
    # Both listeners serve it (the browser's TLS one and the plain one).
    for config, without in zip(_route_configs(spec), _route_configs(plain), strict=True):
        routes = _direct(config)
        assert set(routes) == {"/", "/index.html", "/app.js", "/app.css", "/favicon.svg"}
        types = {}
        for path, route in routes.items():
            assert route.direct_response is not None
            assert route.direct_response.status == 200
            body = route.direct_response.body
            assert body is not None
            name = "index.html" if path == "/" else path.removeprefix("/")
            assert body.filename == str(console_dir / name)
            assert route.match is not None
            [method] = route.match.headers
            assert method.name == ":method"
            assert method.string_match is not None
            assert method.string_match.safe_regex is not None
            assert method.string_match.safe_regex.regex == "GET|HEAD"
            headers = {
                option.header.key: option.header.value
                for option in route.response_headers_to_add
                if option.header is not None
            }
            types[path] = headers["content-type"]
            assert headers["content-security-policy"] == CONSOLE_CSP
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["referrer-policy"] == "no-referrer"
            assert headers["cache-control"] == "no-cache"
        assert types == {
            "/": "text/html; charset=utf-8",
            "/index.html": "text/html; charset=utf-8",
            "/app.js": "text/javascript; charset=utf-8",
            "/app.css": "text/css; charset=utf-8",
            "/favicon.svg": "image/svg+xml",
        }
        # The cap on a file-backed body fits the largest file, with room, and is bounded.
        limit = config.max_direct_response_body_size_bytes
        assert limit is not None
        assert max(len(body) for body in CONSOLE_FILES.values()) <= limit <= MAX_CONSOLE_FILE_BYTES
        # The API's routes are the same as without a console, in the same order, first.
        api_routes = config.virtual_hosts[0].routes[: len(without.virtual_hosts[0].routes)]
        assert api_routes == without.virtual_hosts[0].routes
    for directive in ("default-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
        assert directive in CONSOLE_CSP
    assert "unsafe-inline" not in CONSOLE_CSP
    assert "unsafe-eval" not in CONSOLE_CSP


def test_a_console_directory_that_cannot_be_served_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        Console.from_directory(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "app.js").write_text("1")
    with pytest.raises(SpecError, match=r"no index\.html"):
        Console.from_directory(empty)
    for name, message in (("notes.exe", "serves only"), ("assets", "not a file")):
        bad = _console_dir(tmp_path / f"bad-{name}")
        if "." in name:
            (bad / name).write_bytes(b"MZ")
        else:
            (bad / name).mkdir()
        with pytest.raises(SpecError, match=message):
            Console.from_directory(bad)
    huge = _console_dir(tmp_path / "huge")
    with (huge / "app.js").open("wb") as handle:
        handle.truncate(MAX_CONSOLE_FILE_BYTES + 1)
    with pytest.raises(SpecError, match="Envoy holds it in memory"):
        Console.from_directory(huge)


def _mesh_options(*argv: str) -> Options:
    parser = argparse.ArgumentParser()
    add_mesh_parser(parser.add_subparsers(dest="command"))
    return Options.from_args(parser.parse_args(["mesh", *argv]))


def test_the_commands_take_the_console(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    console_dir = _console_dir(tmp_path / "dist")
    out = tmp_path / "envoy.yaml"
    assert cli_main(["envoy", f"--console={console_dir}", f"--output={out}"]) == 0
    routes = _routes(yaml.safe_load(out.read_text()))
    served = {r["match"]["path"]: r["direct_response"] for r in routes if "direct_response" in r}
    assert served["/"]["body"]["filename"] == str(console_dir / "index.html")
    assert cli_main(["envoy", f"--console={tmp_path / 'nowhere'}"]) == 2
    assert "run `make console`" in capsys.readouterr().err
    # The mesh launcher renders the same routes for its Envoy, read again at each start.
    options = _mesh_options(f"--data-dir={tmp_path / 'mesh'}", "--console", str(console_dir))
    spec = options.edge_spec({name: (LOCAL,) for name in API}, {}, None)
    assert spec.console == Console.from_directory(console_dir)
    (console_dir / "app.js.map").write_text("{}")
    rebuilt = options.edge_spec({name: (LOCAL,) for name in API}, {}, None)
    assert rebuilt.console is not None
    assert "/app.js.map" in {f.path for f in rebuilt.console.files}
    without = _mesh_options(f"--data-dir={tmp_path / 'm2'}")
    assert without.edge_spec({name: (LOCAL,) for name in API}, {}, None).console is None
    # A console that is not there stops the mesh before anything starts.
    with pytest.raises(MeshError, match="run `make console`"):
        _mesh_options(f"--data-dir={tmp_path / 'm3'}", f"--console={tmp_path / 'nowhere'}")


def test_envoy_loads_the_console(tmp_path: Path) -> None:
    """``envoy --mode validate`` reads every file-backed body against the cap."""
    console_dir = _console_dir(tmp_path / "dist")
    config = tmp_path / "envoy.yaml"
    config.write_text(
        render(EdgeSpec.all_in_one(LOCAL, console=Console.from_directory(console_dir)))
    )
    done = envoy_validate(config)
    assert done.returncode == 0, done.stderr[-2000:]
    # A file that grew past the cap after rendering: Envoy refuses to load it.
    with (console_dir / "app.js").open("wb") as handle:
        handle.truncate(MAX_CONSOLE_FILE_BYTES + 1)
    done = envoy_validate(config)
    assert done.returncode != 0
    assert f"{console_dir / 'app.js'} size is" in done.stdout + done.stderr
