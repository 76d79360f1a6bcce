"""What the contracts say about each method: may it be repeated, does it need a bearer.

Read from the generated descriptors, not restated: a method marked
``NO_SIDE_EFFECTS`` or ``IDEMPOTENT`` (docs/contracts.md) may be sent again after
``UNAVAILABLE``; so may one whose request carries a non-empty ``request_id``
(the server answers a repeat with the first result). Everything else is sent
once: gRPC itself already retries a call that never left the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import Message

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2

_FILES: Final[tuple[FileDescriptor, ...]] = (
    auth_pb2.DESCRIPTOR,
    context_pb2.DESCRIPTOR,
    dispatcher_pb2.DESCRIPTOR,
    integration_pb2.DESCRIPTOR,
    events_pb2.DESCRIPTOR,
)
_SAFE_LEVELS: Final = (
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT,
)
#: Methods that take no bearer (AuthService's comment in the contract): the
#: credential they need is in the request, and an expired access token must not
#: be sent along with the refresh token that replaces it.
PUBLIC: Final = frozenset(
    {
        "/switchboard.api.auth.v1.AuthService/Register",
        "/switchboard.api.auth.v1.AuthService/Login",
        "/switchboard.api.auth.v1.AuthService/RefreshToken",
        "/switchboard.api.auth.v1.AuthService/GetJwks",
    }
)


@dataclass(frozen=True)
class Method:
    """One RPC as the client sees it."""

    path: str
    #: NO_SIDE_EFFECTS or IDEMPOTENT in the contract.
    repeatable: bool
    #: Its request has an idempotency key (``request_id``).
    keyed: bool
    #: Needs no bearer.
    public: bool


def _table() -> dict[str, Method]:
    found: dict[str, Method] = {}
    for file in _FILES:
        for service in file.services_by_name.values():
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                found[path] = Method(
                    path=path,
                    repeatable=method.GetOptions().idempotency_level in _SAFE_LEVELS,
                    keyed="request_id" in method.input_type.fields_by_name,
                    public=path in PUBLIC,
                )
    return found


METHODS: Final = _table()


def method_of(path: str | bytes) -> Method:
    """What the contract says about ``path``; a method it does not know (health,
    reflection, a newer server's) is treated as not repeatable and not public."""
    text = path.decode() if isinstance(path, bytes) else path
    return METHODS.get(text) or Method(path=text, repeatable=False, keyed=False, public=False)


def safe_to_repeat(method: Method, request: object) -> bool:
    """Whether sending ``request`` again cannot do anything twice."""
    if method.repeatable:
        return True
    if method.keyed and isinstance(request, Message):
        return bool(getattr(request, "request_id", ""))
    return False
