"""Input schemas (an integration's tools', a delegate's): compiled once, off the event loop,
never fetching.

An integration's server writes its tools' schemas, so a schema is untrusted
input that the hub *runs*. Two things keep it from reaching anything:

- Every validator is built with an explicit ``referencing`` registry whose
  retrieval refuses every URI. Without one, ``jsonschema`` falls back to its
  deprecated automatic retrieval and fetches any remote ``$ref`` with
  ``urllib`` (following redirects, outside the egress policy, blocking the
  thread it runs on). With it, only the schema itself (and the meta-schemas
  the library ships) can be referred to.
- ``compile_schema`` resolves every ``$ref``, ``$dynamicRef`` and
  ``$recursiveRef`` against that registry when the list is read, so a tool
  that refers outside its own schema is known before any call, and a call
  never resolves anything new.

Formats are annotations only (no ``format_checker``): none of ``jsonschema``'s
format checks is consulted, so none can look anything up. Compiling, the
reference walk and each validation run in a worker thread (``asyncio.to_thread``
by the caller): a large schema costs its own caller time, not every caller's.

**Patterns.** A thread alone does not protect the loop from a schema's
``pattern`` or ``patternProperties``: ``re`` holds the interpreter lock for a
whole match, and a pattern such as ``^(a|aa)+$`` backtracks exponentially, so
one crafted argument would freeze the process. ``jsonschema`` matches with
``re.search`` at five places in three modules and offers no hook for the
engine, so ``bound_patterns`` points those modules' ``re`` at a namespace whose
``search`` is the ``regex`` module's (the same syntax as ``re``), run with
``concurrent=True`` (the lock is released while it matches) and a timeout:
each search at most ``PATTERN_TIMEOUT_S``, and all of one validation's at most
``VALIDATION_BUDGET_S``. A validation that runs out is ``SchemaUnusable``.
``tests/integration/ports/test_tool_schemas.py`` fails if a ``jsonschema`` release moves
a match out of reach of this (docs/decisions.md).
"""

from __future__ import annotations

import functools
import re
import threading
import time
import types
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

# jsonschema, referencing, their meta-schemas and regex are imported when the first schema
# is compiled (``_registries``): every process imports this module, few check a schema.
if TYPE_CHECKING:
    import jsonschema
    from referencing import Registry, Resource

#: Most violations one call reports.
MAX_VIOLATIONS: Final = 20
#: Most references one schema may hold (each is resolved when the list is read).
MAX_REFERENCES: Final = 1000
#: Longest one pattern match may take, and all of one validation's together.
PATTERN_TIMEOUT_S: Final = 0.25
VALIDATION_BUDGET_S: Final = 1.0
_REFERENCE_KEYWORDS: Final = ("$ref", "$dynamicRef", "$recursiveRef")


class SchemaUnusable(Exception):
    """The schema cannot be used to check arguments; ``reason`` says why (no secrets)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _refuse(uri: str) -> Resource[Any]:
    """The registry's retrieval: nothing outside the schema is ever fetched."""
    raise LookupError(f"{uri} is outside the schema and is not fetched")


_budget = threading.local()


def _bounded_search(pattern: str, string: str, flags: int = 0) -> Any:
    """``re.search`` as jsonschema calls it, with the lock released and a deadline."""
    import regex

    timeout = PATTERN_TIMEOUT_S
    deadline: float | None = getattr(_budget, "deadline", None)
    if deadline is not None:
        timeout = min(timeout, deadline - time.monotonic())
        if timeout <= 0:
            raise TimeoutError("the validation's time for patterns is spent")
    return regex.search(pattern, string, flags, timeout=timeout, concurrent=True)


def bound_patterns() -> None:
    """Make jsonschema's pattern matching release the lock and end in time (idempotent)."""
    import jsonschema._keywords
    import jsonschema._legacy_keywords
    import jsonschema._utils

    bounded = types.SimpleNamespace(**{name: getattr(re, name) for name in dir(re)})
    bounded.search = _bounded_search
    for module in (jsonschema._keywords, jsonschema._legacy_keywords, jsonschema._utils):
        module.re = bounded  # type: ignore[attr-defined]


@functools.cache
def _registries() -> tuple[Registry[Any], Registry[Any]]:
    """What validators resolve against: no resources of its own (they add the meta-schemas
    the library ships), no retrieval; and what the reference walk resolves against: the
    same, meta-schemas included. Made with the first schema, and jsonschema's patterns are
    bounded before it can check anything."""
    from jsonschema_specifications import REGISTRY as SPECIFICATIONS
    from referencing import Registry

    bound_patterns()
    # (attrs' alias of ``_retrieve``, which mypy's attrs support does not see)
    registry: Registry[Any] = Registry(retrieve=_refuse)  # type: ignore[call-arg]
    return registry, registry.combine(SPECIFICATIONS)


@dataclass(frozen=True)
class Compiled:
    """One tool's checker: a validator, or why there is none."""

    validator: Any = None
    problem: str = ""

    def violations(self, arguments: Any) -> list[tuple[str, str]]:
        """``(path, message)`` of each way ``arguments`` break the schema (at most
        MAX_VIOLATIONS); SchemaUnusable when the schema cannot be applied."""
        import jsonschema
        import regex
        from referencing.exceptions import Unresolvable

        if self.problem:
            raise SchemaUnusable(self.problem)
        _budget.deadline = time.monotonic() + VALIDATION_BUDGET_S
        try:
            errors = sorted(
                self.validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.path]
            )
        except TimeoutError:
            raise SchemaUnusable(
                f"its input schema's patterns take longer than {VALIDATION_BUDGET_S:g} s "
                "to apply to these arguments"
            ) from None
        except (
            jsonschema.SchemaError,
            Unresolvable,
            re.error,
            regex.error,
            RecursionError,
            ValueError,
        ):
            # A bad pattern or a schema nested too deep shows only when applied.
            raise SchemaUnusable("its input schema cannot be applied") from None
        finally:
            _budget.deadline = None
        return [(_path(error), error.message[:300]) for error in errors[:MAX_VIOLATIONS]]


def _path(error: jsonschema.ValidationError) -> str:
    parts = ["arguments"]
    for part in error.absolute_path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts).replace(".[", "[")


def compile_schema(schema: Mapping[str, Any]) -> Compiled:
    """The checker of one input schema (an empty schema accepts any object)."""
    import jsonschema

    registry, known = _registries()
    contents: dict[str, Any] = dict(schema) or {"type": "object"}
    try:
        validator_class = jsonschema.validators.validator_for(
            contents, default=jsonschema.Draft202012Validator
        )
        validator_class.check_schema(contents)
    except jsonschema.SchemaError:
        return Compiled(problem="it declares an invalid input schema")
    except (RecursionError, ValueError, TypeError):
        return Compiled(problem="its input schema cannot be read")
    validator = validator_class(contents, registry=registry)
    try:
        _check_references(contents, validator_class, known)
    except SchemaUnusable as exc:
        return Compiled(problem=exc.reason)
    return Compiled(validator=validator)


def _check_references(contents: dict[str, Any], validator_class: Any, known: Registry[Any]) -> None:
    """Resolve every reference in the schema now, against ``known`` (it fetches nothing)."""
    import referencing.jsonschema
    from referencing import Resource
    from referencing.exceptions import Unresolvable

    default = referencing.jsonschema.specification_with(
        validator_class.META_SCHEMA.get("$schema", ""), default=referencing.jsonschema.DRAFT202012
    )
    root = Resource.from_contents(contents, default_specification=default)
    resolver = known.resolver_with_root(root)
    try:
        for count, (base, reference) in enumerate(_references(root, root.id() or "")):
            if count >= MAX_REFERENCES:
                raise SchemaUnusable(f"its input schema holds more than {MAX_REFERENCES} $refs")
            target = urllib.parse.urljoin(base, reference) if base else reference
            try:
                resolver.lookup(target)
            except Unresolvable:
                if reference.startswith("#"):
                    raise SchemaUnusable(
                        "its input schema has a $ref that resolves to nothing in it"
                    ) from None
                raise SchemaUnusable(
                    "its input schema has a remote $ref, which is never fetched"
                ) from None
    except RecursionError:
        raise SchemaUnusable("its input schema is nested too deeply") from None


def _references(resource: Resource[Any], base: str) -> Iterator[tuple[str, str]]:
    """Each reference keyword's ``(base URI, value)``, through every subschema."""
    identifier = resource.id()
    if identifier:
        base = urllib.parse.urljoin(base, identifier) if base else identifier
    contents = resource.contents
    if isinstance(contents, Mapping):
        for keyword in _REFERENCE_KEYWORDS:
            value = contents.get(keyword)
            if isinstance(value, str):
                yield base, value
    for subresource in resource.subresources():
        yield from _references(subresource, base)
