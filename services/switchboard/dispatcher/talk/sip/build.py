"""The SIP user agent as a dispatcher process builds it from ``SWITCHBOARD_SIP_*``: none
without ``SWITCHBOARD_SIP_LISTEN``; else the engine started (with an account for each
trunk that places calls), the process made the call book's ``Phone`` (which then ends
the calls of stopped servers and holds the minutes' quota: ``talk/phone/book.py``), its
calls closed (before the dispatcher's runs stop) and the library ended when the process
stops."""

from __future__ import annotations

import logging
import ssl

from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.talk.phone.book import CallBook
from switchboard.dispatcher.talk.session import Talks
from switchboard.dispatcher.talk.sip.calls import CallLimits, Calls
from switchboard.dispatcher.talk.sip.engine import (
    PJSIP_MAX_CALLS,
    EngineFailed,
    EngineOptions,
    OutboundAccount,
    SipEngine,
)
from switchboard.dispatcher.talk.sip.rules import Dialplan
from switchboard.dispatcher.talk.sip.settings import SipSettings, listen
from switchboard.dispatcher.talk.webrtc.ports import PortRange
from switchboard.dispatcher.tools.runner import LateTools
from switchboard.platform.config import ConfigError
from switchboard.platform.process import Shared

log = logging.getLogger("switchboard.dispatcher.talk.sip")


async def start_sip(
    shared: Shared, talks: Talks, context: ContextPort, late: LateTools, book: CallBook
) -> Calls | None:
    settings = shared.section(SipSettings)
    where = listen(settings.sip_listen)
    if where is None:
        return None
    plan = Dialplan.read(
        settings.sip_trunks.get_secret_value(), settings.sip_rules.get_secret_value()
    )
    calls = Calls(
        plan=plan,
        talks=talks,
        context=context,
        policy=shared.policy,
        limits=CallLimits(
            max_calls=settings.sip_max_calls,
            max_calls_per_workspace=settings.sip_max_calls_per_workspace,
            invites_per_s=settings.sip_invites_per_s,
            invite_burst=settings.sip_invite_burst,
            dtmf_pause_s=settings.sip_dtmf_pause_s,
            max_call_s=settings.sip_max_call_s,
        ),
        book=book,
    )
    ports = PortRange.parse(settings.sip_rtp_ports)
    tls = listen(settings.sip_tls_listen)
    engine = SipEngine(
        EngineOptions(
            host=where[0],
            port=where[1],
            public_host=settings.sip_public_host,
            rtp_low=ports.low if ports else 0,
            rtp_count=len(ports) if ports else 0,
            # PJSIP's build holds 32 call slots at most, refused calls too while they end.
            max_calls=PJSIP_MAX_CALLS,
            outbound=tuple(
                OutboundAccount(
                    trunk=t.name,
                    caller_id=t.outbound.caller_id,
                    username=t.outbound.username,
                    password=t.outbound.password,
                    srtp=t.srtp,
                )
                for t in plan.trunks
                if t.outbound is not None
            ),
            tls_host=tls[0] if tls else "",
            tls_port=tls[1] if tls else 0,
            tls_cert=settings.sip_tls_cert,
            tls_key=settings.sip_tls_key,
            tls_ca=settings.sip_tls_ca or ssl.get_default_verify_paths().cafile or "",
        ),
        calls.screen,
        calls,
    )
    calls.engine = engine
    late.sources.append(calls)  # the assistant's call tools, offered to its calls' runs

    async def started() -> Calls:
        return calls

    await shared.part(Calls, started)
    try:
        port = await engine.start()
    except EngineFailed as exc:
        raise ConfigError(
            f"SWITCHBOARD_SIP_LISTEN: SIP cannot listen on {where[0]}:{where[1]}"
            + (f" and {tls[0]}:{tls[1]} (TLS)" if tls else "")
            + f": {exc}"
        ) from None
    shared.resources.push_async_callback(engine.stop)
    shared.resources.push_async_callback(calls.close)
    book.phone = calls
    log.info(
        "SIP listening on %s:%d (UDP)%s; %d trunks, %d dispatch rules",
        where[0],
        port,
        f" and {tls[0]}:{engine.tls_port} (TLS)" if tls else "",
        len(plan.trunks),
        len(plan.rules),
    )
    return calls
