"""Memory items as a person keeps them: by validity, with their history, retired
rather than deleted (docs/python-client.md, "Memory"; docs/memory.md)."""

from __future__ import annotations

import datetime as dt

from google.protobuf import timestamp_pb2

from switchboard.api.context.v1 import context_pb2

#: A validity: ``"current"``, ``"retired"``, ``"all"``, or a ``MemoryValidity``.
ValidityLike = int | str
#: A memory item: its name, or the item (whose ``etag`` then goes along).
MemoryLike = str | context_pb2.MemoryItem


def memory_validity(value: ValidityLike) -> context_pb2.MemoryValidity.ValueType:
    """A ``MemoryValidity`` from its number or name (``current``, ``MEMORY_VALIDITY_ALL``)."""
    if isinstance(value, int):
        return context_pb2.MemoryValidity.ValueType(value)
    name = value.upper()
    if not name.startswith("MEMORY_VALIDITY_"):
        name = f"MEMORY_VALIDITY_{name}"
    try:
        return context_pb2.MemoryValidity.Value(name)
    except ValueError:
        raise ValueError(f"{value!r} is not a validity: current, retired or all") from None


def memory_kind(value: int | str) -> context_pb2.MemoryKind.ValueType:
    """A ``MemoryKind`` from its number or name (``fact``, ``MEMORY_KIND_PREFERENCE``)."""
    if isinstance(value, int):
        return context_pb2.MemoryKind.ValueType(value)
    name = value.upper()
    if not name.startswith("MEMORY_KIND_"):
        name = f"MEMORY_KIND_{name}"
    try:
        return context_pb2.MemoryKind.Value(name)
    except ValueError:
        kinds = ", ".join(
            v.name.removeprefix("MEMORY_KIND_").lower()
            for v in context_pb2.MemoryKind.DESCRIPTOR.values
            if v.number
        )
        raise ValueError(f"{value!r} is not a memory kind: {kinds}") from None


def timestamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    """A ``Timestamp`` of an aware datetime (a naive one would be read in local time,
    silently: refused instead)."""
    if when.tzinfo is None:
        raise ValueError("a naive datetime: give it a time zone (datetime.UTC)")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when.astimezone(dt.UTC))
    return stamp


def name_and_etag(item: MemoryLike) -> tuple[str, str]:
    """A memory item's name, and its etag when ``item`` is the item itself."""
    if isinstance(item, str):
        return item, ""
    return item.name, item.etag
