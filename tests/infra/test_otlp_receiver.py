"""The tests' OTLP receiver (tests/infra/otlp.py), fed by OpenTelemetry's own OTLP/gRPC
exporters: what an exporter sends arrives flattened, with its parents, links, resource and
metric points, and waiting for what never comes fails in time with what did arrive."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

from tests.conftest import CALL_DEADLINE_S
from tests.infra.otlp import OtlpReceiver, WaitTimeout, points_by, traceparent

pytestmark = pytest.mark.unit


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def _provider(otlp: OtlpReceiver, service: str, *, batch: bool = False) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = OTLPSpanExporter(endpoint=otlp.endpoint, insecure=True, timeout=CALL_DEADLINE_S)
    processor = (
        BatchSpanProcessor(exporter, schedule_delay_millis=50)
        if batch
        else SimpleSpanProcessor(exporter)
    )
    provider.add_span_processor(processor)
    return provider


def test_spans_arrive_flattened_with_parents_and_links(otlp: OtlpReceiver) -> None:
    provider = _provider(otlp, "switchboard-test")
    tracer = provider.get_tracer("tests.otlp")
    with tracer.start_as_current_span("earlier") as earlier:
        pass
    with (
        tracer.start_as_current_span(
            "SendMessage", kind=trace.SpanKind.SERVER, attributes={"rpc.system": "grpc"}
        ) as server,
        tracer.start_as_current_span(
            "run",
            links=[trace.Link(earlier.get_span_context(), {"why": "follows"})],
            attributes={"tags": ["a", "b"], "n": 3},
        ),
    ):
        pass
    provider.shutdown()

    trace_id = format(server.get_span_context().trace_id, "032x")
    spans = otlp.wait_for_trace(trace_id, lambda spans: len(spans) == 2)
    parent, child = spans
    assert (parent.name, parent.kind, parent.service) == (
        "SendMessage",
        "SERVER",
        "switchboard-test",
    )
    assert parent.parent_span_id == ""
    assert parent.span_id == format(server.get_span_context().span_id, "016x")
    assert parent.attributes == {"rpc.system": "grpc"}
    assert parent.scope == "tests.otlp"
    assert parent.resource["service.name"] == "switchboard-test"
    assert (child.name, child.kind, child.parent_span_id) == ("run", "INTERNAL", parent.span_id)
    assert child.attributes == {"tags": ("a", "b"), "n": 3}
    [link] = child.links
    assert link.trace_id == format(earlier.get_span_context().trace_id, "032x")
    assert link.span_id == format(earlier.get_span_context().span_id, "016x")
    assert link.attributes == {"why": "follows"}
    assert otlp.children_of(parent) == [child]
    assert otlp.parent_of(child) == parent
    assert otlp.parent_of(parent) is None
    assert otlp.find(name="run") == [child]
    assert "SERVER 'SendMessage'" in otlp.tree(trace_id)
    assert otlp.exports[0] >= 1
    assert all("OTel-OTLP-Exporter-Python" in m.get("user-agent", "") for m in otlp.metadata)


def test_a_span_continues_a_remote_traceparent(otlp: OtlpReceiver) -> None:
    """The W3C context a test client sends is what the receiver shows as the parent."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    context = TraceContextTextMapPropagator().extract(
        {"traceparent": traceparent(trace_id, span_id)}
    )
    provider = _provider(otlp, "downstream")
    with provider.get_tracer("t").start_as_current_span("handle", context=context):
        pass
    provider.shutdown()
    span = otlp.wait_for_span(lambda s: s.trace_id == trace_id, "the continued span")
    assert span.parent_span_id == span_id
    assert otlp.parent_of(span) is None  # the client's span is not exported


def test_metrics_arrive_with_their_points(otlp: OtlpReceiver) -> None:
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=otlp.endpoint, insecure=True, timeout=CALL_DEADLINE_S),
        export_interval_millis=60_000,
    )
    provider = MeterProvider(
        metric_readers=[reader], resource=Resource.create({"service.name": "metered"})
    )
    meter = provider.get_meter("tests.otlp")
    calls = meter.create_counter("rpc.calls", unit="{call}", description="calls")
    latency = meter.create_histogram("rpc.latency", unit="s")
    depth = meter.create_up_down_counter("queue.depth")
    calls.add(2, {"code": "OK"})
    calls.add(1, {"code": "UNAVAILABLE"})
    latency.record(0.02, {"method": "Check"})
    latency.record(0.5, {"method": "Check"})
    depth.add(5)
    provider.force_flush()

    counter = otlp.wait_for_metric("rpc.calls")
    assert (counter.kind, counter.unit, counter.service) == ("sum", "{call}", "metered")
    assert counter.monotonic
    assert counter.temporality == "CUMULATIVE"
    by_code = points_by(counter, "code")
    assert by_code[("OK",)].value == 2
    assert by_code[("UNAVAILABLE",)].value == 1
    histogram = otlp.wait_for_metric("rpc.latency")
    [point] = histogram.points
    assert histogram.kind == "histogram"
    assert point.count == 2
    assert point.sum == pytest.approx(0.52)
    assert sum(point.bucket_counts) == 2
    assert len(point.bucket_counts) == len(point.explicit_bounds) + 1
    gauge = otlp.wait_for_metric("queue.depth", lambda m: m.points[0].value == 5)
    assert not gauge.monotonic
    provider.shutdown()


def test_waiting_for_what_never_comes_fails_in_time_saying_what_came(
    otlp: OtlpReceiver,
) -> None:
    provider = _provider(otlp, "lonely")
    with provider.get_tracer("t").start_as_current_span("only"):
        pass
    provider.shutdown()
    otlp.wait_for_span(lambda s: s.name == "only")
    started = time.monotonic()
    with pytest.raises(
        WaitTimeout, match=r"(?s)waiting for the missing span.*lonely: INTERNAL 'only'"
    ):
        otlp.wait_for_span(lambda s: s.name == "missing", "the missing span", timeout_s=0.3)
    assert time.monotonic() - started < 5
    otlp.clear()
    assert otlp.spans == []


async def test_async_tests_wait_while_their_loop_runs(otlp: OtlpReceiver) -> None:
    provider = _provider(otlp, "async", batch=True)
    tracer = provider.get_tracer("t")
    for index in range(3):
        with tracer.start_as_current_span(f"step-{index}"):
            pass
    spans = await otlp.spans_arrive(lambda s: s.service == "async", "three steps", count=3)
    assert sorted(s.name for s in spans) == ["step-0", "step-1", "step-2"]
    assert (await otlp.span_arrives(lambda s: s.name == "step-1")).service == "async"
    provider.shutdown()
