"""A speaking run's speech reaches a watcher on another replica, and a barge-in sent there
stores what was heard.

Two real dispatcher processes (A and B) on one PostgreSQL and one Redis, their speech
engine the local audio server (eSpeak NG), as behind Envoy where a call lands on either.
The run starts on A and speaks; a WatchRun on B gets its ``speech`` updates exactly as A's
feed numbers them (tokens travel between replicas over Redis, never through the log);
a CancelRun sent to B with ``heard_through_sequence`` is forwarded to A with it, and the
answer A stores keeps the sentence heard and marks the rest unspoken.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from tests.e2e.procs import ServeProcess, shared_env
from tests.fakes.audio_server import FakeAudio
from tests.infra.redis import RedisServer
from tests.kits.authkit import PASSWORD, unique_email
from tests.kits.contextkit import (
    Caller,
    all_messages,
    context_stub,
    create_conversation,
    create_workspace,
    struct,
)
from tests.kits.dispatchkit import Stub, dispatcher_stub, read_until, watch_all

pytestmark = pytest.mark.e2e

TIMEOUT_S = 30.0
SENTENCE = "One two three four five."


@pytest.fixture
def env(tmp_path: Path, postgres_url: str, redis_server: RedisServer) -> dict[str, str]:
    return shared_env(tmp_path, postgres_url, redis_server.url)


@pytest.fixture
def front(env: dict[str, str]) -> Iterator[ServeProcess]:
    with ServeProcess("--services", "auth,context,events", env=env) as process:
        yield process


def replica(env: dict[str, str], name: str, voice_url: str) -> ServeProcess:
    return ServeProcess(
        "--services",
        "dispatcher",
        env={
            **env,
            "SWITCHBOARD_INSTANCE_ID": name,
            "SWITCHBOARD_VOICE_URL": voice_url,
            "SWITCHBOARD_VOICE_MAX_RETRIES": "0",
            "SWITCHBOARD_EGRESS_ALLOW_LOOPBACK": "true",
        },
    )


@asynccontextmanager
async def stubs(*processes: ServeProcess) -> AsyncIterator[list[Stub]]:
    async with AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(aio.insecure_channel(process.address))
            for process in processes
        ]
        yield [dispatcher_stub(channel) for channel in channels]


async def test_speech_reaches_another_replica_and_a_barge_in_there_stores_what_was_heard(
    front: ServeProcess, env: dict[str, str]
) -> None:
    async with FakeAudio() as audio, aio.insecure_channel(front.address) as channel:
        registered = await auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(email=unique_email("voice"), password=PASSWORD),
            timeout=TIMEOUT_S,
        )
        owner = Caller(registered.user.name.removeprefix("users/"), registered.tokens.access_token)
        context = context_stub(channel)
        workspace = (await create_workspace(context, owner, "Voices")).name
        conversation = (await create_conversation(context, owner, workspace)).name
        with (
            replica(env, "replica-a", audio.url) as a,
            replica(env, "replica-b", audio.url) as b,
        ):
            async with stubs(a, b) as (on_a, on_b):
                await on_a.CreateAssistant(
                    pb.CreateAssistantRequest(
                        parent=workspace,
                        assistant=pb.Assistant(
                            display_name="Echo voice",
                            handler="handlers/echo",
                            workspace_default=True,
                            voice=pb.VoiceSettings(language="en"),
                        ),
                    ),
                    metadata=owner.md,
                    timeout=TIMEOUT_S,
                )
                # The echo handler, a word every 300 ms: still writing while it speaks.
                sent = await on_a.SendMessage(
                    pb.SendMessageRequest(
                        conversation=conversation,
                        message=cpb.Message(
                            parts=[cpb.ContentPart(text=f"{SENTENCE} {SENTENCE} {SENTENCE}")]
                        ),
                        parameters=struct(delay_ms=300),
                        speech=pb.SpeechOptions(speak=True),
                    ),
                    metadata=owner.md,
                    timeout=TIMEOUT_S,
                )
                run = sent.run.name
                watch = on_b.WatchRun(
                    pb.WatchRunRequest(name=run), metadata=owner.md, timeout=TIMEOUT_S
                )
                seen: list[pb.RunUpdate] = []
                await read_until(
                    watch,
                    seen,
                    lambda seen: any(u.speech.segment_end for u in seen if _spoken(u)),
                )
                heard = next(u for u in seen if _spoken(u) and u.speech.segment_end)
                cancelled = await on_b.CancelRun(
                    pb.CancelRunRequest(
                        name=run, reason="barge-in", heard_through_sequence=heard.sequence
                    ),
                    metadata=owner.md,
                    timeout=TIMEOUT_S,
                )
                await read_until(
                    watch,
                    seen,
                    lambda seen: seen[-1].state_change.run.state == pb.RUN_STATE_CANCELLED,
                )
                watch.cancel()
                on_owner = await watch_all(on_a, owner, run)
        messages = await all_messages(context, owner, conversation)

    # B heard A's speech: the same updates, numbered as A's feed numbered them.
    spoken_b = [u for u in seen if _spoken(u)]
    spoken_a = {u.sequence: u for u in on_owner.updates if _spoken(u)}
    assert spoken_b
    for update in spoken_b:
        assert update.speech == spoken_a[update.sequence].speech
    assert spoken_b[0].speech.text == SENTENCE
    # The cancel, forwarded to A with its heard-through, stored the heard sentence.
    assert cancelled.run.state == pb.RUN_STATE_CANCELLED
    answer = next(m for m in messages if m.name == cancelled.run.output_message)
    assert [p.text for p in answer.parts] == [SENTENCE]
    voice: dict[str, Any] = json_format.MessageToDict(answer.metadata)["voice"]
    assert voice["interrupted"] is True
    assert voice["spoken_chars"] == len(SENTENCE)
    assert voice["unspoken_text"].startswith(" One")


def _spoken(update: pb.RunUpdate) -> bool:
    return update.WhichOneof("update") == "speech"
