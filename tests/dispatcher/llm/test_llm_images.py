"""Images for vision models (dispatcher/llm/conversation/images.py and messages.py): a user
message's image files become Chat Completions image parts with their bytes for a
model with vision, a note for one without, or the run's refusal by setting;
against the local model server, which checks content arrays as the API does."""

from __future__ import annotations

import base64
import time

import pytest

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.base import HandleCall
from switchboard.dispatcher.llm.config import LlmConfig, Provider, parse_providers
from switchboard.dispatcher.llm.conversation.images import for_model
from switchboard.dispatcher.llm.conversation.messages import build_messages
from switchboard.dispatcher.llm.handler import LlmHandler
from switchboard.platform.errors import ModalityUnsupported, NotFound, RequestTooLarge
from tests.fakes.openai_server import FakeOpenAI, Reply, images_of
from tests.kits.llmkit import fail, run

pytestmark = pytest.mark.unit

PICTURE = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
NAME = "workspaces/w/files/cat"


def image(name: str = NAME, size: int = len(PICTURE), mime: str = "image/png") -> cpb.ContentPart:
    return cpb.ContentPart(
        file=cpb.FileReference(file=name, display_name="cat.png", mime_type=mime, size_bytes=size)
    )


def asking(*parts: cpb.ContentPart) -> handler_pb2.HandleRequest:
    return handler_pb2.HandleRequest(
        message=cpb.Message(role=cpb.MESSAGE_ROLE_USER, parts=list(parts))
    )


class Files:
    """The run's file reader over a dict, recording what was read."""

    def __init__(self, **stored: bytes) -> None:
        self.stored = {f"workspaces/w/files/{k}": v for k, v in stored.items()}
        self.read: list[str] = []

    async def __call__(self, name: str, limit: int) -> bytes:
        self.read.append(name)
        if name not in self.stored:
            raise NotFound(f"{name} not found")
        data = self.stored[name]
        if len(data) > limit:
            raise RequestTooLarge("too large")
        return data


def handler_for(fake: FakeOpenAI, *, vision: bool, **config: object) -> LlmHandler:
    provider = Provider("primary", fake.url, "", "m-1", vision=vision)
    return LlmHandler(LlmConfig(providers=(provider,), max_retries=0, **config))  # type: ignore[arg-type]


def call(request: handler_pb2.HandleRequest, files: Files | None) -> HandleCall:
    return HandleCall(request=request, deadline=time.monotonic() + 30, files=files)


def test_the_providers_setting_takes_vision() -> None:
    providers = parse_providers(
        '[{"name": "v", "base_url": "http://x", "model": "m", "vision": true},'
        ' {"name": "t", "base_url": "http://y", "model": "n"}]'
    )
    assert [p.vision for p in providers] == [True, False]
    with pytest.raises(ValueError, match="'vision' must be true or false"):
        parse_providers('[{"name": "v", "base_url": "http://x", "model": "m", "vision": "yes"}]')


def test_a_user_message_with_an_image_is_a_content_array_in_part_order() -> None:
    messages = build_messages(asking(cpb.ContentPart(text="What is this?"), image()))
    content = messages[-1]["content"]
    assert content[0] == {"type": "text", "text": "What is this?\n[file cat.png image/png]"}
    assert content[1]["type"] == "image_url"
    # Without vision the image is its note, and the array one string again.
    plain = for_model(messages, vision=False)
    assert plain[-1]["content"] == (
        "What is this?\n[file cat.png image/png]\n[image cat.png: this model cannot see images]"
    )


def test_only_jpeg_png_gif_and_webp_go_as_images() -> None:
    messages = build_messages(asking(cpb.ContentPart(text="Look"), image(mime="image/tiff")))
    assert messages[-1]["content"] == "Look\n[file cat.png image/tiff]"


async def test_a_vision_model_receives_the_image_bytes() -> None:
    async with FakeOpenAI() as fake:
        fake.script(Reply.text("A cat."))
        files = Files(cat=PICTURE)
        handler = handler_for(fake, vision=True)
        try:
            _, result = await run(
                handler, call(asking(cpb.ContentPart(text="What?"), image()), files)
            )
        finally:
            await handler.aclose()
    assert result.parts[0].text == "A cat."
    [(message, url)] = images_of(fake.requests[0].body)
    assert message == len(fake.requests[0].body["messages"]) - 1
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == PICTURE
    assert files.read == [NAME]


async def test_a_model_without_vision_gets_the_note_and_nothing_is_read() -> None:
    async with FakeOpenAI() as fake:
        fake.script(Reply.text("I cannot see it."))
        files = Files(cat=PICTURE)
        handler = handler_for(fake, vision=False)
        try:
            await run(handler, call(asking(cpb.ContentPart(text="What?"), image()), files))
        finally:
            await handler.aclose()
    body = fake.requests[0].body
    assert images_of(body) == []
    assert "[image cat.png: this model cannot see images]" in body["messages"][-1]["content"]
    assert files.read == []


async def test_refuse_fails_the_run_before_any_call() -> None:
    async with FakeOpenAI() as fake:
        handler = handler_for(fake, vision=False, image_policy="refuse")
        try:
            with pytest.raises(ModalityUnsupported) as refused:
                await run(handler, call(asking(image()), Files(cat=PICTURE)))
        finally:
            await handler.aclose()
    assert refused.value.metadata == {"media_type": "image/png", "model": "primary/m-1"}
    assert fake.requests == []


async def test_images_over_the_limits_and_unreadable_ones_become_notes() -> None:
    async with FakeOpenAI() as fake:
        fake.script(Reply.text("ok"))
        files = Files(cat=PICTURE, dog=PICTURE)
        handler = handler_for(fake, vision=True, max_image_bytes=1000, max_images=2)
        request = asking(
            image("workspaces/w/files/old"),  # over max_images: the oldest is left out
            image("workspaces/w/files/big", size=5000),  # over max_image_bytes
            image("workspaces/w/files/gone"),  # deleted since
            image("workspaces/w/files/dog"),
        )
        try:
            await run(handler, call(request, files))
        finally:
            await handler.aclose()
    content = fake.requests[0].body["messages"][-1]["content"]
    texts = [part["text"] for part in content if part["type"] == "text"]
    assert "[image cat.png: left out: more than 2 images in one call]" in texts
    assert "[image cat.png: larger than 1000 bytes, not sent]" in texts
    assert "[image cat.png: could not be read, not sent]" in texts
    assert len(images_of(fake.requests[0].body)) == 1
    assert sorted(files.read) == ["workspaces/w/files/dog", "workspaces/w/files/gone"]


@pytest.mark.parametrize("policy", ["note", "refuse"])
async def test_a_fallback_without_vision_gets_notes_or_is_skipped(policy: str) -> None:
    async with FakeOpenAI() as seeing, FakeOpenAI() as blind:
        seeing.script(Reply.error(400))
        blind.script(Reply.text("from the fallback"))
        chain = (
            Provider("seeing", seeing.url, "", "v-1", vision=True),
            Provider("blind", blind.url, "", "t-1"),
        )
        handler = LlmHandler(LlmConfig(providers=chain, max_retries=0, image_policy=policy))
        request = call(asking(cpb.ContentPart(text="What?"), image()), Files(cat=PICTURE))
        try:
            if policy == "note":
                await run(handler, request)
            else:
                _, failure = await fail(handler, request)
                assert "seeing" in failure.message
        finally:
            await handler.aclose()
    assert len(images_of(seeing.requests[0].body)) == 1
    if policy == "note":
        [asked] = blind.requests
        assert images_of(asked.body) == []
        assert "cannot see images" in asked.body["messages"][-1]["content"]
    else:
        assert blind.requests == []
