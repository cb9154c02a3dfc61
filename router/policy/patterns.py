"""The safety check for custom detector patterns: `check_pattern`.

A policy may declare its own detector regexes, and every request's text is scanned
with them, so a pattern that can backtrack catastrophically (or quadratically) would
let one request stall the router. `check_pattern` refuses such a pattern at policy
load: a static walk over the parsed pattern for nested or overlapping repeats, then a
short timed probe on growing repetitive inputs for what the walk cannot see.

It lives apart from `detectors` because it never runs on the request path (only when a
policy is loaded or a custom detector is built) and because it reads CPython's private
regex parser (`re._parser`, `re._constants`), which the scanning code has no need of.
"""

from __future__ import annotations

import importlib
import re
import time
from typing import Any

__all__ = ["check_pattern"]

_PARSER: Any = importlib.import_module("re._parser")
_SRE: Any = importlib.import_module("re._constants")
_REPEATS = (_SRE.MAX_REPEAT, _SRE.MIN_REPEAT)
_CATEGORY_CHARS = {
    _SRE.CATEGORY_DIGIT: frozenset(range(48, 58)),
    _SRE.CATEGORY_SPACE: frozenset(map(ord, " \t\n\r\f\v")),
    _SRE.CATEGORY_WORD: frozenset(c for c in range(128) if chr(c).isalnum() or c == 95),
}
_NESTED = "a repeat inside a repeat (like (a+)+) can backtrack exponentially; use a++"
_OVERLAP = "overlapping alternatives in a repeat (like (a|a)*) can backtrack exponentially"
_QUADRATIC = (
    "search time grows with the square of the input (an unbounded repeat retried at every "
    "position): bound it, e.g. \\w{1,64}, or anchor where it starts, e.g. (?<!\\w)"
)
_PROBE_SIZES = (*range(8, 65, 2), 80, 100, 128, 160, 200, 256, 320, 400, 512, 1024, 8192)


def check_pattern(pattern: str) -> str | None:
    """Why a custom pattern must not be used, or None. A static check of the parsed
    pattern (an unbounded repeat, or overlapping alternatives, inside a repeat), then a
    short probe on growing repetitive inputs for what the static check cannot see."""
    try:
        compiled = re.compile(pattern)
        tree = _PARSER.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"does not compile: {exc}"
    if problem := _walk(list(tree), in_repeat=False):
        return problem
    if compiled.fullmatch("") is not None:
        return "matches the empty string, so it would fire everywhere"
    return _probe(compiled, pattern)


def _walk(items: list[Any], in_repeat: bool) -> str | None:
    """The first backtracking hazard in a parsed pattern; possessive and atomic parts
    cannot be re-entered, so what is inside them only counts on its own."""
    for op, av in items:
        if op in _REPEATS and in_repeat and av[1] == _SRE.MAXREPEAT:
            return _NESTED
        if op in _REPEATS and av[1] > 10 and _variable_repeat(list(av[2])):
            return _NESTED
        if op is _SRE.BRANCH and in_repeat and _overlapping([list(a) for a in av[1]]):
            return _OVERLAP
        if op in _REPEATS:
            parts, nested = [av[2]], in_repeat or av[1] > 10
        elif op in (_SRE.POSSESSIVE_REPEAT, _SRE.ATOMIC_GROUP):
            parts, nested = [av if op is _SRE.ATOMIC_GROUP else av[2]], False
        elif op is _SRE.SUBPATTERN:
            parts, nested = [av[3]], in_repeat
        elif op in (_SRE.ASSERT, _SRE.ASSERT_NOT, _SRE.BRANCH, _SRE.GROUPREF_EXISTS):
            parts, nested = [p for p in av[1:] if p is not None], in_repeat
            parts = av[1] if op is _SRE.BRANCH else parts
        else:
            continue
        for part in parts:
            if found := _walk(list(part), nested):
                return found
    return None


def _variable_repeat(body: list[Any]) -> bool:
    """A repeated body that is just a variable-length repeat, like (\\d{1,3})+: the same
    digits split into iterations in exponentially many ways."""
    while len(body) == 1 and body[0][0] is _SRE.SUBPATTERN:
        body = list(body[0][1][3])
    return len(body) == 1 and body[0][0] in _REPEATS and body[0][1][0] < body[0][1][1]


def _overlapping(alternatives: list[list[Any]]) -> bool:
    """Whether two alternatives may start with the same character (or one is empty)."""
    seen: set[int] = set()
    for alternative in alternatives:
        chars = _first_chars(alternative[0]) if alternative else None
        if chars is None or seen & chars:
            return True
        seen |= chars
    return False


def _first_chars(item: tuple[Any, Any]) -> set[int] | None:
    op, av = item
    if op is _SRE.SUBPATTERN:
        return _first_chars(av[3][0]) if len(av[3]) else None
    chars: set[int] = set()
    for kind, value in av if op is _SRE.IN else [item]:
        if kind is _SRE.LITERAL:
            chars.add(value)
        elif kind is _SRE.RANGE and value[1] - value[0] < 1024:
            chars.update(range(value[0], value[1] + 1))
        elif kind is _SRE.CATEGORY and value in _CATEGORY_CHARS:
            chars |= _CATEGORY_CHARS[value]
        else:
            return None
    return chars


def _probe(compiled: re.Pattern[str], pattern: str) -> str | None:
    """Searches growing repetitive inputs made of the pattern's own characters and
    common ones. Sizes grow slowly at first, so an exponential pattern is caught before
    it can hang the check; a search 8x longer costing over 24x more time is quadratic,
    which on a 1 MB request means minutes."""
    own = sorted({c for c in pattern if c.isprintable() and c not in "\\()[]{}?*+|^$"})[:12]
    for unit in ["a", "1", " ", "a ", "1-", "a.", "a@", "aa1", *own, "".join(own) or "x"]:
        seconds: dict[int, float] = {}
        for size in _PROBE_SIZES:
            seconds[size] = _search_time(compiled, (unit * size)[:size] + "\x00")
            if size < 8192 and seconds[size] > 0.1:
                elapsed = f"{seconds[size] * 1000:.0f} ms on a {size}-character probe"
                return f"took {elapsed}: catastrophic backtracking"
        if seconds[8192] > 0.002 and seconds[8192] > 24 * seconds[1024]:
            return _QUADRATIC
    return None


def _search_time(compiled: re.Pattern[str], text: str) -> float:
    """Best of two when slow, so a scheduling hiccup cannot flag a linear pattern."""
    best = float("inf")
    for _ in range(2):
        began = time.perf_counter()
        compiled.search(text)
        best = min(best, time.perf_counter() - began)
        if best < 0.001:
            break
    return best
