"""Fill a servicer's not-yet-built RPCs with honest UNIMPLEMENTED answers.

Generated servicer bases answer UNIMPLEMENTED through a sync method that also
raises NotImplementedError, which our interceptor would have to special-case.
Instead, each service declares which issue brings its RPCs, and every RPC the
servicer does not define itself answers ``NotImplementedYet`` naming it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from switchboard.platform.errors import NotImplementedYet

T = TypeVar("T", bound=type)

#: Set on every placeholder this module installs, so tools (and the README's status
#: test) can tell a built RPC from an honest UNIMPLEMENTED one.
PLACEHOLDER_ATTR = "__switchboard_unimplemented__"


def is_placeholder(rpc: object) -> bool:
    """Whether ``rpc`` is a placeholder installed by ``unimplemented_rpcs``."""
    return bool(getattr(rpc, PLACEHOLDER_ATTR, False))


def _message(service: ServiceDescriptor, method: MethodDescriptor, planned: str) -> str:
    return f"{service.name}.{method.name} is not implemented yet; {planned}"


def _unary(text: str) -> Callable[..., Any]:
    async def rpc(self: object, request: object, context: object) -> object:
        raise NotImplementedYet(text)

    return rpc


def _streaming(text: str) -> Callable[..., Any]:
    async def rpc(self: object, request: object, context: object) -> AsyncIterator[object]:
        # The empty loop makes this an async generator, as streaming handlers must be.
        for _ in ():
            yield _
        raise NotImplementedYet(text)

    return rpc


def unimplemented_rpcs(service: ServiceDescriptor, planned: str) -> Callable[[T], T]:
    """Class decorator: every RPC of ``service`` not defined in the class body answers
    UNIMPLEMENTED with a message saying ``planned`` (which issue brings it)."""

    def decorate(cls: T) -> T:
        for method in service.methods:
            if method.name in cls.__dict__:
                continue
            text = _message(service, method, planned)
            impl = _streaming(text) if method.server_streaming else _unary(text)
            impl.__name__ = method.name
            impl.__qualname__ = f"{cls.__qualname__}.{method.name}"
            setattr(impl, PLACEHOLDER_ATTR, True)
            setattr(cls, method.name, impl)
        return cls

    return decorate
