"""Password hashing (argon2id, off the event loop) and the password policy.

Hashing is deliberately slow, so it runs in a small dedicated thread pool;
the number of hashes waiting is bounded, and beyond it callers get
``QuotaExceeded`` instead of an ever-growing queue (a login flood must not
turn into unbounded memory or latency for everyone else).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, TypeVar

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from switchboard.platform.errors import FieldViolation, InvalidArgument, QuotaExceeded

T = TypeVar("T")

MIN_PASSWORD_LENGTH: Final = 12
# Long inputs are hashed like any other, but an unbounded one is a CPU/memory
# lever for an attacker; 1 KiB is far beyond any passphrase.
MAX_PASSWORD_BYTES: Final = 1024

# The commonest passwords of at least MIN_PASSWORD_LENGTH characters (from the
# public breach-corpus top lists); anything shorter is already refused by length.
COMMON_PASSWORDS: Final = frozenset(
    {
        "123456789012",
        "1234567890123",
        "12345678901234",
        "qwertyuiop12",
        "qwertyuiop123",
        "password1234",
        "password12345",
        "password123!",
        "passwordpassword",
        "iloveyou1234",
        "111111111111",
        "000000000000",
        "123123123123",
        "abc123abc123",
        "qwerty123456",
        "1q2w3e4r5t6y",
        "1qaz2wsx3edc",
        "zaq12wsxcde3",
        "asdfghjkl123",
        "letmein12345",
        "welcome12345",
        "administrator",
        "changeme1234",
        "trustno1trustno1",
        "football1234",
        "baseball1234",
        "superman1234",
        "princess1234",
        "sunshine1234",
        "monkey123456",
        "dragon123456",
        "starwars1234",
        "passw0rd1234",
        "p@ssw0rd1234",
        "qwertyqwerty",
        "aaaaaaaaaaaa",
        "abcdefghijkl",
        "abcdef123456",
        "123456abcdef",
        "iloveyouiloveyou",
        "switchboard1",
        "switchboard123",
    }
)


# OWASP's minimum for argon2id: 19 MiB of memory, 2 iterations, 1 lane.
OWASP_MIN_MEMORY_KIB: Final = 19456
OWASP_MIN_TIME_COST: Final = 2


@dataclass(frozen=True)
class Argon2Params:
    """argon2id cost parameters; the defaults are OWASP's minimum, and lower is refused."""

    memory_kib: int = OWASP_MIN_MEMORY_KIB
    time_cost: int = OWASP_MIN_TIME_COST
    parallelism: int = 1

    def __post_init__(self) -> None:
        if self.memory_kib < OWASP_MIN_MEMORY_KIB or self.time_cost < OWASP_MIN_TIME_COST:
            raise ValueError(
                "argon2id parameters must be at or above OWASP's minimum "
                f"(m={OWASP_MIN_MEMORY_KIB} KiB, t={OWASP_MIN_TIME_COST}, p=1)"
            )
        if self.parallelism < 1:
            raise ValueError("argon2id parallelism must be at least 1")


def check_password_policy(password: str, *, email: str = "", field: str = "password") -> None:
    """Raise InvalidArgument listing every way ``password`` breaks the policy."""
    problems: list[str] = []
    if len(password) < MIN_PASSWORD_LENGTH:
        problems.append(f"must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        problems.append(f"must be at most {MAX_PASSWORD_BYTES} bytes")
    if password.strip() != password or not password.strip():
        problems.append("must not start or end with whitespace")
    lowered = password.lower()
    if lowered in COMMON_PASSWORDS:
        problems.append("is one of the most common passwords")
    local_part = email.split("@", 1)[0].lower()
    if local_part and len(local_part) >= 4 and local_part in lowered:
        problems.append("must not contain the email address")
    if len(set(password)) < 4:
        problems.append("must use at least 4 different characters")
    if problems:
        raise InvalidArgument(
            "password does not meet the policy",
            [FieldViolation(field, f"password {p}") for p in problems],
        )


@functools.cache
def _timing_hash(params: Argon2Params) -> str:
    """A hash of a password nobody has, with ``params``' cost. One per process and cost:
    it is made when the process starts, and each server a process builds (tests build
    thousands) would otherwise spend a whole argon2 hash on it."""
    return _argon(params).hash("dummy-password-for-timing-equalization")


def _argon(params: Argon2Params) -> argon2.PasswordHasher:
    return argon2.PasswordHasher(
        time_cost=params.time_cost,
        memory_cost=params.memory_kib,
        parallelism=params.parallelism,
        hash_len=32,
        salt_len=16,
        type=argon2.Type.ID,
    )


class PasswordHasher:
    """argon2id hashing and verification in a bounded thread pool."""

    def __init__(
        self,
        params: Argon2Params | None = None,
        *,
        threads: int = 2,
        max_pending: int = 64,
    ) -> None:
        self.params = params or Argon2Params()
        self._argon = _argon(self.params)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2")
        self._slots = asyncio.Semaphore(max_pending)
        self._max_pending = max_pending
        # Verifying against this when a user does not exist makes "unknown user"
        # cost the same as "wrong password", so timing reveals nothing.
        self._dummy_hash = _timing_hash(self.params)

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._slots.locked():
            raise QuotaExceeded(
                "too many password operations in progress; retry shortly",
                subject="password_hashing_queue",
            )
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def hash(self, password: str) -> str:
        return await self._run(functools.partial(self._argon.hash, password))

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """True if ``password`` matches. ``None`` (no such user) burns the same time."""
        target = stored_hash or self._dummy_hash
        matched = await self._run(functools.partial(self._verify_sync, target, password))
        return matched and stored_hash is not None

    def _verify_sync(self, stored_hash: str, password: str) -> bool:
        try:
            return bool(self._argon.verify(stored_hash, password))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored_hash: str) -> bool:
        """True if the hash was made with weaker (or different) parameters."""
        try:
            return bool(self._argon.check_needs_rehash(stored_hash))
        except InvalidHashError:
            return True

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
