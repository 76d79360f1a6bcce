"""Images for vision models: a window's image files as Chat Completions image parts.

``messages.py`` puts an ``ImagePart`` wherever a user message holds a stored
image file of a type vision models take (JPEG, PNG, GIF or WEBP:
``parttext.VISION_IMAGE_TYPES``); ``load`` reads the images through the run's
file reader (the context service's DownloadFile, or its domain in this
process) and makes each a ``data:`` URL. Per provider, ``for_model`` keeps
the image parts for a model with vision and puts each part's note in its
place for one without (an array left with only text becomes one string
again, as every compatible server takes that).

Every image is bounded: one larger than ``max_image_bytes`` is never read, and
a call carries at most ``max_images`` (the newest); the rest are notes, so
the model knows an image was there. ``ImagePart`` is a dict (it serializes as
the part itself) that remembers its note.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator, Sequence
from typing import Any, Final

from switchboard.api.context.v1 import context_pb2
from switchboard.dispatcher.handlers.base import FileReader
from switchboard.dispatcher.llm.config import LlmConfig, Provider
from switchboard.platform.errors import ModalityUnsupported, RequestTooLarge, SwitchboardError

#: Images read at once for one call.
_READS_AT_ONCE: Final = 4


def cannot_see(name: str) -> str:
    return f"[image {name}: this model cannot see images]"


class ImagePart(dict[str, Any]):
    """An ``image_url`` content part; ``note`` is the text sent in its place to a
    model without vision, or when the image is not sent at all (``sendable``)."""

    def __init__(self, reference: context_pb2.FileReference) -> None:
        super().__init__(type="image_url", image_url={"url": ""})
        self.file = reference.file
        self.name = reference.display_name or reference.file.rsplit("/", 1)[-1]
        self.mime_type = reference.mime_type
        self.size = reference.size_bytes
        self.note = cannot_see(self.name)
        #: False once the image is known not to be sent (too large, unreadable).
        self.sendable = True

    def refuse(self, why: str) -> None:
        self.sendable = False
        self.note = f"[image {self.name}: {why}]"


def image_parts(messages: Sequence[dict[str, Any]]) -> Iterator[ImagePart]:
    """The image parts of ``messages``, oldest first."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, ImagePart):
                    yield part


def _bound(parts: list[ImagePart], config: LlmConfig) -> list[ImagePart]:
    """The parts within the limits (the newest ``max_images`` of those small
    enough); the others get their note."""
    for part in parts:
        if part.size > config.max_image_bytes:
            part.refuse(f"larger than {config.max_image_bytes} bytes, not sent")
    small = [part for part in parts if part.sendable]
    for part in small[: max(0, len(small) - config.max_images)]:
        part.refuse(f"left out: more than {config.max_images} images in one call")
    return [part for part in small if part.sendable]


def check_policy(
    messages: Sequence[dict[str, Any]], chain: tuple[Provider, ...], config: LlmConfig
) -> tuple[tuple[Provider, ...], list[ImagePart]]:
    """The chain a call with these images may use, and the images to read.

    Under the ``refuse`` policy a first model without vision fails the run
    (``ModalityUnsupported``, before anything is read or asked) and fallbacks
    without vision are skipped: none of them gets an image as a note. Under
    ``note`` every provider stays, and nothing is read when none has vision.
    """
    wanted = _bound(list(image_parts(messages)), config)
    if not wanted:
        return chain, []
    if config.image_policy == "refuse":
        first = chain[0]
        if not first.vision:
            raise ModalityUnsupported(
                f"the model {first.label} cannot see images and the window holds "
                f"{len(wanted)} (SWITCHBOARD_LLM_IMAGE_POLICY is refuse)",
                metadata={"media_type": wanted[0].mime_type, "model": first.label},
            )
        chain = tuple(provider for provider in chain if provider.vision)
    if not any(provider.vision for provider in chain):
        return chain, []
    return chain, wanted


async def load(parts: list[ImagePart], read: FileReader | None, config: LlmConfig) -> None:
    """Read each image and make it a ``data:`` URL; one that cannot be read gets
    a note (the run goes on: a deleted file is not the model's failure)."""
    if read is None:
        for part in parts:
            part.refuse("files cannot be read here, not sent")
        return
    gate = asyncio.Semaphore(_READS_AT_ONCE)

    async def one(part: ImagePart) -> None:
        async with gate:
            try:
                data = await read(part.file, config.max_image_bytes)
            except RequestTooLarge:
                part.refuse(f"larger than {config.max_image_bytes} bytes, not sent")
                return
            except SwitchboardError:
                part.refuse("could not be read, not sent")
                return
        encoded = base64.b64encode(data).decode("ascii")
        part["image_url"] = {"url": f"data:{part.mime_type};base64,{encoded}"}

    await asyncio.gather(*(one(part) for part in parts))


def for_model(messages: list[dict[str, Any]], vision: bool) -> list[dict[str, Any]]:
    """``messages`` as one provider gets them: image parts kept for a model with
    vision (those not sent as their notes), all of them notes for one without;
    a content array left with only text joined into one string."""
    if not any(isinstance(message.get("content"), list) for message in messages):
        return messages
    adapted: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            adapted.append(message)
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if isinstance(part, ImagePart) and not (vision and part.sendable):
                parts.append({"type": "text", "text": part.note})
            else:
                parts.append(part)
        if all(part.get("type") == "text" for part in parts):
            adapted.append({**message, "content": "\n".join(part["text"] for part in parts)})
        else:
            adapted.append({**message, "content": parts})
    return adapted
