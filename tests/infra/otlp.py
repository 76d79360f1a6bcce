"""A real OTLP/gRPC receiver for the tests: the collector's TraceService and MetricsService.

It serves ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` and
``opentelemetry.proto.collector.metrics.v1.MetricsService/Export`` (the messages
of ``opentelemetry-proto``) on 127.0.0.1, port 0 (the kernel picks a free port,
nothing is raced), from a thread-based ``grpc.server``: synchronous tests and
async tests (their exporters in-process or in other processes, Envoy's too)
use it alike. It keeps what it received, flattened into plain values::

    with OtlpReceiver() as otlp:
        env = otlp.env()                      # OTEL_* for a process exporting here
        ...                                   # a call that crosses the mesh
        server = otlp.wait_for_span(lambda s: s.kind == "SERVER", "the server span")
        otlp.trace(server.trace_id)           # every span of that trace, in start order
        otlp.children_of(server)              # its direct children
        otlp.wait_for_metric("rpc.server.duration")

Waiting is on a condition variable that every Export notifies, bounded by a
timeout that fails with what did arrive (the trace as a tree): no sleeps. The
async twins (``await otlp.span_arrives(...)``) wait in a worker thread, so an
exporter on the test's own event loop keeps running meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

T = TypeVar("T")

WAIT_S: Final = 30.0
TRACE_SERVICE: Final = "opentelemetry.proto.collector.trace.v1.TraceService"
METRICS_SERVICE: Final = "opentelemetry.proto.collector.metrics.v1.MetricsService"

#: Span kinds by their OTLP number, without the ``SPAN_KIND_`` prefix ("SERVER", "CLIENT"...).
_KINDS: Final = {
    value.number: value.name.removeprefix("SPAN_KIND_")
    for value in trace_pb2.Span.SpanKind.DESCRIPTOR.values
}
_STATUS: Final = {
    value.number: value.name.removeprefix("STATUS_CODE_")
    for value in trace_pb2.Status.StatusCode.DESCRIPTOR.values
}


def _value(any_value: common_pb2.AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return tuple(_value(item) for item in any_value.array_value.values)
    if kind == "kvlist_value":
        return _attributes(any_value.kvlist_value.values)
    return getattr(any_value, kind)


def _attributes(pairs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class Link:
    """A span's link to another span (a run's execution linked to its SendMessage)."""

    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Span:
    """One span, flattened; ids are lowercase hex (``parent_span_id`` is "" for a root)."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    #: "SERVER", "CLIENT", "INTERNAL", "PRODUCER", "CONSUMER" or "UNSPECIFIED".
    kind: str
    #: The resource's ``service.name`` ("" when it has none).
    service: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    links: tuple[Link, ...]
    #: "UNSET", "OK" or "ERROR".
    status: str
    status_message: str
    start_ns: int
    end_ns: int
    #: The instrumentation scope's name (``opentelemetry.instrumentation.grpc``...).
    scope: str
    events: tuple[str, ...] = ()
    #: The low byte of the span's OTLP ``flags`` (W3C trace flags; many exporters send 0).
    flags: int = 0

    def __str__(self) -> str:
        parent = self.parent_span_id or "root"
        return f"{self.service}: {self.kind} {self.name!r} {self.span_id} (parent {parent})"


@dataclass(frozen=True)
class Point:
    """One data point: a sum's or gauge's ``value``, or a histogram's count, sum and buckets."""

    attributes: dict[str, Any]
    value: float | int | None = None
    count: int = 0
    sum: float = 0.0
    bucket_counts: tuple[int, ...] = ()
    explicit_bounds: tuple[float, ...] = ()
    time_ns: int = 0


@dataclass(frozen=True)
class Metric:
    """One metric of one export: its points as they were at that export."""

    name: str
    #: "sum", "gauge", "histogram", "exponential_histogram" or "summary".
    kind: str
    unit: str
    description: str
    service: str
    resource: dict[str, Any]
    scope: str
    points: tuple[Point, ...]
    #: For sums: whether it only grows, and "CUMULATIVE" or "DELTA".
    monotonic: bool = False
    temporality: str = ""


def _hex(raw: bytes) -> str:
    return raw.hex()


def _span(span: trace_pb2.Span, service: str, resource: dict[str, Any], scope: str) -> Span:
    return Span(
        trace_id=_hex(span.trace_id),
        span_id=_hex(span.span_id),
        parent_span_id=_hex(span.parent_span_id),
        name=span.name,
        kind=_KINDS.get(span.kind, str(span.kind)),
        service=service,
        attributes=_attributes(span.attributes),
        resource=resource,
        links=tuple(
            Link(_hex(link.trace_id), _hex(link.span_id), _attributes(link.attributes))
            for link in span.links
        ),
        status=_STATUS.get(span.status.code, str(span.status.code)),
        status_message=span.status.message,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        scope=scope,
        events=tuple(event.name for event in span.events),
        flags=span.flags & 0xFF,
    )


def _number(point: metrics_pb2.NumberDataPoint) -> float | int | None:
    kind = point.WhichOneof("value")
    if kind == "as_int":
        return point.as_int
    if kind == "as_double":
        return point.as_double
    return None


def _points(metric: metrics_pb2.Metric) -> tuple[str, tuple[Point, ...], bool, str]:
    kind = metric.WhichOneof("data") or ""
    temporality = ""
    monotonic = False
    points: list[Point] = []
    if kind in ("sum", "gauge"):
        data = metric.sum if kind == "sum" else metric.gauge
        points = [
            Point(_attributes(p.attributes), _number(p), time_ns=p.time_unix_nano)
            for p in data.data_points
        ]
        if kind == "sum":
            monotonic = metric.sum.is_monotonic
            temporality = metrics_pb2.AggregationTemporality.Name(
                metric.sum.aggregation_temporality
            ).removeprefix("AGGREGATION_TEMPORALITY_")
    elif kind == "histogram":
        points = [
            Point(
                _attributes(p.attributes),
                count=p.count,
                sum=p.sum,
                bucket_counts=tuple(p.bucket_counts),
                explicit_bounds=tuple(p.explicit_bounds),
                time_ns=p.time_unix_nano,
            )
            for p in metric.histogram.data_points
        ]
        temporality = metrics_pb2.AggregationTemporality.Name(
            metric.histogram.aggregation_temporality
        ).removeprefix("AGGREGATION_TEMPORALITY_")
    elif kind == "exponential_histogram":
        points = [
            Point(_attributes(p.attributes), count=p.count, sum=p.sum, time_ns=p.time_unix_nano)
            for p in metric.exponential_histogram.data_points
        ]
    elif kind == "summary":
        points = [
            Point(_attributes(p.attributes), count=p.count, sum=p.sum, time_ns=p.time_unix_nano)
            for p in metric.summary.data_points
        ]
    return kind, tuple(points), monotonic, temporality


@dataclass
class _Store:
    spans: list[Span] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)
    trace_exports: int = 0
    metric_exports: int = 0
    #: The gRPC metadata of every export (an exporter's headers), in arrival order.
    metadata: list[dict[str, str]] = field(default_factory=list)


class WaitTimeout(AssertionError):
    """What a test waited for did not arrive in time."""


def _export(
    service: str, handle: Callable[[Any, Any], Any], request: Any, response: Any
) -> grpc.GenericRpcHandler[Any, Any]:
    """``service``'s one method, ``Export``, answered by ``handle``."""
    return grpc.method_handlers_generic_handler(
        service,
        {
            "Export": grpc.unary_unary_rpc_method_handler(
                handle,
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
        },
    )


class OtlpReceiver:
    """The receiver; ``endpoint`` is where an OTLP/gRPC exporter sends (``http://127.0.0.1:N``)."""

    def __init__(self, *, host: str = "127.0.0.1", workers: int = 4) -> None:
        self.host = host
        self.port = 0
        self._store = _Store()
        self._changed = threading.Condition()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="otlp-receiver"),
            handlers=[
                _export(
                    TRACE_SERVICE,
                    self._export_traces,
                    trace_service_pb2.ExportTraceServiceRequest,
                    trace_service_pb2.ExportTraceServiceResponse,
                ),
                _export(
                    METRICS_SERVICE,
                    self._export_metrics,
                    metrics_service_pb2.ExportMetricsServiceRequest,
                    metrics_service_pb2.ExportMetricsServiceResponse,
                ),
            ],
        )
        self._started = False

    # Life cycle.

    def start(self) -> OtlpReceiver:
        self.port = self._server.add_insecure_port(f"{self.host}:0")
        if self.port == 0:
            raise RuntimeError(f"the OTLP receiver could not bind {self.host}")
        self._server.start()
        self._started = True
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        if self._started:
            self._server.stop(grace_s).wait(grace_s + 5)
            self._started = False

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``HOST:PORT`` (what Envoy's ``--otlp-endpoint`` takes too)."""
        return f"{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """The OTLP/gRPC endpoint URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes it."""
        return f"http://{self.address}"

    def env(self, service_name: str | None = None, **extra: str) -> dict[str, str]:
        """``OTEL_*`` variables that make a process export its traces and metrics here,
        promptly (short batch and export intervals); ``extra`` adds or overrides some."""
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            # Batches leave within 100 ms, metrics every 500 ms: tests wait for them.
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
        }
        if service_name is not None:
            env["OTEL_SERVICE_NAME"] = service_name
        env.update(extra)
        return env

    # The two services.

    def _export_traces(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received: list[Span] = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                scope = scope_spans.scope.name
                received += [_span(s, service, resource, scope) for s in scope_spans.spans]
        with self._changed:
            self._store.spans += received
            self._store.trace_exports += 1
            self._store.metadata.append(_metadata(context))
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def _export_metrics(
        self,
        request: metrics_service_pb2.ExportMetricsServiceRequest,
        context: grpc.ServicerContext,
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        received: list[Metric] = []
        for resource_metrics in request.resource_metrics:
            resource = _attributes(resource_metrics.resource.attributes)
            service = str(resource.get("service.name", ""))
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind, points, monotonic, temporality = _points(metric)
                    received.append(
                        Metric(
                            name=metric.name,
                            kind=kind,
                            unit=metric.unit,
                            description=metric.description,
                            service=service,
                            resource=resource,
                            scope=scope_metrics.scope.name,
                            points=points,
                            monotonic=monotonic,
                            temporality=temporality,
                        )
                    )
        with self._changed:
            self._store.metrics += received
            self._store.metric_exports += 1
            self._store.metadata.append(_metadata(context))
            self._changed.notify_all()
        return metrics_service_pb2.ExportMetricsServiceResponse()

    # What arrived (snapshots: later exports do not change a returned list).

    @property
    def spans(self) -> list[Span]:
        with self._changed:
            return list(self._store.spans)

    @property
    def metrics(self) -> list[Metric]:
        with self._changed:
            return list(self._store.metrics)

    @property
    def exports(self) -> tuple[int, int]:
        """How many trace and metric Export calls arrived."""
        with self._changed:
            return self._store.trace_exports, self._store.metric_exports

    @property
    def metadata(self) -> list[dict[str, str]]:
        with self._changed:
            return list(self._store.metadata)

    def clear(self) -> None:
        """Forget everything received so far."""
        with self._changed:
            self._store = _Store()

    def trace(self, trace_id: str) -> list[Span]:
        """Every span of one trace (hex id), in start order."""
        return sorted(
            (s for s in self.spans if s.trace_id == trace_id.lower()), key=lambda s: s.start_ns
        )

    def children_of(self, span: Span) -> list[Span]:
        """The spans whose parent is ``span``, in start order."""
        return [
            s
            for s in self.trace(span.trace_id)
            if s.parent_span_id == span.span_id and s.span_id != span.span_id
        ]

    def parent_of(self, span: Span) -> Span | None:
        """The span's parent, if it arrived (None for a root or a parent in another process
        that has not exported it)."""
        if not span.parent_span_id:
            return None
        found = [s for s in self.trace(span.trace_id) if s.span_id == span.parent_span_id]
        return found[0] if found else None

    def find(
        self,
        *,
        name: str | None = None,
        service: str | None = None,
        kind: str | None = None,
        trace_id: str | None = None,
    ) -> list[Span]:
        """The spans matching every given field, in arrival order."""
        return [
            s
            for s in self.spans
            if (name is None or s.name == name)
            and (service is None or s.service == service)
            and (kind is None or s.kind == kind)
            and (trace_id is None or s.trace_id == trace_id.lower())
        ]

    def tree(self, trace_id: str) -> str:
        """One trace as an indented tree, for failure messages."""
        spans = self.trace(trace_id)
        ids = {s.span_id for s in spans}
        lines: list[str] = []

        def walk(span: Span, depth: int) -> None:
            lines.append("  " * depth + str(span))
            for child in spans:
                if child.parent_span_id == span.span_id and child is not span:
                    walk(child, depth + 1)

        for root in (s for s in spans if s.parent_span_id not in ids):
            walk(root, 0)
        return "\n".join(lines) or f"(no spans of trace {trace_id})"

    def describe(self) -> str:
        """Everything received so far, trace by trace."""
        trace_ids = list(dict.fromkeys(s.trace_id for s in self.spans))
        parts = [f"trace {t}:\n{self.tree(t)}" for t in trace_ids]
        names = sorted({m.name for m in self.metrics})
        parts.append(f"metrics: {', '.join(names) or 'none'}")
        return "\n".join(parts)

    # Waiting.

    def _wait(self, found: Callable[[], T | None], what: str, timeout_s: float) -> T:
        with self._changed:
            result = self._changed.wait_for(found, timeout=timeout_s)
        if result is None or result is False:
            raise WaitTimeout(
                f"timed out after {timeout_s:g}s waiting for {what}; received:\n{self.describe()}"
            )
        return result

    def wait_for_spans(
        self,
        predicate: Callable[[Span], bool],
        what: str = "spans",
        *,
        count: int = 1,
        timeout_s: float = WAIT_S,
    ) -> list[Span]:
        """At least ``count`` spans matching ``predicate`` (all of them, in arrival order)."""

        def found() -> list[Span] | None:
            matching = [s for s in self._store.spans if predicate(s)]
            return matching if len(matching) >= count else None

        return self._wait(found, what, timeout_s)

    def wait_for_span(
        self, predicate: Callable[[Span], bool], what: str = "a span", *, timeout_s: float = WAIT_S
    ) -> Span:
        """The first span matching ``predicate``."""
        return self.wait_for_spans(predicate, what, timeout_s=timeout_s)[0]

    def wait_for_trace(
        self,
        trace_id: str,
        complete: Callable[[list[Span]], bool],
        what: str = "the trace",
        *,
        timeout_s: float = WAIT_S,
    ) -> list[Span]:
        """The spans of ``trace_id`` (start order) once ``complete(spans)`` says so."""
        trace_id = trace_id.lower()

        def found() -> list[Span] | None:
            spans = sorted(
                (s for s in self._store.spans if s.trace_id == trace_id), key=lambda s: s.start_ns
            )
            return spans if complete(spans) else None

        return self._wait(found, f"{what} ({trace_id})", timeout_s)

    def wait_for_metric(
        self,
        name: str,
        predicate: Callable[[Metric], bool] = lambda _metric: True,
        *,
        timeout_s: float = WAIT_S,
    ) -> Metric:
        """The latest export of metric ``name`` that satisfies ``predicate``."""

        def found() -> Metric | None:
            for metric in reversed(self._store.metrics):
                if metric.name == name and predicate(metric):
                    return metric
            return None

        return self._wait(found, f"metric {name}", timeout_s)

    # From async tests: the wait runs in a thread, the event loop keeps going.

    async def spans_arrive(
        self,
        predicate: Callable[[Span], bool],
        what: str = "spans",
        *,
        count: int = 1,
        timeout_s: float = WAIT_S,
    ) -> list[Span]:
        return await asyncio.to_thread(
            self.wait_for_spans, predicate, what, count=count, timeout_s=timeout_s
        )

    async def span_arrives(
        self, predicate: Callable[[Span], bool], what: str = "a span", *, timeout_s: float = WAIT_S
    ) -> Span:
        return (await self.spans_arrive(predicate, what, timeout_s=timeout_s))[0]

    async def trace_arrives(
        self,
        trace_id: str,
        complete: Callable[[list[Span]], bool],
        what: str = "the trace",
        *,
        timeout_s: float = WAIT_S,
    ) -> list[Span]:
        return await asyncio.to_thread(
            self.wait_for_trace, trace_id, complete, what, timeout_s=timeout_s
        )

    async def metric_arrives(
        self,
        name: str,
        predicate: Callable[[Metric], bool] = lambda _metric: True,
        *,
        timeout_s: float = WAIT_S,
    ) -> Metric:
        return await asyncio.to_thread(self.wait_for_metric, name, predicate, timeout_s=timeout_s)


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    return {
        key: value if isinstance(value, str) else value.decode(errors="replace")
        for key, value in context.invocation_metadata()
    }


def traceparent(trace_id: str, span_id: str, *, sampled: bool = True) -> str:
    """A W3C ``traceparent`` header value for a client-made parent span."""
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def points_by(metric: Metric, *keys: str) -> Mapping[tuple[Any, ...], Point]:
    """A metric's points keyed by the values of ``keys`` among their attributes."""
    return {tuple(p.attributes.get(k) for k in keys): p for p in metric.points}


__all__ = [
    "Link",
    "Metric",
    "OtlpReceiver",
    "Point",
    "Span",
    "WaitTimeout",
    "points_by",
    "traceparent",
]
