"""The one reader of the standard ``OTEL_*`` variables.

``OtelEnv.read(environ)`` reads them once; ``traces()`` applies the rule that
turns tracing on, for the servers (``platform/observe/telemetry.py``) and for Envoy's
tracer (``deploy/edge/envoy.py``) alike:

- ``OTEL_SDK_DISABLED=true`` turns it off, whatever else is set;
- ``OTEL_TRACES_EXPORTER`` (comma separated) naming ``otlp`` or ``console``
  turns it on, ``none`` turns it off, anything else is refused;
- unset, it is on when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
  or ``OTEL_EXPORTER_OTLP_ENDPOINT``): an operator who points us at a collector
  wants traces there.

When it is on, ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` (``grpc``, the default,
or ``http/protobuf``), ``OTEL_TRACES_SAMPLER`` and ``OTEL_TRACES_SAMPLER_ARG``
are checked here, so both readers refuse the same values with the same words.
Each reader then keeps what it can honour: a server's exporter reads its own
TLS and header variables (the OpenTelemetry specification says so), Envoy's
tracer exports over OTLP only. No SDK import here: ``deploy`` reads it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from switchboard.platform.config import ConfigError

PROTOCOLS: Final = ("grpc", "http/protobuf")
EXPORTERS: Final = ("otlp", "console")
SAMPLERS: Final = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
_TRUE: Final = ("true", "1", "yes", "on")


@dataclass(frozen=True)
class OtelTraces:
    """What the variables ask of traces when tracing is on."""

    #: ``otlp`` and/or ``console``.
    exporters: frozenset[str]
    protocol: str
    #: The endpoint named ("": the exporter's default)...
    endpoint: str
    #: ...and whether it is the traces' own (used as it is) rather than the common one.
    signal_endpoint: bool
    #: ``OTEL_EXPORTER_OTLP[_TRACES]_INSECURE``: a bare HOST:PORT without TLS.
    insecure: bool
    #: ``OTEL_EXPORTER_OTLP[_TRACES]_CERTIFICATE`` ("": the system's roots).
    certificate: str
    sampler: str
    #: The sampler's ratio (``*traceidratio``; 1.0 for the others).
    ratio: float

    @property
    def parent_based(self) -> bool:
        return self.sampler.startswith("parentbased_")


@dataclass(frozen=True)
class OtelEnv:
    """The ``OTEL_*`` variables as set (stripped; "" when unset)."""

    disabled: bool = False
    exporters: tuple[str, ...] = ()
    traces_endpoint: str = ""
    endpoint: str = ""
    protocol: str = ""
    insecure: bool = False
    certificate: str = ""
    sampler: str = ""
    sampler_arg: str = ""
    service_name: str = ""
    resource_attributes: str = ""

    @classmethod
    def read(cls, environ: Mapping[str, str]) -> OtelEnv:
        def get(name: str) -> str:
            return environ.get(name, "").strip()

        def flag(name: str) -> bool:
            return get(name).lower() in _TRUE

        def either(name: str) -> str:
            # The traces' own variable, else the one common to every signal.
            return get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or get(f"OTEL_EXPORTER_OTLP_{name}")

        return cls(
            disabled=flag("OTEL_SDK_DISABLED"),
            exporters=tuple(
                name.strip().lower()
                for name in get("OTEL_TRACES_EXPORTER").split(",")
                if name.strip()
            ),
            traces_endpoint=get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            endpoint=get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            protocol=either("PROTOCOL").lower(),
            insecure=flag("OTEL_EXPORTER_OTLP_TRACES_INSECURE")
            or flag("OTEL_EXPORTER_OTLP_INSECURE"),
            certificate=either("CERTIFICATE"),
            sampler=get("OTEL_TRACES_SAMPLER").lower(),
            sampler_arg=get("OTEL_TRACES_SAMPLER_ARG"),
            service_name=get("OTEL_SERVICE_NAME"),
            resource_attributes=get("OTEL_RESOURCE_ATTRIBUTES"),
        )

    def traces(self, *, endpoint: str | None = None) -> OtelTraces | None:
        """The tracing asked for, or None when it is off (see the module's rule).

        ``endpoint`` (a command line's) stands for ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``.
        Raises ``ConfigError`` for a value no reader can honour.
        """
        if self.disabled:
            return None
        exporters = set(self.exporters)
        unknown = exporters - {*EXPORTERS, "none"}
        if unknown:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER={','.join(self.exporters)!r}: "
                f"choose from {', '.join((*EXPORTERS, 'none'))}"
            )
        if "none" in exporters:
            return None
        signal = (endpoint or "").strip() or self.traces_endpoint
        named = signal or self.endpoint
        if not exporters:
            if not named:
                return None
            exporters = {"otlp"}
        protocol = self.protocol or "grpc"
        if protocol not in PROTOCOLS:
            raise ConfigError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: choose {' or '.join(PROTOCOLS)}"
            )
        sampler = self.sampler or "parentbased_always_on"
        if sampler not in SAMPLERS:
            raise ConfigError(
                f"OTEL_TRACES_SAMPLER={sampler!r}: choose one of {', '.join(SAMPLERS)}"
            )
        ratio = 1.0
        if sampler.endswith("traceidratio") and self.sampler_arg:
            try:
                ratio = float(self.sampler_arg)
            except ValueError:
                raise ConfigError(
                    f"OTEL_TRACES_SAMPLER_ARG={self.sampler_arg!r} is not a number"
                ) from None
            if not 0.0 <= ratio <= 1.0:
                raise ConfigError(
                    f"OTEL_TRACES_SAMPLER_ARG={self.sampler_arg!r} is not between 0 and 1"
                )
        return OtelTraces(
            exporters=frozenset(exporters),
            protocol=protocol,
            endpoint=named,
            signal_endpoint=bool(signal),
            insecure=self.insecure,
            certificate=self.certificate,
            sampler=sampler,
            ratio=ratio,
        )

    def resource(self) -> dict[str, str]:
        """``OTEL_RESOURCE_ATTRIBUTES``: ``key=value`` pairs, comma separated,
        percent-encoded; ``ConfigError`` for a pair without ``=``."""
        found: dict[str, str] = {}
        for pair in self.resource_attributes.split(","):
            if not pair.strip():
                continue
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"OTEL_RESOURCE_ATTRIBUTES: {pair.strip()!r} is not key=value")
            found[unquote(key.strip())] = unquote(value.strip())
        return found

    def resource_keys(self) -> set[str]:
        """The keys ``OTEL_RESOURCE_ATTRIBUTES`` sets, read leniently (a process that
        only adds to them must not refuse what tracing, off, never reads)."""
        return {
            part.partition("=")[0].strip()
            for part in self.resource_attributes.split(",")
            if part.strip()
        }
