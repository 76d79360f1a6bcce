"""`switchboard serve` with SWITCHBOARD_METRICS_PORT set serves Prometheus text on its own port."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ServeProcess, run, tool

pytestmark = pytest.mark.e2e

CHECKS = 3


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=CALL_DEADLINE_S)
    assert response.status_code == 200
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def test_serve_exposes_metrics_on_its_metrics_port() -> None:
    with ServeProcess("--dev", env={"SWITCHBOARD_METRICS_PORT": "0"}) as serve:
        listening = serve.log[-1]
        metrics_port = int(listening["metrics_port"])
        assert metrics_port > 0
        assert metrics_port != serve.port
        assert any(
            entry.get("message") == "metrics listening"
            and entry.get("metrics_port") == metrics_port
            for entry in serve.log
        )
        for _ in range(CHECKS):
            probe = run([tool("grpc-health-probe"), f"-addr={serve.address}"])
            assert probe.returncode == 0, probe.stderr
        found = scrape(metrics_port)
        method = frozenset({("method", "grpc.health.v1.Health/Check"), ("code", "OK")})
        assert found[("switchboard_rpc_requests_total", method)] == CHECKS
        database = frozenset({("dependency", "database")})
        assert found[("switchboard_dependency_up", database)] == 1
        assert found[("process_resident_memory_bytes", frozenset())] > 0
        assert serve.terminate() == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=CALL_DEADLINE_S)


def test_serve_without_the_port_serves_no_metrics() -> None:
    with ServeProcess("--dev") as serve:
        assert serve.log[-1]["metrics_port"] == 0
        assert not any(entry.get("message") == "metrics listening" for entry in serve.log)
