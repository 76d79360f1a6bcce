"""Records to messages: the one place an integration becomes what a client sees.

The credential never appears in a message (``has_credential`` says whether one
is set); the live circuit state comes from the breakers, the rest of the status
from what the prober stored.
"""

from __future__ import annotations

import datetime as dt

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.rpc import status_pb2

from switchboard.api.integration.v1 import integration_pb2 as pb
from switchboard.integration.store import IntegrationRecord
from switchboard.platform.resilience.breaker import BreakerState
from switchboard.platform.values.names import etag_of
from switchboard.platform.values.resources import IntegrationName

_CIRCUIT = {
    "closed": pb.CIRCUIT_STATE_CLOSED,
    "open": pb.CIRCUIT_STATE_OPEN,
    "half_open": pb.CIRCUIT_STATE_HALF_OPEN,
}


def integration_name(workspace_id: str, integration_id: str) -> str:
    return str(IntegrationName(workspace_id, integration_id))


def name_of(record: IntegrationRecord) -> str:
    return integration_name(record.workspace_id, record.id)


def timestamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def integration_proto(
    record: IntegrationRecord, circuit: BreakerState | None = None
) -> pb.Integration:
    message = pb.Integration(
        name=name_of(record),
        display_name=record.display_name,
        kind=record.kind,  # type: ignore[arg-type]
        endpoint=record.endpoint,
        disabled=record.disabled,
        create_time=timestamp(record.created_at),
        update_time=timestamp(record.updated_at),
        etag=etag_of(record.version),
        has_credential=record.credential is not None,
        event_types=record.event_types,
        call_price_micros=record.call_price_micros,
        tool_call_price_micros=dict(record.tool_call_prices),
        retry_safe=record.retry_safe,
        retry_safe_tools=record.retry_safe_tools,
    )
    if record.call_timeout_ms:
        message.call_timeout.CopyFrom(
            duration_pb2.Duration(
                seconds=record.call_timeout_ms // 1000,
                nanos=(record.call_timeout_ms % 1000) * 1_000_000,
            )
        )
    if record.config:
        message.config.CopyFrom(struct_pb2.Struct.FromString(record.config))
    status = message.status
    status.health = record.health  # type: ignore[assignment]
    status.consecutive_failures = record.failures
    if record.health_since is not None:
        status.health_since.CopyFrom(timestamp(record.health_since))
    if record.last_probe_at is not None:
        status.last_probe_time.CopyFrom(timestamp(record.last_probe_at))
    if record.last_error:
        status.last_error.CopyFrom(status_pb2.Status.FromString(record.last_error))
    if circuit is not None:
        status.circuit = _CIRCUIT[circuit.state]
        if circuit.state == "open" and circuit.retry_at is not None:
            status.circuit_retry_time.CopyFrom(
                timestamp(dt.datetime.fromtimestamp(circuit.retry_at, dt.UTC))
            )
    return message
