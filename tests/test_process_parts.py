"""A process builds only what the services it serves need (mesh.SERVICES, <service>/build.py)."""

from __future__ import annotations

import pytest

from switchboard.auth.accounts import Accounts
from switchboard.context.domain import ContextDomain
from switchboard.dispatcher.service import Dispatcher
from switchboard.integration.service import IntegrationHub
from switchboard.mesh import create_server
from tests.conftest import make_settings

pytestmark = pytest.mark.service

#: services served -> (Accounts, ContextDomain, IntegrationHub, Dispatcher) built or not.
CASES = {
    "auth": (True, False, False, False),
    "auth,events": (True, False, False, False),
    "context": (False, True, False, False),
    "integration": (False, False, True, False),
    # The dispatcher reaches tools and experts' breakers through the process's hub, and
    # the context service through its own domain when no other process serves it.
    "dispatcher": (False, True, True, True),
}


@pytest.mark.parametrize("services", list(CASES))
async def test_a_process_builds_the_parts_of_what_it_serves(services: str) -> None:
    server, _ = await create_server(make_settings(services=services))
    await server.start()
    try:
        shared = server.shared
        found = tuple(
            shared.built(kind) is not None
            for kind in (Accounts, ContextDomain, IntegrationHub, Dispatcher)
        )
        assert found == CASES[services]
    finally:
        await server.shutdown(grace=0)


async def test_a_dispatcher_with_a_context_address_builds_no_context_domain() -> None:
    # Nothing is called at start: the address only has to parse.
    settings = make_settings(services="dispatcher", context_address="127.0.0.1:9")
    server, _ = await create_server(settings)
    await server.start()
    try:
        assert server.shared.built(ContextDomain) is None
        assert server.shared.built(Dispatcher) is not None
    finally:
        await server.shutdown(grace=0)
