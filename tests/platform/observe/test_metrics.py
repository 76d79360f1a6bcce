"""platform/observe/metrics.py: definitions, scrape-time readings, the endpoint, dashboard, docs."""

from __future__ import annotations

import asyncio
import functools
import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from switchboard.platform.observe.metrics import (
    SPECS,
    Metrics,
    MetricsEndpoint,
    run_state_label,
    series_names,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "deploy" / "grafana" / "switchboard.json"
DOCS = ROOT / "docs" / "metrics.md"
_METRIC_NAME = re.compile(r"\b(?:switchboard|process)_[a-z0-9_]+\b")


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.text().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_names_follow_the_conventions() -> None:
    names = [spec.name for spec in SPECS]
    assert len(names) == len(set(names))
    for spec in SPECS:
        assert spec.name.startswith("switchboard_")
        assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.name)
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds"), spec.name
            assert spec.buckets, spec.name
        # No label may name something users create.
        assert not {"user", "workspace", "conversation", "run", "integration", "id"} & set(
            spec.labels
        )


def _one(labels: tuple[str, ...]) -> list[tuple[tuple[str, ...], float]]:
    return [(labels, 1.0)]


def test_two_processes_in_one_interpreter_keep_their_own_registries() -> None:
    first, second = Metrics(), Metrics()
    first.rpc("/a.v1.S/M", timed=True).in_flight.inc()
    rpc = first.rpc("/a.v1.S/M", timed=True)
    rpc.ended("OK", 0.002)
    found = samples(first)
    assert found[("switchboard_rpc_requests_total", (("code", "OK"), ("method", "a.v1.S/M")))] == 1
    assert found[("switchboard_rpc_duration_seconds_count", (("method", "a.v1.S/M"),))] == 1
    assert found[("switchboard_rpc_in_flight", (("method", "a.v1.S/M"),))] == 0
    assert not any(name == "switchboard_rpc_requests_total" for name, _ in samples(second))


def test_streams_are_counted_but_not_timed() -> None:
    metrics = Metrics()
    rpc = metrics.rpc("/a.v1.S/Watch", timed=False)
    rpc.in_flight.inc()
    rpc.ended("CANCELLED", 30.0)
    found = samples(metrics)
    key = ("switchboard_rpc_requests_total", (("code", "CANCELLED"), ("method", "a.v1.S/Watch")))
    assert found[key] == 1
    assert not any(name.startswith("switchboard_rpc_duration") for name, _ in found)


def test_scraped_readings_add_up_and_a_broken_reader_does_not_fail_the_scrape() -> None:
    metrics = Metrics()
    metrics.observe("switchboard_subscribers", lambda: [(("events",), 3)])
    metrics.observe("switchboard_subscribers", lambda: [(("runs",), 2)])

    def broken() -> list[tuple[tuple[str, ...], float]]:
        raise RuntimeError("a reader's bug")

    metrics.observe("switchboard_runs_active", broken)
    metrics.observe("switchboard_breaker_transitions_total", lambda: [(("open",), 4)])
    found = samples(metrics)
    assert found[("switchboard_subscribers", (("stream", "events"),))] == 3
    assert found[("switchboard_subscribers", (("stream", "runs"),))] == 2
    assert found[("switchboard_breaker_transitions_total", (("state", "open"),))] == 4
    with pytest.raises(ValueError, match="not a scraped metric"):
        metrics.observe("switchboard_rpc_requests_total", lambda: [])
    with pytest.raises(ValueError, match="not a scraped metric"):
        metrics.observe("switchboard_no_such_thing", lambda: [])


def test_every_exposed_series_is_declared() -> None:
    metrics = Metrics(process=True)
    metrics.rpc("/a.v1.S/M", timed=True).ended("OK", 0.1)
    metrics.run_ended("echo", run_state_label("RUN_STATE_SUCCEEDED"), 0.5)
    metrics.run_queue_wait.observe(0.01)
    metrics.event_append.observe(0.001)
    metrics.tool_call("mcp_server", "ok", 0.2)
    metrics.spend("p/m", 12)
    metrics.budget_reservation("reserved")
    metrics.budget_refusal("budget_exhausted")
    for spec in SPECS:
        if spec.scraped:
            metrics.observe(spec.name, functools.partial(_one, ("x",) * len(spec.labels)))
    exposed = {name for name, _ in samples(metrics)}
    assert exposed <= series_names()
    assert {spec.name for spec in SPECS if spec.kind != "histogram"} <= exposed
    assert run_state_label("RUN_STATE_DEADLINE_EXCEEDED") == "deadline_exceeded"


async def _request(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


async def test_the_endpoint_serves_text_on_a_port_of_its_own() -> None:
    metrics = Metrics()
    metrics.rpc("/a.v1.S/M", timed=True).ended("OK", 0.1)
    endpoint = await MetricsEndpoint.open(metrics, "127.0.0.1", 0)
    try:
        assert endpoint.port > 0
        answer = await _request(endpoint.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"text/plain; version=" in head
        assert b'switchboard_rpc_requests_total{code="OK",method="a.v1.S/M"} 1.0' in body
        missing = await _request(endpoint.port, b"GET /other HTTP/1.1\r\n\r\n")
        assert missing.startswith(b"HTTP/1.1 404")
        posted = await _request(endpoint.port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert posted.startswith(b"HTTP/1.1 405")
        head_only = await _request(endpoint.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head_only.startswith(b"HTTP/1.1 200")
        assert head_only.endswith(b"\r\n\r\n")
    finally:
        await endpoint.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", endpoint.port)


def _expressions(node: object) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_expressions(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_expressions(item))
    return found


def test_the_dashboard_names_only_metrics_the_code_defines() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    expressions = _expressions(dashboard["panels"])
    assert expressions
    known = series_names()
    used = set()
    for expr in expressions:
        names = set(_METRIC_NAME.findall(expr))
        assert names, f"no metric in {expr!r}"
        assert names <= known, f"undefined metrics {names - known} in {expr!r}"
        used |= names
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    # The main signals each have a panel.
    for spec in SPECS:
        base = spec.name + ("_bucket" if spec.kind == "histogram" else "")
        assert base in used, f"{spec.name} has no panel"


def test_docs_describe_every_metric_and_setting() -> None:
    text = DOCS.read_text()
    for spec in SPECS:
        assert f"`{spec.name}`" in text, spec.name
        for label in spec.labels:
            assert f"`{label}`" in text, (spec.name, label)
    for variable in ("SWITCHBOARD_METRICS_PORT", "SWITCHBOARD_METRICS_HOST"):
        assert variable in text
    assert "deploy/grafana/switchboard.json" in text


def test_the_mesh_launcher_reads_each_process_s_metrics_port() -> None:
    from switchboard.deploy.processes import _listening_port

    json_line = '{"message": "switchboard listening", "port": 5001, "metrics_port": 9464}'
    assert _listening_port(json_line) == 5001
    assert _listening_port(json_line, "metrics_port") == 9464
    text_line = "INFO switchboard listening address=127.0.0.1:5001 port=5001 metrics_port=9464"
    assert _listening_port(text_line) == 5001
    assert _listening_port(text_line, "metrics_port") == 9464
    assert _listening_port("INFO switchboard listening port=5001", "metrics_port") == 0


def test_tool_call_labels_are_bounded() -> None:
    from google.rpc import code_pb2, status_pb2

    from switchboard.api.integration.v1 import integration_pb2 as ipb
    from switchboard.integration.ports.connectors import ToolResult
    from switchboard.integration.tools import _kind_label, _outcome

    assert _kind_label(ipb.INTEGRATION_KIND_MCP_SERVER) == "mcp_server"
    assert _kind_label(ipb.INTEGRATION_KIND_GRPC_HANDLER) == "grpc_handler"
    ok = status_pb2.Status(code=code_pb2.OK)
    assert _outcome(ok, None) == "ok"
    failed = status_pb2.Status(code=code_pb2.UNAVAILABLE, message="a message is no label")
    assert _outcome(failed, None) == "unavailable"
    assert _outcome(ok, ToolResult(text="no", is_error=True)) == "tool_error"
