"""Resource names (AIP-122) shared by every service: their patterns and one matcher.

A malformed name is the caller's mistake, so matching raises INVALID_ARGUMENT
with a violation on the field that held it.
"""

from __future__ import annotations

import re
from typing import Final

from switchboard.platform.errors import FieldViolation, InvalidArgument

#: One segment's id: lower case, digits and dashes, as the services generate them.
ID: Final = r"[a-z0-9][a-z0-9-]{0,62}"
WORKSPACE: Final = re.compile(rf"^workspaces/({ID})$")
CONVERSATION: Final = re.compile(rf"^workspaces/({ID})/conversations/({ID})$")
MESSAGE: Final = re.compile(rf"^workspaces/({ID})/conversations/({ID})/messages/({ID})$")
RUN: Final = re.compile(rf"^workspaces/({ID})/conversations/({ID})/runs/({ID})$")
MEMBER: Final = re.compile(rf"^workspaces/({ID})/members/({ID})$")
USER: Final = re.compile(rf"^users/({ID})$")
#: A client-chosen idempotency key (``request_id`` fields).
REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def match(pattern: re.Pattern[str], value: str, field: str) -> re.Match[str]:
    """``pattern``'s match of ``value``, or INVALID_ARGUMENT naming ``field``."""
    found = pattern.match(value)
    if found is None:
        description = "is required" if not value else "is not a valid resource name"
        raise InvalidArgument(f"{field} {description}", [FieldViolation(field, description)])
    return found
