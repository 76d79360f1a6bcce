"""Prometheus metrics of one process: the definitions, scrape-time readings, the endpoint.

One ``Metrics`` object per process, built by the composition root
(``switchboard.mesh.create_server``) and passed by constructor to what
records on a hot path: the interceptor (RPCs), the dispatcher (runs), the
bus (event log appends), the hub (tool calls). It owns its own registry, never
prometheus_client's global default one, so two servers in one test process
stay apart. Everything that is a current state (queue depth, subscribers,
breakers, the database pool, dependency health) is read when Prometheus
scrapes, from the objects that already hold it (``observe``), so nothing
pays for it between scrapes.

Every metric is declared in ``SPECS`` (name, type, labels, help) and
documented in docs/metrics.md; a test checks both, and that the Grafana
dashboard (deploy/grafana/switchboard.json) names no other. Labels take
bounded values only: method names of registered services, status code
names, handler ids of the operator's registry (``workspace`` for every
workspace's own expert), integration kinds, states. Never a user, workspace,
conversation, run or integration id.

The endpoint (``MetricsEndpoint``) serves the text format on its own port
(``SWITCHBOARD_METRICS_PORT``) from the event loop: the readings are taken
on the loop that owns the state they read, so they need no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("switchboard.metrics")

Kind = Literal["counter", "gauge", "histogram"]
#: One reading of a scraped metric: its label values (in the spec's order) and value.
Sample = tuple[tuple[str, ...], float]
Reader = Callable[[], Iterable[Sample]]

#: Latency of calls with one response (health checks to database writes).
RPC_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)  # fmt: skip
#: Runs: an echo answers in milliseconds, a model in seconds, a tool run in minutes.
RUN_BUCKETS: Final = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0
)  # fmt: skip
QUEUE_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0
)  # fmt: skip
APPEND_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
)  # fmt: skip
TOOL_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0
)  # fmt: skip

#: The label value of runs answered by a workspace's own expert (its id is the workspace's).
WORKSPACE_HANDLER: Final = "workspace"


@dataclass(frozen=True)
class Spec:
    """One metric: its exposed name (counters end in ``_total``), type, labels, meaning."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    #: Read at scrape time (``Metrics.observe``) rather than recorded as it happens.
    scraped: bool = False
    buckets: tuple[float, ...] = ()


SPECS: Final[tuple[Spec, ...]] = (
    # RPCs (platform/rpc/interceptors.py).
    Spec(
        "switchboard_rpc_requests_total",
        "counter",
        "Calls finished, by method and gRPC status code.",
        ("method", "code"),
    ),
    Spec(
        "switchboard_rpc_duration_seconds",
        "histogram",
        "Duration of calls with one response (unary and client streaming), by method.",
        ("method",),
        buckets=RPC_BUCKETS,
    ),
    Spec(
        "switchboard_rpc_in_flight",
        "gauge",
        "Calls in progress, open streams included, by method.",
        ("method",),
    ),
    # Runs (dispatcher/runs/: execution.py, finishing.py, recovery.py, scheduler.py).
    Spec(
        "switchboard_runs_active",
        "gauge",
        "Runs this process owns that have not ended, by state.",
        ("state",),
        scraped=True,
    ),
    Spec(
        "switchboard_runs_ended_total",
        "counter",
        "Runs that reached a terminal state in this process, by handler and state.",
        ("handler", "state"),
    ),
    Spec(
        "switchboard_run_duration_seconds",
        "histogram",
        "From a run's start (RUNNING) to its end, by handler and terminal state.",
        ("handler", "state"),
        buckets=RUN_BUCKETS,
    ),
    Spec(
        "switchboard_run_queue_wait_seconds",
        "histogram",
        "From a run's admission to the scheduler to its start.",
        buckets=QUEUE_BUCKETS,
    ),
    # Streams and the event log (events/, platform/events/bus.py, platform/events/eventlog.py).
    Spec(
        "switchboard_subscribers",
        "gauge",
        "Open subscriptions: event subscriptions (Subscribe, Stream) and run watchers "
        "(WatchRun, Converse).",
        ("stream",),
        scraped=True,
    ),
    Spec(
        "switchboard_event_subscriber_backlog_events",
        "gauge",
        "Events delivered to this process and queued for its subscribers, not yet sent.",
        scraped=True,
    ),
    Spec(
        "switchboard_event_subscriber_backlog_max_events",
        "gauge",
        "The longest queue of one subscriber (it ends at SWITCHBOARD_EVENTS_SUBSCRIBER_BUFFER).",
        scraped=True,
    ),
    Spec(
        "switchboard_event_append_seconds",
        "histogram",
        "Time to append events to the log (one call, one or more events).",
        buckets=APPEND_BUCKETS,
    ),
    Spec(
        "switchboard_event_log_degraded",
        "gauge",
        "1 while the event log runs on its fallback (Redis unreachable), else 0.",
        scraped=True,
    ),
    Spec(
        "switchboard_event_outbox_events",
        "gauge",
        "Events waiting to reach the log: memory (held while Redis is away) or "
        "database (staged with their change, being published by this process).",
        ("outbox",),
        scraped=True,
    ),
    # Integrations (platform/resilience/breaker.py, integration/tools.py).
    Spec(
        "switchboard_breakers",
        "gauge",
        "Integration circuits this process holds state for, by state.",
        ("state",),
        scraped=True,
    ),
    Spec(
        "switchboard_breaker_transitions_total",
        "counter",
        "Integration circuit changes this process made, by the state entered.",
        ("state",),
        scraped=True,
    ),
    # Phone calls (dispatcher/talk/sip).
    Spec(
        "switchboard_sip_calls",
        "gauge",
        "Phone calls this process carries: ringing (being admitted) or answered.",
        ("state",),
        scraped=True,
    ),
    Spec(
        "switchboard_sip_refused_total",
        "counter",
        "INVITEs this process refused, by the SIP status answered.",
        ("code",),
        scraped=True,
    ),
    # Phone calls over carriers' media streams (dispatcher/talk/streams).
    Spec(
        "switchboard_media_streams_calls",
        "gauge",
        "Media-stream phone calls this process carries (being admitted or answered), by carrier.",
        ("carrier",),
        scraped=True,
    ),
    Spec(
        "switchboard_tool_call_duration_seconds",
        "histogram",
        "Tool calls through the hub, by integration kind and outcome.",
        ("kind", "outcome"),
        buckets=TOOL_BUCKETS,
    ),
    # Budgets (dispatcher/budgets/): what runs spend and what their caps refuse.
    Spec(
        "switchboard_spend_micros_total",
        "counter",
        "Cost of ended runs in micro-units of the price table's currency, by model.",
        ("model",),
    ),
    Spec(
        "switchboard_budget_reservations_total",
        "counter",
        "Budget reservations of run steps, by outcome (reserved, refused, overdraft).",
        ("outcome",),
    ),
    Spec(
        "switchboard_budget_refusals_total",
        "counter",
        "Messages refused at admission by a budget, by reason "
        "(budget_exhausted, model_not_priced).",
        ("reason",),
    ),
    # Dependencies (platform/store/db.py, mesh.py health entries).
    Spec(
        "switchboard_db_pool_connections",
        "gauge",
        "Pooled database connections, by state (checked_out, idle).",
        ("state",),
        scraped=True,
    ),
    Spec(
        "switchboard_db_pool_max_connections",
        "gauge",
        "Most pooled database connections (pool size plus overflow).",
        scraped=True,
    ),
    Spec(
        "switchboard_dependency_up",
        "gauge",
        "1 while a dependency answers (its health entry switchboard.<dependency> is "
        "SERVING), else 0.",
        ("dependency",),
        scraped=True,
    ),
    Spec(
        "switchboard_dependency_outages_total",
        "counter",
        "Times a dependency's health entry turned NOT_SERVING.",
        ("dependency",),
        scraped=True,
    ),
)

#: Families prometheus_client's ProcessCollector adds (documented, not ours to define).
PROCESS_METRICS: Final = (
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
)

_SUFFIXES: Final = {
    "counter": ("", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


def series_names() -> frozenset[str]:
    """Every series name the endpoint may expose (``_bucket``, ``_count``... included)."""
    names = {spec.name + suffix for spec in SPECS for suffix in _SUFFIXES[spec.kind]}
    names.update(
        spec.name.removesuffix("_total") + "_created" for spec in SPECS if spec.kind == "counter"
    )
    names.update(PROCESS_METRICS)
    return frozenset(names)


class RpcMetrics:
    """One method's metrics, with its labelled children cached: a call costs a few µs."""

    __slots__ = ("_codes", "_method", "_requests", "duration", "in_flight")

    def __init__(self, metrics: Metrics, method: str, *, timed: bool) -> None:
        self._method = method
        self._requests = metrics.rpc_requests
        self._codes: dict[str, Counter] = {}
        self.in_flight = metrics.rpc_in_flight.labels(method)
        self.duration = metrics.rpc_duration.labels(method) if timed else None

    def ended(self, code: str, seconds: float) -> None:
        """The call ended with ``code`` (a status code's name) after ``seconds``."""
        self.in_flight.dec()
        counter = self._codes.get(code)
        if counter is None:
            counter = self._codes[code] = self._requests.labels(self._method, code)
        counter.inc()
        if self.duration is not None:
            self.duration.observe(seconds)


class Metrics:
    """The metrics of one process, in a registry of its own."""

    def __init__(self, *, process: bool = False) -> None:
        self.registry = CollectorRegistry()
        self._specs = {spec.name: spec for spec in SPECS}
        self._readers: dict[str, list[Reader]] = {}
        registry = self.registry
        self.rpc_requests = self._counter("switchboard_rpc_requests_total")
        self.rpc_duration = self._histogram("switchboard_rpc_duration_seconds")
        spec = self._specs["switchboard_rpc_in_flight"]
        self.rpc_in_flight = Gauge(spec.name, spec.help, spec.labels, registry=registry)
        self.runs_ended = self._counter("switchboard_runs_ended_total")
        self.run_duration = self._histogram("switchboard_run_duration_seconds")
        self.run_queue_wait = self._histogram("switchboard_run_queue_wait_seconds")
        self.event_append = self._histogram("switchboard_event_append_seconds")
        self.tool_calls = self._histogram("switchboard_tool_call_duration_seconds")
        self.spend_micros = self._counter("switchboard_spend_micros_total")
        self.budget_reservations = self._counter("switchboard_budget_reservations_total")
        self.budget_refusals = self._counter("switchboard_budget_refusals_total")
        registry.register(_Scraped(self))
        if process:
            # The process's CPU, memory and file descriptors (Linux /proc).
            ProcessCollector(registry=registry)

    def _counter(self, name: str) -> Counter:
        spec = self._specs[name]
        return Counter(name.removesuffix("_total"), spec.help, spec.labels, registry=self.registry)

    def _histogram(self, name: str) -> Histogram:
        spec = self._specs[name]
        return Histogram(name, spec.help, spec.labels, buckets=spec.buckets, registry=self.registry)

    # -- recording -------------------------------------------------------------------

    def rpc(self, method: str, *, timed: bool) -> RpcMetrics:
        """``method``'s metrics (``/package.Service/Method``); ``timed``: one response."""
        return RpcMetrics(self, method.removeprefix("/"), timed=timed)

    def run_ended(self, handler: str, state: str, duration_s: float | None) -> None:
        """A run ended in ``state`` (RunState name without its prefix, lower case)."""
        self.runs_ended.labels(handler, state).inc()
        if duration_s is not None:
            self.run_duration.labels(handler, state).observe(duration_s)

    def tool_call(self, kind: str, outcome: str, duration_s: float) -> None:
        self.tool_calls.labels(kind, outcome).observe(duration_s)

    def spend(self, model: str, micros: int) -> None:
        """A run ended having spent ``micros`` on ``model`` (``provider/model``)."""
        if micros > 0:
            self.spend_micros.labels(model or "none").inc(micros)

    def budget_reservation(self, outcome: str) -> None:
        """``reserved``, ``refused`` or ``overdraft``."""
        self.budget_reservations.labels(outcome).inc()

    def budget_refusal(self, reason: str) -> None:
        """``budget_exhausted`` or ``model_not_priced``."""
        self.budget_refusals.labels(reason).inc()

    # -- scrape-time readings ------------------------------------------------------------

    def observe(self, name: str, read: Reader) -> None:
        """Read ``name`` (a scraped metric of ``SPECS``) with ``read`` at every scrape.

        Several readers of one name add their samples (one per process part).
        """
        spec = self._specs.get(name)
        if spec is None or not spec.scraped:
            raise ValueError(f"{name} is not a scraped metric of SPECS")
        self._readers.setdefault(name, []).append(read)

    def readings(self) -> Iterator[Metric]:
        for spec in SPECS:
            if not spec.scraped:
                continue
            family: GaugeMetricFamily | CounterMetricFamily
            if spec.kind == "counter":
                family = CounterMetricFamily(
                    spec.name.removesuffix("_total"), spec.help, labels=spec.labels
                )
            else:
                family = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
            for read in self._readers.get(spec.name, ()):
                try:
                    samples = list(read())
                except Exception:  # a broken reader must not fail the scrape
                    log.exception("metric reading failed", extra={"metric": spec.name})
                    continue
                for labels, value in samples:
                    family.add_metric(list(labels), value)
            yield family

    def text(self) -> bytes:
        """The exposition text of everything in the registry."""
        return generate_latest(self.registry)


class _Scraped(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics.readings()

    def describe(self) -> Iterable[Metric]:
        return ()


def run_state_label(name: str) -> str:
    """``RUN_STATE_SUCCEEDED`` -> ``succeeded``."""
    return name.removeprefix("RUN_STATE_").lower()


# -- the endpoint ----------------------------------------------------------------------------

#: Bounds on one scrape request: its head's size and the time it may take to arrive.
_MAX_HEAD_BYTES: Final = 16 * 1024
_READ_TIMEOUT_S: Final = 10.0
METRICS_PATH: Final = "/metrics"


class MetricsEndpoint:
    """Prometheus text over HTTP/1.1 on its own port, served from the event loop."""

    def __init__(self, metrics: Metrics, server: asyncio.Server) -> None:
        self.metrics = metrics
        self._server = server
        sockets = server.sockets
        self.port = int(sockets[0].getsockname()[1]) if sockets else 0

    @classmethod
    async def open(cls, metrics: Metrics, host: str, port: int) -> MetricsEndpoint:
        """Bind (``port`` 0 picks a free one) and serve; raises OSError if it cannot bind."""
        holder: list[MetricsEndpoint] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await holder[0]._serve(reader, writer)

        server = await asyncio.start_server(handle, host, port, reuse_address=True)
        endpoint = cls(metrics, server)
        holder.append(endpoint)
        return endpoint

    async def close(self) -> None:
        self._server.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body, content_type = self._answer(head)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if head.startswith(b"HEAD ") else body)
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that sent no complete request gets nothing
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        if len(head) > _MAX_HEAD_BYTES:
            return "431 Request Header Fields Too Large", b"", "text/plain"
        method, _, rest = head.partition(b" ")
        target = rest.split(b" ", 1)[0].decode("latin-1")
        path = target.split("?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET only\n", "text/plain"
        if path not in (METRICS_PATH, "/"):
            return "404 Not Found", b"metrics are at /metrics\n", "text/plain"
        started = time.perf_counter()
        body = self.metrics.text()
        log.debug("metrics scraped", extra={"ms": round((time.perf_counter() - started) * 1000, 3)})
        return "200 OK", body, CONTENT_TYPE_LATEST
