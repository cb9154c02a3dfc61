"""Custom detector patterns: vetted and compiled for RE2 (`compile_pattern`).

A policy may declare its own detector regexes, and every request's text is scanned
with them, so a pattern that could backtrack would let one request stall the router.
No check of a backtracking engine's patterns catches every such pattern (nested
bounded repeats, overlapping alternatives, chains of unbounded ones all escaped the
one this module used to hold), so custom patterns run on RE2 (`google-re2`), whose
matching time is linear in the text whatever the pattern. The built-in detectors stay
on Python's `re`: their patterns are fixed, reviewed, and use lookarounds.

RE2 has no lookarounds, backreferences, atomic groups, possessive repeats or
conditionals (none is needed where nothing backtracks): a pattern using one is
refused at load with what RE2 said. A pattern is written as for Python's `re` and
means what it means there: `\\d`, `\\w` and `\\s` keep their Unicode meaning, and
`\\Z`, `\\uXXXX` and `\\N{NAME}` their Python spelling, as `compile_pattern` rewrites
them in RE2's syntax (`_to_re2`). Two exceptions: `\\b` and `\\B` are ASCII word
boundaries (RE2 has no other), and `\\W` or `\\S` inside a character class is refused
(RE2 cannot spell its Unicode meaning there; `\\p{L}` is "any letter"). RE2's own
syntax works too (`\\p{Greek}`, `[[:alpha:]]`, `\\Q...\\E`).

Also refused: control characters (a double-quoted YAML "\\bEMP" holds a backspace, not
a word boundary), a pattern that can match the empty string (it fires everywhere, or
its empty matches use up the finding budget of the detector), and programs too big
for RE2's DFA to run in its memory budget (it would fall back to a slower automaton).
"""

from __future__ import annotations

import itertools
import unicodedata
from typing import Any

import re2

__all__ = ["PatternError", "anchor_warning", "check_pattern", "compile_pattern"]

# RE2's memory budget per pattern: the compiled program and the DFA cache share it. At
# the 8 MiB default a program of ~100k instructions (\w{1,50}, spelled in Unicode,
# has ~67k) leaves the DFA too little cache and RE2 falls back to its NFA, 500x slower.
_MAX_MEM = 64 << 20
_MAX_PROGRAM = 200_000

# What Python's `re` means by \d, \w and \s in a str pattern (Unicode decimal digits;
# str.isalnum() or "_"; str.isspace()), as the inside of an RE2 character class.
_UNICODE_CLASS = {
    "d": r"\p{Nd}",
    "w": r"\p{L}\p{N}_",
    "s": r"\t-\r\x1c-\x20\x85\p{Z}",
}
_UNSUPPORTED = (
    (("(?=", "(?!", "(?<=", "(?<!"), "lookarounds"),
    (("(?P=", *(f"\\{n}" for n in range(1, 10))), "backreferences"),
    (("(?>",), "atomic groups"),
    (("++", "*+", "?+", "}+"), "possessive repeats"),
    (("(?(",), "conditionals"),
    (("(?x", "(?a", "(?u", "(?L"), "flags other than i, m, s and U"),
)
_RE2_NOTE = (
    "custom patterns run on RE2 (linear time, nothing backtracks), which has no "
    "lookarounds, backreferences, atomic groups, possessive repeats or conditionals"
)


class PatternError(ValueError):
    """Why a custom pattern cannot be used; the message is for the policy author."""


def check_pattern(pattern: str) -> str | None:
    """Why a custom pattern must not be used, or None."""
    try:
        compile_pattern(pattern)
    except PatternError as exc:
        return str(exc)
    return None


def compile_pattern(pattern: str) -> Any:
    """`pattern` compiled for RE2 (a `re2._Regexp`: `finditer` gives character
    offsets for a str), or PatternError saying why it cannot be."""
    for i, char in enumerate(pattern):
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise PatternError(
                f"holds the control character U+{ord(char):04X} at position {i}: in a "
                "double-quoted YAML string \\b is a backspace and \\t a tab; write the "
                "pattern in single quotes ('\\bEMP-\\d{6}\\b') so the regex sees them"
            )
    options = re2.Options()
    options.log_errors = False  # (RE2 would print the error on stderr too)
    options.max_mem = _MAX_MEM
    try:
        compiled = re2.compile(_to_re2(pattern), options)
    except (re2.error, PatternError) as exc:
        raise PatternError(_compile_error(pattern, exc)) from None
    if compiled.programsize > _MAX_PROGRAM:
        raise PatternError(
            f"is too big for RE2 ({compiled.programsize} instructions, the most is "
            f"{_MAX_PROGRAM}): counted repeats multiply, e.g. (\\w{{1,50}}){{1,10}} is 500 "
            "copies of \\w; write a smaller count or an unbounded repeat"
        )
    if _matches_empty(compiled):
        raise PatternError(
            "can match the empty string, so it would fire everywhere (or its empty "
            "matches hide real ones): make every alternative need at least one character"
        )
    return compiled


def anchor_warning(pattern: str) -> str | None:
    """A note when the pattern anchors on ^ or $ without (?m): each reads the start or
    end of a whole scanned text (an input element, a parameter, a metadata value),
    not of a line, which is rarely what an identifier pattern means."""
    _, anchored, multiline = _scan(pattern)
    if not anchored or multiline:
        return None
    return (
        "'^' and '$' match only at the start and end of each scanned text (a whole "
        "input element, parameter or metadata value), not of each line: add (?m) at "
        "the start to match at lines, or drop them to match anywhere"
    )


def _compile_error(pattern: str, exc: Exception) -> str:
    said = exc.args[0] if exc.args else str(exc)
    said = said.decode("utf-8", "replace") if isinstance(said, bytes) else str(said)
    what = [name for spellings, name in _UNSUPPORTED if any(s in pattern for s in spellings)]
    if what and isinstance(exc, re2.error):
        return (
            f"uses {' and '.join(what)} ({said}): custom patterns run on RE2 (linear "
            "time, nothing backtracks), which does not support them"
        )
    return f"does not compile ({said}); {_RE2_NOTE}"


def _matches_empty(compiled: Any) -> bool:
    """Whether some empty match exists. An empty match depends only on the characters
    around it (^ $ \\A \\z \\b \\B), so the pairs of none, a letter, a line break and a
    space cover every context."""
    around = ("", "a", "\n", " ")
    for before, after in itertools.product(around, repeat=2):
        m = compiled.match(before + after, len(before))
        if m is not None and m.end() == len(before):
            return True
    return False


def _to_re2(pattern: str) -> str:
    return _scan(pattern)[0]


def _scan(pattern: str) -> tuple[str, bool, bool]:
    """The pattern in RE2's spelling; whether it has ^ or $ outside a class; whether it
    turns multiline on somewhere. A lexer, not a parser: escapes, classes (with their
    [:name:] parts) and \\Q...\\E quoting are all it needs to know."""
    out: list[str] = []
    anchored = multiline = in_class = False
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\" and i + 1 < n:
            i, piece = _escape(pattern, i, in_class)
            out.append(piece)
            continue
        if in_class:
            if pattern.startswith("[:", i) and (close := pattern.find(":]", i + 2)) > 0:
                out.append(pattern[i : close + 2])
                i = close + 2
                continue
            in_class = char != "]"
        elif char == "[":
            in_class = True
            start = i + 1 + pattern.startswith("^", i + 1)
            if pattern.startswith("]", start):  # a leading ] is literal
                start += 1
            out.append(pattern[i:start])
            i = start
            continue
        elif char in "^$":
            anchored = True
        elif pattern.startswith("(?", i):
            j = i + 2
            while j < n and pattern[j] in "imsU-":
                j += 1
            if pattern[j : j + 1] in (":", ")"):
                multiline |= "m" in pattern[i + 2 : j].split("-", 1)[0]
        out.append(char)
        i += 1
    return "".join(out), anchored, multiline


def _escape(pattern: str, i: int, in_class: bool) -> tuple[int, str]:
    """The escape at pattern[i] (a backslash) in RE2's spelling, and where it ends."""
    letter = pattern[i + 1]
    if letter.lower() in _UNICODE_CLASS:
        body = _UNICODE_CLASS[letter.lower()]
        if letter.islower():
            return i + 2, body if in_class else f"[{body}]"
        if letter == "D":
            return i + 2, r"\P{Nd}"
        if in_class:  # (a complement inside a union: RE2 has no way to spell it)
            raise PatternError(
                f"\\{letter} inside a character class has no Unicode form on RE2: write "
                "the class the other way round, e.g. [^\\W\\d] (letters) as [\\p{L}_], "
                "[\\W_] as [^\\p{L}\\p{N}]"
            )
        return i + 2, f"[^{body}]"
    if letter == "Z" and not in_class:
        return i + 2, r"\z"
    if letter == "Q":  # RE2's literal quoting: copied through to its \E
        end = pattern.find("\\E", i + 2)
        end = len(pattern) if end < 0 else end + 2
        return end, pattern[i:end]
    width = {"u": 4, "U": 8}.get(letter)
    if width is not None:
        digits = pattern[i + 2 : i + 2 + width]
        if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise PatternError(
                f"bad escape \\{letter}{digits}: \\{letter} takes {width} hex digits"
            )
        return i + 2 + width, f"\\x{{{digits}}}"
    if letter == "N" and pattern.startswith("{", i + 2):
        close = pattern.find("}", i + 3)
        name = pattern[i + 3 : close] if close > 0 else ""
        try:
            return close + 1, f"\\x{{{ord(unicodedata.lookup(name)):x}}}"
        except KeyError:
            raise PatternError(f"unknown character name \\N{{{name}}}") from None
    return i + 2, pattern[i : i + 2]
