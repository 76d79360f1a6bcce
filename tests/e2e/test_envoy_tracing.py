"""Envoy joins the traces: its OpenTelemetry tracer, configured by `switchboard envoy` from the
OTEL_* variables, exports to a real OTLP receiver (tests/infra/otlp.py).

A real `switchboard serve` (exporting its own spans to the same receiver) behind a real
Envoy. A client sends a W3C ``traceparent`` with a trace id of its own: Envoy's server span
continues it, its client span (one per upstream attempt) is that span's child, and the
server's span is the child of Envoy's client span: one trace from the caller to the
handler, over native gRPC and over grpc-web. A caller that decided not to sample is obeyed.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.deploy.edge.envoy import ENVOY_SERVICE_NAME, OTLP_CLUSTER
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.envoy import EnvoyProcess, fronting
from tests.e2e.grpcweb import AUTH, ORIGIN, GrpcWeb, encode
from tests.e2e.procs import ServeProcess
from tests.infra.otlp import OtlpReceiver, Span, traceparent

pytestmark = pytest.mark.e2e

SERVER_SERVICE = "switchboard-test-server"
GET_JWKS = "switchboard.api.auth.v1.AuthService/GetJwks"


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def serve(otlp: OtlpReceiver) -> Iterator[ServeProcess]:
    with ServeProcess("--dev", env=otlp.env(SERVER_SERVICE)) as process:
        yield process


@pytest.fixture(scope="module")
def envoy(serve: ServeProcess, otlp: OtlpReceiver) -> Iterator[EnvoyProcess]:
    # The same variables the servers get: Envoy's tracer exports to the same receiver.
    yield from fronting(serve.address, allow_origins=(ORIGIN,), env=otlp.env())


def _ids() -> tuple[str, str]:
    return secrets.token_hex(16), secrets.token_hex(8)


def _envoy(spans: list[Span], kind: str) -> list[Span]:
    return [s for s in spans if s.service == ENVOY_SERVICE_NAME and s.kind == kind]


def _hops(spans: list[Span]) -> bool:
    """Envoy's server and client spans and the server's own have all arrived."""
    server = [s for s in spans if s.service == SERVER_SERVICE and s.kind == "SERVER"]
    return bool(_envoy(spans, "SERVER") and _envoy(spans, "CLIENT") and server)


def _assert_one_trace(otlp: OtlpReceiver, trace_id: str, caller_span: str) -> None:
    spans = otlp.wait_for_trace(trace_id, _hops, "Envoy's spans and the server's")
    tree = otlp.tree(trace_id)
    [ingress] = _envoy(spans, "SERVER")
    # Envoy continues the caller's trace: its span's parent is the caller's span.
    assert ingress.parent_span_id == caller_span, tree
    assert ingress.resource["service.name"] == ENVOY_SERVICE_NAME
    # One upstream attempt, the child of Envoy's server span.
    [egress] = _envoy(spans, "CLIENT")
    assert egress.parent_span_id == ingress.span_id, tree
    assert egress.attributes.get("upstream_cluster") == "switchboard", egress.attributes
    # The server continues what Envoy sent upstream in traceparent.
    [handler] = [s for s in spans if s.service == SERVER_SERVICE and s.kind == "SERVER"]
    assert handler.parent_span_id == egress.span_id, tree
    assert handler.name.endswith(GET_JWKS), tree
    # Envoy's span names are fixed (bounded); the call is in the attributes.
    assert (ingress.name, egress.name) == ("ingress", "router switchboard egress"), tree
    assert ingress.attributes["grpc.path"] == f"/{GET_JWKS}"
    assert ingress.attributes["http.status_code"] == "200"
    for span in (ingress, egress, handler):
        assert span.status != "ERROR", tree


def test_a_native_grpc_call_is_one_trace_through_envoy(
    envoy: EnvoyProcess, otlp: OtlpReceiver
) -> None:
    trace_id, caller_span = _ids()
    with grpc.insecure_channel(f"127.0.0.1:{envoy.port}") as channel:
        auth_pb2_grpc.AuthServiceStub(channel).GetJwks(
            auth_pb2.GetJwksRequest(),
            metadata=(("traceparent", traceparent(trace_id, caller_span)),),
            timeout=CALL_DEADLINE_S,
        )
    _assert_one_trace(otlp, trace_id, caller_span)
    # Envoy's configuration as it runs it: the tracer and its collector cluster.
    tracing, clusters = _tracing_in(envoy)
    assert tracing["provider"]["name"] == "envoy.tracers.opentelemetry"
    assert OTLP_CLUSTER in clusters


async def test_a_grpc_web_call_is_one_trace_through_envoy(
    envoy: EnvoyProcess, otlp: OtlpReceiver
) -> None:
    trace_id, caller_span = _ids()
    async with httpx.AsyncClient(base_url=envoy.url, timeout=CALL_DEADLINE_S) as client:
        headers = {**GrpcWeb(client).headers(), "traceparent": traceparent(trace_id, caller_span)}
        answer = await client.post(
            f"{AUTH}GetJwks", content=encode(auth_pb2.GetJwksRequest()), headers=headers
        )
        assert answer.status_code == 200
        assert answer.headers.get("grpc-status", "0") == "0"
    await otlp.trace_arrives(trace_id, _hops, "Envoy's spans and the server's")
    _assert_one_trace(otlp, trace_id, caller_span)


def test_a_caller_that_does_not_sample_is_obeyed(envoy: EnvoyProcess, otlp: OtlpReceiver) -> None:
    unsampled, unsampled_parent = _ids()
    sampled, sampled_parent = _ids()
    with grpc.insecure_channel(f"127.0.0.1:{envoy.port}") as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        for trace_id, parent, sample in (
            (unsampled, unsampled_parent, False),
            (sampled, sampled_parent, True),
        ):
            stub.GetJwks(
                auth_pb2.GetJwksRequest(),
                metadata=(("traceparent", traceparent(trace_id, parent, sampled=sample)),),
                timeout=CALL_DEADLINE_S,
            )
    # The sampled call came second: once its spans are in, the first one's would be too.
    _assert_one_trace(otlp, sampled, sampled_parent)
    assert otlp.trace(unsampled) == [], otlp.tree(unsampled)


def test_without_a_collector_envoy_has_no_tracer(serve: ServeProcess) -> None:
    with EnvoyProcess(serve.address, env={"OTEL_SDK_DISABLED": "true"}) as proxy:
        tracing, clusters = _tracing_in(proxy)
        assert proxy.terminate() == 0
    assert tracing == {}
    assert OTLP_CLUSTER not in clusters


def _tracing_in(envoy: EnvoyProcess) -> tuple[dict[str, Any], set[str]]:
    """The plain listener's HCM ``tracing`` ({} without) and the cluster names, as Envoy
    runs them (admin /config_dump)."""
    configs = envoy.config_dump()["configs"]
    [listeners] = [c for c in configs if c["@type"].endswith("ListenersConfigDump")]
    [clusters] = [c for c in configs if c["@type"].endswith("ClustersConfigDump")]
    [listener] = listeners["static_listeners"]
    [hcm] = listener["listener"]["filter_chains"][0]["filters"]
    tracing: dict[str, Any] = hcm["typed_config"].get("tracing", {})
    names = {c["cluster"]["name"] for c in clusters["static_clusters"]}
    return tracing, names
