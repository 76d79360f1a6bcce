"""Calls' ports in PJSIP's conference bridge lent and given back as calls come and go, fast,
in a process of its own (``test_ports.py`` runs it under glibc's ``MALLOC_PERTURB_``, which
fills freed memory, so a port the bridge reads after it was freed crashes it at once).

Usage: ``portchurn_proc.py ROUNDS``; prints ``survived ROUNDS made N`` and exits 0.
"""

from __future__ import annotations

import random
import sys

import pjsua2 as pj

from switchboard.dispatcher.talk.sip.pjsip import Playout, Ports


class _Host:
    """The engine as a port reaches it: only the audio it hands in is used."""

    def __init__(self) -> None:
        self.frames = 0

    @property
    def account(self) -> object:
        return None

    def on_invite(self, call_id: int, source: str, message: str) -> None: ...

    def on_state(self, leg: object) -> None: ...

    def on_media(self, leg: object) -> None: ...

    def on_transferred(self, leg: object, code: int) -> None: ...

    def on_key(self, leg: object, digit: str) -> None: ...

    def on_audio(self, number: int, pcm: bytes) -> None:
        self.frames += 1


def main(rounds: int) -> None:
    ep = pj.Endpoint()
    ep.libCreate()
    config = pj.EpConfig()
    config.uaConfig.threadCnt = 0
    config.uaConfig.mainThreadOnly = False
    config.logConfig.level = 1
    config.logConfig.consoleLevel = 1
    config.medConfig.clockRate = 16_000
    config.medConfig.sndClockRate = 16_000
    ep.libInit(config)
    ep.audDevManager().setNullDev()
    ep.libStart()
    host = _Host()
    ports = Ports(host)
    number = 0
    # Varied, but the same each run: how long the ports stay in the bridge, their rates.
    varied = random.Random(rounds)  # noqa: S311 - not for secrets
    for _ in range(rounds):
        rate = varied.choice((8_000, 16_000))
        lent = []
        for _ in range(3):
            number += 1
            lent.append(ports.lend(number, rate, Playout(rate)))
        # Each port hears the others and speaks to them, as a call's port and its stream.
        for a in lent:
            for b in lent:
                if a is not b:
                    a.startTransmit(b)
        # The bridge's clock runs on its own thread meanwhile (its ticks every 20 ms).
        ep.libHandleEvents(varied.randint(0, 45))
        for a in lent:
            for b in lent:
                if a is not b:
                    a.stopTransmit(b)
            ports.give_back(a, rate, Playout(rate))
    ports.abandon()
    ep.libDestroy()
    print(f"survived {rounds} made {ports.made} heard {host.frames > 0}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
