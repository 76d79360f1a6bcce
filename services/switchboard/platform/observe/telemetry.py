"""Tracing: OpenTelemetry, set up once per process from the standard ``OTEL_*`` variables.

Off by default, and then nothing is installed: no server or client
interceptor, no instrumented HTTP client, no span anywhere (every place that
could make one holds ``None`` instead of a tracer, decided once when it is
built). ``tracing_config`` turns the ``OTEL_*`` variables, read by their one
reader (``platform/observe/otelenv.py``, which Envoy's tracer shares), into this
process's tracing: on when ``OTEL_TRACES_EXPORTER`` names ``otlp`` or
``console`` or, unset, when an OTLP endpoint is set; off with
``OTEL_SDK_DISABLED=true`` or ``none``; refused at start for a value it cannot
honour. ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` chooses ``grpc`` (the
default) or ``http/protobuf``; ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG`` the sampler (default ``parentbased_always_on``);
``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` the resource. Without
a service name the process names itself by what it serves
(``switchboard`` all-in-one, ``switchboard-dispatcher`` in the mesh). The
exporters read their own variables (headers, TLS, timeout, compression) as
the OpenTelemetry specification says; no other module opens an exporter.

The process's tracing is ambient, as OpenTelemetry's own provider is:
``create_server`` installs it (``install``) before it opens anything, and
the channels, the HTTP clients and the stores built after that ask for it
here. It is not OpenTelemetry's global provider, which can be set once per
process: tests build servers with and without tracing in one process.
docs/observability.md describes the spans and how they nest.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, StatusCode
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from switchboard.platform.config import ALL_SERVICES, ConfigError
from switchboard.platform.observe.otelenv import EXPORTERS, OtelEnv

if TYPE_CHECKING:
    import httpx
    from grpc import aio

log = logging.getLogger("switchboard.telemetry")

HEALTH_SERVICE: Final = "grpc.health.v1.Health"


@dataclass(frozen=True)
class TracingConfig:
    """What the ``OTEL_*`` variables ask for, when tracing is on."""

    exporter: str = "otlp"
    protocol: str = "grpc"
    #: The endpoint named by the variables ("": the exporter's default).
    endpoint: str = ""
    sampler: str = "parentbased_always_on"
    ratio: float = 1.0
    service_name: str = "switchboard"
    resource: Mapping[str, str] = field(default_factory=dict)


def default_service_name(services: Sequence[str]) -> str:
    """``switchboard`` for the all-in-one process, else ``switchboard-<services>``."""
    if set(services) >= set(ALL_SERVICES):
        return "switchboard"
    return "switchboard-" + "-".join(services)


def tracing_config(environ: Mapping[str, str], *, service_name: str) -> TracingConfig | None:
    """The tracing ``environ`` asks for, or None when it is off (``platform/observe/otelenv.py``).

    ``service_name`` is used when neither ``OTEL_SERVICE_NAME`` nor
    ``OTEL_RESOURCE_ATTRIBUTES`` names the service. Raises ``ConfigError``
    for a value this process cannot honour.
    """
    otel = OtelEnv.read(environ)
    traces = otel.traces()
    if traces is None:
        return None
    if len(traces.exporters) > 1:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER={','.join(otel.exporters)!r}: a server takes one of "
            f"{', '.join(EXPORTERS)}"
        )
    resource = otel.resource()
    return TracingConfig(
        exporter=next(iter(traces.exporters)),
        protocol=traces.protocol,
        endpoint=traces.endpoint,
        sampler=traces.sampler,
        ratio=traces.ratio,
        service_name=otel.service_name or resource.get("service.name") or service_name,
        resource=resource,
    )


class NoBackgroundRoots(Sampler):
    """``inner``, except that a CLIENT span with no parent is never sampled.

    Every trace this process starts begins with a call it serves (a SERVER span)
    or a piece of work that opens its own span (a run, a webhook delivery). A
    client span without a parent is background work calling out with no request
    behind it: an integration's health probe (MCP ping, an expert's health
    check), a lease renewal. Each would be a trace of its own, one per
    integration every probe interval. Dropped here, and its ``traceparent``
    says "not sampled", so the server it calls records nothing either.
    """

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if kind == SpanKind.CLIENT and not parent.is_valid:
            return SamplingResult(Decision.DROP)
        return self.inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"NoBackgroundRoots{{{self.inner.get_description()}}}"


def make_sampler(config: TracingConfig) -> Sampler:
    root: Sampler
    base = config.sampler.removeprefix("parentbased_")
    if base == "always_on":
        root = ALWAYS_ON
    elif base == "always_off":
        root = ALWAYS_OFF
    else:
        root = TraceIdRatioBased(config.ratio)
    return ParentBased(root) if config.sampler.startswith("parentbased_") else root


def _exporter(config: TracingConfig) -> SpanExporter:
    """The exporter ``config`` names; it reads its own ``OTEL_EXPORTER_OTLP_*`` variables."""
    if config.exporter == "console":
        return ConsoleSpanExporter()
    if config.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter()


def _not_health(method: str) -> bool:
    """Whether a call is traced: every one except the health service's.

    Probes would fill every trace store with noise (docs/decisions.md, 31).
    """
    return not method.startswith(f"/{HEALTH_SERVICE}/")


class Tracing:
    """A process's tracing: one tracer provider and what is built on it."""

    def __init__(self, provider: TracerProvider, config: TracingConfig | None = None) -> None:
        self.provider = provider
        self.config = config or TracingConfig()
        self._client_interceptors: list[Any] | None = None

    @classmethod
    def from_config(cls, config: TracingConfig) -> Tracing:
        resource = Resource.create({**config.resource, "service.name": config.service_name})
        provider = TracerProvider(
            resource=resource, sampler=NoBackgroundRoots(make_sampler(config))
        )
        provider.add_span_processor(BatchSpanProcessor(_exporter(config)))
        return cls(provider, config)

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, service_name: str = "switchboard"
    ) -> Tracing | None:
        """The tracing the ``OTEL_*`` variables ask for; None when it is off."""
        config = tracing_config(
            os.environ if environ is None else environ, service_name=service_name
        )
        if config is None:
            return None
        tracing = cls.from_config(config)
        log.info(
            "tracing on",
            extra={
                "exporter": config.exporter,
                "protocol": config.protocol,
                "endpoint": config.endpoint or "(default)",
                "sampler": config.sampler,
                "ratio": config.ratio,
                "service_name": config.service_name,
            },
        )
        return tracing

    @classmethod
    def to_exporter(
        cls,
        exporter: SpanExporter,
        *,
        service_name: str = "switchboard",
        sampler: Sampler = ALWAYS_ON,
    ) -> Tracing:
        """Tracing that hands every span to ``exporter`` as it ends (tests, tools)."""
        provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            sampler=NoBackgroundRoots(sampler),
        )
        processor: SpanProcessor = SimpleSpanProcessor(exporter)
        provider.add_span_processor(processor)
        return cls(provider, TracingConfig(exporter="custom", service_name=service_name))

    def tracer(self, name: str) -> trace.Tracer:
        return self.provider.get_tracer(name)

    def server_interceptor(self) -> aio.ServerInterceptor[Any, Any]:
        """A span per call, the caller's trace context as its parent; health excluded.

        Our own interceptor on the OpenTelemetry API, not the instrumentation
        package's aio one (``platform/observe/rpcspans.py``, docs/decisions.md, 33).
        """
        from switchboard.platform.observe.rpcspans import ServerSpans

        return ServerSpans(self.tracer("switchboard.rpc"), _not_health)

    def client_interceptors(self) -> list[Any]:
        """A span per outgoing call, and its trace context in the call's metadata."""
        if self._client_interceptors is None:
            from grpc import aio
            from opentelemetry.instrumentation.grpc import aio_client_interceptors

            from switchboard.platform.observe.clientspans import StreamSpans

            made = aio_client_interceptors(tracer_provider=self.provider)  # type: ignore[no-untyped-call]
            # Its unary interceptors as they are; streaming calls get spans that end
            # with the call (platform/observe/clientspans.py), whoever stops reading it.
            unary = [
                i
                for i in made
                if not isinstance(
                    i, (aio.UnaryStreamClientInterceptor, aio.StreamStreamClientInterceptor)
                )
            ]
            streams = StreamSpans(self.provider.get_tracer("switchboard.grpc.client"))
            self._client_interceptors = [*unary, streams]
        return self._client_interceptors

    def instrument_http(self, client: httpx.AsyncClient) -> None:
        """A span per request of ``client``, and ``traceparent`` in its headers."""
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=self.provider)

    def shutdown(self) -> None:
        """Export what is buffered, then stop (at process shutdown)."""
        try:
            self.provider.force_flush()
        finally:
            self.provider.shutdown()


# -- the process's tracing ----------------------------------------------------------

_installed: Tracing | None = None
_installs = 0


def install(tracing: Tracing | None) -> Callable[[], None]:
    """Make ``tracing`` the process's (None: leave it off); returns the undo.

    Servers built in one process share one (tests that run two services in
    one process install the same object twice; the last undo removes it).
    """
    global _installed, _installs  # noqa: PLW0603 - the one ambient object, see the module doc
    if tracing is None:
        return lambda: None
    if _installed is not tracing:
        if _installed is not None:
            log.warning("replacing this process's tracing")
        _installed, _installs = tracing, 0
    _installs += 1
    done = False

    def undo() -> None:
        global _installed, _installs  # noqa: PLW0603
        nonlocal done
        if done or _installed is not tracing:
            return
        done = True
        _installs -= 1
        if _installs <= 0:
            _installed, _installs = None, 0

    return undo


def installed() -> Tracing | None:
    """The process's tracing, or None when it is off."""
    return _installed


def tracer(name: str) -> trace.Tracer | None:
    """A tracer of the process's tracing, or None when it is off (ask once, at build time)."""
    return _installed.tracer(name) if _installed is not None else None


def client_interceptors() -> list[Any] | None:
    """Interceptors for a new service-to-service channel (None when tracing is off)."""
    return _installed.client_interceptors() if _installed is not None else None


def instrument_http(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """``client``, instrumented when tracing is on."""
    if _installed is not None:
        _installed.instrument_http(client)
    return client


@contextlib.contextmanager
def http_request_span(
    method: str, url: str, headers: dict[str, str]
) -> Iterator[Callable[[int], None]]:
    """A CLIENT span for one HTTP request sent by a client no instrumentation covers
    (the llm handler's aiohttp), from the request until its response's head, named and
    attributed as opentelemetry-instrumentation-httpx names its own; ``traceparent``
    goes into ``headers``. Yields the setter of the response's status. Without tracing:
    nothing, at no cost."""
    if _installed is None:
        yield _no_status
        return
    parts = urllib.parse.urlsplit(url)
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "url.full": urllib.parse.urlunsplit(parts._replace(query="", fragment="")),
        "server.address": parts.hostname or "",
    }
    if parts.port is not None:
        attributes["server.port"] = parts.port
    tracer = _installed.provider.get_tracer("switchboard.http")
    with tracer.start_as_current_span(method, kind=SpanKind.CLIENT, attributes=attributes) as span:
        inject(headers)

        def answered(status: int) -> None:
            span.set_attribute("http.response.status_code", status)
            if status >= 400:
                span.set_status(StatusCode.ERROR)

        yield answered


def _no_status(_status: int) -> None:
    return None


# -- trace context ------------------------------------------------------------------


def current_ids() -> tuple[str, str] | None:
    """The current span's trace id and span id (hex), or None outside a recorded trace."""
    found = trace.get_current_span().get_span_context()
    if not found.is_valid:
        return None
    return format(found.trace_id, "032x"), format(found.span_id, "016x")


def traceparent() -> str:
    """The W3C ``traceparent`` of the current span ("" outside a trace)."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent", "")


def parent_from(traceparent_value: str) -> otel_context.Context:
    """A context whose parent is the span ``traceparent_value`` names (a new trace if "")."""
    if not traceparent_value:
        return otel_context.Context()
    return extract({"traceparent": traceparent_value}, context=otel_context.Context())


def untraced() -> contextvars.Context:
    """A copy of the current context without its trace, for a task that outlives the
    call that starts it (a shared writer, a relay): its spans are not the call's."""
    copied = contextvars.copy_context()
    copied.run(otel_context.attach, otel_context.Context())
    return copied
