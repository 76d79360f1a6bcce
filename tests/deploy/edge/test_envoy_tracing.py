"""Envoy's OpenTelemetry tracer in the generated configuration (switchboard/deploy/edge/envoy.py):
read from the OTEL_* variables, absent without them, its sampling, its collector cluster, and
that Envoy accepts it (``envoy --mode validate``). tests/e2e/test_envoy_tracing.py runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from switchboard.cli import main as cli_main
from switchboard.deploy.edge.envoy import (
    API,
    ENVOY_SERVICE_NAME,
    OTLP_CLUSTER,
    EdgeSpec,
    HostPort,
    SpecError,
    Tracing,
    render,
)
from switchboard.deploy.processes import telemetry_identity
from tests.deploy.edge.test_envoy_config import _mesh_options
from tests.e2e.envoy import envoy_validate

pytestmark = pytest.mark.unit

LOCAL: Final = HostPort("127.0.0.1", 50051)
ENDPOINT: Final = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}


def _config(tracing: Tracing | None, *, mesh: bool = False) -> dict[str, Any]:
    if mesh:
        upstreams: dict[str, tuple[HostPort, ...]] = {
            name: (HostPort("127.0.0.1", 50100 + i),) for i, name in enumerate(API)
        }
        spec = EdgeSpec(upstreams=upstreams, tracing=tracing)
    else:
        spec = EdgeSpec.all_in_one(LOCAL, tracing=tracing)
    config: dict[str, Any] = yaml.safe_load(render(spec))
    return config


def _tracing(config: dict[str, Any]) -> dict[str, Any] | None:
    [listener] = config["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    tracing: dict[str, Any] | None = manager.get("tracing")
    return tracing


def _collector(config: dict[str, Any]) -> dict[str, Any] | None:
    found = [c for c in config["static_resources"]["clusters"] if c["name"] == OTLP_CLUSTER]
    return found[0] if found else None


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_TRACES_SAMPLER": "always_on"},
        {**ENDPOINT, "OTEL_SDK_DISABLED": "true"},
        {**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"},
        {**ENDPOINT, "OTEL_TRACES_EXPORTER": "console"},
    ],
)
def test_without_an_otlp_endpoint_there_is_no_tracing_at_all(environ: dict[str, str]) -> None:
    assert Tracing.from_environment(environ) is None
    config = _config(None)
    assert _tracing(config) is None
    assert _collector(config) is None


@pytest.mark.parametrize("mesh", [False, True])
def test_an_endpoint_turns_on_the_opentelemetry_tracer(mesh: bool) -> None:
    config = _config(Tracing.from_environment(ENDPOINT), mesh=mesh)
    tracing = _tracing(config)
    assert tracing is not None
    assert tracing["random_sampling"] == {"value": 100.0}
    assert tracing["spawn_upstream_span"] is True
    provider = tracing["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    otel = provider["typed_config"]
    assert otel["grpc_service"]["envoy_grpc"]["cluster_name"] == OTLP_CLUSTER
    assert otel["service_name"] == ENVOY_SERVICE_NAME
    assert "sampler" not in otel  # parent-based: Envoy keeps a caller's decision
    cluster = _collector(config)
    assert cluster is not None
    assert cluster["type"] == "STATIC"
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert address["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 4317}
    options = cluster["typed_extension_protocol_options"]
    http2 = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http2["explicit_http_config"]
    assert "transport_socket" not in cluster


def test_the_signal_endpoint_wins_and_the_common_one_follows() -> None:
    both = {**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:5317"}
    tracing = Tracing.from_environment(both)
    assert tracing is not None
    assert tracing.collector == HostPort("traces", 5317)
    explicit = Tracing.from_environment(both, endpoint="http://10.0.0.9:4317", service_name="edge")
    assert explicit is not None
    assert (explicit.collector, explicit.service_name) == (HostPort("10.0.0.9", 4317), "edge")
    # The exporters' default endpoint when OTEL_TRACES_EXPORTER=otlp names none.
    default = Tracing.from_environment({"OTEL_TRACES_EXPORTER": "otlp"})
    assert default is not None
    assert default.collector == HostPort("localhost", 4317)


@pytest.mark.parametrize(
    ("sampler", "arg", "random", "ratio"),
    [
        ("parentbased_always_on", "", 100.0, None),
        ("parentbased_always_off", "", 0.0, None),
        ("parentbased_traceidratio", "0.01", 1.0, None),
        ("parentbased_traceidratio", "", 100.0, None),
        ("traceidratio", "0.25", 100.0, 250_000),
        ("always_off", "", 100.0, 0),
        ("always_on", "", 100.0, "always_on"),
    ],
)
def test_sampling_follows_the_otel_sampler(
    sampler: str, arg: str, random: float, ratio: int | str | None
) -> None:
    environ = {**ENDPOINT, "OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": arg}
    tracing = _tracing(_config(Tracing.from_environment(environ)))
    assert tracing is not None
    # An empty Percent is 0% (a proto3 default is not written), not an absent one (100%).
    assert tracing["random_sampling"].get("value", 0.0) == pytest.approx(random)
    otel = tracing["provider"]["typed_config"]
    if ratio is None:
        assert "sampler" not in otel
    elif ratio == "always_on":
        assert otel["sampler"]["name"] == "envoy.tracers.opentelemetry.samplers.always_on"
    else:
        assert (
            otel["sampler"]["name"] == "envoy.tracers.opentelemetry.samplers.trace_id_ratio_based"
        )
        percentage = otel["sampler"]["typed_config"]["sampling_percentage"]
        assert percentage.get("numerator", 0) == ratio
        assert percentage["denominator"] == "MILLION"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, "between 0"),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"}, "not a number"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "grpc or http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://collector:21"}, "http"),
    ],
)
def test_what_envoy_cannot_honour_is_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        Tracing.from_environment({**ENDPOINT, **environ})


def test_tls_and_otlp_over_http() -> None:
    https = Tracing.from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example"})
    cluster = _collector(_config(https))
    assert cluster is not None
    assert cluster["type"] == "STRICT_DNS"
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "collector.example"
    assert "system_root_certs" in tls["common_tls_context"]["validation_context"]
    with_ca = Tracing.from_environment(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317", "OTEL_EXPORTER_OTLP_CERTIFICATE": "/ca"}
    )
    cluster = _collector(_config(with_ca))
    assert cluster is not None
    context = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert context["validation_context"]["trusted_ca"] == {"filename": "/ca"}
    insecure = Tracing.from_environment(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    )
    assert insecure is not None
    assert not insecure.tls
    over_http = Tracing.from_environment(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
    )
    config = _config(over_http)
    tracing = _tracing(config)
    assert tracing is not None
    uri = tracing["provider"]["typed_config"]["http_service"]["http_uri"]
    assert (uri["uri"], uri["cluster"]) == ("http://c:4318/v1/traces", OTLP_CLUSTER)
    cluster = _collector(config)
    assert cluster is not None
    assert "typed_extension_protocol_options" not in cluster  # HTTP/1.1


def test_envoy_accepts_the_tracer(tmp_path: Path) -> None:
    variants = {
        "grpc-mesh": (ENDPOINT, True),
        "ratio": ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "traceidratio"}, False),
        "https": ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example"}, True),
        "http": (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_TRACES_SAMPLER": "always_on",
            },
            False,
        ),
    }
    for name, (environ, mesh) in variants.items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(_config(Tracing.from_environment(environ), mesh=mesh)))
        done = envoy_validate(config)
        assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"


def test_the_envoy_command_reads_the_variables_and_its_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "envoy.yaml"
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert cli_main(["envoy", f"--output={out}"]) == 0
    assert _tracing(yaml.safe_load(out.read_text())) is None
    assert cli_main(["envoy", "--otlp-endpoint=http://127.0.0.1:4317", f"--output={out}"]) == 0
    assert _tracing(yaml.safe_load(out.read_text())) is not None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.01")
    assert cli_main(["envoy", "--trace-service-name=edge", f"--output={out}"]) == 0
    tracing = _tracing(yaml.safe_load(out.read_text()))
    assert tracing is not None
    assert tracing["random_sampling"]["value"] == pytest.approx(1.0)
    assert tracing["provider"]["typed_config"]["service_name"] == "edge"


def test_the_mesh_gives_envoy_the_services_variables(tmp_path: Path) -> None:
    options = _mesh_options(f"--data-dir={tmp_path / 'mesh'}")
    upstreams: dict[str, tuple[HostPort, ...]] = {name: (LOCAL,) for name in API}
    assert options.edge_spec(upstreams, {}, None).tracing is None
    spec = options.edge_spec(upstreams, dict(ENDPOINT), None)
    assert spec.tracing is not None
    assert spec.tracing.service_name == ENVOY_SERVICE_NAME
    named = options.edge_spec(upstreams, {**ENDPOINT, "OTEL_SERVICE_NAME": "shop"}, None)
    assert named.tracing is not None
    assert named.tracing.service_name == "shop"


def test_each_mesh_process_names_itself_unless_the_user_did() -> None:
    assert telemetry_identity({}, "switchboard-dispatcher", "dispatcher-2") == {
        "OTEL_SERVICE_NAME": "switchboard-dispatcher",
        "OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=dispatcher-2",
    }
    user = {"OTEL_SERVICE_NAME": "shop", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=dev"}
    assert telemetry_identity(user, "switchboard-auth", "auth") == {
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=dev,service.instance.id=auth"
    }
    named = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=shop,service.instance.id=a"}
    assert telemetry_identity(named, "switchboard-auth", "auth") == {}
