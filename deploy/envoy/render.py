#!/usr/bin/env python3
"""Render the Envoy configuration that puts grpc-web in front of `switchboard serve`.

Fills in ``envoy.yaml.in`` beside this file and writes the result to ``--output``
(standard output by default). Standard library only, so any Python 3.11+ runs it:

    python3 deploy/envoy/render.py --listen 127.0.0.1:8080 --upstream 127.0.0.1:50051 \\
        --allow-origin http://localhost:5173 --output envoy.yaml
    envoy -c envoy.yaml --disable-hot-restart

Port 0 is allowed for ``--listen`` and ``--admin``: Envoy then binds free ports, and
``envoy --admin-address-path FILE`` writes where the admin interface went (its
``/listeners?format=json`` tells the grpc-web port).
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).resolve().with_name("envoy.yaml.in")
#: Idle streams are cut after this long; keep it well above SWITCHBOARD_EVENTS_HEARTBEAT_S.
DEFAULT_STREAM_IDLE_TIMEOUT_S = 300
_ORIGIN_RE = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) to its parts; port 0 means any free port."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def origin(text: str) -> str:
    """An allowed CORS origin: ``*`` (any) or ``scheme://host[:port]``."""
    if text != "*" and not _ORIGIN_RE.match(text):
        raise argparse.ArgumentTypeError(f"expected '*' or scheme://host[:port], got {text!r}")
    return text


def origin_matchers(origins: list[str]) -> list[dict[str, Any]]:
    """Envoy StringMatchers for ``allow_origin_string_match``."""
    if "*" in origins:
        return [{"safe_regex": {"regex": ".*"}}]
    return [{"exact": item} for item in origins]


def render(
    listen: tuple[str, int],
    upstream: tuple[str, int],
    admin: tuple[str, int],
    origins: list[str],
    stream_idle_timeout_s: int = DEFAULT_STREAM_IDLE_TIMEOUT_S,
) -> str:
    """The Envoy configuration (YAML) for these addresses and origins."""
    # JSON scalars and flow sequences are valid YAML, and quote whatever needs it.
    return string.Template(TEMPLATE.read_text()).substitute(
        listen_host=json.dumps(listen[0]),
        listen_port=listen[1],
        upstream_host=json.dumps(upstream[0]),
        upstream_port=upstream[1],
        admin_host=json.dumps(admin[0]),
        admin_port=admin[1],
        allow_origins=json.dumps(origin_matchers(origins or ["*"])),
        stream_idle_timeout=f"{stream_idle_timeout_s}s",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--listen",
        type=host_port,
        default=("127.0.0.1", 8080),
        help="where browsers connect (grpc-web); default 127.0.0.1:8080",
    )
    parser.add_argument(
        "--upstream",
        type=host_port,
        default=("127.0.0.1", 50051),
        help="the switchboard server (HTTP/2 gRPC); default 127.0.0.1:50051",
    )
    parser.add_argument(
        "--admin",
        type=host_port,
        default=("127.0.0.1", 9901),
        help="Envoy's admin interface (keep it on loopback); default 127.0.0.1:9901",
    )
    parser.add_argument(
        "--allow-origin",
        type=origin,
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a CORS origin allowed to call, e.g. https://app.example.com (repeatable); "
        "default '*' (any origin: tokens travel in the authorization header, not cookies)",
    )
    parser.add_argument(
        "--stream-idle-timeout",
        type=int,
        default=DEFAULT_STREAM_IDLE_TIMEOUT_S,
        metavar="SECONDS",
        help="cut a stream after this long without a frame; keep it well above "
        f"SWITCHBOARD_EVENTS_HEARTBEAT_S (default {DEFAULT_STREAM_IDLE_TIMEOUT_S})",
    )
    parser.add_argument("--output", "-o", type=Path, help="file to write; default stdout")
    args = parser.parse_args(argv)
    if args.stream_idle_timeout <= 0:
        parser.error("--stream-idle-timeout must be positive")
    config = render(
        args.listen, args.upstream, args.admin, args.allow_origin, args.stream_idle_timeout
    )
    if args.output is None:
        sys.stdout.write(config)
    else:
        args.output.write_text(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
