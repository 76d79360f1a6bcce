"""dispatcher/build.py: each room's settings reach what it builds from its own section, and
a handler plugin is given the dispatcher's section and every other by its class."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import Any

import pytest

from switchboard.dispatcher.build import handler_registry
from switchboard.dispatcher.handlers.echo import EchoHandler
from switchboard.dispatcher.llm.handler import LlmHandler
from switchboard.dispatcher.llm.settings import LlmSettings
from switchboard.dispatcher.settings import DispatcherSettings
from switchboard.settings import Settings

pytestmark = pytest.mark.unit

#: What the last plugin built was given.
GIVEN: dict[str, Any] = {}


class Recorder(EchoHandler):
    """A plugin that keeps the keyword arguments it was built with."""

    def __init__(self, **given: Any) -> None:
        super().__init__()
        self._capabilities.id = "recorder"
        GIVEN.clear()
        GIVEN.update(given)


def test_a_plugin_gets_the_dispatchers_section_and_any_other_by_its_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    point = EntryPoint(
        name="recorder", value="tests.dispatcher.test_build:Recorder", group="switchboard.handlers"
    )
    monkeypatch.setattr(
        "switchboard.dispatcher.handlers.router.entry_points",
        lambda group: [point] if group == "switchboard.handlers" else [],
    )
    settings = Settings.from_values(
        dev_mode=True,
        llm_base_url="http://127.0.0.1:9/v1",
        llm_model="m-1",
        dispatcher_max_tool_steps=5,
    )
    registry = handler_registry(settings, len)
    assert registry.get("recorder") is not None
    assert isinstance(GIVEN["settings"], DispatcherSettings)
    assert GIVEN["settings"].dispatcher_max_tool_steps == 5
    assert GIVEN["sections"].section(LlmSettings).llm_model == "m-1"
    # The model handler was built from the model's own section.
    llm = registry.get("llm")
    assert isinstance(llm, LlmHandler)
    assert [p.model for p in llm.config.providers] == ["m-1"]


def test_without_a_model_only_echo_is_built() -> None:
    registry = handler_registry(
        Settings.from_values(dev_mode=True, dispatcher_handler_plugins=False), len
    )
    assert registry.get("llm") is None
    assert isinstance(registry.get("echo"), EchoHandler)
