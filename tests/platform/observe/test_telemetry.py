"""The tracing rule: off by default, on for an endpoint or an explicit exporter,
and every OTEL_* value this process cannot honour refused at start."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from switchboard.platform.config import ALL_SERVICES, ConfigError
from switchboard.platform.observe.telemetry import (
    Tracing,
    default_service_name,
    install,
    installed,
    make_sampler,
    tracing_config,
)

pytestmark = pytest.mark.unit

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}


def config(**env: str) -> object:
    return tracing_config(env, service_name="switchboard")


def test_off_by_default() -> None:
    assert config() is None
    assert Tracing.from_environ({}) is None


@pytest.mark.parametrize(
    "env",
    [
        ENDPOINT,
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"},
        {"OTEL_TRACES_EXPORTER": "otlp"},
        {"OTEL_TRACES_EXPORTER": "console"},
    ],
)
def test_on_for_an_endpoint_or_an_explicit_exporter(env: dict[str, str]) -> None:
    assert tracing_config(env, service_name="switchboard") is not None


@pytest.mark.parametrize(
    "env",
    [
        {**ENDPOINT, "OTEL_SDK_DISABLED": "true"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"},
        {**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_disabled_or_none_wins(env: dict[str, str]) -> None:
    assert tracing_config(env, service_name="switchboard") is None


def test_defaults_and_parsing() -> None:
    found = tracing_config(ENDPOINT, service_name="switchboard-dispatcher")
    assert found is not None
    assert found.exporter == "otlp"
    assert found.protocol == "grpc"
    assert found.endpoint == "http://127.0.0.1:4317"
    assert found.sampler == "parentbased_always_on"
    assert found.service_name == "switchboard-dispatcher"
    found = tracing_config(
        {
            **ENDPOINT,
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.01",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,team=a%20b",
        },
        service_name="switchboard",
    )
    assert found is not None
    assert found.protocol == "http/protobuf"  # the traces-specific one wins
    assert found.ratio == 0.01
    assert dict(found.resource) == {"deployment.environment": "prod", "team": "a b"}
    sampler = make_sampler(found)
    assert isinstance(sampler, ParentBased)
    assert isinstance(make_sampler(found.__class__(sampler="traceidratio")), TraceIdRatioBased)


def test_service_name_from_variables_first() -> None:
    named = tracing_config(
        {**ENDPOINT, "OTEL_RESOURCE_ATTRIBUTES": "service.name=edge-a"}, service_name="x"
    )
    assert named is not None
    assert named.service_name == "edge-a"
    named = tracing_config(
        {
            **ENDPOINT,
            "OTEL_SERVICE_NAME": "mine",
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=edge-a",
        },
        service_name="x",
    )
    assert named is not None
    assert named.service_name == "mine"


def test_default_service_names_say_which_process() -> None:
    assert default_service_name(ALL_SERVICES) == "switchboard"
    assert default_service_name(("auth", "context", "dispatcher", "integration", "events")) == (
        "switchboard-auth-context-dispatcher-integration-events"
    )
    assert default_service_name(("dispatcher",)) == "switchboard-dispatcher"
    assert default_service_name(("auth", "context")) == "switchboard-auth-context"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        (
            {**ENDPOINT, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {**ENDPOINT, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        ({**ENDPOINT, "OTEL_RESOURCE_ATTRIBUTES": "novalue"}, "OTEL_RESOURCE_ATTRIBUTES"),
    ],
)
def test_unusable_values_are_refused(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        tracing_config(env, service_name="switchboard")


def test_both_exporters_build_and_shut_down() -> None:
    for protocol in ("grpc", "http/protobuf"):
        tracing = Tracing.from_environ(
            {**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}, service_name="t"
        )
        assert tracing is not None
        resource = tracing.provider.resource.attributes
        assert resource["service.name"] == "t"
        tracing.shutdown()


def test_install_is_undone_by_the_last_server_that_installed_it() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    tracing = Tracing.to_exporter(InMemorySpanExporter())
    assert install(None)() is None
    first, second = install(tracing), install(tracing)
    assert installed() is tracing
    first()
    first()  # twice is once
    assert installed() is tracing
    second()
    assert installed() is None
