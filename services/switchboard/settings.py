"""Every setting of a process: the kernel's section and each service's, read together.

Each section is read from the same ``SWITCHBOARD_*`` variables by its own class:
the kernel's in ``platform/config.py``, each service's in its package
(``<service>/settings.py``), and those two services read beside the platform
part they read them for (docs/decisions.md, entry 48). This module, above the
services, composes them: ``load_settings`` reads every section at once and
names every bad variable in one ``ConfigError``, refuses a ``SWITCHBOARD_*``
variable that no section has (with the nearest name of any section), and
``settings_table`` is the README's configuration table, written from the
sections' fields by ``make docs`` (scripts/render-settings.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar, get_type_hints

from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo

from switchboard.a2a.settings import A2ASettings
from switchboard.auth.settings import AuthSettings
from switchboard.context.files.settings import FileSettings
from switchboard.context.semantic.settings import SemanticSettings
from switchboard.context.settings import ContextSettings
from switchboard.context.windows.settings import WindowSettings
from switchboard.dispatcher.llm.settings import LlmSettings
from switchboard.dispatcher.schedules.settings import ScheduleSettings
from switchboard.dispatcher.settings import DispatcherSettings
from switchboard.dispatcher.talk.sip.settings import SipSettings
from switchboard.dispatcher.talk.streams.settings import StreamsSettings
from switchboard.dispatcher.talk.webrtc.settings import WebRtcSettings
from switchboard.dispatcher.voice.settings import VoiceSettings
from switchboard.events.settings import EventSettings
from switchboard.integration.settings import IntegrationSettings
from switchboard.platform import config
from switchboard.platform.config import (
    NOT_SETTINGS,
    PREFIX,
    SHOWN_DEFAULT,
    ConfigError,
    KernelSettings,
    Section,
)
from switchboard.platform.rpc.outbound.channels import RemoteHandlerSettings
from switchboard.platform.rpc.outbound.peers import PeerSettings
from switchboard.platform.security.egress import EgressSettings

_S = TypeVar("_S", bound=Section)


@dataclass(frozen=True)
class Settings:
    """A process's settings, one section per attribute; in this order in the README."""

    kernel: KernelSettings
    events: EventSettings
    context: ContextSettings
    windows: WindowSettings
    files: FileSettings
    semantic: SemanticSettings
    peers: PeerSettings
    dispatcher: DispatcherSettings
    schedules: ScheduleSettings
    llm: LlmSettings
    voice: VoiceSettings
    webrtc: WebRtcSettings
    sip: SipSettings
    streams: StreamsSettings
    remote_handlers: RemoteHandlerSettings
    integration: IntegrationSettings
    egress: EgressSettings
    auth: AuthSettings
    a2a: A2ASettings

    def section(self, kind: type[_S]) -> _S:
        """The section of type ``kind`` (``Shared.section`` hands it to a service's build)."""
        for section in self.sections():
            if type(section) is kind:
                return section
        raise LookupError(f"no settings section {kind.__name__}")

    def sections(self) -> Iterator[Section]:
        for field in dataclasses.fields(self):
            yield getattr(self, field.name)

    @classmethod
    def from_values(cls, **values: object) -> Settings:
        """Every section from ``values`` (by setting name) over the environment, without
        the check for unknown variables (``load_settings`` adds it): for tests and tools.
        ConfigError names every bad one."""
        settings, found = _compose(values)
        if settings is None:
            raise ConfigError("; ".join(found))
        return settings


#: Attribute of ``Settings`` -> its section's class, in the README's order.
_ATTRIBUTES: Final[dict[str, type[Section]]] = {
    field.name: get_type_hints(Settings)[field.name] for field in dataclasses.fields(Settings)
}
#: Every section's class.
SECTIONS: Final[tuple[type[Section], ...]] = tuple(_ATTRIBUTES.values())


def _owners() -> dict[str, type[Section]]:
    owners: dict[str, type[Section]] = {}
    for kind in SECTIONS:
        for name in kind.model_fields:
            if name in owners:
                raise TypeError(f"{name} is a field of {owners[name].__name__} and {kind.__name__}")
            owners[name] = kind
    return owners


#: Setting name -> the section that has it; no two sections share one.
OWNERS: Final = _owners()
#: Setting name -> its field (its default, its description), whichever section has it.
FIELDS: Final[dict[str, FieldInfo]] = {
    name: kind.model_fields[name] for name, kind in OWNERS.items()
}


def _compose(values: Mapping[str, object]) -> tuple[Settings | None, list[str]]:
    given: dict[type[Section], dict[str, object]] = {kind: {} for kind in SECTIONS}
    for name, value in values.items():
        # A name no section has goes to the kernel's, which refuses it as an extra input.
        given[OWNERS.get(name, KernelSettings)][name] = value
    built: dict[type[Section], Section] = {}
    found: list[str] = []
    # Every section is read even when one is bad: every problem is named at once.
    for kind in SECTIONS:
        try:
            built[kind] = kind(**given[kind])
        except ValidationError as exc:
            found += config.problems(exc)
    if found:
        return None, found
    sections: dict[str, Any] = {attribute: built[kind] for attribute, kind in _ATTRIBUTES.items()}
    return Settings(**sections), []


def known_variables() -> frozenset[str]:
    """Every environment variable that is a setting, of any section."""
    return frozenset(PREFIX + name.upper() for name in OWNERS)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One message per ``SWITCHBOARD_*`` variable that is no setting, with the nearest name.

    pydantic-settings ignores them, so a misspelt variable would silently
    leave its setting at the default (a limit, a timeout, a secret).
    """
    known = known_variables()
    found = []
    for variable in sorted(environ):
        name = variable.upper()
        if not name.startswith(PREFIX) or name in known or name in NOT_SETTINGS:
            continue
        # Compared without the prefix, which every name shares and would make all alike.
        close = difflib.get_close_matches(
            name.removeprefix(PREFIX), [k.removeprefix(PREFIX) for k in known], n=1, cutoff=0.6
        )
        hint = f"; did you mean {PREFIX}{close[0]}?" if close else ""
        found.append(f"{variable} is not a setting{hint}")
    return found


def load_settings(**overrides: object) -> Settings:
    """Read every section from the environment, with explicit overrides (CLI flags) on top.

    ConfigError names every bad variable at once, of every section, and never quotes
    a value.
    """
    found = unknown_variables(os.environ)
    settings, invalid = _compose(overrides)
    found += invalid
    if settings is None or found:
        raise ConfigError("; ".join(found))
    return settings


def _default_text(info: FieldInfo) -> str:
    extra = info.json_schema_extra
    if isinstance(extra, dict) and SHOWN_DEFAULT in extra:
        return str(extra[SHOWN_DEFAULT])
    value = info.default
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, tuple):
        value = ",".join(str(item) for item in value)
    return f"`{value}`" if value != "" else "empty"


def settings_table() -> str:
    """The README's configuration table: a row per setting, section by section, from its
    field (the description is the meaning; ``config.shown`` overrides the default's text)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for kind in SECTIONS:
        for name, info in kind.model_fields.items():
            rows.append(
                f"| `{PREFIX}{name.upper()}` | {_default_text(info)} | {info.description} |"
            )
    return "\n".join(rows) + "\n"
