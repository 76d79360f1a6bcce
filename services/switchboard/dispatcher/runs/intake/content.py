"""The content policy checked on a message before it is dispatched.

A policy returns a ``Verdict``: whether the message is blocked, which rules
blocked it and which non-blocking findings (flags) it raised. Verdicts name
rules, never the text that matched: a blocklist term is often itself
something that must not be shown, and a verdict travels to clients and logs.

The built-in policy compares a normalised copy of the text (see
``normalise``) so that case, fullwidth letters, zero-width characters and
runs of whitespace do not hide a term or an injection marker. The text is
untrusted and can be large, so the work is bounded twice: only the first
``max_chars`` characters are read, and every regular expression, the built-in
ones and the operator's ``re:`` entries alike, must pass ``check_regex_cost``
(bounded, unnested repetition), which keeps matching linear in the text.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from switchboard.platform.plugins import load_plugin

CONTENT_POLICIES: Final = "switchboard.content_policies"
BUILTIN_NAME: Final = "builtin"
REGEX_PREFIX: Final = "re:"
MAX_PATTERN_LENGTH: Final = 200
DEFAULT_MAX_CHARS: Final = 100_000
# How many ways one regex may backtrack from one start position (see
# check_regex_cost). At DEFAULT_MAX_CHARS that bounds a search to the order
# of 1e8 steps even on input crafted against the pattern; real text costs
# far less.
MAX_REGEX_COST: Final = 1_000
RULE_PREFIX: Final = "blocklist:"
FLAG_PREFIX: Final = "prompt-injection:"


@dataclass(frozen=True)
class Verdict:
    """What a policy decided about one text.

    ``rules`` names the blocklist rules that matched (``blocklist:<index>``)
    and ``flags`` the non-blocking findings; neither contains the text.
    """

    blocked: bool
    rules: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()


ALLOWED: Final = Verdict(blocked=False)


@runtime_checkable
class ContentPolicy(Protocol):
    """Decides whether a message may be dispatched."""

    def check(self, text: str) -> Verdict: ...


# Unicode's Default_Ignorable_Code_Point set: characters that render as
# nothing (zero-width space and joiners, soft hyphen, bidi controls, variation
# selectors, tag characters). Inserted inside a word they hide it from a
# plain comparison while the reader still sees the word.
_IGNORABLE: Final = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    "\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
_WHITESPACE: Final = re.compile(r"\s+")


def normalise(text: str) -> str:
    """``text`` as the policy compares it: ignorable characters removed,
    NFKC, casefolded, and every run of whitespace made one space."""
    text = _IGNORABLE.sub("", text)
    # Casefolding can produce text that is no longer NFKC (and NFKC can
    # produce letters that casefold further), hence the normalisation on both
    # sides, as in Unicode's compatibility caseless matching.
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return _WHITESPACE.sub(" ", text)


def _is_word_char(char: str) -> bool:
    # The same test as ``\w`` in a str pattern.
    return char.isalnum() or char == "_"


def _head(text: str, max_chars: int) -> str:
    """The first ``max_chars`` characters, without a word cut in two at the end."""
    if len(text) <= max_chars:
        return text
    end = max_chars
    if _is_word_char(text[end]):
        # The word running past the limit is dropped rather than read in
        # part: "bad" would otherwise match the cut-off start of "badger".
        while end > 0 and _is_word_char(text[end - 1]):
            end -= 1
    return text[:end]


# --- regex cost -------------------------------------------------------------

_sre: Any = importlib.import_module("re._parser")
_REPEATS: Final = frozenset({_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT})


def check_regex_cost(pattern: str, *, flags: int = 0) -> int:
    """The product of ``pattern``'s repetition ranges: a bound on how many ways
    it can backtrack from one start position.

    ``ValueError`` unless the pattern compiles and its matching time per
    start position is bounded by the pattern alone, which makes a search
    linear in the text: no unbounded repetition (``*``, ``+``, ``{n,}``: a
    search for ``a+b`` in a long run of ``a`` is quadratic), no repetition of
    anything that itself repeats or branches (the exponential ``(a+)+`` and
    ``(a|a)+``), no backreferences, and a product of at most
    ``MAX_REGEX_COST``. Alternatives are not counted: their number is bounded
    by the pattern's length, and an operator who writes many alternatives
    that all match the same text is not the adversary this guards against.
    """
    try:
        parsed = _sre.parse(pattern, flags)
    except re.error as error:
        raise ValueError(f"does not compile: {error}") from error
    cost = _cost(parsed)
    if cost > MAX_REGEX_COST:
        raise ValueError(
            f"may backtrack {cost} times per position (at most {MAX_REGEX_COST});"
            " narrow its repetition ranges"
        )
    return cost


def _cost(items: Any) -> int:
    total = 1
    for op, av in items:
        if op in _REPEATS:
            low, high, body = av
            if high == _sre.MAXREPEAT:
                raise ValueError("has unbounded repetition (*, + or {n,}); give a maximum")
            if high > 1 and _repeats_or_branches(body):
                raise ValueError("has nested repetition; repeat only single items")
            total *= (high - low + 1) * _cost(body)
        elif op is _sre.BRANCH:
            total *= max(_cost(branch) for branch in av[1])
        elif op is _sre.SUBPATTERN:
            total *= _cost(av[3])
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            total *= _cost(av[1])
        elif op is _sre.ATOMIC_GROUP:
            total *= _cost(av)
        elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
            raise ValueError("has a backreference")
    return total


def _repeats_or_branches(items: Any) -> bool:
    for op, av in items:
        if op in _REPEATS or op is _sre.BRANCH:
            return True
        if op is _sre.SUBPATTERN and _repeats_or_branches(av[3]):
            return True
        if op in (_sre.ASSERT, _sre.ASSERT_NOT) and _repeats_or_branches(av[1]):
            return True
        if op is _sre.ATOMIC_GROUP and _repeats_or_branches(av):
            return True
    return False


# --- prompt-injection markers -----------------------------------------------


@dataclass(frozen=True)
class Marker:
    """One prompt-injection marker: its flag name and its pattern, which is
    matched against ``normalise``-d text (lower case, single spaces)."""

    name: str
    pattern: str


_GAP: Final = r"[^.!?;]{0,40}?"  # a bounded stretch within one sentence
_YOU_ARE: Final = r"you(?: are|'re|\u2019re| r)"

INJECTION_MARKERS: Final[tuple[Marker, ...]] = (
    Marker(
        "ignore-previous",
        r"\b(?:ignore|forget|override|bypass|skip) (?:all |any |every )?(?:of )?"
        r"(?:the |your |my |these |those )?"
        r"(?:previous|prior|above|earlier|preceding|former|foregoing|original|initial) "
        r"(?:instructions?|directions?|rules|prompts?|commands?|guidelines|context)\b"
        r"|\bignore (?:all|everything) (?:above|before)\b",
    ),
    Marker(
        "disregard-instructions",
        rf"\bdisregard\b{_GAP}\b"
        r"(?:instructions?|directions?|rules|guidelines|prompts?|programming|guardrails)\b",
    ),
    Marker(
        "you-are-now",
        rf"\b{_YOU_ARE} now (?:a|an|my|the|dan|no longer|free|unrestricted|unfiltered"
        r"|uncensored|jailbroken|evil|in (?:developer|god|jailbreak|dan) mode)\b"
        r"|\bfrom now on,? you (?:are|will be|will act as|must act as)\b",
    ),
    Marker(
        "reveal-system-prompt",
        r"\b(?:reveal|print|show|display|output|repeat|recite|leak|dump|expose|share|tell"
        r"|give|spell out|write out|what(?: is|'s| are| were))\b"
        rf"{_GAP}"
        r"\b(?:your (?:system |initial |original |hidden |secret |internal |full )?"
        r"(?:prompt|instructions)|the (?:system|hidden|secret|internal) (?:prompt|instructions))\b",
    ),
    # Chat-template control tokens: <|im_start|>, <|endoftext|>, <|eot_id|>.
    Marker("chat-template-token", r"< ?\| ?[a-z_]{1,30} ?\| ?>"),
    # Llama-style instruction and system tags: [INST], [/INST], <<SYS>>.
    Marker("inst-tag", r"\[ ?/? ?inst ?\]|<< ?/? ?sys ?>>"),
    Marker("end-of-sequence", r"< ?/ ?s ?>"),
    Marker(
        "role-header",
        r"#{1,6} ?(?:system|assistant|developer|instructions?|response) ?:",
    ),
    Marker(
        "system-prompt-delimiter",
        r"\b(?:begin|end|start) (?:of )?(?:the )?(?:new )?system (?:prompt|message|instructions)\b",
    ),
    Marker(
        "developer-mode",
        r"\b(?:developer|god|jailbreak|sudo) mode (?:enabled|activated)\b"
        rf"|\b(?:enter|enable|activate|switch to|switch into|act in|stay in|{_YOU_ARE} in)"
        r" (?:developer|god|jailbreak|sudo) mode\b",
    ),
    Marker(
        "do-anything-now",
        # "Do anything now" alone is an ordinary question ("can we do anything
        # now?"); the jailbreak names it after DAN or tells "you" it can.
        rf"\b(?:dan\b{_GAP}\b|you can |you will |you must |stands? for "
        r"[\"'(\u201c\u2018]?)do anything now\b"
        r"|\bdan (?:mode|jailbreak|prompt)\b"
        rf"|\b(?:{_YOU_ARE}(?: now)?|act as|pretend to be|pretend you are|you will be)"
        r" dan\b(?!['\u2019])",
    ),
)

_COMPILED_MARKERS: Final = tuple(
    (FLAG_PREFIX + marker.name, re.compile(marker.pattern)) for marker in INJECTION_MARKERS
)


# --- the built-in policy ----------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    name: str
    # For a plain term: the normalised term, a cheap substring test that
    # rules out almost every text before the regex runs.
    literal: str | None
    regex: re.Pattern[str]

    def matches(self, text: str) -> bool:
        if self.literal is not None and self.literal not in text:
            return False
        return self.regex.search(text) is not None


def _compile_rule(index: int, entry: str) -> _Rule:
    # Errors name the entry by index only: the term is kept out of logs too.
    name = f"{RULE_PREFIX}{index}"
    if entry.startswith(REGEX_PREFIX):
        pattern = entry[len(REGEX_PREFIX) :]
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise ValueError(
                f"blocklist entry {index}: the regular expression is longer than"
                f" {MAX_PATTERN_LENGTH} characters"
            )
        if not pattern:
            raise ValueError(f"blocklist entry {index}: the regular expression is empty")
        try:
            check_regex_cost(pattern, flags=re.IGNORECASE)
        except ValueError as error:
            raise ValueError(f"blocklist entry {index}: the regular expression {error}") from None
        regex = re.compile(pattern, re.IGNORECASE)
        if regex.search("") is not None:
            raise ValueError(
                f"blocklist entry {index}: the regular expression matches empty text"
                " (it would block every message)"
            )
        return _Rule(name, None, regex)
    term = normalise(entry).strip(" ")
    if not term:
        raise ValueError(f"blocklist entry {index} is empty")
    # Lookarounds rather than \b: a term may begin or end with punctuation
    # ("c++"), where \b would demand a letter on the other side.
    return _Rule(name, term, re.compile(rf"(?<!\w){re.escape(term)}(?!\w)"))


class BuiltinContentPolicy:
    """Blocks blocklisted terms and flags prompt-injection markers.

    Each ``blocklist`` entry is a term, matched case-insensitively on word
    boundaries after ``normalise``, or ``re:<pattern>``, a regular expression
    (case-insensitive) searched in the normalised text, which has single
    spaces for whitespace. A pattern longer than ``MAX_PATTERN_LENGTH``, one
    that does not compile, or one ``check_regex_cost`` refuses is a
    ``ValueError`` here, at construction.
    """

    name = BUILTIN_NAME

    def __init__(
        self,
        blocklist: Sequence[str],
        flag_injection: bool = True,
        *,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        if isinstance(blocklist, str):
            # A bare string is a sequence of one-letter terms: surely a mistake.
            raise TypeError("blocklist must be a sequence of entries, not a str")
        if max_chars < 1:
            raise ValueError("max_chars must be positive")
        self._rules = tuple(_compile_rule(index, entry) for index, entry in enumerate(blocklist))
        self._flag_injection = flag_injection
        self._max_chars = max_chars

    def check(self, text: str) -> Verdict:
        if not self._rules and not self._flag_injection:
            return ALLOWED
        normal = normalise(_head(text, self._max_chars))
        rules = tuple(rule.name for rule in self._rules if rule.matches(normal))
        flags: tuple[str, ...] = ()
        if self._flag_injection:
            flags = tuple(name for name, regex in _COMPILED_MARKERS if regex.search(normal))
        return Verdict(blocked=bool(rules), rules=rules, flags=flags)


def load_content_policy(name: str, blocklist: Sequence[str], flag_injection: bool) -> ContentPolicy:
    """The content policy called ``name``.

    ``"builtin"`` is ``BuiltinContentPolicy(blocklist, flag_injection)``. Any
    other name is an entry point of the ``switchboard.content_policies`` group
    or ``package.module:attr`` (see ``platform.plugins.load_plugin``): a class
    or factory is called without arguments, an instance is used as it is, and
    ``blocklist`` and ``flag_injection`` are settings of the built-in only.
    ``ValueError`` for an unknown name or a bad blocklist, ``TypeError`` if
    what loads cannot be created or has no ``check`` method.
    """
    builtins: Mapping[str, Callable[[], ContentPolicy]] = {
        BUILTIN_NAME: lambda: BuiltinContentPolicy(blocklist, flag_injection),
    }
    try:
        policy = load_plugin(CONTENT_POLICIES, name, builtins)
    except TypeError as error:
        # The plugin's constructor wanted arguments (or was not callable as
        # one): say which setting caused it.
        raise TypeError(f"cannot create content policy {name!r}: {error}") from error
    if not callable(getattr(policy, "check", None)):
        raise TypeError(f"content policy {name!r} ({policy!r}) needs a `check(text)` method")
    return policy
