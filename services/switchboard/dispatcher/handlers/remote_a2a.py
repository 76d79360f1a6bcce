"""Calling a remote A2A agent as a workspace's domain expert (integrations of kind
INTEGRATION_KIND_A2A_AGENT); serving A2A is the front door's (the ``a2a`` package).

The handler is a thin shell around the hub's A2A client
(``integration/kinds/a2a.py``), so the dispatcher and the hub speak to an
agent the same way. What it adds is what a handler needs:

- **capabilities** from the Agent Card (name, description, skills as
  topics, whether it streams), read when the expert is first built;
- **availability**: after a call could not reach the agent it is
  unavailable, and a probe (the card, then a GetTask the agent must answer)
  in the background makes it available again, so routing tells the truth
  about an agent that is down without waiting for a run to fail;
- **the user's files**: the message's files go with its text as A2A file
  parts, read as the run's user (``message_files``: bytes within a bound, else
  the URL a file came from, else a line saying it was not sent);
- **the conversation's thread**: each answer ends with a data part naming
  the agent's task and context (``a2a_task``). The next message routed to
  the same expert in that conversation continues that context, and, when
  the agent asked for input, that task (docs/a2a.md, "A2A agents as domain
  experts": what the user does next).

Failures reach the run as ``HandlerFailure``: ``retryable`` (counted by the
integration's breaker) when the agent could not be reached or went away
mid-task, not when it answered that the task failed or was rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Final

from a2a.types import a2a_pb2 as a2a

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.base import (
    Frame,
    HandleCall,
    HandlerFailure,
    capabilities,
    text_of,
)
from switchboard.dispatcher.handlers.handed import BUDGET_EXTENSION, extension_value
from switchboard.dispatcher.handlers.hops import Hop
from switchboard.integration.kinds.a2a import (
    A2AAgent,
    AgentFailed,
    message_files,
    previous_task,
)
from switchboard.integration.ports.connectors import ConnectorError
from switchboard.platform import background
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.values import idempotency, structs
from switchboard.platform.values.resources import HandlerName

log = logging.getLogger("switchboard.dispatcher.handlers.remote_a2a")

#: How long an agent stays unavailable after a failed call before a probe may clear it.
RETRY_AFTER_S: Final = 5.0


def card_capabilities(handler_id: str, card: a2a.AgentCard) -> handler_pb2.HandlerCapabilities:
    """What ListHandlers shows for an agent, from its card (the id is the integration's)."""
    topics = dict.fromkeys(tag for skill in card.skills for tag in skill.tags)
    skills = "; ".join(
        f"{skill.name or skill.id}: {skill.description}" if skill.description else skill.name
        for skill in card.skills
    )
    description = card.description + (f" Skills: {skills}" if skills else "")
    return capabilities(
        handler_id,
        card.name or handler_id,
        description.strip()[:2000],
        topics=tuple(topics),
        streaming=card.capabilities.streaming,
    )


class A2AExpert:
    """A handler that sends the run's message to an A2A agent; see the module doc."""

    kind = dispatcher_pb2.HANDLER_KIND_REMOTE

    def __init__(self, handler_id: str, agent: A2AAgent, *, timeout_s: float) -> None:
        self._agent = agent
        self._timeout_s = timeout_s
        self._capabilities = capabilities(
            handler_id, handler_id, f"A2A agent, card at {agent.card_url}"
        )
        self._author = str(HandlerName(handler_id))
        # Unavailable until a probe succeeds again (0: not down).
        self._down_since = 0.0
        self._refreshing: asyncio.Task[bool] | None = None
        self._closed = False

    @property
    def capabilities(self) -> handler_pb2.HandlerCapabilities:
        return self._capabilities

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def id(self) -> str:
        return self._capabilities.id

    def available(self) -> bool:
        if self._closed:
            return False
        if not self._down_since:
            return True
        if time.monotonic() - self._down_since >= RETRY_AFTER_S:
            self._refresh_soon()
        return False

    def _refresh_soon(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # asked outside the event loop: the next ask starts it
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = background.spawn(
                self.refresh(), name=f"a2a-expert-refresh-{self._capabilities.id}", logger=log
            )

    def _down(self) -> None:
        self._down_since = time.monotonic()

    async def refresh(self) -> bool:
        """Probe the agent (its card, then an answer from its interface) and describe it
        from the card; False, and unavailable for a while, if it cannot."""
        try:
            await self._agent.probe(self._timeout_s)
            card = await self._agent.card(self._timeout_s)
        except (ConnectorError, SwitchboardError, TimeoutError) as exc:
            # The reason names the card's host at most (remote_a2a's errors are safe to show).
            reason = exc.message if isinstance(exc, SwitchboardError) else str(exc)
            log.warning(
                "A2A agent unreachable",
                extra={
                    "handler": self._capabilities.id,
                    "error": type(exc).__name__,
                    "reason": reason[:300],
                },
            )
            self._down()
            return False
        except Exception:
            # An answer nobody foresaw (or a bug): the agent is not known to work,
            # so it is down, as for any failed probe, and the log says why.
            log.error("A2A agent could not be probed", exc_info=True, extra={"handler": self.id})
            self._down()
            return False
        self._capabilities = card_capabilities(self._capabilities.id, card)
        self._down_since = 0.0
        return True

    async def handle(self, call: HandleCall) -> AsyncIterator[Frame]:
        request = call.request
        metadata = structs.message_dict(request.parameters) if request.parameters else None
        name = f"A2A expert {self._capabilities.id!r}"
        # The run's budget goes with the message (``hops.py``): the budget
        # extension names what is left, and the usage the agent reports is charged.
        hop = Hop(call.budget)
        # Outside the try: a run with nothing left ends (or waits) at its cap, not as a
        # failure of the agent.
        handed = await hop.start()
        try:
            # The user's files go with the text, read as the run's user.
            files = await message_files(request.message, call.files)
            frames = self._agent.exchange(
                text_of(request.message),
                deadline=call.deadline,
                # The run's key (every attempt of the run sends it): an agent
                # that dedupes by message id sees a run sent again as one.
                message_id=idempotency.handler_key(request.run) if request.run else "",
                previous=previous_task(request.context, self._author),
                metadata=metadata,
                extensions={BUDGET_EXTENSION: extension_value(handed)} if handed else None,
                files=files,
            )
            async with contextlib.aclosing(frames):
                async for frame in frames:
                    if frame.WhichOneof("frame") == "result":
                        await hop.settle(frame.result)
                    yield frame
        except AgentFailed as failed:
            raise HandlerFailure(f"{name}: {failed}") from None
        except ConnectorError as unreachable:
            self._down()
            raise HandlerFailure(f"{name}: {unreachable}", retryable=True) from None
        except SwitchboardError as refused:
            # The card names an address the egress policy refuses, or a malformed one.
            raise HandlerFailure(f"{name}: {refused.message}") from None
        except TimeoutError:
            raise  # the run's deadline: the run says so
        except Exception:
            # What the agent's answer did to the SDK, or a bug: the run fails with a
            # status, counted against the agent; the traceback is the log's.
            log.error("A2A expert failed unexpectedly", exc_info=True, extra={"handler": self.id})
            raise HandlerFailure(
                f"{name} failed unexpectedly; the server's log has the details", retryable=True
            ) from None
        finally:
            await hop.close()

    async def close(self) -> None:
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
        await self._agent.close()
