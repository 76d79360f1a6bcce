"""The deployment subcommands of ``switchboard``: ``envoy``, ``edge-health`` and ``dev-cert``.

Each module they use is imported only when its command runs: ``serve`` never
pays for envoy-data-plane's import.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from switchboard.deploy.edge.envoy import EdgeSpec

EXIT_USAGE = 2


def add_envoy_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    envoy = sub.add_parser(
        "envoy",
        help="print Envoy's configuration for either shape",
        description="Render the Envoy bootstrap (YAML) from typed envoy-data-plane messages. "
        "The server limits it must agree with (SWITCHBOARD_MAX_CONCURRENT_RPCS, "
        "_MAX_CONCURRENT_STREAMS, _MAX_METADATA_BYTES, _KEEPALIVE_MIN_CLIENT_PING_INTERVAL_S, "
        "the heartbeats) are read from the environment, as the servers read them; so is "
        "Envoy's OpenTelemetry tracer (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_TRACES_SAMPLER...: "
        "no endpoint, no tracing).",
    )
    _add_upstreams(envoy)
    _add_listeners(envoy)
    _add_timeouts(envoy)
    _add_extras(envoy)


def _add_upstreams(envoy: argparse.ArgumentParser) -> None:
    """Which shape, and where its servers are."""
    envoy.add_argument(
        "--shape",
        choices=("all-in-one", "mesh"),
        default="all-in-one",
        help="one upstream serving everything (default), or one cluster per service",
    )
    envoy.add_argument(
        "--upstream",
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="all-in-one: the server (default 127.0.0.1:50051)",
    )
    envoy.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT[,HOST:PORT...]",
        help="mesh: a service's replicas, once per service (auth, context, dispatcher, "
        "integration, events); a DNS name stands for every address it resolves to",
    )
    envoy.add_argument(
        "--edge-health",
        metavar="HOST:PORT",
        help="mesh: `switchboard edge-health`, which answers grpc.health.v1 and reflection "
        "for every service of the deployment; without it they go to the dispatcher's replicas",
    )
    envoy.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="NAME=N",
        help="mesh: how many replicas a service's DNS name stands for (a Kubernetes headless "
        "Service); Envoy's circuit breakers are sized for them (default: one per address)",
    )
    envoy.add_argument(
        "--telephony",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a dispatcher's media-streams server (SWITCHBOARD_STREAMS_LISTEN), once per "
        "replica: the carriers' webhooks and WebSockets under /telephony/ go to them "
        "(docs/telephony.md)",
    )


def _add_listeners(envoy: argparse.ArgumentParser) -> None:
    """Where Envoy listens (plain, TLS, admin) and which origins may call."""
    envoy.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="plain HTTP listener: native gRPC (h2c) and grpc-web (default 127.0.0.1:8080)",
    )
    envoy.add_argument(
        "--tls-listen",
        metavar="HOST:PORT",
        help="TLS listener with ALPN h2,http/1.1 (browsers get HTTP/2); needs --tls-cert/--tls-key",
    )
    envoy.add_argument(
        "--tls-cert", metavar="FILE", help="PEM certificate chain (as Envoy sees it)"
    )
    envoy.add_argument("--tls-key", metavar="FILE", help="PEM private key (as Envoy sees it)")
    envoy.add_argument(
        "--admin",
        default="127.0.0.1:9901",
        metavar="HOST:PORT",
        help="Envoy's admin interface; loopback only (default 127.0.0.1:9901)",
    )
    envoy.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a CORS origin allowed to call, e.g. https://app.example.com (repeatable); default "
        "'*' (any origin: tokens travel in the authorization header, not cookies)",
    )


def _add_timeouts(envoy: argparse.ArgumentParser) -> None:
    """How long streams, unary calls and health checks may take."""
    envoy.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="cut a stream after this long without a frame; above the heartbeat (default 300)",
    )
    envoy.add_argument(
        "--unary-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="route timeout of unary calls that carry no deadline (default 60)",
    )
    envoy.add_argument(
        "--health-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="active gRPC health check interval per replica (default 5)",
    )


def _add_extras(envoy: argparse.ArgumentParser) -> None:
    """The browser console, tracing and where the configuration goes."""
    envoy.add_argument(
        "--console",
        type=Path,
        metavar="DIR",
        help="also serve the browser console built in DIR (`make console` writes "
        "clients/web/dist): each file a GET route answered by Envoy, with a strict "
        "Content-Security-Policy; paths as Envoy sees them",
    )
    envoy.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="trace requests with Envoy's OpenTelemetry tracer, exporting OTLP to URL "
        "(http://HOST:4317; https:// for TLS); default OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "
        "else OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing. OTEL_TRACES_SAMPLER and "
        "OTEL_TRACES_SAMPLER_ARG choose the sampling",
    )
    envoy.add_argument(
        "--trace-service-name",
        default="switchboard-envoy",
        metavar="NAME",
        help="service.name of Envoy's spans (default switchboard-envoy)",
    )
    envoy.add_argument("--output", "-o", type=Path, help="file to write; default stdout")


def add_dev_cert_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cert = sub.add_parser(
        "dev-cert",
        help="make a self-signed certificate for the development TLS listener",
        description="Write dev-cert.pem and dev-key.pem (ECDSA P-256, for localhost, "
        "127.0.0.1 and ::1) for Envoy's TLS listener. For development only.",
    )
    cert.add_argument("directory", type=Path, help="where to write the two files")
    cert.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name or IP the certificate is valid for (repeatable)",
    )
    cert.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    cert.add_argument("--force", action="store_true", help="replace existing files")


def add_edge_health_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    edge = sub.add_parser(
        "edge-health",
        help="answer health and reflection for the whole mesh, behind its Envoy",
        description="Serve grpc.health.v1.Health for every service of the deployment "
        '(SERVING while at least one of its replicas is; "" while every service is) and '
        "server reflection listing every service, for Envoy to route those calls to "
        "(switchboard envoy --edge-health). It asks each replica's own health service "
        "every --interval seconds.",
    )
    edge.add_argument(
        "--listen",
        default="127.0.0.1:50052",
        metavar="HOST:PORT",
        help="where to serve (default 127.0.0.1:50052; port 0 picks a free one)",
    )
    edge.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT[,HOST:PORT...]",
        help="a service's replicas, once per service, as `switchboard envoy --service` "
        "takes them; a DNS name stands for every address it resolves to",
    )
    edge.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often each replica is asked (default 2)",
    )
    edge.add_argument(
        "--check-timeout",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how long one replica may take to answer; no answer counts as not serving (default 1)",
    )
    edge.add_argument(
        "--log-format", choices=("json", "text"), default="json", help="log lines (default json)"
    )


def run_edge_health(args: argparse.Namespace) -> int:
    from switchboard.deploy.edge import health as edgehealth

    return edgehealth.run_edge_health(args)


def run_envoy(args: argparse.Namespace) -> int:
    from switchboard.deploy.edge import envoy

    try:
        spec = envoy_spec(args)
        text = envoy.render(spec)
    except envoy.SpecError as exc:
        print(f"switchboard envoy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


def envoy_spec(args: argparse.Namespace) -> EdgeSpec:
    """The ``EdgeSpec`` the ``envoy`` command's arguments describe."""
    from switchboard.deploy.edge.envoy import (
        Console,
        EdgeSpec,
        HostPort,
        ServerLimits,
        SpecError,
        Tls,
        Tracing,
    )

    tls_parts = (args.tls_listen, args.tls_cert, args.tls_key)
    if any(tls_parts) and not all(tls_parts):
        raise SpecError("--tls-listen, --tls-cert and --tls-key go together")
    common = {
        "listen": HostPort.parse(args.listen),
        "admin": HostPort.parse(args.admin),
        "tls": Tls(HostPort.parse(args.tls_listen), args.tls_cert, args.tls_key)
        if args.tls_listen
        else None,
        "allow_origins": tuple(args.allow_origin) or ("*",),
        "limits": ServerLimits.from_environment(os.environ),
        "stream_idle_timeout_s": args.stream_idle_timeout,
        "unary_timeout_s": args.unary_timeout,
        "health_interval_s": args.health_interval,
        "console": Console.from_directory(args.console) if args.console else None,
        "tracing": Tracing.from_environment(
            os.environ, endpoint=args.otlp_endpoint, service_name=args.trace_service_name
        ),
        "telephony": tuple(HostPort.parse(where) for where in args.telephony),
    }
    if args.shape == "all-in-one":
        if args.service or args.replicas or args.edge_health:
            raise SpecError(
                "--service, --replicas and --edge-health are for --shape mesh; all-in-one "
                "takes --upstream"
            )
        return EdgeSpec.all_in_one(HostPort.parse(args.upstream), **common)
    upstreams: dict[str, tuple[HostPort, ...]] = {}
    for entry in args.service:
        name, sep, addresses = entry.partition("=")
        if not sep or not addresses:
            raise SpecError(f"--service expects NAME=HOST:PORT[,HOST:PORT...], got {entry!r}")
        if name in upstreams:
            raise SpecError(f"--service {name} given twice")
        upstreams[name] = tuple(HostPort.parse(part) for part in addresses.split(","))
    replicas: dict[str, int] = {}
    for entry in args.replicas:
        name, sep, count = entry.partition("=")
        if not sep or not count.isdigit():
            raise SpecError(f"--replicas expects NAME=N, got {entry!r}")
        replicas[name] = int(count)
    edge_health = HostPort.parse(args.edge_health) if args.edge_health else None
    return EdgeSpec(upstreams=upstreams, replicas=replicas, edge_health=edge_health, **common)


def run_dev_cert(args: argparse.Namespace) -> int:
    from switchboard.deploy.edge.devcert import DEFAULT_HOSTS, CertError, make_dev_cert

    try:
        made = make_dev_cert(
            args.directory, hosts=(*DEFAULT_HOSTS, *args.host), days=args.days, force=args.force
        )
    except CertError as exc:
        print(f"switchboard dev-cert: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"certificate {made.cert_file}")
    print(f"private key {made.key_file}")
    print(f"valid for {', '.join(made.hosts)} until {made.not_after:%Y-%m-%d}")
    return 0
