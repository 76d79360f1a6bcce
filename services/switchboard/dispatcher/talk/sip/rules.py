"""Who may call in, and where a call goes: trunks and dispatch rules.

A **trunk** is a carrier (or a PBX) allowed to send calls: the addresses its INVITEs come
from (``addresses``, networks in CIDR), and, if it has them, the digest credentials its
INVITEs must answer a challenge with (``username``, ``password``: ``digest.py``). A trunk
with credentials may list no addresses: it calls from anywhere and is known by its
username. An INVITE from no trunk's address, to no trunk that takes any, is refused (403)
before anything else is looked at.

A **dispatch rule** takes a call to an assistant: the number dialed (the Request-URI's
user part, ``+15550100``; ``*`` for any), the trunks it listens on (all if none), the
assistant that answers (``workspaces/{w}/assistants/{a}``: the call's conversation is made
in its workspace), and the user the call acts as (``user``, a member of that workspace
who may write in it: the conversation is theirs, the runs count against their budgets and
quotas). ``callers`` maps caller IDs to users: a caller whose number is listed acts as
that user (their own conversation, their rights); any other caller is anonymous, and has
no way into Switchboard but the call's audio. ``transfer`` names the destinations the
assistant may hand the call to (``tools.py``). The first rule that matches wins, so a
``*`` rule goes last.

A trunk may require its calls to be **secure**: ``tls`` (its INVITEs come over SIP over TLS,
else 403; its calls out go over TLS) and ``srtp`` (its calls' audio is SRTP, the keys in the
TLS-protected offer: an offer without them is refused 488), which needs ``tls``.

A trunk may also carry calls **out** (``outbound``): where its INVITEs go (``to``, the
carrier's SIP address), the number they present (``caller_id``), the digest credentials the
carrier challenges them with (``username``, ``password``: its own, not the ones it calls in
with), the workspaces that may call through it and the number prefixes they may call
(``numbers``, such as ``+1`` or ``+4420``: a trunk never calls a number outside them, so a
leaked credential cannot run up calls abroad). A trunk with ``outbound`` and neither
addresses nor credentials of its own takes no calls in.

Both are read at start (``SWITCHBOARD_SIP_TRUNKS``, ``SWITCHBOARD_SIP_RULES``), as JSON,
and a mistake stops the process with the words below.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Final

from switchboard.platform.values.resources import AssistantName, UserName

#: The most trunks and rules a process takes, and the most callers a rule maps.
MAX_TRUNKS: Final = 64
MAX_RULES: Final = 256
MAX_CALLERS: Final = 1000
_NUMBER: Final = re.compile(r"^(\*|\+?[0-9A-Za-z._-]{1,64})$")
_NAME: Final = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_CREDENTIAL: Final = re.compile(r"^[A-Za-z0-9._-]+$")
_SIP_URI: Final = re.compile(r"^sips?:[^\s<>\"]{1,252}$")
#: The most transfer destinations a rule names.
MAX_DESTINATIONS: Final = 16
#: A number a call may be placed to: E.164.
E164: Final = re.compile(r"^\+[1-9][0-9]{7,14}$")
_PREFIX: Final = re.compile(r"^\+[0-9]{0,15}$")
_ID: Final = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
#: The most workspaces and number prefixes an outbound trunk lists.
MAX_OUTBOUND_ENTRIES: Final = 256


@dataclass(frozen=True)
class Outbound:
    """How a trunk places calls (the module doc)."""

    to: str  # the carrier's SIP address, ``sip:host[:port]``
    caller_id: str
    workspaces: frozenset[str]
    numbers: tuple[str, ...]
    username: str = ""
    password: str = field(default="", repr=False)
    tls: bool = False  # the trunk's: its INVITEs go over TLS

    def allows(self, workspace_id: str, number: str) -> bool:
        return workspace_id in self.workspaces and any(number.startswith(p) for p in self.numbers)

    def uri(self, number: str) -> str:
        """The Request-URI of a call to ``number`` through the carrier."""
        scheme, _, rest = self.to.partition(":")
        return f"{scheme}:{number}@{rest}" + (";transport=tls" if self.tls else "")


@dataclass(frozen=True)
class Trunk:
    name: str
    addresses: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    #: Digest credentials its INVITEs must answer a challenge with (empty: none asked).
    username: str = ""
    password: str = field(default="", repr=False)
    outbound: Outbound | None = None
    #: Its INVITEs come (and go) over TLS; its calls' audio is SRTP (the module doc).
    tls: bool = False
    srtp: bool = False

    @property
    def authenticates(self) -> bool:
        return bool(self.username)

    @property
    def takes_calls(self) -> bool:
        """Whether calls may come in by it (an outbound-only trunk takes none)."""
        return bool(self.addresses or self.username)

    def allows(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.addresses)


@dataclass(frozen=True)
class DispatchRule:
    number: str
    assistant: AssistantName
    user: UserName
    trunks: frozenset[str] = frozenset()
    callers: dict[str, UserName] = field(default_factory=dict)
    #: Where the assistant may transfer a call (``transfer_call``): name to SIP URI.
    transfer: dict[str, str] = field(default_factory=dict)

    @property
    def workspace_id(self) -> str:
        return self.assistant.workspace

    def matches(self, trunk: str, dialed: str) -> bool:
        if self.trunks and trunk not in self.trunks:
            return False
        return self.number in ("*", dialed)

    def acts_as(self, caller: str) -> tuple[UserName, bool]:
        """The user the call acts as, and whether the caller is that user (not anonymous)."""
        known = self.callers.get(caller)
        return (known, True) if known is not None else (self.user, False)


@dataclass(frozen=True)
class Dialplan:
    trunks: tuple[Trunk, ...] = ()
    rules: tuple[DispatchRule, ...] = ()

    def trunk_of(self, address: str) -> Trunk | None:
        """The trunk whose addresses hold ``address``."""
        return next((t for t in self.trunks if t.allows(address)), None)

    def trunk_named(self, username: str) -> Trunk | None:
        """The trunk of no addresses whose digest username is ``username``: a carrier
        that calls from anywhere and proves itself by its credentials."""
        if not username:
            return None
        return next((t for t in self.trunks if not t.addresses and t.username == username), None)

    @property
    def secure(self) -> bool:
        """Whether some trunk calls over TLS (the user agent must listen on it)."""
        return any(t.tls for t in self.trunks)

    @property
    def open_trunks_need_tls(self) -> bool:
        """Whether every trunk that takes calls from any address takes them over TLS only."""
        open_ones = [t for t in self.trunks if not t.addresses and t.username]
        return bool(open_ones) and all(t.tls for t in open_ones)

    @property
    def open_trunks(self) -> bool:
        """Whether some trunk takes calls from any address (with credentials)."""
        return any(not t.addresses and t.username for t in self.trunks)

    def named(self, name: str) -> Trunk | None:
        return next((t for t in self.trunks if t.name == name), None)

    def outbound(self, name: str) -> tuple[Trunk, Outbound] | None:
        """The trunk ``name`` if it places calls."""
        trunk = self.named(name)
        if trunk is None or trunk.outbound is None:
            return None
        return trunk, trunk.outbound

    def rule_for(self, trunk: str, dialed: str) -> DispatchRule | None:
        return next((r for r in self.rules if r.matches(trunk, dialed)), None)

    @classmethod
    def read(cls, trunks_json: str, rules_json: str) -> Dialplan:
        """ValueError naming the entry and the field for anything wrong."""
        trunks = tuple(_trunk(i, t) for i, t in enumerate(_list(trunks_json, "trunks", MAX_TRUNKS)))
        names = [t.name for t in trunks]
        if len(set(names)) != len(names):
            raise ValueError("SIP trunks: two trunks have the same name")
        open_names = [t.username for t in trunks if not t.addresses and t.username]
        if len(set(open_names)) != len(open_names):
            raise ValueError("SIP trunks: two trunks without addresses have the same username")
        rules = tuple(
            _rule(i, r, set(names)) for i, r in enumerate(_list(rules_json, "rules", MAX_RULES))
        )
        return cls(trunks, rules)


def _list(text: str, what: str, most: int) -> list[dict[str, Any]]:
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"SIP {what}: not JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"SIP {what}: a JSON list of objects is needed")
    if len(value) > most:
        raise ValueError(f"SIP {what}: at most {most}")
    return value


def _trunk(index: int, value: dict[str, Any]) -> Trunk:
    where = f"SIP trunks[{index}]"
    _only(where, value, {"name", "addresses", "username", "password", "outbound", "tls", "srtp"})
    tls, srtp = value.get("tls", False), value.get("srtp", False)
    if type(tls) is not bool or type(srtp) is not bool:
        raise ValueError(f"{where}: tls and srtp are true or false")
    if srtp and not tls:
        raise ValueError(f"{where}.srtp: needs tls (SRTP's keys travel in the SIP offer)")
    name = value.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}.name: lowercase letters, digits and '-', from a letter")
    username, password = value.get("username", ""), value.get("password", "")
    if (
        not isinstance(username, str)
        or not isinstance(password, str)
        or bool(username) != bool(password)
        or len(username) > 64
        or len(password) > 256
    ):
        raise ValueError(f"{where}: a username (up to 64) and a password (up to 256), or neither")
    if username and (not _CREDENTIAL.match(username) or len(password) < 12):
        raise ValueError(
            f"{where}: the username is letters, digits and '._-'; the password at least 12 long"
        )
    outbound = _outbound(where, value["outbound"], tls) if "outbound" in value else None
    addresses = value.get("addresses", [])
    if (
        not isinstance(addresses, list)
        or len(addresses) > 64
        or (not addresses and not username and outbound is None)
    ):
        raise ValueError(
            f"{where}.addresses: 1 to 64 networks (CIDR) are needed (or none, with credentials "
            "or for an outbound-only trunk)"
        )
    networks = []
    for j, text in enumerate(addresses):
        try:
            networks.append(ipaddress.ip_network(str(text), strict=False))
        except ValueError:
            raise ValueError(f"{where}.addresses[{j}]: {text!r} is not a network") from None
    return Trunk(
        name=name,
        addresses=tuple(networks),
        username=username,
        password=password,
        outbound=outbound,
        tls=tls,
        srtp=srtp,
    )


def _outbound(trunk: str, value: Any, tls: bool) -> Outbound:
    where = f"{trunk}.outbound"
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: an object with to, caller_id, workspaces and numbers")
    _only(where, value, {"to", "caller_id", "workspaces", "numbers", "username", "password"})
    to = value.get("to")
    if not isinstance(to, str) or not _SIP_URI.match(to) or "@" in to or ";" in to:
        raise ValueError(f"{where}.to: the carrier's address, sip:host or sip:host:port")
    caller_id = value.get("caller_id")
    if not isinstance(caller_id, str) or not E164.match(caller_id):
        raise ValueError(f"{where}.caller_id: the number calls present, E.164 (+15550100)")
    workspaces = value.get("workspaces")
    if (
        not isinstance(workspaces, list)
        or not 1 <= len(workspaces) <= MAX_OUTBOUND_ENTRIES
        or not all(isinstance(w, str) and _ID.match(w) for w in workspaces)
    ):
        raise ValueError(f"{where}.workspaces: the ids of the workspaces that may call out on it")
    numbers = value.get("numbers")
    if (
        not isinstance(numbers, list)
        or not 1 <= len(numbers) <= MAX_OUTBOUND_ENTRIES
        or not all(isinstance(n, str) and _PREFIX.match(n) for n in numbers)
    ):
        raise ValueError(
            f'{where}.numbers: the prefixes it may call, such as "+1" or "+4420" '
            '("+" for any number)'
        )
    username, password = value.get("username", ""), value.get("password", "")
    if (
        not isinstance(username, str)
        or not isinstance(password, str)
        or bool(username) != bool(password)
        or len(username) > 64
        or len(password) > 256
        or (username and not _CREDENTIAL.match(username))
    ):
        raise ValueError(f"{where}: a username (up to 64) and a password (up to 256), or neither")
    return Outbound(
        to=to,
        caller_id=caller_id,
        workspaces=frozenset(workspaces),
        numbers=tuple(numbers),
        username=username,
        password=password,
        tls=tls,
    )


def _rule(index: int, value: dict[str, Any], trunks: set[str]) -> DispatchRule:
    where = f"SIP rules[{index}]"
    _only(where, value, {"number", "assistant", "user", "trunks", "callers", "transfer"})
    number = value.get("number")
    if not isinstance(number, str) or not _NUMBER.match(number):
        raise ValueError(f"{where}.number: a number or SIP user (up to 64 characters), or '*'")
    try:
        assistant = AssistantName.parse(str(value.get("assistant", "")), "assistant")
        user = UserName.parse(str(value.get("user", "")), "user")
    except Exception as exc:  # noqa: BLE001 - the parser's InvalidArgument, said plainly
        raise ValueError(f"{where}: {exc}") from None
    named = value.get("trunks", [])
    if not isinstance(named, list) or any(t not in trunks for t in named):
        raise ValueError(f"{where}.trunks: names of trunks listed in SWITCHBOARD_SIP_TRUNKS")
    callers = value.get("callers", {})
    if not isinstance(callers, dict) or len(callers) > MAX_CALLERS:
        raise ValueError(f"{where}.callers: an object of caller ID to users/{{id}}")
    mapped = {}
    for caller, name in callers.items():
        if not _NUMBER.match(str(caller)) or caller == "*":
            raise ValueError(f"{where}.callers: {caller!r} is not a caller ID")
        try:
            mapped[str(caller)] = UserName.parse(str(name), "callers")
        except Exception:  # noqa: BLE001
            raise ValueError(f"{where}.callers[{caller!r}]: users/{{id}} is needed") from None
    transfer = value.get("transfer", {})
    if not isinstance(transfer, dict) or len(transfer) > MAX_DESTINATIONS:
        raise ValueError(
            f"{where}.transfer: an object of up to {MAX_DESTINATIONS} names to SIP URIs"
        )
    for name, uri in transfer.items():
        if not _NAME.match(str(name)) or not isinstance(uri, str) or not _SIP_URI.match(uri):
            raise ValueError(
                f"{where}.transfer[{name!r}]: a name (lowercase, digits, '-') to a sip: or "
                "sips: URI (up to 256 characters)"
            )
    return DispatchRule(
        number=number,
        assistant=assistant,
        user=user,
        trunks=frozenset(named),
        callers=mapped,
        transfer=dict(transfer),
    )


def _only(where: str, value: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}")


class InviteRate:
    """INVITEs per source address: a token bucket each (``rate`` a second, ``burst`` at
    once), so a flood from one address is refused (503) before it costs a call. Used on
    the engine's thread only."""

    def __init__(self, rate: float, burst: int, most_sources: int = 4096) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._most = most_sources
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, source: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, then = self._buckets.get(source, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._rate)
        if len(self._buckets) >= self._most and source not in self._buckets:
            # Full buckets say nothing: the oldest go first.
            for key in list(self._buckets)[: self._most // 4]:
                del self._buckets[key]
        if tokens < 1:
            self._buckets[source] = (tokens, now)
            return False
        self._buckets[source] = (tokens - 1, now)
        return True
