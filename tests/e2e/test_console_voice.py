"""Push-to-talk in the browser console, with a real microphone's path and real speech
engines: Chromium's fake microphone plays a WAV that eSpeak NG spoke
(tests/infra/speech.py's COUNTING), the console records it (an AudioWorklet), sends it as a
16 kHz WAV with the resumable upload and SendMessage ``speech``, and plays the answer's
speech updates; the server transcribes with PocketSphinx and speaks with eSpeak NG, both
behind the local audio server (tests/fakes/audio_server.py) at SWITCHBOARD_VOICE_URL.

One stack for the module: the console built into a temporary directory, the audio server,
``switchboard serve --dev`` with the voice settings, Envoy with ``--console`` on its TLS
listener; one Chromium (tests/browser/console.mjs) started with the fake microphone.

- A turn: Talk shows once the owner gives the assistant a voice in its editor; Talk
  clicked, about the WAV's length recorded, Talk clicked again; the stored user message's
  text is the transcript (counting words), on the page too, with the recording attached (a
  16 kHz mono WAV, as long as what was recorded); every speech update of the run arrived and
  was played, back to back, as long as the server said; screenshots at a desktop's and a
  phone's width.
- Stop while it speaks (that turn recorded holding Space on Talk): the audio stops,
  CancelRun carries the last chunk played, the run is CANCELLED and the stored answer keeps
  what was heard and marks the rest unspoken.
- The microphone refused: the page says so precisely, and nothing is sent.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import wave
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from google.protobuf import json_format

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.chromium import artifacts_dir, required
from tests.e2e.envoy import EnvoyProcess
from tests.e2e.procs import ROOT, ServeProcess
from tests.e2e.test_console import (
    WEB,
    Chromium,
    Page,
    Server,
    User,
    open_conversation,
    problems,
    run_state,
    sign_in,
    split_words,
    tid,
)
from tests.infra.speech import COUNTING, says, speak

pytestmark = pytest.mark.e2e

TERMINAL: Final = frozenset(
    {
        dispatcher_pb2.RUN_STATE_SUCCEEDED,
        dispatcher_pb2.RUN_STATE_FAILED,
        dispatcher_pb2.RUN_STATE_CANCELLED,
        dispatcher_pb2.RUN_STATE_DEADLINE_EXCEEDED,
    }
)
#: Recorded beyond the spoken WAV's end, so its last word is whole.
TAIL_MS: Final = 700
#: The counting words PocketSphinx recognises after Chromium's audio path, every time: the
#: fake microphone resamples eSpeak's 22,050 Hz to the device's rate and the console
#: band-limits it to 16 kHz, and through clean resampling the first and the last word vary
#: ("one" may come back as "well", "five" as "sawyer"); the WAV itself is recognised word for
#: word only through the audio server's own linear interpolation, whose aliasing the model
#: seems to have learned.
HEARD: Final = ("three", "four")


@dataclass
class VoiceStack:
    serve: ServeProcess
    envoy: EnvoyProcess
    console_dir: Path
    #: The WAV Chromium's fake microphone plays, and how long it is.
    speech: Path
    speech_ms: int

    @property
    def origin(self) -> str:
        return f"https://localhost:{self.envoy.tls_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.serve.port}"


@contextmanager
def _audio_server(*options: str) -> Iterator[str]:
    """The local audio server (PocketSphinx recognition, eSpeak NG speech) with
    ``options`` (its command line's); its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.audio_server", "--port", "0", "--quiet", *options],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            pytest.fail(f"the audio server did not start: {url!r}")
        yield url
    finally:
        # SIGTERM: the server stops its recognition process before it exits.
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=CALL_DEADLINE_S)
        if proc.stdout is not None:
            proc.stdout.close()


def built_console(root: Path) -> Path:
    """The console built (clients/web/build.mjs) into ``root``/dist, which Envoy serves."""
    node = required("node", "scripts/install-deps.sh")
    if not (WEB / "node_modules" / "esbuild").is_dir():
        pytest.fail("clients/web has no node_modules; run `make tools` (npm ci in clients/web)")
    console_dir = root / "dist"
    built = subprocess.run(
        [node, str(WEB / "build.mjs"), f"--outdir={console_dir}"],
        cwd=WEB,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    return console_dir


def voice_env(root: Path, voice_url: str) -> dict[str, str]:
    """A `serve --dev` of the voice stacks: its database in ``root``, the audio server."""
    return {
        "SWITCHBOARD_DATABASE_URL": f"sqlite+aiosqlite:///{root}/switchboard.db",
        "SWITCHBOARD_VOICE_URL": voice_url,
        # The audio server is on this machine's loopback, which egress refuses by default.
        "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
        "SWITCHBOARD_EVENTS_HEARTBEAT_S": "1",
        "SWITCHBOARD_DISPATCHER_HEARTBEAT_S": "1",
        "SWITCHBOARD_SHUTDOWN_GRACE_S": "1",
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VoiceStack]:
    root = tmp_path_factory.mktemp("console-voice")
    console_dir = built_console(root)
    spoken = speak(COUNTING)
    speech = root / "counting.wav"
    speech.write_bytes(spoken)
    with wave.open(io.BytesIO(spoken)) as w:
        speech_ms = round(1000 * w.getnframes() / w.getframerate())
    with ExitStack() as cleanup:
        voice_url = cleanup.enter_context(_audio_server())
        serve = ServeProcess("--dev", env=voice_env(root, voice_url))
        cleanup.push(serve.__exit__)
        serve.start()
        envoy = EnvoyProcess(f"127.0.0.1:{serve.port}", tls=True, console=console_dir)
        cleanup.push(envoy.__exit__)
        envoy.start()
        yield VoiceStack(serve, envoy, console_dir, speech, speech_ms)


def _fake_microphone(stack: VoiceStack, answer: str = "") -> Chromium:
    """Chromium whose microphone is the spoken WAV (played once from its start each time
    the page opens the microphone, then silence), its permission prompt answered yes (or
    ``answer="deny"``: refused, as a person refusing it would)."""
    return Chromium(
        stack.envoy.cert_file,
        args=(
            f"--use-fake-ui-for-media-stream{'=' + answer if answer else ''}",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={stack.speech}%noloop",
        ),
    )


@pytest.fixture(scope="module")
def chromium(stack: VoiceStack) -> Iterator[Chromium]:
    driver = _fake_microphone(stack)
    yield driver
    driver.close()


@pytest.fixture
def server(stack: VoiceStack) -> Iterator[Server]:
    client = Server(stack.address)
    yield client
    client.close()


def _voice_assistant(server: Server, user: User, workspace: str, *, voice: bool = True) -> str:
    """An assistant whose answers echo the message (the echo handler), the workspace's
    default, with a voice unless ``voice`` is false; its name."""
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


def talk(browser: Page, stack: VoiceStack, *, hold: bool = False) -> str:
    """Clicks Talk, records the spoken WAV to its end, clicks again (or, ``hold``, holds
    Space on Talk meanwhile); the run answering."""
    before = browser.eval("(s) => document.querySelector(s).dataset.run ?? ''", tid("talk-control"))
    if hold:
        browser.call("key", selector=tid("talk"), key="Space", action="down")
    else:
        browser.click(tid("talk"))
    browser.wait_for(tid("talk-control", state="recording"))
    # The page's own count of what it recorded (no sleep): the WAV, then a little silence.
    browser.wait(
        "([s, ms]) => Number(document.querySelector(s).dataset.recordedMs) >= ms",
        [tid("talk-control"), stack.speech_ms + TAIL_MS],
    )
    if hold:
        browser.call("key", key="Space", action="up")
    else:
        browser.click(tid("talk"))
    run: str = browser.wait(
        "([s, before]) => { const r = document.querySelector(s).dataset.run;"
        " return r && r !== before && r; }",
        [tid("talk-control"), before],
    )
    return run


def talk_data(browser: Page) -> dict[str, str]:
    return browser.data(tid("talk-control"))


def replay(server: Server, user: User, run: str) -> tuple[list[dispatcher_pb2.RunUpdate], str]:
    """The run's speech updates and its answer's text (its deltas), as WatchRun replays
    them from the start."""
    speech: list[dispatcher_pb2.RunUpdate] = []
    text = ""
    for response in server.dispatcher.WatchRun(
        dispatcher_pb2.WatchRunRequest(name=run), metadata=user.md, timeout=CALL_DEADLINE_S
    ):
        if response.WhichOneof("frame") != "update":
            continue
        update = response.update
        kind = update.WhichOneof("update")
        if kind == "speech":
            speech.append(update)
        elif kind == "delta":
            text += update.delta.text
        elif kind == "state_change" and update.state_change.run.state in TERMINAL:
            break
    return speech, text


def test_push_to_talk_sends_the_recording_and_plays_the_spoken_answer(
    stack: VoiceStack, chromium: Chromium, server: Server, tmp_path: Path
) -> None:
    user = server.register("talk")
    workspace, conversation = server.workspace(user, f"talk-{os.getpid()}")
    assistant = _voice_assistant(server, user, workspace, voice=False)
    shots = artifacts_dir(tmp_path) / "voice"
    shots.mkdir(parents=True, exist_ok=True)
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, user.email)
        open_conversation(browser, workspace, conversation)
        # Without a voice, no Talk; the owner gives the assistant one in its editor.
        browser.wait_for(tid("assistant", name=assistant, voice="false"))
        assert not browser.visible(tid("talk"))
        browser.click(f"{tid('assistant', name=assistant)} {tid('edit-assistant')}")
        browser.click(tid("assistant-voice-on"))
        browser.fill(tid("assistant-voice-language"), "en")
        browser.click(tid("save-assistant"))
        browser.wait_for(tid("assistant", name=assistant, voice="true"))
        # The default assistant has a voice now: Talk shows, labelled for a screen reader.
        browser.wait_visible(tid("talk"))
        label = browser.eval(
            "(s) => document.querySelector(s).getAttribute('aria-label')", tid("talk")
        )
        assert label == "talk: record a message"
        run = talk(browser, stack)
        # Recorded by the worklet, not the fallback.
        assert talk_data(browser)["capture"] == "worklet"
        # The transcript is the stored user message's text, shown in the conversation.
        transcript = browser.wait(
            "(s) => document.querySelector(s)?.textContent", tid("talk-transcript-text")
        )
        assert says(transcript, HEARD), transcript
        shown = browser.wait(
            '() => [...document.querySelectorAll(\'[data-testid="message"][data-role="user"]\')]'
            ".map((m) => ({ text: m.querySelector('[data-testid=\"message-text\"]').textContent,"
            " files: [...m.querySelectorAll('[data-testid=\"file\"]')]"
            ".map((f) => f.dataset.file) }))"
            ".find((m) => m.files.length)"
        )
        assert shown["text"] == transcript
        # The answer: the run succeeds once its speech was sent; the page played every chunk.
        card = run_state(browser, run, "RUN_STATE_SUCCEEDED")
        played = browser.wait(
            "(s) => { const d = document.querySelector(s).dataset;"
            " return d.playback === 'ended' && { ...d }; }",
            tid("talk-control"),
        )
        browser.shots(shots / "push-to-talk.png")
        assert not split_words(browser, tid("talk-control"))
        assert problems(browser) == []
        attached = shown["files"]
    updates, _ = replay(server, user, run)
    assert updates, "the run sent no speech"
    # Every speech update arrived, and each was played, for as long as the server said.
    assert int(played["chunksReceived"]) == len(updates) == int(card["speechChunks"])
    assert int(played["chunksPlayed"]) == len(updates)
    spoken_ms = sum(u.speech.duration_ms for u in updates)
    assert abs(int(played["msPlayed"]) - spoken_ms) <= len(updates)
    assert abs(int(played["msReceived"]) - spoken_ms) <= len(updates)
    assert played["heardThrough"] == str(updates[-1].sequence)
    assert all(u.speech.format.sample_rate_hz == 24_000 for u in updates)
    # The stored turn: the transcript as text, the recording as its one file.
    [message] = [
        m for m in server.messages(user, conversation) if m.role == context_pb2.MESSAGE_ROLE_USER
    ]
    text = "".join(p.text for p in message.parts)
    assert text == transcript
    [recording] = [p.file for p in message.parts if p.HasField("file")]
    assert [recording.file] == attached
    # The server names the type by what it sniffed (WAV has two names).
    assert recording.mime_type in {"audio/wav", "audio/x-wav"}
    data = b"".join(
        chunk.data
        for chunk in server.context.DownloadFile(
            context_pb2.DownloadFileRequest(name=recording.file),
            metadata=user.md,
            timeout=CALL_DEADLINE_S,
        )
    )
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16_000)
        recorded_ms = 1000 * w.getnframes() / 16_000
    assert stack.speech_ms + TAIL_MS - 50 <= recorded_ms <= stack.speech_ms + TAIL_MS + 1000
    assert abs(recorded_ms - int(played["recordedMs"])) <= 1
    given = server.dispatcher.GetAssistant(
        dispatcher_pb2.GetAssistantRequest(name=assistant),
        metadata=user.md,
        timeout=CALL_DEADLINE_S,
    ).assistant
    assert given.HasField("voice")
    assert given.voice.language == "en"
    stored = server.run(user, run)
    assert stored.speech.speak
    assert stored.speech.transcribe
    assert stored.speech.output_format.sample_rate_hz == 24_000


def test_stop_while_it_speaks_cancels_the_run_with_what_was_heard(
    stack: VoiceStack, chromium: Chromium, server: Server
) -> None:
    user = server.register("talkstop")
    workspace, conversation = server.workspace(user, f"talkstop-{os.getpid()}")
    _voice_assistant(server, user, workspace)
    with chromium.open(stack.origin + "/") as browser:
        sign_in(browser, user.email)
        open_conversation(browser, workspace, conversation)
        browser.wait_visible(tid("talk"))
        # From the keyboard this time: Space held on Talk while the WAV plays.
        run = talk(browser, stack, hold=True)
        # Stopped once the first chunk is playing: the rest of the answer is not spoken yet.
        browser.wait(
            "(s) => { const d = document.querySelector(s).dataset;"
            " return d.playback === 'playing' && Number(d.chunksPlayed) >= 1; }",
            tid("talk-control"),
        )
        browser.click(tid("talk-stop"))
        stopped = browser.wait(
            "(s) => { const d = document.querySelector(s).dataset;"
            " return d.playback === 'stopped' && { ...d }; }",
            tid("talk-control"),
        )
        run_state(browser, run, "RUN_STATE_CANCELLED")
        note = browser.wait(
            "(s) => { const n = document.querySelector(s); return n && { ...n.dataset }; }",
            tid("message-spoken"),
        )
        # Silent from the stop on: nothing played after it.
        after = talk_data(browser)
        assert after["msPlayed"] == stopped["msPlayed"]
        assert not browser.visible(tid("talk-stop"))
        assert problems(browser) == []
    heard = int(stopped["heardThrough"])
    # CancelRun was told the last chunk played.
    assert stopped["cancelHeardThrough"] == stopped["heardThrough"]
    updates, answer = replay(server, user, run)
    heard_updates = [u for u in updates if u.sequence <= heard]
    # What the page played is what it told the server it heard: whole chunks, in order.
    assert heard in {u.sequence for u in updates}
    assert int(stopped["chunksPlayed"]) == len(heard_updates)
    stored = server.run(user, run)
    assert stored.state == dispatcher_pb2.RUN_STATE_CANCELLED
    # The stored answer is what was heard; the rest is marked unspoken.
    [message] = [m for m in server.messages(user, conversation) if m.name == stored.output_message]
    voice = json_format.MessageToDict(message.metadata)["voice"]
    spoken = "".join(p.text for p in message.parts)
    assert voice["interrupted"] is True
    assert voice["spoken_chars"] == len(spoken)
    assert voice["audio_ms"] == sum(u.speech.duration_ms for u in heard_updates)
    assert spoken + voice["unspoken_text"] == answer
    assert voice["unspoken_chars"] == len(answer) - len(spoken) > 0
    # And the page says so, under the answer.
    assert note["interrupted"] == "true"
    assert int(note["unspokenChars"]) == voice["unspoken_chars"]


def test_a_refused_microphone_is_said_precisely_and_nothing_is_sent(
    stack: VoiceStack, server: Server
) -> None:
    user = server.register("talkdenied")
    workspace, conversation = server.workspace(user, f"talkdenied-{os.getpid()}")
    _voice_assistant(server, user, workspace)
    refusing = _fake_microphone(stack, "deny")
    try:
        with refusing.open(stack.origin + "/") as browser:
            sign_in(browser, user.email)
            open_conversation(browser, workspace, conversation)
            browser.wait_visible(tid("talk"))
            browser.click(tid("talk"))
            refused = browser.wait(
                "(s) => { const e = document.querySelector(s);"
                " return e && { ...e.dataset, text: e.textContent }; }",
                tid("error", action="talk"),
            )
            assert refused["code"] == "PERMISSION_DENIED"
            assert "Microphone permission denied" in refused["text"]
            assert talk_data(browser)["state"] == "idle"
            # Beside the control that was used: inside the composer.
            assert browser.eval(
                "(s) => !!document.querySelector(s).closest('[data-testid=\"composer\"]')",
                tid("error", action="talk"),
            )
    finally:
        refusing.close()
    assert server.messages(user, conversation) == []
