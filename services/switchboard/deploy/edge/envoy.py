"""The Envoy bootstrap for both shapes, built from envoy-data-plane's typed messages.

One function, ``bootstrap(spec)``, knows both shapes: all-in-one (every service
at one upstream) and the mesh (each service its own cluster of replicas). What
it derives, and from where:

- **Routes come from the contracts.** Every method of every API service gets its
  route from its descriptor: streaming methods go to the service's *streams*
  cluster with no route timeout (a Subscribe lasts hours; the stream idle
  timeout, above the server's heartbeat, cuts dead ones); unary methods go to
  the *unary* cluster with a route timeout. Methods whose contract says
  ``idempotency_level = NO_SIDE_EFFECTS`` or ``IDEMPOTENT`` are retried on
  UNAVAILABLE and resets; every other method only when the request never
  reached a server (connect failure, refused stream).
- **Two clusters per service, same replicas.** Each open stream holds one of a
  cluster's requests for its whole life, so streams and unary calls get separate
  circuit breakers: a thousand subscribers cannot make the next SendMessage
  answer 503. Both are sized from the server's own limit (``max_concurrent_rpcs``
  per replica), so Envoy never admits more than the replicas would accept.
- **Limits match the server's**: request header size (``max_metadata_bytes``),
  upstream HTTP/2 streams per connection (``max_concurrent_streams``), keepalive
  pings no more often than the server tolerates.
- **Affinity**: every service's clusters pick a replica by Maglev, a consistent
  hash of the ``AFFINITY_HEADER`` the clients set to the conversation a call is
  about, so a conversation's calls land on one replica (the same one in every
  cluster: their replicas are the same addresses, and Maglev's table depends
  only on them). A call without the header gets a random replica; every replica
  serves any call, so affinity saves work and never decides an answer.
- **Health**: active gRPC health checks per service name (grpc.health.v1) and
  outlier detection on local-origin failures only (a refused or reset
  connection), so a client's own deadline or a handler's error never ejects a
  healthy replica.
- **The edge**: grpc-web and CORS as before, plain HTTP and (with certificate
  files) TLS with ALPN ``h2,http/1.1`` so browsers get HTTP/2; Envoy sets
  ``x-forwarded-for`` from the connection it sees (``use_remote_address``), and
  the servers trust it only from their configured proxies; the admin interface
  only on loopback.
- **The browser console** (optional, ``Console``): each file of its build is a
  GET route answered by Envoy itself (``direct_response`` from the file, read
  when the configuration loads) with its content type, ``no-cache`` and the
  security headers (a strict Content-Security-Policy, nosniff, no referrer, no
  framing). The page and the API share one origin, so it needs no CORS.
  Without a console the configuration is exactly what it was before.
- **Tracing** (optional, ``Tracing``): Envoy's OpenTelemetry tracer on both
  listeners, exporting over OTLP to the ``otlp_collector`` cluster. Each request
  gets a server span (continuing a W3C ``traceparent`` the client sent) and a
  client span per upstream attempt, whose context Envoy sends upstream in
  ``traceparent``: the servers' spans are its children. ``Tracing.from_environment``
  reads the standard ``OTEL_*`` variables; without an OTLP endpoint there is no
  tracing block at all.
- **Telephony** (optional, ``telephony``): ``/telephony/`` to the dispatchers'
  media-streams servers over HTTP/1.1, WebSocket upgrades allowed on that route only
  (``telephony.py``). Without them the configuration is exactly what it was before.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import betterproto2
import yaml
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    CircuitBreakersThresholdsRetryBudget,
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    ClusterLbPolicy,
    OutlierDetection,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    Http2ProtocolOptions,
    HttpService,
    HttpUri,
    KeepaliveSettings,
    RoutingPriority,
    SocketAddress,
    TransportSocket,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.overload.v3 import OverloadManager, ResourceMonitor
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    RetryPolicy,
    RetryPolicyRetryHostPredicate,
    Route,
    RouteAction,
    RouteActionHashPolicy,
    RouteActionHashPolicyHeader,
    RouteActionMaxStreamDuration,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.filters.http.buffer.v3 import Buffer, BufferPerRoute
from envoy_data_plane.envoy.extensions.filters.http.cors.v3 import Cors, CorsPolicy
from envoy_data_plane.envoy.extensions.filters.http.grpc_json_transcoder.v3 import (
    GrpcJsonTranscoder,
    GrpcJsonTranscoderPrintOptions,
    GrpcJsonTranscoderRequestValidationOptions,
)
from envoy_data_plane.envoy.extensions.filters.http.grpc_web.v3 import GrpcWeb
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerTracing,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
    DownstreamConnectionsConfig,
)
from envoy_data_plane.envoy.extensions.retry.host.previous_hosts.v3 import PreviousHostsPredicate
from envoy_data_plane.envoy.extensions.tracers.opentelemetry.resource_detectors.v3 import (
    EnvironmentResourceDetectorConfig,
)
from envoy_data_plane.envoy.extensions.tracers.opentelemetry.samplers.v3 import (
    AlwaysOnSamplerConfig,
    TraceIdRatioBasedSamplerConfig,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CertificateValidationContextSystemRootCerts,
    CommonTlsContext,
    DownstreamTlsContext,
    TlsCertificate,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import RegexMatcher, StringMatcher
from envoy_data_plane.envoy.type.v3 import (
    FractionalPercent,
    FractionalPercentDenominatorType,
    Percent,
)
from envoy_data_plane.google.protobuf import Any as AnyMessage
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor, ServiceDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2

from switchboard.deploy.edge import telephony as phone
from switchboard.deploy.edge.contracts import API, COMPANION_API, OPTIONAL_API
from switchboard.dispatcher.settings import DispatcherSettings
from switchboard.events.settings import EventSettings
from switchboard.platform.config import PREFIX, ConfigError, KernelSettings
from switchboard.platform.observe.otelenv import OtelEnv

#: Every process serves these itself. In the mesh Envoy sends them to ``switchboard
#: edge-health`` (``EdgeSpec.edge_health``), which answers for the whole deployment.
HEALTH_PATH: Final = "/grpc.health.v1.Health/"
REFLECTION_PATHS: Final = (
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)
#: Names of the listeners (tests and operators find the ports by them in /listeners).
PLAIN_LISTENER: Final = "grpc_web"
TLS_LISTENER: Final = "grpc_web_tls"
ALPN: Final = ("h2", "http/1.1")
#: The cluster of ``switchboard edge-health`` (docs/edge.md).
EDGE_HEALTH_CLUSTER: Final = "edge_health"

_SAFE_LEVELS: Final = frozenset(
    {
        descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
        descriptor_pb2.MethodOptions.IDEMPOTENT,
    }
)
#: Methods whose requests carry a file's bytes, up to a 1 MiB chunk per message. Their
#: routes buffer a whole request message for the unsent-request retry: with Envoy's
#: default (the 1 MiB connection buffer), a chunk with its framing would overflow it and
#: lose the retry when a replica refuses the stream.
CHUNK_METHODS: Final = frozenset(
    {
        "/switchboard.api.context.v1.ContextService/AppendUpload",
        "/switchboard.api.context.v1.ContextService/UploadFile",
    }
)
#: Retries for a request that never reached a server: safe for every method.
_RETRY_UNSENT: Final = "connect-failure,refused-stream"
#: ... and, for methods the contract marks safe to repeat, after UNAVAILABLE or a reset.
_RETRY_SAFE: Final = f"{_RETRY_UNSENT},unavailable,reset"
#: The routing header: the conversation a call is about (``workspaces/{w}/conversations/{c}``),
#: set by Switchboard's clients from the request. Envoy hashes it to pick the replica;
#: the servers never read it, so a wrong or missing value costs speed, never an answer.
AFFINITY_HEADER: Final = "switchboard-affinity"
_CORS_HEADERS: Final = (
    "authorization, content-type, x-grpc-web, x-user-agent, x-request-id, grpc-timeout, "
    # A2A's HTTP+JSON binding and the resume extension (docs/a2a.md).
    "a2a-version, a2a-extensions, switchboard-after-sequence, "
    # The browser console sets it on every call that names a conversation.
    f"{AFFINITY_HEADER}"
)
_CORS_EXPOSE: Final = (
    "grpc-status, grpc-message, grpc-status-details-bin, x-request-id, a2a-extensions"
)

#: What the console may serve, by file suffix; anything else in its directory is refused.
CONSOLE_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}
#: The largest console file Envoy holds in memory (each is read when the configuration loads).
MAX_CONSOLE_FILE_BYTES: Final = 8 * 1024 * 1024
MAX_CONSOLE_FILES: Final = 64
#: Scripts, styles, images and calls from this origin only; nothing inline, no eval, no
#: plugins, no framing, no markup from strings (Trusted Types): an injected string cannot
#: run, and the tokens in the tab's storage stay out of reach of other origins' code.
CONSOLE_CSP: Final = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        # blob: the console shows an image attachment from the bytes it downloaded
        # (DownloadFile, then a Blob URL); nothing from another origin.
        "img-src 'self' blob:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    )
)
CONSOLE_HEADERS: Final = (
    ("content-security-policy", CONSOLE_CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    # The microphone for the console's own page only (push-to-talk); no frame, no other origin.
    ("permissions-policy", "camera=(), microphone=(self), geolocation=(), payment=(), usb=()"),
    # Direct responses carry no validators (ETag, Last-Modified): every load asks again,
    # so a rebuilt console is never served stale from a browser's cache.
    ("cache-control", "no-cache"),
)


def _as_declared(name: str) -> str:
    # betterproto2's attribute names are the proto field names.
    return name


#: A "casing" for ``Message.to_dict`` that keeps the names (it only calls the casing).
_AS_DECLARED: Final = cast(betterproto2.Casing, _as_declared)


class SpecError(ValueError):
    """The spec cannot make a working, safe Envoy configuration."""


@dataclass(frozen=True)
class HostPort:
    """An address; the host is an IP literal or a DNS name (resolved by Envoy)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """``HOST:PORT`` (``[::1]:8080`` for IPv6); port 0 lets Envoy pick one."""
        host, sep, port = text.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise SpecError(f"expected HOST:PORT, got {text!r}")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


#: The server settings Envoy must agree with (field names of the sections below).
_LIMIT_SETTINGS: Final = (
    "max_concurrent_rpcs",
    "max_concurrent_streams",
    "max_metadata_bytes",
    "max_receive_message_bytes",
    "keepalive_min_client_ping_interval_s",
    "events_heartbeat_s",
    "dispatcher_heartbeat_s",
)


def _setting_default(name: str) -> Any:
    # The kernel's limits, and the two services' heartbeats.
    for section in (KernelSettings, EventSettings, DispatcherSettings):
        if name in section.model_fields:
            return section.model_fields[name].default
    raise KeyError(name)


@dataclass(frozen=True)
class ServerLimits:
    """The limits of the upstream servers (their settings) Envoy must agree with.

    The defaults are the servers' defaults; ``from_environment`` reads the same
    ``SWITCHBOARD_*`` variables the servers read, so a config rendered beside
    them agrees with them without needing their secrets.
    """

    max_concurrent_rpcs: int = _setting_default("max_concurrent_rpcs")
    max_concurrent_streams: int = _setting_default("max_concurrent_streams")
    max_metadata_bytes: int = _setting_default("max_metadata_bytes")
    #: The largest request message a server takes: an HTTP+JSON body the transcoder
    #: would turn into a larger one is refused at the edge (413), never sent on.
    max_receive_message_bytes: int = _setting_default("max_receive_message_bytes")
    keepalive_min_client_ping_interval_s: float = _setting_default(
        "keepalive_min_client_ping_interval_s"
    )
    #: The longest a live stream stays silent (the larger of the two heartbeats).
    heartbeat_s: float = max(
        _setting_default("events_heartbeat_s"), _setting_default("dispatcher_heartbeat_s")
    )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> ServerLimits:
        """The defaults, overridden by whichever of the variables are set."""
        values: dict[str, float] = {}
        for name in _LIMIT_SETTINGS:
            text = environ.get(f"{PREFIX}{name.upper()}")
            if text is None:
                values[name] = _setting_default(name)
                continue
            try:
                values[name] = float(text)
            except ValueError:
                raise SpecError(f"{PREFIX}{name.upper()}={text!r} is not a number") from None
        return cls(
            max_concurrent_rpcs=int(values["max_concurrent_rpcs"]),
            max_concurrent_streams=int(values["max_concurrent_streams"]),
            max_metadata_bytes=int(values["max_metadata_bytes"]),
            max_receive_message_bytes=int(values["max_receive_message_bytes"]),
            keepalive_min_client_ping_interval_s=values["keepalive_min_client_ping_interval_s"],
            heartbeat_s=max(values["events_heartbeat_s"], values["dispatcher_heartbeat_s"]),
        )


@dataclass(frozen=True)
class Tls:
    """A TLS listener: where, and the PEM files Envoy reads (paths as Envoy sees them)."""

    listen: HostPort
    cert_file: str
    key_file: str


@dataclass(frozen=True)
class StaticFile:
    """One file of the console: the path it is served at and the file Envoy reads."""

    path: str
    filename: str
    content_type: str
    size: int


@dataclass(frozen=True)
class Console:
    """The browser console's build (``make console``), served by Envoy itself.

    ``from_directory`` reads a flat directory (what ``clients/web/build.mjs``
    writes): ``index.html`` is served at ``/`` and ``/index.html``, every other
    file at ``/<name>``. The file names are absolute, as Envoy sees them; Envoy
    reads the files when it loads the configuration, so a new build needs Envoy
    started (or the configuration rendered) again.
    """

    files: tuple[StaticFile, ...]

    @classmethod
    def from_directory(cls, directory: str | Path) -> Console:
        root = Path(directory).expanduser().resolve()
        if not root.is_dir():
            raise SpecError(f"console directory {root} does not exist; run `make console`")
        files: list[StaticFile] = []
        for entry in sorted(root.iterdir()):
            if entry.name.startswith("."):
                continue
            if not entry.is_file():
                raise SpecError(f"console directory {root} has {entry.name!r}, which is not a file")
            content_type = CONSOLE_TYPES.get(entry.suffix.lower())
            if content_type is None:
                known = ", ".join(sorted(CONSOLE_TYPES))
                raise SpecError(f"console file {entry.name!r}: serves only {known}")
            size = entry.stat().st_size
            if size > MAX_CONSOLE_FILE_BYTES:
                raise SpecError(
                    f"console file {entry.name!r} is {size} bytes; "
                    f"at most {MAX_CONSOLE_FILE_BYTES} (Envoy holds it in memory)"
                )
            paths = ["/", "/index.html"] if entry.name == "index.html" else [f"/{entry.name}"]
            files += [StaticFile(path, str(entry), content_type, size) for path in paths]
        if not any(f.path == "/" for f in files):
            raise SpecError(f"console directory {root} has no index.html; run `make console`")
        if len(files) > MAX_CONSOLE_FILES:
            raise SpecError(f"console directory {root} has over {MAX_CONSOLE_FILES} files")
        return cls(tuple(files))

    @property
    def body_limit(self) -> int:
        """Envoy's cap on a direct response read from a file: the largest file, rounded
        up to a MiB (a slightly larger rebuild still loads), never above the maximum."""
        largest = max((f.size for f in self.files), default=0)
        mib = 1024 * 1024
        return min(MAX_CONSOLE_FILE_BYTES, max(mib, math.ceil(largest / mib) * mib))


#: The cluster Envoy's tracer exports its spans to.
OTLP_CLUSTER: Final = "otlp_collector"
#: The ``service.name`` of Envoy's spans unless told otherwise.
ENVOY_SERVICE_NAME: Final = "switchboard-envoy"
OTLP_GRPC: Final = "grpc"
OTLP_HTTP: Final = "http/protobuf"
_OTLP_PORTS: Final = {OTLP_GRPC: 4317, OTLP_HTTP: 4318}
_OTLP_EXPORT_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True)
class Tracing:
    """Envoy's OpenTelemetry tracer: where its spans go (OTLP) and which requests it traces.

    Each request gets a server span, continuing the caller's W3C ``traceparent``
    when it sent one, and a client span per upstream attempt (a retry is a
    second one); Envoy sends that client span's context upstream in
    ``traceparent``, so the servers' own spans are its children.

    Sampling follows OpenTelemetry's samplers: ``parent_based`` (the default,
    like ``parentbased_*``) keeps the caller's decision when it sent a
    ``traceparent`` and traces ``sampling_percent`` of the requests that start a
    trace here (Envoy's ``random_sampling``); otherwise Envoy decides alone for
    every request, by trace id (``traceidratio``, ``always_on``, ``always_off``).
    """

    collector: HostPort
    #: OTLP over gRPC (``grpc``, the exporters' port 4317) or over HTTP
    #: (``http/protobuf``, 4318, spans POSTed to ``path``).
    protocol: str = OTLP_GRPC
    #: TLS to the collector, verified against ``ca_file`` or else the system's roots.
    tls: bool = False
    ca_file: str | None = None
    path: str = "/v1/traces"
    sampling_percent: float = 100.0
    parent_based: bool = True
    service_name: str = ENVOY_SERVICE_NAME

    def __post_init__(self) -> None:
        if self.protocol not in _OTLP_PORTS:
            raise SpecError(
                f"OTLP protocol {self.protocol!r}: Envoy exports over {OTLP_GRPC} or {OTLP_HTTP}"
            )
        if not 0 <= self.sampling_percent <= 100:
            raise SpecError(f"sampling {self.sampling_percent:g}% is not between 0 and 100")
        if not self.service_name:
            raise SpecError("the tracer needs a service name")
        if self.collector.port == 0:
            raise SpecError(f"the OTLP collector {self.collector} has port 0")

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[str, str],
        *,
        endpoint: str | None = None,
        service_name: str = ENVOY_SERVICE_NAME,
    ) -> Tracing | None:
        """The tracer the standard ``OTEL_*`` variables describe; None when tracing is off.

        On when an OTLP endpoint is given (``endpoint``, else
        ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, else ``OTEL_EXPORTER_OTLP_ENDPOINT``) or
        ``OTEL_TRACES_EXPORTER=otlp`` asks for the exporters' default (``http://localhost:4317``;
        4318 over HTTP), unless ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER``
        names no ``otlp`` (``none``, ``console``): the rule the servers follow, read by
        the one reader of these variables (``platform/observe/otelenv.py``).
        Also read: ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` (default ``grpc``),
        ``_INSECURE`` and ``_CERTIFICATE``, ``OTEL_TRACES_SAMPLER`` and
        ``OTEL_TRACES_SAMPLER_ARG``. Not read: headers and client certificates.
        """
        try:
            traces = OtelEnv.read(environ).traces(endpoint=endpoint)
        except ConfigError as exc:
            raise SpecError(str(exc)) from None
        if traces is None or "otlp" not in traces.exporters:
            return None
        text = traces.endpoint or f"http://localhost:{_OTLP_PORTS[traces.protocol]}"
        collector, tls, path = _collector(
            text, traces.protocol, insecure=traces.insecure, full_path=traces.signal_endpoint
        )
        return cls(
            collector=collector,
            protocol=traces.protocol,
            tls=tls,
            ca_file=(traces.certificate or None) if tls else None,
            path=path,
            # The ratio samplers trace that share; always_on all, always_off none.
            sampling_percent=0.0 if traces.sampler.endswith("always_off") else traces.ratio * 100,
            parent_based=traces.parent_based,
            service_name=service_name,
        )


def _collector(
    text: str, protocol: str, *, insecure: bool, full_path: bool
) -> tuple[HostPort, bool, str]:
    """The collector's address, whether to use TLS, and (OTLP/HTTP) the path to POST to."""
    if "://" not in text:
        if protocol == OTLP_HTTP:
            raise SpecError(f"OTLP/HTTP endpoint {text!r} needs a scheme (http:// or https://)")
        # A bare HOST:PORT, as the gRPC exporters take it: TLS unless told it is insecure.
        where = HostPort.parse(text)
        return where, not insecure, ""
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise SpecError(f"OTLP endpoint {text!r}: expected http(s)://HOST[:PORT]")
    try:
        port = url.port or _OTLP_PORTS[protocol]
    except ValueError:
        raise SpecError(f"OTLP endpoint {text!r} has a bad port") from None
    path = ""
    if protocol == OTLP_HTTP:
        # A signal's own endpoint is used as it is; the common one gets /v1/traces.
        path = (url.path or "/") if full_path else url.path.rstrip("/") + "/v1/traces"
    return HostPort(url.hostname, port), url.scheme == "https", path


@dataclass(frozen=True)
class EdgeSpec:
    """What the edge needs to know; ``bootstrap`` turns it into Envoy's configuration.

    ``upstreams`` maps a short service name to its replicas. The all-in-one shape
    is every service at the same address (``all_in_one``); the mesh gives each
    its own. A DNS name is resolved by Envoy (``STRICT_DNS``: every address it
    returns is a replica, as a Kubernetes headless Service answers).
    """

    upstreams: dict[str, tuple[HostPort, ...]]
    listen: HostPort = HostPort("127.0.0.1", 8080)
    admin: HostPort = HostPort("127.0.0.1", 9901)
    tls: Tls | None = None
    allow_origins: tuple[str, ...] = ("*",)
    limits: ServerLimits = ServerLimits()
    #: Share of each replica's ``max_concurrent_rpcs`` kept for unary calls; streams get the rest.
    unary_share: float = 0.1
    unary_timeout_s: float = 60.0
    stream_idle_timeout_s: float = 300.0
    health_interval_s: float = 5.0
    health_timeout_s: float = 2.0
    connect_timeout_s: float = 5.0
    #: Streams per downstream HTTP/2 connection (a browser tab multiplexes everything on one).
    downstream_max_streams: int = 1024
    #: Client connections Envoy holds at once, over all listeners.
    max_downstream_connections: int = 50_000
    #: How many replicas stand behind a service's addresses, where a DNS name is several
    #: (a Kubernetes headless Service): the breakers are sized for them. Default: one
    #: replica per address.
    replicas: Mapping[str, int] = field(default_factory=dict)
    #: The browser console's files, served on both listeners; none by default.
    console: Console | None = None
    #: Envoy's OpenTelemetry tracer; none (no tracing at all) by default.
    tracing: Tracing | None = None
    #: ``switchboard edge-health``, which answers health and reflection for every
    #: service of the deployment; without it they go to the dispatcher's replicas.
    edge_health: HostPort | None = None
    #: The dispatchers' media-streams servers (``SWITCHBOARD_STREAMS_LISTEN``): the
    #: carriers' webhooks and WebSockets under ``/telephony/`` go to them; none by default.
    telephony: tuple[HostPort, ...] = ()

    @classmethod
    def all_in_one(cls, upstream: HostPort, **kwargs: Any) -> EdgeSpec:
        return cls(upstreams={name: (upstream,) for name in API}, **kwargs)


def bootstrap(spec: EdgeSpec) -> Bootstrap:
    """Envoy's bootstrap for ``spec``. Raises SpecError for an unsafe or unworkable spec."""
    _check(spec)
    # Both listeners route alike: one route configuration, built once.
    routes = _routes(spec)
    listeners = [_listener(PLAIN_LISTENER, spec.listen, spec, routes, None)]
    if spec.tls is not None:
        listeners.append(_listener(TLS_LISTENER, spec.tls.listen, spec, routes, spec.tls))
    clusters = [
        cluster
        for name in _served(spec)
        for cluster in (_cluster(name, spec, streams=False), _cluster(name, spec, streams=True))
    ]
    if spec.edge_health is not None:
        clusters.append(_edge_health_cluster(spec.edge_health, spec))
    if spec.tracing is not None:
        clusters.append(_collector_cluster(spec.tracing, spec))
    if spec.telephony:
        clusters.append(
            phone.cluster(
                _endpoints(phone.TELEPHONY_CLUSTER, spec.telephony),
                dns=phone.any_dns([where.is_ip for where in spec.telephony]),
                connect_timeout=_seconds(spec.connect_timeout_s),
            )
        )
    return Bootstrap(
        admin=Admin(address=_address(spec.admin)),
        static_resources=BootstrapStaticResources(listeners=listeners, clusters=clusters),
        # Every connection costs memory whether or not it sends anything: past this
        # many, Envoy refuses new ones instead of running out.
        overload_manager=OverloadManager(
            resource_monitors=[
                ResourceMonitor(
                    name="envoy.resource_monitors.global_downstream_max_connections",
                    typed_config=_pack(
                        DownstreamConnectionsConfig(
                            max_active_downstream_connections=spec.max_downstream_connections
                        )
                    ),
                )
            ]
        ),
    )


def render(spec: EdgeSpec) -> str:
    """The bootstrap as YAML with a header saying how it was made."""
    # Proto field names, as Envoy's own documentation writes them. Not Casing.SNAKE:
    # it re-cases the names and breaks those with digits ("consecutive_5_xx").
    config = bootstrap(spec).to_dict(casing=_AS_DECLARED)
    body: str = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)
    shape = "all-in-one" if _single_upstream(spec) else "mesh"
    header = (
        f"# Envoy bootstrap for Switchboard ({shape} shape), generated by `switchboard envoy`\n"
        "# from envoy-data-plane's typed messages (switchboard/deploy/edge/envoy.py).\n"
        "# Do not edit: change the generator or its options and render it again.\n"
    )
    return header + body + "\n"


# Checks: refuse what would be unsafe (admin off loopback) or could never work.


def _check(spec: EdgeSpec) -> None:
    missing = sorted(set(API) - OPTIONAL_API - set(spec.upstreams))
    if missing:
        raise SpecError(f"no upstream for {', '.join(missing)}")
    unknown = sorted(set(spec.upstreams) - set(API))
    if unknown:
        raise SpecError(f"unknown services {', '.join(unknown)}; known: {', '.join(API)}")
    _check_replicas(spec)
    if spec.edge_health is not None and spec.edge_health.port == 0:
        raise SpecError(f"edge-health {spec.edge_health} has port 0")
    for where in spec.telephony:
        if where.port == 0:
            raise SpecError(f"telephony upstream {where} has port 0")
    if not _is_loopback(spec.admin.host):
        raise SpecError(
            f"the admin interface must listen on loopback, not {spec.admin.host!r}: "
            "it can stop Envoy and dump its configuration"
        )
    if spec.stream_idle_timeout_s <= spec.limits.heartbeat_s:
        raise SpecError(
            f"stream idle timeout {spec.stream_idle_timeout_s:g}s must be above the "
            f"server's heartbeat ({spec.limits.heartbeat_s:g}s), or live streams are cut"
        )
    if not 0 < spec.unary_share < 1:
        raise SpecError("unary_share must be between 0 and 1")
    if spec.unary_timeout_s <= 0:
        raise SpecError("the unary timeout must be positive")


def _check_replicas(spec: EdgeSpec) -> None:
    for name, replicas in spec.upstreams.items():
        if not replicas:
            raise SpecError(f"{name} has no replicas")
        for replica in replicas:
            if replica.port == 0:
                raise SpecError(f"{name} upstream {replica} has port 0")
    for name, count in spec.replicas.items():
        if name not in spec.upstreams:
            raise SpecError(f"replicas given for unknown service {name}")
        if not 1 <= count <= 10_000:
            raise SpecError(f"{name}: replicas must be between 1 and 10000")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _single_upstream(spec: EdgeSpec) -> bool:
    return len({replicas for replicas in spec.upstreams.values()}) == 1


def _served(spec: EdgeSpec) -> list[str]:
    """Cluster names: one per distinct set of replicas (all-in-one has one)."""
    if _single_upstream(spec):
        return ["switchboard"]
    return list(API)


def _cluster_of(service: str, spec: EdgeSpec) -> str:
    return "switchboard" if _single_upstream(spec) else service


# Listeners and routes.


def _address(where: HostPort) -> Address:
    return Address(socket_address=SocketAddress(address=where.host, port_value=where.port))


def _pack(message: Any) -> AnyMessage:
    return AnyMessage.pack(message)


def _seconds(value: float) -> dt.timedelta:
    return dt.timedelta(seconds=value)


def _listener(
    name: str, where: HostPort, spec: EdgeSpec, routes: RouteConfiguration, tls: Tls | None
) -> Listener:
    manager = HttpConnectionManager(
        stat_prefix=name,
        codec_type=HttpConnectionManagerCodecType.AUTO,
        stream_idle_timeout=_seconds(spec.stream_idle_timeout_s),
        # The client address the servers see (x-forwarded-for) is the peer of this
        # connection, appended after whatever the client sent; the servers take
        # the rightmost address that is not a trusted proxy.
        use_remote_address=True,
        xff_num_trusted_hops=0,
        # Reject what the server would reject anyway, before it costs an upstream stream.
        max_request_headers_kb=max(1, math.ceil(spec.limits.max_metadata_bytes / 1024)),
        http2_protocol_options=Http2ProtocolOptions(
            max_concurrent_streams=spec.downstream_max_streams,
        ),
        route_config=routes,
        upgrade_configs=phone.manager_upgrades() if spec.telephony else [],
        tracing=_tracing(spec.tracing) if spec.tracing is not None else None,
        http_filters=[
            HttpFilter(name="envoy.filters.http.grpc_web", typed_config=_pack(GrpcWeb())),
            HttpFilter(name="envoy.filters.http.cors", typed_config=_pack(Cors())),
            *_transcoder(spec),
            HttpFilter(name="envoy.filters.http.router", typed_config=_pack(Router())),
        ],
    )
    chain = FilterChain(
        filters=[
            Filter(
                name="envoy.filters.network.http_connection_manager",
                typed_config=_pack(manager),
            )
        ]
    )
    if tls is not None:
        context = DownstreamTlsContext(
            common_tls_context=CommonTlsContext(
                tls_certificates=[
                    TlsCertificate(
                        certificate_chain=DataSource(filename=tls.cert_file),
                        private_key=DataSource(filename=tls.key_file),
                    )
                ],
                alpn_protocols=list(ALPN),
            )
        )
        chain.transport_socket = TransportSocket(
            name="envoy.transport_sockets.tls", typed_config=_pack(context)
        )
    return Listener(name=name, address=_address(where), filter_chains=[chain])


#: The buffer filter that holds an HTTP+JSON body to its size limit (``_transcoder``).
_BODY_LIMIT: Final = "envoy.filters.http.buffer"
#: The services Envoy serves as HTTP+JSON (by their ``google.api.http`` bindings), when the
#: a2a front door is routed: A2A's HTTP+JSON binding and the public Agent Card.
TRANSCODED: Final = (
    API["a2a"],
    *COMPANION_API["a2a"],
)
#: What the transcoder needs beside the services' files: the error details a status
#: carries, so an error's body is JSON with its details (``convert_grpc_status``).
_ERROR_FILES: Final = (status_pb2.DESCRIPTOR, error_details_pb2.DESCRIPTOR)


def transcoder_descriptors() -> bytes:
    """The descriptor set Envoy's transcoder reads: the transcoded services' files (the
    pinned SDK's A2A descriptor, which ``scripts/a2a-proto.py --check`` holds equal to
    third_party/a2a/a2a.proto; our card's) with every file they import, dependencies first.

    One change to A2A's bindings: SubscribeToTask is also a POST. A2A's contract says GET,
    and the official SDK's HTTP+JSON client sends POST (its own server takes both), so the
    edge takes both too.
    """
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}

    def add(file: FileDescriptor) -> None:
        if file.name in files:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        files[file.name] = proto

    for file in (*_ERROR_FILES, *(service.file for service in TRANSCODED)):
        add(file)
    a2a_file = files[API["a2a"].file.name]
    for method in a2a_file.service[0].method:
        if method.name == "SubscribeToTask":
            rule = method.options.Extensions[annotations_pb2.http]
            for binding in (rule, *rule.additional_bindings):
                if binding.get:
                    rule.additional_bindings.add(post=binding.get)
    return descriptor_pb2.FileDescriptorSet(file=files.values()).SerializeToString(
        deterministic=True
    )


def _transcoder(spec: EdgeSpec) -> list[HttpFilter]:
    """Envoy's gRPC-JSON transcoder for A2A's HTTP+JSON binding, when a2a is routed.

    gRPC and grpc-web requests pass it untouched; a request whose method and path match
    an HTTP binding becomes the gRPC call, routed like one. Responses are JSON in A2A's
    field names (lowerCamelCase); a stream is Server-Sent Events (``data: {...}``, one
    event a message); an error is its ``google.rpc.Status`` as JSON with the HTTP status
    of its code. Request headers reach the server as call metadata (``A2A-Version``,
    ``A2A-Extensions``, ``switchboard-after-sequence``, ``authorization``).

    A body larger than the servers take as a message is refused here with 413, by the
    buffer filter before the transcoder (``_BODY_LIMIT``): sent on, the server would
    refuse it with RESOURCE_EXHAUSTED, which HTTP reads as 429, "too many requests".
    Only HTTP+JSON requests are buffered: they match no route until the transcoder
    has made them gRPC calls, and every route (gRPC, grpc-web, the console) turns the
    buffer off, so streams are never held. A query parameter the method does not have
    is a 400 naming it, not a 404 for a path that exists.
    """
    if "a2a" not in spec.upstreams:
        return []
    config = GrpcJsonTranscoder(
        proto_descriptor_bin=transcoder_descriptors(),
        services=[service.full_name for service in TRANSCODED],
        print_options=GrpcJsonTranscoderPrintOptions(stream_sse_style_delimited=True),
        convert_grpc_status=True,
        request_validation_options=GrpcJsonTranscoderRequestValidationOptions(
            # A tenant or id in the path and another in the body: refused, not guessed.
            reject_binding_body_field_collisions=True,
            reject_unknown_query_parameters=True,
        ),
    )
    return [
        # First: on the way back it sees every answer after it, the transcoded response
        # and the buffer's and the transcoder's own.
        HttpFilter(
            name="envoy.filters.http.lua",
            typed_config=_pack(
                Lua(default_source_code=DataSource(inline_string=a2a_http_lua(spec.limits)))
            ),
        ),
        HttpFilter(
            name=_BODY_LIMIT,
            typed_config=_pack(Buffer(max_request_bytes=spec.limits.max_receive_message_bytes)),
        ),
        HttpFilter(name="envoy.filters.http.grpc_json_transcoder", typed_config=_pack(config)),
    ]


#: gRPC codes by number, as A2A's HTTP+JSON errors name them (``google.rpc.Code``).
_CODE_NAMES: Final = {number: name for name, number in code_pb2.Code.items()}
#: The code an HTTP status of Envoy's own stands for (``google.rpc.Code``'s HTTP mapping;
#: 413 is what Switchboard's own "too large" is, RESOURCE_EXHAUSTED).
_HTTP_CODES: Final = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    431: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_LUA_NAMES: Final = ", ".join(f'[{n}] = "{name}"' for n, name in sorted(_CODE_NAMES.items()))
_LUA_HTTP: Final = ", ".join(f'[{n}] = "{name}"' for n, name in sorted(_HTTP_CODES.items()))


def a2a_http_lua(limits: ServerLimits) -> str:
    """The Lua filter that gives A2A's HTTP+JSON clients A2A's error shape and its
    required fields, whoever answered.

    A2A's HTTP+JSON binding answers an error as ``{"error": {"code": <HTTP status>,
    "status": <gRPC code name>, "message", "details"}}`` (Google's AIP-193 shape, which
    A2A's SDKs read to raise their typed errors from the ``ErrorInfo`` of domain
    ``a2a-protocol.org`` in ``details``). For a request that is not gRPC (gRPC and
    grpc-web pass untouched) it rewrites:

    - a transcoded error (the transcoder writes the bare ``google.rpc.Status``) into
      that shape; a message larger than the server takes (RESOURCE_EXHAUSTED, "larger
      than max": its JSON was smaller than its protobuf) is 413, as at the edge;
    - Envoy's own answers, plain text or empty, into it too: the transcoder's 400 (a body
      that is not JSON, a value of the wrong type, an unknown query parameter: A2A's
      ``INVALID_PARAMS`` with the field in ``BadRequest`` when it names one, else
      ``INVALID_REQUEST``), its 413 (a body over the servers' message limit), a path
      nothing serves (404, ``METHOD_NOT_FOUND``), an upstream that cannot be reached;
    - ListTasks' answer, whose JSON would leave out an empty ``tasks``, an empty
      ``nextPageToken`` and a zero ``totalSize`` (protobuf's JSON omits default
      values), though A2A requires all four fields: they are added when missing. (The
      transcoder's ``always_print_primitive_fields`` would print them, but for every
      message, and A2A wants a task's ``artifacts`` left out unless asked for.)

    A stream that fails after it started has already sent its 200: it ends without an
    error event.
    """
    limit = limits.max_receive_message_bytes
    return (
        f"local NAMES = {{{_LUA_NAMES}}}\n"
        f"local HTTP = {{{_LUA_HTTP}}}\n"
        f"local LIMIT = {limit}\n" + _A2A_HTTP_LUA
    )


_A2A_HTTP_LUA: Final = r"""local META = "switchboard.a2a"

local function escape(text)
  return (text:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    if c == "\n" then return "\\n" end
    return string.format("\\u%04x", c:byte())
  end))
end

local function info(domain, reason)
  return '{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"' .. reason
    .. '","domain":"' .. domain .. '"}'
end

-- Envoy's own error (status, and the plain text it wrote, if any) in A2A's shape.
local function own(status, text)
  text = text:gsub("%s+$", "")
  local details = {}
  if status == 400 then
    local field, why = text:match("^([%w_%.%[%]]+): (.+)$")
    local unknown = text:match('^Could not find field "([^"]+)"')
    if unknown ~= nil then
      field, why = unknown, "is not a parameter of this method"
    end
    if field ~= nil then
      details = {info("a2a-protocol.org", "INVALID_PARAMS"),
        info("switchboard.dev", "ERROR_REASON_INVALID_ARGUMENT"),
        '{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"'
          .. escape(field) .. '","description":"' .. escape(why) .. '"}]}'}
    else
      details = {info("a2a-protocol.org", "INVALID_REQUEST"),
        info("switchboard.dev", "ERROR_REASON_INVALID_ARGUMENT")}
      if text == "" then text = "the request is not valid" end
    end
  elseif status == 413 then
    text = "the request body is larger than " .. LIMIT .. " bytes, the most a server takes"
    details = {info("a2a-protocol.org", "INVALID_REQUEST"),
      info("switchboard.dev", "ERROR_REASON_REQUEST_TOO_LARGE")}
  elseif status == 404 then
    text = "no A2A method or public card at this path"
    details = {info("a2a-protocol.org", "METHOD_NOT_FOUND")}
  elseif text == "" then
    text = "the edge could not answer (HTTP " .. status .. ")"
  end
  return '{"error":{"code":' .. status .. ',"status":"' .. (HTTP[status] or "UNKNOWN")
    .. '","message":"' .. escape(text) .. '","details":[' .. table.concat(details, ",") .. ']}}'
end

local function replace(handle, headers, body, text)
  body:setBytes(text)
  headers:replace("content-type", "application/json")
  headers:replace("content-length", tostring(#text))
end

-- (Headers are read again after body(): waiting for the body ends the old object's scope.)
local function error_shape(handle, status)
  local body = handle:body(true)
  local text = body:getBytes(0, body:length())
  local headers = handle:headers()
  local kind = headers:get("content-type") or ""
  if kind:sub(1, 16) == "application/json" then
    if text:sub(1, 9) == '{"error":' then
      return
    end
    local code, rest = text:match('^{"code":(%d+)(.*)$')
    if code ~= nil then
      local name = NAMES[tonumber(code)] or "UNKNOWN"
      if name == "RESOURCE_EXHAUSTED" and (text:find("larger than max", 1, true)
          or text:find('"ERROR_REASON_REQUEST_TOO_LARGE"', 1, true)) then
        -- Too large (a message, or a field of it), not too many: HTTP's 413.
        status = 413
        headers:replace(":status", "413")
      end
      replace(handle, headers, body,
        '{"error":{"code":' .. status .. ',"status":"' .. name .. '"' .. rest .. '}')
      return
    end
  end
  replace(handle, headers, body, own(status, text))
end

local REQUIRED = {{'"tasks":', '"tasks":[]'}, {'"nextPageToken":', '"nextPageToken":""'},
  {'"pageSize":', '"pageSize":0'}, {'"totalSize":', '"totalSize":0'}}

local function listed(handle)
  local body = handle:body(true)
  local text = body:getBytes(0, body:length())
  local headers = handle:headers()
  if text == "" then text = "{}" end
  if text:sub(1, 1) ~= "{" then
    return
  end
  local missing = {}
  for _, field in ipairs(REQUIRED) do
    if not text:find(field[1], 1, true) then
      missing[#missing + 1] = field[2]
    end
  end
  if #missing == 0 then
    return
  end
  local rest = text:sub(2)
  local joined = table.concat(missing, ",")
  if not rest:match("^%s*}") then
    joined = joined .. ","
  end
  replace(handle, headers, body, "{" .. joined .. rest)
end

function envoy_on_request(handle)
  local headers = handle:headers()
  if (headers:get("content-type") or ""):sub(1, 16) == "application/grpc" then
    return
  end
  local path = (headers:get(":path") or ""):match("^[^?]*")
  local list = headers:get(":method") == "GET"
    and (path == "/tasks" or path:match("^/[^/]+/tasks$") ~= nil)
  handle:streamInfo():dynamicMetadata():set(META, "http", list and "list" or "call")
end

function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata():get(META)
  if meta == nil then
    return
  end
  local status = tonumber(handle:headers():get(":status") or "") or 0
  if status >= 400 then
    error_shape(handle, status)
  elseif status == 200 and meta["http"] == "list" then
    listed(handle)
  end
end
"""


def _tracing(tracing: Tracing) -> HttpConnectionManagerTracing:
    timeout = _seconds(_OTLP_EXPORT_TIMEOUT_S)
    config = OpenTelemetryConfig(
        service_name=tracing.service_name,
        # OTEL_RESOURCE_ATTRIBUTES in Envoy's own environment (deployment, region...).
        resource_detectors=[
            TypedExtensionConfig(
                name="envoy.tracers.opentelemetry.resource_detectors.environment",
                typed_config=_pack(EnvironmentResourceDetectorConfig()),
            )
        ],
    )
    if tracing.protocol == OTLP_GRPC:
        config.grpc_service = GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=OTLP_CLUSTER), timeout=timeout
        )
    else:
        scheme = "https" if tracing.tls else "http"
        config.http_service = HttpService(
            http_uri=HttpUri(
                uri=f"{scheme}://{tracing.collector}{tracing.path}",
                cluster=OTLP_CLUSTER,
                timeout=timeout,
            )
        )
    random = tracing.sampling_percent
    if not tracing.parent_based:
        # A sampler of its own: the same decision for a trace id whatever the caller sent.
        random = 100.0
        if tracing.sampling_percent >= 100:
            sampler = TypedExtensionConfig(
                name="envoy.tracers.opentelemetry.samplers.always_on",
                typed_config=_pack(AlwaysOnSamplerConfig()),
            )
        else:
            sampler = TypedExtensionConfig(
                name="envoy.tracers.opentelemetry.samplers.trace_id_ratio_based",
                typed_config=_pack(
                    TraceIdRatioBasedSamplerConfig(
                        sampling_percentage=FractionalPercent(
                            numerator=round(tracing.sampling_percent * 10_000),
                            denominator=FractionalPercentDenominatorType.MILLION,
                        )
                    )
                ),
            )
        config.sampler = sampler
    return HttpConnectionManagerTracing(
        random_sampling=Percent(value=random),
        # Envoy is its own hop: a server span for the request, a client span per attempt.
        spawn_upstream_span=True,
        provider=TracingHttp(name="envoy.tracers.opentelemetry", typed_config=_pack(config)),
    )


def _origin_matchers(origins: Sequence[str]) -> list[StringMatcher]:
    if not origins or "*" in origins:
        return [StringMatcher(safe_regex=RegexMatcher(regex=".*"))]
    return [StringMatcher(exact=origin) for origin in origins]


def _routes(spec: EdgeSpec) -> RouteConfiguration:
    cors = CorsPolicy(
        allow_origin_string_match=_origin_matchers(spec.allow_origins),
        # GET: A2A's HTTP+JSON reads and the public Agent Card.
        allow_methods="GET, POST, OPTIONS",
        allow_headers=_CORS_HEADERS,
        expose_headers=_CORS_EXPOSE,
        max_age="86400",
        # A preflight from an origin not allowed is answered here, without CORS
        # headers (the browser then refuses), never sent to a server.
        forward_not_matching_preflights=False,
    )
    # The carriers' HTTP/1.1 and WebSockets, before the gRPC routes.
    routes: list[Route] = [phone.route()] if spec.telephony else []
    for service, descriptor in API.items():
        if service in spec.upstreams:
            for served in (descriptor, *COMPANION_API.get(service, ())):
                routes += _service_routes(served, _cluster_of(service, spec), spec)
    check, watch = RouteMatch(path=f"{HEALTH_PATH}Check"), RouteMatch(path=f"{HEALTH_PATH}Watch")
    if spec.edge_health is not None:
        # One server answers for the deployment: every service's health across its
        # replicas, reflection for every contract (a process knows only its own).
        routes.append(_edge_health_route(check, spec, unary=True))
        routes.append(_edge_health_route(watch, spec, unary=False))
        for prefix in REFLECTION_PATHS:
            routes.append(_edge_health_route(RouteMatch(prefix=prefix), spec, unary=False))
    else:
        # Every process serves its own; they go to the dispatcher's replicas
        # (all-in-one: the one server, which serves every service).
        fallback = _cluster_of("dispatcher", spec)
        routes.append(_route(check, fallback, spec, unary=True, safe=True))
        routes.append(_route(watch, fallback, spec, unary=False, safe=False))
        for prefix in REFLECTION_PATHS:
            routes.append(
                _route(RouteMatch(prefix=prefix), fallback, spec, unary=False, safe=False)
            )
    if spec.console is not None:
        routes += [_static_route(file) for file in spec.console.files]
    config = RouteConfiguration(
        name="switchboard",
        virtual_hosts=[
            VirtualHost(
                name="switchboard",
                domains=["*"],
                routes=routes,
                typed_per_filter_config={
                    "envoy.filters.http.cors": _pack(cors),
                    # Every route's requests stream (only HTTP+JSON, which matches no
                    # route before it is transcoded, is held to the body limit).
                    **(
                        {_BODY_LIMIT: _pack(BufferPerRoute(disabled=True))}
                        if "a2a" in spec.upstreams
                        else {}
                    ),
                },
                # Requests that never reached a server are safe to send again, streams too.
                retry_policy=_retry_policy(_RETRY_UNSENT),
                # The Host the client used, as Envoy saw it (never one the client sent in
                # this header): the public Agent Card names the edge it was fetched from.
                request_headers_to_add=[
                    HeaderValueOption(
                        header=HeaderValue(key="x-forwarded-host", value="%REQ(:AUTHORITY)%"),
                        append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                ],
            )
        ],
    )
    if spec.console is not None:
        # Envoy refuses a file-backed direct response above this (4 KiB by default).
        config.max_direct_response_body_size_bytes = spec.console.body_limit
    return config


def _static_route(file: StaticFile) -> Route:
    """A console file, answered by Envoy from the file it read at load."""
    headers = (("content-type", file.content_type), *CONSOLE_HEADERS)
    return Route(
        match=RouteMatch(
            path=file.path,
            # Only reads: anything else to these paths is no route (404), never a server's.
            headers=[
                HeaderMatcher(
                    name=":method",
                    string_match=StringMatcher(safe_regex=RegexMatcher(regex="GET|HEAD")),
                )
            ],
        ),
        direct_response=DirectResponseAction(status=200, body=DataSource(filename=file.filename)),
        response_headers_to_add=[
            HeaderValueOption(
                header=HeaderValue(key=key, value=value),
                append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for key, value in headers
        ],
    )


def _streaming(method: MethodDescriptor) -> bool:
    return method.client_streaming or method.server_streaming


def safe_to_retry(method: MethodDescriptor) -> bool:
    """Whether the contract marks ``method`` safe to repeat (its idempotency level)."""
    return method.GetOptions().idempotency_level in _SAFE_LEVELS


def _service_routes(service: ServiceDescriptor, cluster: str, spec: EdgeSpec) -> list[Route]:
    """Exact routes for streaming and retry-safe methods, then one prefix for the rest."""
    routes: list[Route] = []
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        if path in CHUNK_METHODS:
            route = _route(
                RouteMatch(path=path), cluster, spec, unary=not _streaming(method), safe=False
            )
            route.request_body_buffer_limit = spec.limits.max_receive_message_bytes
            routes.append(route)
        elif _streaming(method):
            routes.append(_route(RouteMatch(path=path), cluster, spec, unary=False, safe=False))
        elif safe_to_retry(method):
            routes.append(_route(RouteMatch(path=path), cluster, spec, unary=True, safe=True))
    prefix = RouteMatch(prefix=f"/{service.full_name}/")
    routes.append(_route(prefix, cluster, spec, unary=True, safe=False))
    return routes


def _route(match: RouteMatch, cluster: str, spec: EdgeSpec, *, unary: bool, safe: bool) -> Route:
    action = RouteAction(
        cluster=cluster if unary else f"{cluster}_streams",
        hash_policy=list(_AFFINITY),
        # Streams have no route timeout; unary calls without a deadline get one.
        timeout=_seconds(spec.unary_timeout_s if unary else 0),
        # A client's grpc-timeout wins over the route timeout, uncapped.
        max_stream_duration=RouteActionMaxStreamDuration(grpc_timeout_header_max=_seconds(0)),
    )
    if safe:
        # Every other route inherits the virtual host's unsent-only policy.
        action.retry_policy = _retry_policy(_RETRY_SAFE)
    return Route(match=match, route=action)


#: A call with the header goes where its conversation's runs live; one without has no
#: hash, and the cluster's hashing balancer then picks a replica at random.
_AFFINITY: Final = [
    RouteActionHashPolicy(header=RouteActionHashPolicyHeader(header_name=AFFINITY_HEADER))
]


def _edge_health_route(match: RouteMatch, spec: EdgeSpec, *, unary: bool) -> Route:
    action = RouteAction(
        cluster=EDGE_HEALTH_CLUSTER,
        # A Watch or a reflection stream lasts as long as its client wants.
        timeout=_seconds(spec.unary_timeout_s if unary else 0),
        max_stream_duration=RouteActionMaxStreamDuration(grpc_timeout_header_max=_seconds(0)),
    )
    if unary:
        # Check has no side effects: asking again is harmless.
        action.retry_policy = _retry_policy(_RETRY_SAFE)
    return Route(match=match, route=action)


def _retry_policy(retry_on: str) -> RetryPolicy:
    return RetryPolicy(
        retry_on=retry_on,
        num_retries=2,
        # A retry goes to another replica when there is one.
        retry_host_predicate=[
            RetryPolicyRetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=_pack(PreviousHostsPredicate()),
            )
        ],
        host_selection_retry_max_attempts=3,
    )


# Clusters.


def _cluster(service: str, spec: EdgeSpec, *, streams: bool) -> Cluster:
    replicas = spec.upstreams[service] if service in spec.upstreams else _all(spec)
    name = f"{service}_streams" if streams else service
    per_replica = spec.limits.max_concurrent_rpcs
    unary_per_replica = max(1, int(per_replica * spec.unary_share))
    allowed = (per_replica - unary_per_replica) if streams else unary_per_replica
    hosts = max(spec.replicas.get(service, 0), _replica_count(replicas))
    requests = allowed * hosts
    # Connections Envoy may need: each carries at most the server's streams per connection.
    connections = hosts * max(1, math.ceil(allowed / spec.limits.max_concurrent_streams)) + hosts
    thresholds = CircuitBreakersThresholds(
        priority=RoutingPriority.DEFAULT,
        max_connections=connections,
        max_pending_requests=requests,
        max_requests=requests,
        # Retries may add a fifth on top of the load, never a storm.
        retry_budget=CircuitBreakersThresholdsRetryBudget(
            budget_percent=Percent(value=20.0), min_retry_concurrency=10
        ),
        track_remaining=True,
    )
    dns = not all(replica.is_ip for replica in replicas)
    cluster = Cluster(
        name=name,
        type=ClusterDiscoveryType.STRICT_DNS if dns else ClusterDiscoveryType.STATIC,
        connect_timeout=_seconds(spec.connect_timeout_s),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _pack(
                HttpProtocolOptions(
                    explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                        http2_protocol_options=Http2ProtocolOptions(
                            max_concurrent_streams=spec.limits.max_concurrent_streams,
                            # Pings no more often than the server tolerates (it
                            # answers faster ones with GOAWAY too_many_pings).
                            connection_keepalive=KeepaliveSettings(
                                interval=_seconds(
                                    2 * spec.limits.keepalive_min_client_ping_interval_s
                                ),
                                timeout=_seconds(20),
                            ),
                        )
                    )
                )
            )
        },
        load_assignment=_endpoints(name, replicas),
        # Maglev, not a ring: its table (65,537 entries) shares the keys out evenly
        # among the few replicas a deployment has, where a ring of Envoy's default
        # size leaves one several percent more. A replica joining or leaving moves
        # about twice the keys a ring would move, a price paid once per change:
        # the calls it moves are served anyway, following the runs over Redis.
        lb_policy=ClusterLbPolicy.MAGLEV,
        circuit_breakers=CircuitBreakers(thresholds=[thresholds]),
        health_checks=[_health_check(service, spec)],
        outlier_detection=OutlierDetection(
            # Only failures Envoy saw itself (refused, reset, timed out connecting)
            # eject a replica: a status the server chose, a client's deadline
            # (504) included, says nothing about the replica's health.
            split_external_local_origin_errors=True,
            consecutive_local_origin_failure=3,
            enforcing_consecutive_local_origin_failure=100,
            enforcing_consecutive_5xx=0,
            enforcing_consecutive_gateway_failure=0,
            enforcing_success_rate=0,
            interval=_seconds(5),
            base_ejection_time=_seconds(10),
            # With two replicas, one at most is ever ejected.
            max_ejection_percent=50,
        ),
    )
    if dns:
        cluster.dns_lookup_family = ClusterDnsLookupFamily.V4_PREFERRED
    return cluster


def _endpoints(cluster_name: str, where: Sequence[HostPort]) -> ClusterLoadAssignment:
    """The cluster's addresses, one locality."""
    return ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=[
            LocalityLbEndpoints(
                lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_address(one))) for one in where]
            )
        ],
    )


def _edge_health_cluster(where: HostPort, spec: EdgeSpec) -> Cluster:
    """``switchboard edge-health``: HTTP/2, no health check of its own (its ``""`` says
    whether the deployment serves, not whether it answers)."""
    cluster = Cluster(
        name=EDGE_HEALTH_CLUSTER,
        type=ClusterDiscoveryType.STATIC if where.is_ip else ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=_seconds(spec.connect_timeout_s),
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _pack(
                HttpProtocolOptions(
                    explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                        http2_protocol_options=Http2ProtocolOptions()
                    )
                )
            )
        },
        load_assignment=_endpoints(EDGE_HEALTH_CLUSTER, [where]),
    )
    if not where.is_ip:
        cluster.dns_lookup_family = ClusterDnsLookupFamily.V4_PREFERRED
    return cluster


def _collector_cluster(tracing: Tracing, spec: EdgeSpec) -> Cluster:
    where = tracing.collector
    cluster = Cluster(
        name=OTLP_CLUSTER,
        type=ClusterDiscoveryType.STATIC if where.is_ip else ClusterDiscoveryType.STRICT_DNS,
        connect_timeout=_seconds(spec.connect_timeout_s),
        load_assignment=_endpoints(OTLP_CLUSTER, [where]),
    )
    if not where.is_ip:
        cluster.dns_lookup_family = ClusterDnsLookupFamily.V4_PREFERRED
    if tracing.protocol == OTLP_GRPC:
        cluster.typed_extension_protocol_options = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _pack(
                HttpProtocolOptions(
                    explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                        http2_protocol_options=Http2ProtocolOptions()
                    )
                )
            )
        }
    if tracing.tls:
        validation = (
            CertificateValidationContext(trusted_ca=DataSource(filename=tracing.ca_file))
            if tracing.ca_file
            else CertificateValidationContext(
                system_root_certs=CertificateValidationContextSystemRootCerts()
            )
        )
        context = UpstreamTlsContext(
            sni="" if where.is_ip else where.host,
            common_tls_context=CommonTlsContext(
                validation_context=validation,
                alpn_protocols=["h2"] if tracing.protocol == OTLP_GRPC else [],
            ),
        )
        cluster.transport_socket = TransportSocket(
            name="envoy.transport_sockets.tls", typed_config=_pack(context)
        )
    return cluster


def _all(spec: EdgeSpec) -> tuple[HostPort, ...]:
    return next(iter(spec.upstreams.values()))


def _replica_count(replicas: Iterable[HostPort]) -> int:
    # A DNS name may stand for several replicas; size for at least one each.
    return max(1, len(tuple(replicas)))


def _health_check(service: str, spec: EdgeSpec) -> HealthCheck:
    # The all-in-one server is healthy when "" is (every service it serves).
    name = "" if service == "switchboard" else API[service].full_name
    return HealthCheck(
        timeout=_seconds(spec.health_timeout_s),
        interval=_seconds(spec.health_interval_s),
        unhealthy_threshold=2,
        healthy_threshold=1,
        # A fresh or restarted replica is checked at once, not after an interval.
        no_traffic_interval=_seconds(spec.health_interval_s),
        grpc_health_check=HealthCheckGrpcHealthCheck(service_name=name),
    )


__all__ = [
    "AFFINITY_HEADER",
    "ALPN",
    "API",
    "COMPANION_API",
    "CONSOLE_CSP",
    "CONSOLE_HEADERS",
    "CONSOLE_TYPES",
    "EDGE_HEALTH_CLUSTER",
    "ENVOY_SERVICE_NAME",
    "MAX_CONSOLE_FILE_BYTES",
    "OTLP_CLUSTER",
    "OTLP_GRPC",
    "OTLP_HTTP",
    "PLAIN_LISTENER",
    "TLS_LISTENER",
    "TRANSCODED",
    "Console",
    "EdgeSpec",
    "HostPort",
    "ServerLimits",
    "SpecError",
    "StaticFile",
    "Tls",
    "Tracing",
    "bootstrap",
    "render",
    "safe_to_retry",
    "transcoder_descriptors",
]
