"""This process's clients of its integrations: one connector each, behind its breaker.

A connector (``ports/connectors.py``) is built from an integration's stored record,
for that record's version; a change to the integration (its event, in any
process) retires it, and the next call builds one for the new version. Every
call goes through the integration's circuit breaker (``platform/resilience/breaker.py``)
and a timeout, and its failures come out as the errors clients get.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

from switchboard.integration.mapping import name_of
from switchboard.integration.ports.connectors import (
    Connector,
    ConnectorError,
    Malformed,
    ToolNotFound,
)
from switchboard.integration.store import IntegrationRecord, IntegrationStore
from switchboard.platform import background
from switchboard.platform.errors import (
    DeadlineExceeded,
    DependencyUnavailable,
    DestinationBlocked,
    FailedPrecondition,
    NotFound,
    SwitchboardError,
)
from switchboard.platform.resilience.breaker import Breakers
from switchboard.platform.security.credentials.secretbox import SecretBox
from switchboard.platform.values import names
from switchboard.platform.values.jsonbounds import JsonRejected
from switchboard.platform.values.resources import IntegrationName

log = logging.getLogger("switchboard.integration")

#: Kept for integration/service.py until it reads names as ``IntegrationName``.
INTEGRATION: Final = names.INTEGRATION

#: How a webhook offers tools, for the refusal of one that declares none.
NO_TOOLS: Final = (
    'a webhook offers tools it declares in its config: {"tools": [{"name": ..., '
    '"description": ..., "input_schema": {...}}]} (docs/integration.md, "Webhook tools")'
)
#: Builds the connector of a record, given its credential in clear (None if unset).
ConnectorFactory = Callable[[IntegrationRecord, str | None], Connector | None]


@dataclass(frozen=True)
class Limits:
    max_per_workspace: int = 50
    max_config_bytes: int = 16_384
    default_call_timeout_s: float = 30.0
    max_call_timeout_s: float = 300.0
    max_result_bytes: int = 1_048_576
    tool_calls_per_minute: int = 600
    probe_interval_s: float = 30.0
    #: Plain http:// endpoints are accepted (only where loopback or private
    #: destinations are allowed: dev mode and tests).
    allow_plain_http: bool = False
    #: After a webhook secret is rotated, how long the previous one also signs.
    secret_overlap_s: float = 86_400.0


async def find(store: IntegrationStore, name: str, field: str) -> IntegrationRecord:
    """The integration ``name`` names (the request's ``field``), or NOT_FOUND."""
    integration = IntegrationName.parse(name, field)
    record = await store.get(integration.workspace, integration.integration)
    if record is None:
        raise NotFound(f"{name} not found")
    return record


@dataclass
class _Live:
    """A connector built for one version of a record."""

    version: int
    connector: Connector


class Connections:
    def __init__(
        self, build: ConnectorFactory, secrets: SecretBox, breakers: Breakers, limits: Limits
    ) -> None:
        self._build = build
        self._secrets = secrets
        self._breakers = breakers
        self._limits = limits
        self._live: dict[str, _Live] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``work`` in the background (a failure is logged); cancelled by ``close``."""
        background.spawn(work, name=name, logger=log, keep=self._tasks)

    async def _close(self, connector: Connector) -> None:
        try:
            # A stdio server gets stdin closed, then SIGTERM, then SIGKILL: about 7 s.
            async with asyncio.timeout(10):
                await connector.close()
        except Exception:  # closing must not fail a shutdown or an update
            log.warning("closing an integration's connector failed", exc_info=True)

    def get(self, record: IntegrationRecord) -> Connector:
        """The connector for ``record`` as it now stands (FAILED_PRECONDITION for a
        webhook without tools)."""
        name = name_of(record)
        live = self._live.get(name)
        if live is not None and live.version == record.version:
            return live.connector
        if live is not None:
            self.spawn(self._close(live.connector), "integration-close")
        credential = None
        if record.credential is not None:
            credential = self._secrets.open(record.credential, purpose=name)
        connector = self._build(record, credential)
        if connector is None:
            raise FailedPrecondition(f"{name} is a webhook that declares no tools; {NO_TOOLS}")
        self._live[name] = _Live(record.version, connector)
        return connector

    def forget(self, name: str, version: int | None) -> bool:
        """Retire ``name``'s connector unless it was built for ``version`` (None: always)."""
        live = self._live.get(name)
        if live is None or (version is not None and live.version == version):
            return False
        del self._live[name]
        self.spawn(self._close(live.connector), "integration-close")
        return True

    def timeout_s(self, record: IntegrationRecord) -> float:
        configured = record.call_timeout_ms / 1000 or self._limits.default_call_timeout_s
        return min(configured, self._limits.max_call_timeout_s)

    async def guarded(
        self, record: IntegrationRecord, call: Callable[[], Awaitable[Any]], timeout_s: float
    ) -> Any:
        """``call`` inside the integration's breaker and timeout, failures mapped.

        Every way a call can end is a verdict or deliberately none: it answered
        (a result, or "no such tool"); it failed, which counts (no answer in
        time, unreachable, a malformed answer, anything unforeseen); or it says
        nothing about the integration (refused here before it left, cancelled).
        """
        name = name_of(record)
        metadata = {"integration": name}
        permit = await self._breakers.acquire(name, label=f"integration {name}")
        try:
            async with asyncio.timeout(timeout_s):
                result = await call()
        except TimeoutError:
            await permit.failed()
            raise DeadlineExceeded(
                f"{name} did not answer within {timeout_s:g} s", metadata=metadata
            ) from None
        except ToolNotFound:
            await permit.succeeded()  # it answered: the tool is not there
            raise
        except (Malformed, JsonRejected) as exc:  # it answered, outside its protocol
            await permit.failed()
            what = str(exc) if isinstance(exc, Malformed) else f"a message {exc}"
            raise DependencyUnavailable(
                f"{name} gave a malformed answer: {what}"[:300], metadata=metadata
            ) from None
        except ConnectorError as exc:  # unreachable, or broke the protocol
            await permit.failed()
            raise DependencyUnavailable(
                f"{name} is unreachable: {exc}"[:300], metadata=metadata
            ) from None
        except DestinationBlocked as exc:
            permit.released()
            raise FailedPrecondition(f"{name}: {exc.message}", metadata=metadata) from None
        except SwitchboardError:
            # Refused on our side (a malformed endpoint, a result over the size
            # limit): precise already, and no verdict on the integration.
            permit.released()
            raise
        except Exception:
            # A connector's bug, or an answer nobody foresaw (an SDK's own
            # exception): it came from talking to this integration, so it counts,
            # and the caller gets a status, not the exception's text.
            await permit.failed()
            log.error(
                "integration call failed unexpectedly",
                exc_info=True,
                extra={"integration": name, "kind": record.kind},
            )
            raise DependencyUnavailable(
                f"{name} failed unexpectedly; the server's log has the details",
                metadata=metadata,
            ) from None
        except BaseException:
            # Cancelled: no verdict on the integration.
            permit.released()
            raise
        await permit.succeeded()
        return result

    async def close(self) -> None:
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        live, self._live = self._live, {}
        await asyncio.gather(*(self._close(item.connector) for item in live.values()))
