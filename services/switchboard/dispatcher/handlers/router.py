"""The handler registry and the routing rules that pick a handler for a message.

Order of the rules (the first that names an available handler wins):

1. the handler named in the request (``SendMessageRequest.handler``), or the
   handler of the assistant the request names (``admission.route``);
2. the message's metadata key ``handler``;
3. the message's content type: a ``type:<mime>=<handler>`` route matching a
   part's ``mime_type`` (``image/*`` matches any image);
4. a command prefix: a ``/<prefix>=<handler>`` route, or ``/<handler-id>``
   itself, at the start of the text;
5. the workspace's default assistant, if it has one (``admission.route``);
6. the workspace's route (``workspace:<id>=<handler>`` routes);
7. the process default (``SWITCHBOARD_DISPATCHER_DEFAULT_HANDLER``, else
   ``llm`` when configured, else ``echo``).

The message's own choices (2 to 4) come before the default assistant: a person
who types ``/translator`` means the translator, whatever answers the rest.

An explicit choice (rules 1 and 2) that names an unknown handler is the
caller's mistake (INVALID_ARGUMENT); one that is unavailable (circuit open,
remote down) is UNAVAILABLE rather than a silent substitute.

Handlers are the operator's (the registry: built-ins, the LLM, plugins,
statically configured experts) and each workspace's own (its domain experts,
integrations of the hub: ``experts.py``). Rules 1, 2 and 4 may name a
workspace's expert; an id both claim is the operator's, always.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Final, Protocol

from switchboard.api.context.v1 import context_pb2
from switchboard.dispatcher.handlers.base import Handler
from switchboard.platform.errors import (
    DependencyUnavailable,
    FieldViolation,
    InvalidArgument,
)
from switchboard.platform.values import names
from switchboard.platform.values.resources import HandlerName

log = logging.getLogger("switchboard.dispatcher.handlers.router")

ENTRY_POINT_GROUP = "switchboard.handlers"
HANDLER_ID = names.CLIENT_ID


@dataclass(frozen=True)
class Routes:
    """Parsed ``SWITCHBOARD_DISPATCHER_ROUTES``."""

    prefixes: Mapping[str, str]
    content_types: tuple[tuple[str, str], ...]
    workspaces: Mapping[str, str]

    @classmethod
    def parse(cls, text: str) -> Routes:
        prefixes: dict[str, str] = {}
        types: list[tuple[str, str]] = []
        workspaces: dict[str, str] = {}
        for raw in text.split(","):
            rule = raw.strip()
            if not rule:
                continue
            key, sep, handler = rule.partition("=")
            key, handler = key.strip(), handler.strip()
            if not sep or not HANDLER_ID.fullmatch(handler):
                raise ValueError(f"route {rule!r}: expected <match>=<handler-id>")
            if key.startswith("/") and len(key) > 1 and " " not in key:
                prefixes[key[1:].lower()] = handler
            elif key.startswith("type:") and len(key) > 5:
                types.append((key[5:].lower(), handler))
            elif key.startswith("workspace:") and len(key) > 10:
                workspaces[key[10:]] = handler
            else:
                raise ValueError(
                    f"route {rule!r}: the match must be /prefix, type:<mime> or workspace:<id>"
                )
        return cls(prefixes, tuple(types), workspaces)


@dataclass(frozen=True)
class Choice:
    handler: Handler
    reason: str
    #: The text with a matched command prefix removed (what the handler answers).
    strip_prefix: str = ""


class Registry:
    """Handlers by id; built at start, read on every message."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def add(self, handler: Handler) -> None:
        handler_id = handler.capabilities.id
        if not HANDLER_ID.fullmatch(handler_id):
            raise ValueError(f"handler id {handler_id!r} {names.CLIENT_ID_RULE.must}")
        if handler_id in self._handlers:
            raise ValueError(f"two handlers claim the id {handler_id!r}")
        self._handlers[handler_id] = handler

    def get(self, handler_id: str) -> Handler | None:
        return self._handlers.get(handler_id)

    def all(self) -> list[Handler]:
        return [self._handlers[k] for k in sorted(self._handlers)]

    def load_entry_points(self, factory_args: Mapping[str, object]) -> None:
        """Add every handler registered in the ``switchboard.handlers`` entry point group.

        An entry point names a class or factory called with keyword arguments it
        may ignore (``**kwargs``); a broken plugin stops the start, loudly.
        """
        for point in entry_points(group=ENTRY_POINT_GROUP):
            factory = point.load()
            handler = factory(**factory_args)
            if not isinstance(handler, Handler):
                raise TypeError(f"entry point {point.name!r} did not build a handler")
            self.add(handler)
            log.info("handler loaded from entry point", extra={"handler": point.name})


class WorkspaceHandlers(Protocol):
    """A workspace's own handlers (``experts.WorkspaceExperts``)."""

    async def of(self, workspace_id: str) -> Mapping[str, Handler]:
        """The workspace's handlers by id; raises DependencyUnavailable if unknown now."""
        ...


_NONE: Final[Mapping[str, Handler]] = MappingProxyType({})


class Router:
    def __init__(
        self,
        registry: Registry,
        routes: Routes,
        default: str,
        experts: WorkspaceHandlers | None = None,
    ) -> None:
        self.registry = registry
        self.routes = routes
        self.default = default
        self.experts = experts

    async def local(self, workspace_id: str) -> Mapping[str, Handler]:
        """The workspace's own handlers, to pass to ``choose``."""
        if self.experts is None:
            return _NONE
        return await self.experts.of(workspace_id)

    async def find(self, workspace_id: str, handler_id: str) -> Handler | None:
        """The handler a run of ``workspace_id`` names, the operator's first."""
        return self._get(handler_id, await self.local(workspace_id))

    async def listed(self, workspace_id: str) -> list[Handler]:
        """Every handler ``workspace_id`` may route to, by id."""
        local = await self.local(workspace_id)
        found = {k: h for k, h in local.items() if self.registry.get(k) is None}
        found.update((h.capabilities.id, h) for h in self.registry.all())
        return [found[k] for k in sorted(found)]

    def _get(self, handler_id: str, local: Mapping[str, Handler]) -> Handler | None:
        # The operator's handler wins a clash, whatever the workspace registered.
        return self.registry.get(handler_id) or local.get(handler_id)

    def named(
        self, handler_id: str, field: str, reason: str, local: Mapping[str, Handler]
    ) -> Choice:
        """An explicit choice: ``handler_id`` itself, or an error on ``field``."""
        handler = self._get(handler_id, local)
        if handler is None:
            raise InvalidArgument(
                f"no handler {handler_id!r}; ListHandlers shows the available ones",
                [FieldViolation(field, f"names unknown handler {handler_id!r}")],
            )
        if not handler.available():
            raise DependencyUnavailable(
                f"handler {handler_id!r} is unavailable now (unhealthy or circuit open)",
                metadata={"handler": str(HandlerName(handler_id))},
            )
        return Choice(handler, reason)

    def choose(
        self,
        request_handler: str,
        workspace_id: str,
        message: context_pb2.Message,
        local: Mapping[str, Handler] = _NONE,
    ) -> Choice:
        """The handler for ``message`` when the workspace has no default assistant;
        ``local`` is ``await self.local(workspace_id)``."""
        if request_handler:
            handler_id = request_handler.removeprefix("handlers/")
            return self.named(handler_id, "handler", "named in the request", local)
        found = self.by_message(message, local)
        return found if found is not None else self.by_default(workspace_id)

    def by_message(
        self, message: context_pb2.Message, local: Mapping[str, Handler] = _NONE
    ) -> Choice | None:
        """Rules 2 to 4: the handler the message itself picks, if any."""
        if message.HasField("metadata") and "handler" in message.metadata.fields:
            value = message.metadata.fields["handler"].string_value.removeprefix("handlers/")
            return self.named(value, "message.metadata.handler", "named in message metadata", local)
        for found in self._by_content_type(message.parts):
            return found
        text = next((p.text for p in message.parts if p.WhichOneof("part") == "text"), "")
        if text.startswith("/"):
            command = text[1:].split(maxsplit=1)
            word = command[0].lower() if command else ""
            target = self.routes.prefixes.get(word) or word
            if target:
                handler = self._get(target, local)
                if handler is not None and handler.available():
                    return Choice(handler, f"command prefix /{word}", strip_prefix="/" + word)
        return None

    def by_default(self, workspace_id: str) -> Choice:
        """Rules 6 and 7: the workspace's route, else the process default."""
        ws_default = self.routes.workspaces.get(workspace_id)
        if ws_default:
            handler = self.registry.get(ws_default)
            if handler is not None and handler.available():
                return Choice(handler, f"the route workspace:{workspace_id}")
        handler = self.registry.get(self.default)
        if handler is not None and handler.available():
            return Choice(handler, "the default handler")
        for fallback in self.registry.all():  # the default is down: any available one
            if fallback.available():
                return Choice(fallback, f"the default {self.default!r} is unavailable")
        raise DependencyUnavailable("no handler is available now; retry later")

    def _by_content_type(self, parts: Iterable[context_pb2.ContentPart]) -> Iterable[Choice]:
        if not self.routes.content_types:
            return
        for part in parts:
            mime = _mime_of(part)
            if not mime:
                continue
            for pattern, handler_id in self.routes.content_types:
                if fnmatch.fnmatchcase(mime.lower(), pattern):
                    handler = self.registry.get(handler_id)
                    if handler is not None and handler.available():
                        yield Choice(handler, f"content type {mime}")
                        return


def _mime_of(part: context_pb2.ContentPart) -> str:
    kind = part.WhichOneof("part")
    if kind == "text":
        return "text/plain"
    if kind == "data":
        return "application/json"
    if kind == "file":
        return part.file.mime_type
    return ""
