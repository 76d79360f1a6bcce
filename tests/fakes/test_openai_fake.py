"""The local server of the Chat Completions protocol (tests/fakes/openai_server.py):
tool calls in the API's wire shapes, the API's checks of tool messages, replies
computed from the request, the echo model, and the command line."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CALL_DEADLINE_S
from tests.fakes.openai_server import (
    FakeOpenAI,
    FakeToolCall,
    Reply,
    echo_reply,
    images_of,
    parse_call_lines,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "demo__add",
            "description": "Adds.",
            "parameters": {"type": "object", "properties": {}},
        },
    }
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


def events(text: str) -> Iterator[Any]:
    for block in text.split("\n\n"):
        if block and block != "data: [DONE]":
            assert block.startswith("data: ")
            yield json.loads(block.removeprefix("data: "))


def asked(content: str = "hi") -> dict[str, Any]:
    return {"role": "user", "content": content}


def calling(*ids: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": "demo__add", "arguments": "{}"}}
            for i in ids
        ],
    }


def answering(call_id: str, text: str = "5") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


async def post(fake: FakeOpenAI, body: dict[str, Any]) -> httpx.Response:
    # The file's bound, not httpx's 5 s: beside the suite's load a loopback connect to the
    # fake (served on this test's own loop) once took longer (ConnectTimeout in a full run).
    async with httpx.AsyncClient(base_url=fake.url, timeout=CALL_DEADLINE_S) as client:
        return await client.post("/chat/completions", json={"model": "m", **body})


async def test_tool_calls_stream_as_the_api_streams_them(fake: FakeOpenAI) -> None:
    fake.script(
        Reply.tool_calls(
            [("demo__add", {"a": 2, "b": 3}, "call_1"), FakeToolCall("demo__now", "{}")],
            content="Checking.",
            chunk_chars=5,
        )
    )

    response = await post(
        fake,
        {
            "messages": [asked()],
            "tools": TOOLS,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )

    chunks = list(events(response.text))
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert deltas[0] == {"role": "assistant", "content": "", "refusal": None}
    assert deltas[1] == {"content": "Checking."}
    assert deltas[2] == {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "demo__add", "arguments": ""},
            }
        ]
    }
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[3:7]]
    assert pieces == ['{"a":', ' 2, "', 'b": 3', "}"]
    assert all(set(d["tool_calls"][0]) == {"index", "function"} for d in deltas[3:7])
    second = deltas[7]["tool_calls"][0]
    assert second["index"] == 1
    assert second["id"].startswith("call_")
    assert second["function"] == {"name": "demo__now", "arguments": ""}
    assert deltas[8]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert deltas[9] == {}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] > 0


async def test_a_call_only_answer_opens_with_null_content(fake: FakeOpenAI) -> None:
    fake.script(Reply.tool_calls([("demo__add", {}, "")]))

    response = await post(fake, {"messages": [asked()], "tools": TOOLS, "stream": True})

    deltas = [chunk["choices"][0]["delta"] for chunk in events(response.text)]
    assert deltas[0]["content"] is None
    # An id of "" sends none.
    assert "id" not in deltas[1]["tool_calls"][0]


async def test_tool_calls_without_stream_are_one_message(fake: FakeOpenAI) -> None:
    fake.script(Reply.tool_calls([("demo__add", '{"a": 1}', "call_9")]))

    response = await post(fake, {"messages": [asked()], "tools": TOOLS})

    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {
            "id": "call_9",
            "type": "function",
            "function": {"name": "demo__add", "arguments": '{"a": 1}'},
        }
    ]


async def test_a_reply_can_be_computed_from_the_request(fake: FakeOpenAI) -> None:
    seen: list[dict[str, Any]] = []

    def reply(body: dict[str, Any]) -> Reply:
        seen.append(body)
        return Reply.text(f"{len(body['messages'])} messages")

    fake.script(reply)
    fake.default = reply

    first = await post(fake, {"messages": [asked()]})
    second = await post(fake, {"messages": [asked(), calling("c1"), answering("c1")]})

    assert first.json()["choices"][0]["message"]["content"] == "1 messages"
    assert second.json()["choices"][0]["message"]["content"] == "3 messages"
    assert [len(body["messages"]) for body in seen] == [1, 3]


@pytest.mark.parametrize(
    "messages",
    [
        [asked(), calling("c1"), answering("c1")],
        [asked(), calling("c1", "c2"), answering("c2"), answering("c1"), asked("more")],
        [asked(), calling("c1"), answering("c1"), calling("c2"), answering("c2")],
        [asked(), {**calling("c1"), "content": "Let me see."}, answering("c1")],
    ],
)
async def test_answered_calls_are_accepted(fake: FakeOpenAI, messages: list[Any]) -> None:
    fake.default = Reply.text("ok")

    response = await post(fake, {"messages": messages, "tools": TOOLS})

    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("messages", "complaint", "param"),
    [
        ([asked(), answering("c1")], "must be a response to a preceeding", "messages.[1].role"),
        (
            [asked(), calling("c1"), answering("c2")],
            "must be a response to a preceeding",
            "messages.[2].role",
        ),
        (
            [asked(), calling("c1", "c2"), answering("c1")],
            "did not have response messages: c2",
            "messages.[1].role",
        ),
        (
            [asked(), calling("c1"), asked("again"), answering("c1")],
            "did not have response messages: c1",
            "messages.[1].role",
        ),
        (
            [asked(), calling("c1"), answering("c1"), asked(), answering("c1")],
            "must be a response to a preceeding",
            "messages.[4].role",
        ),
        (
            [asked(), {"role": "tool", "content": "5"}],
            "tool_call_id",
            "messages.[1].tool_call_id",
        ),
        (
            [asked(), {"role": "assistant", "content": None}],
            "got null instead",
            "messages.[1].content",
        ),
        (
            [
                asked(),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "a.b", "arguments": "{}"},
                        }
                    ],
                },
                answering("c1"),
            ],
            "does not match pattern",
            "messages[1].tool_calls[0].function.name",
        ),
    ],
)
async def test_tool_messages_are_checked_as_the_api_checks_them(
    fake: FakeOpenAI, messages: list[Any], complaint: str, param: str
) -> None:
    fake.default = Reply.text("never")

    response = await post(fake, {"messages": messages, "tools": TOOLS})

    assert response.status_code == 400
    error = response.json()["error"]
    assert complaint in error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def function(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": []}, "tools"),
        ({"tools": [function("has space")]}, "tools[0].function.name"),
        ({"tools": [function("x" * 65)]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": [function(f"f{i}") for i in range(129)]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"top_p": 2}, "top_p"),
    ],
)
async def test_tools_are_checked_as_the_api_checks_them(
    fake: FakeOpenAI, extra: dict[str, Any], param: str
) -> None:
    fake.default = Reply.text("never")

    response = await post(fake, {"messages": [asked()], **extra})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_the_echo_model() -> None:
    offered = {"tools": TOOLS}
    call = 'call demo__add {"a": 2, "b": 3}'

    assert echo_reply({"messages": [asked("hello there")]}).content == "hello there"
    # Without tools offered (or with tool_choice "none") a call is just text.
    assert echo_reply({"messages": [asked(call)]}).content == call
    assert echo_reply({"messages": [asked(call)], **offered, "tool_choice": "none"}).calls == ()
    reply = echo_reply({"messages": [asked(call)], **offered})
    assert reply.calls == (FakeToolCall("demo__add", '{"a": 2, "b": 3}'),)
    after = echo_reply(
        {"messages": [asked(call), calling("c1", "c2"), answering("c1", "5"), answering("c2", "x")]}
    )
    assert after.content == "Tool demo__add returned: 5\nTool demo__add returned: x"


def test_call_lines() -> None:
    assert parse_call_lines('call a {"x": {"y": [1, 2]}}') == [("a", '{"x": {"y": [1, 2]}}')]
    assert parse_call_lines('call a {}\n call b_2 {\n  "k": "v"\n}\n') == [
        ("a", "{}"),
        ("b_2", '{\n  "k": "v"\n}'),
    ]
    assert parse_call_lines("call a [1]") is None
    assert parse_call_lines("call a {} and more") is None
    assert parse_call_lines("please call a {}") is None
    assert parse_call_lines("") is None


async def read_line(stream: asyncio.StreamReader) -> str:
    return (await asyncio.wait_for(stream.readline(), CALL_DEADLINE_S)).decode().strip()


async def start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.openai_server",
        "--port",
        "0",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.terminate()
    return await asyncio.wait_for(process.wait(), CALL_DEADLINE_S)


async def test_the_command_line_serves_the_echo_model_until_terminated() -> None:
    process = await start()
    try:
        assert process.stdout is not None
        url = await read_line(process.stdout)
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/v1")
        request: dict[str, Any] = {
            "model": "echo",
            "messages": [asked('call demo__add {"a": 2, "b": 3}')],
            "tools": TOOLS,
        }
        async with httpx.AsyncClient(base_url=url, timeout=CALL_DEADLINE_S) as client:
            first = (await client.post("/chat/completions", json=request)).json()
            [made] = first["choices"][0]["message"]["tool_calls"]
            assert made["function"] == {"name": "demo__add", "arguments": '{"a": 2, "b": 3}'}
            request["messages"] += [
                {"role": "assistant", "content": None, "tool_calls": [made]},
                answering(made["id"], "5"),
            ]
            second = (await client.post("/chat/completions", json=request)).json()
        assert second["choices"][0]["message"]["content"] == "Tool demo__add returned: 5"
    finally:
        code = await stop(process)
    assert code == 0
    assert process.stderr is not None
    log = (await process.stderr.read()).decode()
    assert log.count("POST /v1/chat/completions") == 2


async def test_the_command_line_serves_a_script(tmp_path: Path) -> None:
    script = tmp_path / "replies.json"
    script.write_text(
        json.dumps(
            [
                {"tool_calls": [{"name": "demo__add", "arguments": {"a": 1}, "id": "call_s"}]},
                {"text": "scripted answer", "usage": [7, 2]},
            ]
        )
    )
    process = await start("--model", "scripted", "--script", str(script), "--quiet")
    try:
        assert process.stdout is not None
        url = await read_line(process.stdout)
        async with httpx.AsyncClient(base_url=url, timeout=CALL_DEADLINE_S) as client:
            bodies = [
                (await client.post("/chat/completions", json={"model": "m", "messages": messages}))
                for messages in (
                    [asked()],
                    [asked(), calling("call_s"), answering("call_s")],
                    [asked()],
                )
            ]
    finally:
        await stop(process)
    assert bodies[0].json()["choices"][0]["message"]["tool_calls"][0]["id"] == "call_s"
    assert bodies[1].json()["choices"][0]["message"]["content"] == "scripted answer"
    assert bodies[1].json()["usage"]["prompt_tokens"] == 7
    # The script is used up.
    assert bodies[2].status_code == 500


async def test_the_command_line_refuses_a_bad_script(tmp_path: Path) -> None:
    script = tmp_path / "replies.json"
    script.write_text('[{"nothing": 1}]')
    process = await start("--model", "scripted", "--script", str(script))
    code = await asyncio.wait_for(process.wait(), CALL_DEADLINE_S)
    assert process.stderr is not None
    assert code == 2
    assert "needs 'text', 'tool_calls' or 'error'" in (await process.stderr.read()).decode()


PNG_B64 = "iVBORw0KGgo="


def picture(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


async def test_content_arrays_with_images_are_accepted_and_recorded(fake: FakeOpenAI) -> None:
    fake.default = Reply.text("seen")
    content = [
        {"type": "text", "text": "What is this?"},
        picture(f"data:image/png;base64,{PNG_B64}", detail="low"),
        picture("https://example.com/cat.jpg"),
    ]
    response = await post(fake, {"messages": [{"role": "user", "content": content}]})
    assert response.status_code == 200
    assert fake.requests[0].body["messages"][0]["content"] == content
    assert images_of(fake.requests[0].body) == [
        (0, f"data:image/png;base64,{PNG_B64}"),
        (0, "https://example.com/cat.jpg"),
    ]
    # The echo model reads the text parts.
    assert echo_reply({"messages": [{"role": "user", "content": content}]}).content == (
        "What is this?"
    )


@pytest.mark.parametrize(
    ("message", "complaint", "param"),
    [
        ({"role": "user", "content": []}, "empty array", "messages[0].content"),
        ({"role": "user", "content": [{"text": "x"}]}, "type", "messages[0].content[0].type"),
        (
            {"role": "user", "content": [{"type": "picture"}]},
            "Supported values",
            "messages[0].content[0].type",
        ),
        (
            {"role": "user", "content": [{"type": "text"}]},
            "text",
            "messages[0].content[0].text",
        ),
        (
            {"role": "system", "content": [picture(f"data:image/png;base64,{PNG_B64}")]},
            "only allowed for messages with role 'user'",
            "messages[0]",
        ),
        (
            {"role": "user", "content": [picture("data:image/png;base64,not base64!")]},
            "Invalid image URL",
            "messages[0].content[0].image_url.url",
        ),
        (
            {"role": "user", "content": [picture("data:text/plain;base64,aGk=")]},
            "Invalid image URL",
            "messages[0].content[0].image_url.url",
        ),
        (
            {"role": "user", "content": [picture("ftp://example.com/a.png")]},
            "Expected a valid URL",
            "messages[0].content[0].image_url.url",
        ),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
            "Missing required parameter",
            "messages[0].content[0].image_url.url",
        ),
        (
            {"role": "user", "content": [picture("https://example.com/a.png", detail="max")]},
            "'auto', 'low', and 'high'",
            "messages[0].content[0].image_url.detail",
        ),
    ],
)
async def test_invalid_content_parts_are_the_apis_400(
    fake: FakeOpenAI, message: dict[str, Any], complaint: str, param: str
) -> None:
    fake.default = Reply.text("never")
    response = await post(fake, {"messages": [message]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert complaint in error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
