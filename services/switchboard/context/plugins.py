"""Pluggable context components (tokenizers, summarizers, entity extractors) by name.

A deployment names the component it wants in its settings. The name is looked
up, in order, among the built-ins, among the installed entry points of the
component's group (so a separately installed package can add one), and finally
as an import path ``package.module:attr``. Settings are operator-controlled, so
importing the module they name is no more power than they already have.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib import metadata
from types import MappingProxyType
from typing import Final, TypeVar, cast

from switchboard.context.entities import BuiltinEntityExtractor, EntityExtractor
from switchboard.context.summarizer import ExtractiveSummarizer, Summarizer
from switchboard.context.tokens import ApproxTokenCounter, TokenCounter

T = TypeVar("T")

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


def _instantiate(target: object) -> object:
    # A class or factory is called; an object that is already an instance is
    # used as it is.
    return target() if callable(target) else target


def _import_path(path: str) -> object:
    module_name, _, attribute = path.partition(":")
    target: object = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def load_plugin(group: str, name: str, builtins: Mapping[str, Callable[[], T]]) -> T:
    """Create the component called ``name``: a built-in, an entry point of
    ``group``, or ``package.module:attr``; ``ValueError`` if there is none."""
    if name in builtins:
        return builtins[name]()
    installed = metadata.entry_points(group=group)
    for entry_point in installed:
        if entry_point.name == name:
            # Third-party code: its type is only known by convention.
            return cast("T", _instantiate(entry_point.load()))
    module_name, colon, attribute = name.partition(":")
    if colon and module_name and attribute:
        try:
            target = _import_path(name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot load {group} plugin {name!r}: {error}") from error
        return cast("T", _instantiate(target))
    available = sorted({*builtins, *(entry_point.name for entry_point in installed)})
    raise ValueError(
        f"unknown {group} plugin {name!r}; available: {', '.join(available)}"
        " (or give an import path, package.module:attr)"
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
