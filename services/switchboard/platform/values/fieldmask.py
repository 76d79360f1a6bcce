"""Update masks (AIP-134): which fields of a resource an update changes."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from switchboard.platform.errors import Violations


def is_set(resource: Message, path: str) -> bool:
    """Whether ``resource`` sets the field ``path`` (a proto3 default means "not set")."""
    descriptor = resource.DESCRIPTOR.fields_by_name[path]
    if descriptor.message_type is not None and not getattr(descriptor, "is_repeated", False):
        return resource.HasField(path)
    return bool(getattr(resource, path))


def update_paths(
    mask: field_mask_pb2.FieldMask,
    resource: Message,
    mutable: Sequence[str],
    field: str = "update_mask",
) -> list[str]:
    """The fields to update; unknown or immutable paths are INVALID_ARGUMENT on ``field``.

    No mask means every mutable field the request sets; ``*`` means all of them.
    """
    paths = list(mask.paths)
    if not paths:
        return [p for p in mutable if is_set(resource, p)]
    if paths == ["*"]:
        return list(mutable)
    violations = Violations()
    known = {f.name for f in resource.DESCRIPTOR.fields}
    for path in paths:
        if path not in known:
            violations.add(f"{field}.paths", f"{path!r} is not a field")
        elif path not in mutable:
            violations.add(f"{field}.paths", f"{path!r} cannot be changed")
    violations.check()
    return list(dict.fromkeys(paths))
