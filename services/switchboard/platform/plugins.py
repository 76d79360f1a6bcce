"""Components chosen by name in settings: a built-in, an entry point, or an import path.

A deployment names the component it wants. The name is looked up, in order,
among the built-ins, among the installed entry points of the component's group
(so a separately installed package can add one), and finally as an import path
``package.module:attr``. Settings are operator-controlled, so importing the
module they name is no more power than they already have. Used by the context
service's tokenizers, summarizers and entity extractors and by the
dispatcher's content policies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import TypeVar, cast

T = TypeVar("T")


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
