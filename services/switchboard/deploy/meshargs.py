"""The ``switchboard mesh`` command's arguments, apart from its runner.

Every ``switchboard`` command builds the whole parser, and the runner
(``deploy.launcher``) imports the process supervisor with httpx, grpc, redis and
SQLAlchemy: 2 s of imports that ``keygen``, ``envoy`` or a refused ``serve`` would pay
for nothing. The runner is imported only when ``mesh`` runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_mesh_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mesh = sub.add_parser(
        "mesh",
        help="run the scaled-out shape on this machine (PostgreSQL, Redis, services, Envoy)",
        description="Run one process per service (two events and two dispatcher replicas by "
        "default), or with --processes N that many processes each serving every service, on "
        "this machine's PostgreSQL and Redis binaries, behind Envoy, with the data in "
        "--data-dir. Ctrl-C stops everything. Other SWITCHBOARD_* variables in the "
        "environment reach every service.",
    )
    mesh.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".mesh"),
        help="database, Redis, secrets, Envoy's config and mesh.json (default .mesh)",
    )
    mesh.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="Envoy's plain listener: native gRPC and grpc-web (default 127.0.0.1:8080; "
        "port 0 picks a free one)",
    )
    mesh.add_argument(
        "--tls",
        action="store_true",
        help="also a TLS listener (HTTP/2 for browsers) with a development certificate made "
        "in the data directory",
    )
    mesh.add_argument(
        "--tls-listen",
        default="127.0.0.1:8443",
        metavar="HOST:PORT",
        help="the TLS listener with --tls (default 127.0.0.1:8443)",
    )
    mesh.add_argument(
        "--admin",
        default="127.0.0.1:9901",
        metavar="HOST:PORT",
        help="Envoy's admin interface, loopback only (default 127.0.0.1:9901)",
    )
    mesh.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="SERVICE=N",
        help="replicas of a service (repeatable); default auth=1 context=1 integration=1 "
        "events=2 dispatcher=2 a2a=1",
    )
    mesh.add_argument(
        "--processes",
        metavar="N|auto",
        help="the shape that scales: N processes that each serve every service (a run "
        "whole, with no hop between services) behind Envoy, on the same PostgreSQL and "
        "Redis; auto: one per core this launcher may use. Instead of --replicas",
    )
    mesh.add_argument(
        "--oversubscribe",
        action="store_true",
        help="allow --processes above the cores this launcher may use (they take turns on "
        "the cores: for measuring what processes cost each other, not for serving)",
    )
    mesh.add_argument(
        "--health-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="Envoy's active health check interval per replica (default 5)",
    )
    mesh.add_argument(
        "--start-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long each process may take to become ready (default 60)",
    )
    mesh.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        metavar="N",
        help="restarts in a row of a failing process before the mesh stops (default 5)",
    )
    mesh.add_argument(
        "--console",
        type=Path,
        metavar="DIR",
        help="serve the browser console built in DIR (`make console` writes clients/web/dist) "
        "from Envoy, on the same origin as the API; read again whenever Envoy starts",
    )
    mesh.add_argument(
        "--envoy-log-level",
        default="warning",
        choices=("trace", "debug", "info", "warning", "error", "critical", "off"),
        help="Envoy's log level (default warning)",
    )
