"""The one reader of the ``OTEL_*`` variables (platform/observe/otelenv.py): the servers'
tracing and Envoy's tracer follow the same rule and refuse the same values."""

from __future__ import annotations

import pytest

from switchboard.deploy.edge.envoy import SpecError, Tracing
from switchboard.platform.config import ConfigError
from switchboard.platform.observe.otelenv import OtelEnv
from switchboard.platform.observe.telemetry import tracing_config

pytestmark = pytest.mark.unit

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {**ENDPOINT, "OTEL_SDK_DISABLED": "true"},
        {**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_off_for_both(environ: dict[str, str]) -> None:
    assert OtelEnv.read(environ).traces() is None
    assert tracing_config(environ, service_name="s") is None
    assert Tracing.from_environment(environ) is None


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
        {**ENDPOINT, "OTEL_TRACES_SAMPLER": "sometimes"},
        {**ENDPOINT, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
    ],
)
def test_both_refuse_the_same_values_in_the_same_words(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as server:
        tracing_config(environ, service_name="s")
    with pytest.raises(SpecError) as envoy:
        Tracing.from_environment(environ)
    assert str(server.value) == str(envoy.value)


def test_the_variables_are_read_once_as_set() -> None:
    otel = OtelEnv.read(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": " http://a:4318/v1/traces ",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://b:4318",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "HTTP/PROTOBUF",
            "OTEL_EXPORTER_OTLP_INSECURE": "yes",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=shop,region=eu%2D1",
        }
    )
    traces = otel.traces()
    assert traces is not None
    assert traces.exporters == {"otlp"}
    assert (traces.endpoint, traces.signal_endpoint) == ("http://a:4318/v1/traces", True)
    assert traces.protocol == "http/protobuf"
    assert traces.insecure
    assert (traces.ratio, traces.parent_based) == (0.25, True)
    assert otel.resource() == {"service.name": "shop", "region": "eu-1"}
    assert otel.resource_keys() == {"service.name", "region"}
    # A command line's endpoint stands for the traces' own.
    given = otel.traces(endpoint="http://c:4318/x")
    assert given is not None
    assert (given.endpoint, given.signal_endpoint) == ("http://c:4318/x", True)
    # The console exporter is the servers' only: Envoy exports over OTLP.
    console = {"OTEL_TRACES_EXPORTER": "console"}
    assert tracing_config(console, service_name="s") is not None
    assert Tracing.from_environment(console) is None
