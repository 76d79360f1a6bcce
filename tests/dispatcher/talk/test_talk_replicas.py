"""A voice session dropped on one replica resumes exactly on another.

Two real dispatcher processes (A and B) on one PostgreSQL and one Redis, as
behind Envoy, with the local audio server for speech. A session on A takes a
typed turn whose answer is spoken; the connection drops in the middle of the
answer's speech, and the session is resumed on B with the last sequence the
client saw. B rebuilds the frames from the stored turn and the run's updates
(the shared log, and the speech it heard from A over Redis), whether the run is
still speaking or has ended meanwhile: the frames seen on
A and on B together are the run's updates exactly once each, in order, and the
speech assembled from them is the speech an undisturbed watcher of the run got.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from tests.dispatcher.runs.test_dispatcher_forwarding import people, replica, stubs
from tests.e2e.procs import ServeProcess, shared_env
from tests.fakes.audio_server import FakeAudio
from tests.infra.redis import RedisServer
from tests.kits.dispatchkit import watch_all
from tests.kits.talkkit import ended, open_talk, start

pytestmark = pytest.mark.e2e

TIMEOUT_S = 30.0


@pytest.fixture
async def audio_server() -> AsyncIterator[FakeAudio]:
    async with FakeAudio() as fake:
        yield fake


@pytest.fixture
def env(tmp_path: Path, postgres_url: str, redis_server: RedisServer) -> dict[str, str]:
    return shared_env(tmp_path, postgres_url, redis_server.url)


@pytest.fixture
def front(env: dict[str, str]) -> Iterator[ServeProcess]:
    with ServeProcess(
        "--services",
        "auth,context,events,integration",
        env={**env, "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true"},
    ) as process:
        yield process


def speech_bytes(updates: list[pb.RunUpdate]) -> bytes:
    return b"".join(u.speech.audio for u in updates if u.WhichOneof("update") == "speech")


@pytest.mark.parametrize("after_the_end", [False, True], ids=["mid-answer", "after-the-end"])
async def test_a_session_dropped_mid_answer_resumes_on_another_replica(
    front: ServeProcess, env: dict[str, str], audio_server: FakeAudio, after_the_end: bool
) -> None:
    """Resumed while the run still speaks, or after it ended (within the resume
    window): B replays what it heard of A's run, speech included, up to the end."""
    who = await people(front)
    voice = {
        "SWITCHBOARD_VOICE_URL": audio_server.url,
        "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
        # Most of the (long) answer goes out at once, the rest still paced: the drop
        # lands mid-answer either way, without waiting out the speech.
        "SWITCHBOARD_VOICE_LEAD_MS": "10000",
    }
    with replica(env, "talk-a", **voice) as a, replica(env, "talk-b", **voice) as b:
        async with stubs(a, b) as (on_a, on_b):
            assistant = await on_a.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=who.workspace,
                    assistant=pb.Assistant(
                        display_name="Voice",
                        handler="handlers/echo",
                        voice=pb.VoiceSettings(language="en"),
                    ),
                ),
                metadata=who.owner.md,
                timeout=TIMEOUT_S,
            )
            talk = open_talk(on_a, who.editor, start(who.conversation, assistant.assistant.name))
            hello = await talk.next()
            assert hello is not None
            session = hello.session.name
            await talk.send(pb.TalkRequest(text="one two three four five six seven eight nine ten"))
            transcript = await talk.until(lambda f: f.WhichOneof("frame") == "transcript")
            run = transcript.transcript.run
            # A few of the answer's speech frames, then the connection drops.
            for _ in range(3):
                await talk.until(
                    lambda f: (
                        f.WhichOneof("frame") == "update"
                        and f.update.WhichOneof("update") == "speech"
                    )
                )
            talk.cancel()
            seen_on_a = [f for f in talk.frames if f.sequence]
            last = seen_on_a[-1].sequence
            if after_the_end:
                # The run finishes speaking while the client is away.
                assert (await watch_all(on_a, who.editor, run)).final.state == (
                    pb.RUN_STATE_SUCCEEDED
                )

            again = open_talk(
                on_b,
                who.editor,
                pb.TalkRequest(resume=pb.TalkResume(session=session, after_sequence=last)),
            )
            resumed = await again.next()
            assert resumed is not None
            assert resumed.session.name == session
            assert resumed.session.turn_count == 1
            await again.until(ended)
            again.cancel()
            seen_on_b = [f for f in again.frames if f.sequence]

            frames = seen_on_a + seen_on_b
            sequences = [f.sequence for f in frames]
            assert sequences == sorted(set(sequences)), "a frame repeated or out of order"
            assert all(s >> 40 == 1 for s in sequences)
            relayed = [f.update for f in frames if f.WhichOneof("frame") == "update"]
            assert all(u.run == run for u in relayed)
            # Nothing lost: the run's updates as its owner's watcher got them, undisturbed.
            undisturbed = await watch_all(on_a, who.editor, run)
            assert [u.sequence for u in relayed] == undisturbed.sequences
            assert speech_bytes(relayed) == speech_bytes(undisturbed.updates)
            assert speech_bytes(relayed), "the answer was spoken"
            assert undisturbed.final.state == pb.RUN_STATE_SUCCEEDED
            assert relayed[-1].state_change.run.state == pb.RUN_STATE_SUCCEEDED
