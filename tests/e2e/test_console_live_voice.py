"""Live voice in the browser console: a Talk session over a WebRTC peer connection
(``ConnectTalk`` through Envoy's grpc-web), with a real microphone's path and real speech
engines. Chromium's fake microphone loops a WAV that eSpeak NG spoke: the counting words,
then 3 s of silence, again and again; the server ends each turn by its voice activity
detection, transcribes it with PocketSphinx and speaks the echo handler's answer with
eSpeak NG, both behind the local audio server (tests/fakes/audio_server.py).

The loop is the design: the next pass of the words begins 5 s after the last ended, and
a turn's answer (its words and the echo handler's trailer, about 9 words, spoken at 80 a
minute: about 6.5 s) begins 1 to 2 s after its words end on a quiet host, so the next pass
is spoken over it (barge-in) whenever the answer begins within those 5 s. At eSpeak's
usual 140 words a minute and a 3 s gap the margin was 3 s, and beside the suite's load on
two cores the transcription backlog pushed every answer past it: the next turn superseded
each run before it spoke.

One stack for the module: the console built into a temporary directory, the audio server,
``switchboard serve --dev`` with the voice settings (at most one WebRTC peer per user),
behind a relay so it can be replaced, Envoy with ``--console`` on its TLS listener; one
Chromium with the fake microphone. The page reaches the server's host candidate on this
machine's other interface (aiortc leaves out 127.0.0.1); Chromium's own host candidates are
addresses, not mDNS names, since the page holds the microphone (no flag needed).

- A live session: Live opens it; the microphone's level moves; the first turn is
  transcribed (partial transcripts first, then the final, which says the counting words)
  and stored as the user message; the answer's text streams into the turn and its run's
  card; its speech plays on the inbound track (the page counts samples with the energy of
  speech); the next pass of the words interrupts an answer (SPEECH_INTERRUPTED, the run
  CANCELLED); End closes it; screenshots at a desktop's and a phone's width.
- Refused as the server refuses: a second live session of the same user is
  RESOURCE_EXHAUSTED, said beside Live; once the first ends, Live works again; an
  assistant without a voice offers no Live.
- The server replaced while a session is live: the page resumes it on the new process
  once (``resume`` after the last numbered frame), says so, and the next turn is answered.
"""

from __future__ import annotations

import io
import os
import wave
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.chromium import artifacts_dir
from tests.e2e.envoy import EnvoyProcess
from tests.e2e.procs import ServeProcess
from tests.e2e.test_console import (
    Chromium,
    Page,
    Server,
    User,
    open_conversation,
    problems,
    run_state,
    sign_in,
    split_words,
    text_of,
    tid,
)
from tests.e2e.test_console_voice import HEARD, _audio_server, built_console, voice_env
from tests.infra.speech import COUNTING, says, speak
from tests.infra.tcprelay import TcpRelay

# A hang guard: a live session's whole course (sign-in, a turn heard and answered, its
# speech, an interruption, End) took past the default 120 s beside the suite on a slow host.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

#: The silence after each pass of the words: longer than the turn's end (700 ms of
#: silence) plus the answer's start, shorter than that plus the answer (module doc).
GAP_MS: Final = 5_000
#: The answers' pace (the audio server's eSpeak, words a minute): slow, so an answer
#: outlasts the gap (module doc).
ANSWER_WPM: Final = 80
#: The inbound track's sound, as the page counts it: at least this much of it voiced,
#: at this level (RMS of the voiced blocks; eSpeak's speech is about 0.1, silence 0).
SPOKEN_MS: Final = 500
SPEECH_RMS: Final = 0.02

LIVE: Final = tid("live-control")
ENDED: Final = frozenset({"RUN_STATE_SUCCEEDED", "RUN_STATE_CANCELLED"})


@dataclass
class LiveStack:
    env: dict[str, str]
    serve: ServeProcess
    upstream: TcpRelay
    envoy: EnvoyProcess
    console_dir: Path
    #: The WAV Chromium's fake microphone loops.
    speech: Path

    @property
    def origin(self) -> str:
        return f"https://localhost:{self.envoy.tls_port}"

    @property
    def address(self) -> str:
        """The server, through the relay: the same address across a restart."""
        return f"127.0.0.1:{self.upstream.port}"

    def restart_server(self) -> None:
        """A new server process on the same database (and dev signing key) as the same
        dispatcher instance, so it takes back at start the runs the old one had going;
        the old one stops as it does in production (SIGTERM: its peers closed first)."""
        instance = self.serve.env["SWITCHBOARD_INSTANCE_ID"]
        self.upstream.retarget(0)
        assert self.serve.terminate() == 0
        self.serve.__exit__(None, None, None)
        self.serve = ServeProcess("--dev", env={**self.env, "SWITCHBOARD_INSTANCE_ID": instance})
        self.serve.start()
        self.upstream.retarget(self.serve.port)


def _looped_words() -> bytes:
    """The counting words, then GAP_MS of silence (a WAV at eSpeak's rate)."""
    spoken = speak(COUNTING)
    with wave.open(io.BytesIO(spoken)) as w:
        params = w.getparams()
        frames = w.readframes(w.getnframes())
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setparams(params)
        silence = bytes(params.sampwidth * params.nchannels * params.framerate * GAP_MS // 1000)
        w.writeframes(frames + silence)
    return out.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    root = tmp_path_factory.mktemp("console-live")
    console_dir = built_console(root)
    speech = root / "counting-looped.wav"
    speech.write_bytes(_looped_words())
    with ExitStack() as cleanup:
        voice_url = cleanup.enter_context(_audio_server("--speech-wpm", str(ANSWER_WPM)))
        upstream = cleanup.enter_context(TcpRelay())
        env = {
            **voice_env(root, voice_url),
            # One live session per user: the second is refused (RESOURCE_EXHAUSTED).
            "SWITCHBOARD_WEBRTC_MAX_PEERS_PER_USER": "1",
        }
        envoy = EnvoyProcess(f"127.0.0.1:{upstream.port}", tls=True, console=console_dir)
        cleanup.push(envoy.__exit__)
        serve = ServeProcess("--dev", env=env)
        live = LiveStack(env, serve, upstream, envoy, console_dir, speech)
        cleanup.callback(lambda: live.serve.__exit__(None, None, None))
        serve.start()
        upstream.retarget(serve.port)
        envoy.start()
        yield live


@pytest.fixture(scope="module")
def chromium(stack: LiveStack) -> Iterator[Chromium]:
    driver = Chromium(
        stack.envoy.cert_file,
        args=(
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            # Looped (no %noloop): the words come again and again, as a person would speak.
            f"--use-file-for-fake-audio-capture={stack.speech}",
        ),
    )
    yield driver
    driver.close()


@pytest.fixture
def server(stack: LiveStack) -> Iterator[Server]:
    client = Server(stack.address)
    yield client
    client.close()


def _voice_assistant(server: Server, user: User, workspace: str, *, voice: bool = True) -> str:
    """The workspace's default assistant, answering with the echo handler (the message's
    text), with a voice unless ``voice`` is false; its name."""
    made = server.dispatcher.CreateAssistant(
        dispatcher_pb2.CreateAssistantRequest(
            parent=workspace,
            assistant_id="talker",
            assistant=dispatcher_pb2.Assistant(
                display_name="Talker",
                handler="handlers/echo",
                workspace_default=True,
                voice=dispatcher_pb2.VoiceSettings(language="en") if voice else None,
            ),
        ),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    )
    return str(made.assistant.name)


def live_data(browser: Page) -> dict[str, str]:
    return browser.data(LIVE)


def go_live(browser: Page) -> dict[str, str]:
    """Clicks Live; the control's data once the session is live (its first frame came)."""
    browser.click(tid("live"))
    found: dict[str, str] = browser.wait(
        "(s) => { const d = document.querySelector(s).dataset;"
        " return d.state === 'live' && d.session && { ...d }; }",
        LIVE,
    )
    return found


TURNS_JS: Final = """() => [...document.querySelectorAll('[data-testid="live-turn"]')].map((t) => ({
  ...t.dataset,
  heard: t.querySelector('[data-testid="live-heard"]').textContent,
  answer: t.querySelector('[data-testid="live-answer"]').textContent,
}))"""


def turns(browser: Page) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = browser.eval(TURNS_JS)
    return found


#: Whether a turn's final transcript says HEARD, as ``says`` reads it.
_WORDS: Final = " ".join(HEARD)
SAYS_JS: Final = f"(t) => t.heard.toLowerCase().split(/\\s+/).join(' ').includes('{_WORDS}')"


def heard_turn(browser: Page, other_than: str = "") -> dict[str, Any]:
    """The first turn, of a run other than ``other_than``, whose final transcript says the
    words (waited for). Not merely the first final turn: the microphone loops the words
    from the page's load, so a session can go live in the middle of a pass, and its first
    turn is then the pass's tail (seen: 'by you' for "five")."""
    found: dict[str, Any] = browser.wait(
        f"(other) => ({TURNS_JS})().find((t) => t.final === 'true' && t.run"
        f" && t.run !== other && ({SAYS_JS})(t))",
        other_than,
    )
    return found


def end(browser: Page) -> None:
    before = live_data(browser)
    # Clicked where it is at that moment: a pointer click aims at where the button was
    # found, and on a loaded machine a run card appearing in between moves it away.
    browser.eval("(s) => document.querySelector(s).click()", tid("live-end"))
    try:
        browser.wait("(s) => document.querySelector(s).dataset.state === 'ended'", LIVE)
    except pytest.fail.Exception as failed:
        # What the control went through (a dropped connection, a resume, its state when
        # End was pressed) says why it did not end: the page's own record, not a guess.
        pytest.fail(f"{failed}\nthe live control before End: {before}\nnow: {live_data(browser)}")


def test_a_live_session_hears_answers_aloud_and_is_interrupted_by_speech(
    stack: LiveStack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    user = server.register("live")
    workspace, conversation = server.workspace(user, f"live-{os.getpid()}")
    _voice_assistant(server, user, workspace)
    shots = artifacts_dir(tmp_path) / "voice"
    shots.mkdir(parents=True, exist_ok=True)
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, user.email)
        open_conversation(browser, workspace, conversation)
        # Live beside push-to-talk, for the default assistant, which has a voice.
        browser.wait_visible(tid("live"))
        assert browser.visible(tid("talk"))
        started = go_live(browser)
        assert started["session"].startswith(conversation + "/voiceSessions/")
        # The microphone has the live session: push-to-talk steps aside meanwhile.
        assert not browser.visible(tid("talk"))
        assert browser.visible(tid("live-end"))
        # The microphone's level moves with the words (the page's AnalyserNode).
        browser.wait("(s) => Number(document.querySelector(s).dataset.micPeak) > 0.01", LIVE)
        # The first turn: heard as it was spoken (partials), then its final transcript.
        heard = heard_turn(browser)
        assert says(heard["heard"], HEARD), heard
        run = heard["run"]
        # Its answer's text streams into the turn (the echo handler says it back) and
        # into the run's card, which follows the run as SendMessage's would.
        answered = browser.wait(
            "([s, run]) => { const t = [...document.querySelectorAll(s)]"
            ".find((e) => e.dataset.run === run);"
            " const a = t && t.querySelector('[data-testid=\"live-answer\"]').textContent;"
            " return a && a.length > 0 && a; }",
            [tid("live-turn"), run],
        )
        assert answered.lower().split()[0] == heard["heard"].lower().split()[0]
        browser.wait_for(tid("run", run=run))
        # While an answer speaks, Stop is offered (INTERRUPT on the channel).
        browser.wait_visible(tid("live-stop"))
        # End stays where it is in its row as Stop comes and goes with the answers: a click
        # aimed at End never lands on Stop (the looping words start answers at any moment).
        # (The row itself moves as the conversation above it grows.)
        places = browser.wait(
            "([end, stop]) => { const e = document.querySelector(end);"
            " const at = e.getBoundingClientRect(), row = e.parentElement.getBoundingClientRect();"
            " const seen = (window.__endPlaces ??= {});"
            " seen[document.querySelector(stop).checkVisibility()] ="
            " [Math.round(at.x - row.x), Math.round(at.y - row.y)];"
            " return seen.true && seen.false && seen; }",
            [tid("live-end"), tid("live-stop")],
        )
        assert places["true"] == places["false"], places
        # Its speech plays from the inbound track: the page counted sound, not silence.
        audio = browser.wait(
            "([s, ms, rms]) => { const d = document.querySelector(s).dataset;"
            " return Number(d.voicedMs) >= ms && Number(d.audioRms) >= rms && { ...d }; }",
            [LIVE, SPOKEN_MS, SPEECH_RMS],
        )
        assert int(audio["audioSamples"]) > int(audio["voicedMs"]) * 16
        # The next pass of the words is spoken over an answer: the server interrupts it.
        interrupted = browser.wait(
            "(s) => { const d = document.querySelector(s).dataset;"
            " return Number(d.interruptions) >= 1 && { ...d }; }",
            LIVE,
        )
        cut = interrupted["interruptedRun"]
        assert cut.startswith(conversation + "/runs/")
        # The run interrupted ends CANCELLED: in its turn, its card, and on the server.
        browser.wait(
            "([s, run]) => [...document.querySelectorAll(s)].some((t) => t.dataset.run === run"
            " && t.dataset.runState === 'RUN_STATE_CANCELLED' && t.dataset.interrupted === 'true')",
            [tid("live-turn"), cut],
        )
        run_state(browser, cut, "RUN_STATE_CANCELLED")
        assert int(live_data(browser)["lastSequence"]) > 0
        # Words shown while they were spoken: a partial transcript (about one a second of
        # speech, when the recogniser keeps up) came in some turn.
        browser.wait("(s) => Number(document.querySelector(s).dataset.partials) >= 1", LIVE)
        browser.shots(shots / "live-voice.png")
        assert not split_words(browser, LIVE)
        end(browser)
        # Ended: the microphone let go, Live offered again, push-to-talk back.
        assert browser.visible(tid("live"))
        assert browser.visible(tid("talk"))
        assert problems(browser) == []
    assert server.run(user, cut).state == dispatcher_pb2.RUN_STATE_CANCELLED
    # The turn heard is stored: the transcript as the user's message, its run answering it.
    users = [
        m for m in server.messages(user, conversation) if m.role == context_pb2.MESSAGE_ROLE_USER
    ]
    assert users, "no user message stored"
    stored = [m for m in users if m.name == heard["message"]]
    assert [text_of(m) for m in stored] == [heard["heard"]], [text_of(m) for m in users]
    assert server.run(user, run).input_message == heard["message"]


def test_live_is_refused_as_the_server_refuses(
    stack: LiveStack, chromium: Chromium, server: Server
) -> None:
    user = server.register("liverefused")
    workspace, conversation = server.workspace(user, f"liverefused-{os.getpid()}")
    _voice_assistant(server, user, workspace)
    with chromium.open(stack.origin + "/") as first, chromium.open(stack.origin + "/") as second:
        for browser in (first, second):
            sign_in(browser, user.email)
            open_conversation(browser, workspace, conversation)
            browser.wait_visible(tid("live"))
        go_live(first)
        # A second live session of the same user: the server allows one (the setting).
        second.click(tid("live"))
        refused = second.wait(
            "(s) => { const e = document.querySelector(s);"
            " return e && { ...e.dataset, text: e.textContent }; }",
            tid("error", action="live"),
        )
        assert refused["code"] == "RESOURCE_EXHAUSTED"
        assert "at most 1 WebRTC peers" in refused["text"]
        assert "end one" in refused["text"]
        # Beside the control that was used, and nothing left open.
        assert second.eval(
            "(s) => !!document.querySelector(s).closest('[data-testid=\"composer\"]')",
            tid("error", action="live"),
        )
        assert live_data(second)["state"] == "failed"
        assert second.visible(tid("live"))
        # Once the first ends, its room comes back.
        end(first)
        go_live(second)
        end(second)
    # An assistant without a voice: no Live (nor Talk) in its conversation.
    other = server.register("livemute")
    workspace, conversation = server.workspace(other, f"livemute-{os.getpid()}")
    assistant = _voice_assistant(server, other, workspace, voice=False)
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, other.email)
        open_conversation(browser, workspace, conversation)
        browser.wait_for(tid("assistant", name=assistant, voice="false"))
        assert not browser.visible(tid("live"))
        assert not browser.visible(tid("talk"))


def test_a_dropped_connection_is_resumed_once_and_said(
    stack: LiveStack, chromium: Chromium, server: Server
) -> None:
    user = server.register("liveresume")
    workspace, conversation = server.workspace(user, f"liveresume-{os.getpid()}")
    _voice_assistant(server, user, workspace)
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, user.email)
        open_conversation(browser, workspace, conversation)
        browser.wait_visible(tid("live"))
        session = go_live(browser)["session"]
        first = heard_turn(browser)
        # The server is replaced: its peer closes, the page's connection drops.
        stack.restart_server()
        browser.wait("(s) => document.querySelector(s).dataset.state === 'reconnecting'", LIVE)
        resumed = browser.wait(
            "(s) => { const d = document.querySelector(s).dataset;"
            " return d.state === 'live' && d.resumes === '1' && { ...d }; }",
            LIVE,
        )
        # The same session, resumed after the last numbered frame the page had.
        assert resumed["session"] == session
        assert resumed["resumed"] == session
        assert int(resumed["resumedAfter"]) > 0
        note = browser.eval("(s) => document.querySelector(s).textContent", tid("live-note"))
        assert note.startswith("Reconnected after a dropped connection"), note
        assert note.endswith(f"after frame {resumed['resumedAfter']}."), note
        # It goes on: the next pass of the words is a new turn, heard on the new peer.
        later = heard_turn(browser, other_than=first["run"])
        assert says(later["heard"], HEARD), later
        # Nothing replayed twice, nothing lost: each answer on the page whose run ended is
        # the echo of its transcript, once (a run recovered on the new server starts its
        # answer over: shown once, not appended), and a finished one is the stored answer.
        ended = [t for t in turns(browser) if t.get("runState") in ENDED]
        assert ended, turns(browser)
        for turn in ended:
            assert turn["answer"].startswith(turn["heard"]), turn
            assert turn["answer"].count(turn["heard"]) == 1, turn
            if turn["runState"] == "RUN_STATE_SUCCEEDED":
                stored = server.run(user, turn["run"])
                kept = server.messages(user, conversation)
                [answer] = [m for m in kept if m.name == stored.output_message]
                assert turn["answer"] == text_of(answer), turn
        end(browser)
