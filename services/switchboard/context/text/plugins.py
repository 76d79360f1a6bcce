"""Pluggable context components (tokenizers, summarizers, entity extractors) by name.

The built-ins and entry point groups of each kind; the lookup itself (built-in,
entry point, or ``package.module:attr``) is ``platform.plugins.load_plugin``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

from switchboard.context.text.entities import BuiltinEntityExtractor, EntityExtractor
from switchboard.context.text.summarizer import ExtractiveSummarizer, Summarizer
from switchboard.context.text.tokencount import ApproxTokenCounter, TokenCounter
from switchboard.platform.plugins import load_plugin

TOKENIZERS: Final = "switchboard.tokenizers"
SUMMARIZERS: Final = "switchboard.summarizers"
ENTITY_EXTRACTORS: Final = "switchboard.entity_extractors"

# Read-only views: these are shared module state, and a test or caller that
# registered into them would change every later lookup in the process.
BUILTIN_TOKENIZERS: Final[Mapping[str, Callable[[], TokenCounter]]] = MappingProxyType(
    {ApproxTokenCounter.name: ApproxTokenCounter}
)
BUILTIN_SUMMARIZERS: Final[Mapping[str, Callable[[], Summarizer]]] = MappingProxyType(
    {ExtractiveSummarizer.name: ExtractiveSummarizer}
)
BUILTIN_ENTITY_EXTRACTORS: Final[Mapping[str, Callable[[], EntityExtractor]]] = MappingProxyType(
    {BuiltinEntityExtractor.name: BuiltinEntityExtractor}
)


def _checked(kind: str, component: object, method: str) -> None:
    # Entry points and import paths are not type-checked against the protocol;
    # failing at start beats failing on the first message.
    if not isinstance(getattr(component, "name", None), str) or not callable(
        getattr(component, method, None)
    ):
        raise TypeError(f"{kind} plugin {component!r} needs a str `name` and a `{method}` method")


def load_token_counter(name: str) -> TokenCounter:
    """The token counter called ``name`` (see ``load_plugin``).

    ``TypeError`` if what loads has no ``str`` ``name`` or no ``count`` method.
    """
    counter = load_plugin(TOKENIZERS, name, BUILTIN_TOKENIZERS)
    _checked("tokenizer", counter, "count")
    return counter


def load_summarizer(name: str) -> Summarizer:
    """The summarizer called ``name`` (see ``load_plugin``).

    ``TypeError`` if what loads has no ``str`` ``name`` or no ``summarize`` method.
    """
    summarizer = load_plugin(SUMMARIZERS, name, BUILTIN_SUMMARIZERS)
    _checked("summarizer", summarizer, "summarize")
    return summarizer


def load_entity_extractor(name: str) -> EntityExtractor:
    """The entity extractor called ``name`` (see ``load_plugin``).

    ``TypeError`` if what loads has no ``str`` ``name`` or no ``extract`` method.
    """
    extractor = load_plugin(ENTITY_EXTRACTORS, name, BUILTIN_ENTITY_EXTRACTORS)
    _checked("entity extractor", extractor, "extract")
    return extractor
