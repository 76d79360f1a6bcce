"""Health: probes with jitter, and a verdict stored only when it changes.

Every process that serves IntegrationService probes every enabled integration
each ``probe_interval_s`` (jittered, at most ``PROBE_CONCURRENCY`` at once):
gRPC health for experts, MCP ``ping``, and for webhooks the latest delivery's
outcome. A success is HEALTHY (DEGRADED while the circuit is not closed), the
first failure DEGRADED, the second in a row UNHEALTHY. A verdict that changes
nothing writes nothing; one that does is stored with its INTEGRATION_CHANGED
event in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Final

from google.rpc import code_pb2, status_pb2

from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2 as pb
from switchboard.integration.connect.connections import Connections, Limits
from switchboard.integration.mapping import name_of
from switchboard.integration.ports.connectors import ConnectorError
from switchboard.integration.store import Health, IntegrationRecord, IntegrationStore
from switchboard.platform import background
from switchboard.platform.background import FailureNotes
from switchboard.platform.errors import DestinationBlocked, SwitchboardError
from switchboard.platform.events.bus import EventBus
from switchboard.platform.resilience.breaker import Breakers
from switchboard.platform.store.outbox import Staged
from switchboard.platform.values.names import now

#: Jitter's own generator: the module-level one is the process's (a library or a test
#: may seed it), and jitter neither needs nor should disturb it.
_JITTER: Final = random.Random()  # noqa: S311 - jitter, not security

log = logging.getLogger("switchboard.integration")

#: Probes run at once (each bounded by its own timeout).
PROBE_CONCURRENCY: Final = 8
PROBE_TIMEOUT_S: Final = 10.0

#: Answers the health of a webhook from its deliveries: None if nothing was sent yet.
WebhookHealth = Callable[[str, str], Awaitable[tuple[int, str] | None]]
#: The event announcing an integration's new status.
Announce = Callable[[IntegrationRecord], events_pb2.Event]


def status_bytes(code: int, message: str) -> bytes:
    data: bytes = status_pb2.Status(code=code, message=message[:500]).SerializeToString()
    return data


class Prober:
    def __init__(
        self,
        store: IntegrationStore,
        connections: Connections,
        breakers: Breakers,
        bus: EventBus,
        limits: Limits,
        announce: Announce,
    ) -> None:
        self._store = store
        self._connections = connections
        self._breakers = breakers
        self._bus = bus
        self._limits = limits
        self._announce = announce
        #: Set by the composition root where webhook deliveries run.
        self.webhook_health: WebhookHealth | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failures = FailureNotes(log)

    def start(self) -> None:
        if self._limits.probe_interval_s <= 0:
            return  # the operator turned probes off: calls alone judge an integration
        self._task = background.spawn(self._probe_loop(), name="integration-prober", logger=log)

    @property
    def running(self) -> bool:
        """Whether probes run on the timer (not when the interval is 0, nor once closed)."""
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait((self._task,), timeout=5)

    async def _probe_loop(self) -> None:
        interval = self._limits.probe_interval_s
        # Replicas started together do not probe in step.
        await asyncio.sleep(_JITTER.uniform(0, min(interval, 5.0)))
        while not self._closed:
            try:
                await self.probe_all()
            except asyncio.CancelledError:
                raise
            except SwitchboardError:
                log.warning("integration probes skipped: the database is unavailable")
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                self._failures.failed("integration probes failed", exc)
            else:
                self._failures.succeeded()
            await asyncio.sleep(interval * _JITTER.uniform(0.8, 1.2))

    async def probe_all(self) -> None:
        """Probe every enabled integration once (bounded concurrency)."""
        records = await self._store.active()
        limit = asyncio.Semaphore(PROBE_CONCURRENCY)

        async def one(record: IntegrationRecord) -> None:
            async with limit:
                await self.probe(record)

        await asyncio.gather(*(one(record) for record in records))

    async def probe(self, record: IntegrationRecord) -> None:
        """Probe one integration and store the verdict if it changed."""
        name = name_of(record)
        error = ""
        code = code_pb2.OK
        try:
            if record.kind == pb.INTEGRATION_KIND_WEBHOOK:
                if self.webhook_health is None:
                    return  # deliveries run elsewhere: they are probed there
                outcome = await self.webhook_health(record.workspace_id, record.id)
                if outcome is None:
                    return  # nothing delivered yet: nothing known
                code, error = outcome
            else:
                timeout_s = min(self._connections.timeout_s(record), PROBE_TIMEOUT_S)
                connector = self._connections.get(record)
                async with asyncio.timeout(timeout_s):
                    await connector.probe(timeout_s)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            code, error = code_pb2.DEADLINE_EXCEEDED, "the probe timed out"
        except (ConnectorError, DestinationBlocked) as exc:
            code, error = code_pb2.UNAVAILABLE, str(exc)[:300] or "unreachable"
        except SwitchboardError as exc:
            code, error = int(exc.code), exc.message[:300]
        except Exception as exc:  # noqa: BLE001 - a broken probe makes the integration unhealthy
            # An answer nobody foresaw, or a bug: the integration is not known to be
            # working. The status is the outage's; the why is in the log.
            self._failures.failed("integration probe failed unexpectedly", exc, integration=name)
            code, error = code_pb2.UNAVAILABLE, "the probe failed unexpectedly"
        verdict = _verdict(record, code, error, self._breakers.state(name).state == "closed")
        staged: Staged[IntegrationRecord | None] = Staged(
            self._bus.outbox, lambda done: [self._announce(done)] if done else []
        )
        changed = await self._store.record_health(
            record.workspace_id, record.id, record.version, verdict, staged
        )
        await self._bus.publish_staged(staged.events)
        health = pb.HealthState.ValueType(verdict.health)
        _log_change(changed, record, health, verdict.failures, error)


def _verdict(record: IntegrationRecord, code: int, error: str, closed: bool) -> Health:
    """What a probe answering ``code`` (``error`` its why) makes of ``record``'s status;
    ``closed``: whether calls flow (the circuit is closed)."""
    failures = 0 if code == code_pb2.OK else record.failures + 1
    if code != code_pb2.OK:
        health = pb.HEALTH_STATE_DEGRADED if failures < 2 else pb.HEALTH_STATE_UNHEALTHY
        last_error = status_bytes(code, error)
    elif closed:
        health = pb.HEALTH_STATE_HEALTHY
        # Recovered: the old failure is no longer the integration's state, and a status
        # that said HEALTHY beside it read as a live failure.
        last_error = b""
    else:
        # Answering, but the circuit is still open: the failure that opened it explains
        # the DEGRADED until calls flow again.
        health = pb.HEALTH_STATE_DEGRADED
        last_error = record.last_error
    return Health(health=health, last_error=last_error, failures=failures, probed_at=now())


def _log_change(
    changed: IntegrationRecord | None,
    record: IntegrationRecord,
    health: pb.HealthState.ValueType,
    failures: int,
    error: str,
) -> None:
    """One line per status change (``changed``: the stored verdict, if it was stored);
    unhealthy is a warning."""
    if changed is not None and health != record.health:
        log.log(
            logging.WARNING if health == pb.HEALTH_STATE_UNHEALTHY else logging.INFO,
            "integration status changed",
            extra={
                "integration": name_of(record),
                "kind": pb.IntegrationKind.Name(record.kind),  # type: ignore[arg-type]
                "from_health": pb.HealthState.Name(record.health),  # type: ignore[arg-type]
                "to_health": pb.HealthState.Name(health),
                "failures": failures,
                "error": error,
            },
        )
