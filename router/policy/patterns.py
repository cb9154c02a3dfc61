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
means what it means there: `\\d`, `\\w` and `\\s` keep their Unicode meaning, `$`
outside multiline mode matches before a final "\\n" too, `{,n}` is a repeat, and `\\Z`,
`\\uXXXX` and `\\N{NAME}` keep their Python spelling, as `compile_pattern` rewrites
them in RE2's syntax (`_to_re2`), as it does (?i)'s folding of the Turkish dotted and
dotless i, `[\\b]`, (?#comments) and (?u). Exceptions: `\\b` and `\\B` are ASCII word
boundaries (RE2 has no other; next to a non-ASCII literal, where that reverses their
meaning, they are refused), `\\W` or `\\S` inside a character class is refused (RE2
cannot spell its Unicode meaning there; `\\p{L}` is "any letter"), and RE2's Unicode
tables may be newer than Python's. RE2's own syntax works too (`\\p{Greek}`,
`[[:alpha:]]`, `\\Q...\\E`). tests/test_patterns_re2.py holds both engines to this.

Also refused: control characters (a double-quoted YAML "\\bEMP" holds a backspace, not
a word boundary), a pattern that can match the empty string (it fires everywhere, or
its empty matches use up the finding budget of the detector), and programs too big
for RE2's DFA to run in its memory budget (it would fall back to a slower automaton).
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Iterator
from typing import Any, NamedTuple

import re2

__all__ = [
    "CustomPattern",
    "PatternError",
    "anchor_warning",
    "check_pattern",
    "compile_pattern",
]

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
    (("(?x", "(?a", "(?L"), "flags other than i, m, s and U"),
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


def compile_pattern(pattern: str) -> CustomPattern:
    """`pattern` compiled for RE2, or PatternError saying why it cannot be."""
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
    eols = tuple(i for name, i in compiled.groupindex.items() if name.startswith(_EOL_GROUP))
    return CustomPattern(pattern, compiled, eols)


class CustomPattern:
    """A custom pattern compiled for RE2: `spans` finds what Python's `re.finditer`
    would (as character offsets)."""

    __slots__ = ("_eols", "pattern", "regex")

    def __init__(self, pattern: str, regex: Any, eols: tuple[int, ...]) -> None:
        self.pattern = pattern
        self.regex = regex  # a `re2._Regexp` (`re2` has no type hints)
        self._eols = eols

    def spans(self, text: str) -> Iterator[tuple[int, int]]:
        """(start, end) of each match, left to right, as `re.finditer` gives them. A
        `$` that matched before a final "\\n" consumed it on RE2 (see `_EOL`): the
        match ends before it, as in Python."""
        for m in self.regex.finditer(text):
            start, end = m.start(), m.end()
            if self._eols and end == len(text) and any(m.start(g) == end - 1 for g in self._eols):
                end -= 1
            yield start, end

    def __repr__(self) -> str:
        return f"CustomPattern({self.pattern!r})"


def anchor_warning(pattern: str) -> str | None:
    """A note when the pattern anchors on ^ or $ outside multiline mode: each reads
    the start or end of a whole scanned text (an input element, a parameter, a
    metadata value), not of a line, which is rarely what an identifier pattern means."""
    if not _scan(pattern).anchored:
        return None
    return (
        "outside (?m), '^' matches only at the start of each scanned text (a whole input "
        "element, parameter or metadata value) and '$' only at its end or before a "
        "newline that ends it, not at each line: add (?m) at the start to match at "
        "lines, or drop them to match anywhere"
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
    if said.startswith("invalid repetition size"):
        return f"does not compile ({said}): RE2 counts repeats up to 1000; {_RE2_NOTE}"
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
    return _scan(pattern).re2


# What a `$` outside multiline mode becomes: Python's `$` matches at the end of the
# text or just before a "\n" that ends it, RE2's only at the end. RE2 has no lookahead,
# so the second case consumes the "\n"; the empty group marks where Python's match
# ends, and `CustomPattern.spans` ends the match there.
_EOL_GROUP = "hybridroute_eol_"
_EOL = r"(?:\z|(?P<{name}>)\n\z)"


class _Scanned(NamedTuple):
    re2: str  # the pattern in RE2's spelling
    anchored: bool  # a ^ or $ outside a class and outside multiline mode


def _scan(pattern: str) -> _Scanned:
    """The pattern in RE2's spelling, and whether it anchors on ^ or $ outside
    multiline mode. A lexer, not a parser: escapes, classes (with their [:name:]
    parts and literal ranges), \\Q...\\E quoting, repeat counts and which groups turn
    the i and m flags on or off are all it needs to know."""
    out: list[str] = []
    anchored = False
    flags = [""]  # per open group: which of i and m are on in it
    atoms: list[str] | None = None  # in a class: its characters so far (None: escapes)
    eols = 0
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\" and i + 1 < n:
            i, piece = _escape(pattern, i, atoms is not None)
            spelled = _ESCAPED_CHAR.fullmatch(piece)
            code = spelled and chr(min(int(spelled["hex"] or spelled["hex2"], 16), 0x10FFFF))
            if atoms is not None:
                atoms.append(code or "")
            elif code and code in _TURKISH_I and "i" in flags[-1]:
                piece = f"[{_DOTTED_I}]"
            out.append(piece)
            continue
        if atoms is not None:
            if pattern.startswith("[:", i) and (close := pattern.find(":]", i + 2)) > 0:
                out.append(pattern[i : close + 2])
                atoms.append("")
                i = close + 2
                continue
            if char == "]":
                if "i" in flags[-1] and _holds_an_i(atoms):
                    # (before a final "-", which would make it a range)
                    out.insert(len(out) - (atoms[-1] == "-"), _DOTTED_I)
                atoms = None
            else:
                atoms.append(char)
        elif char == "[":
            start = i + 1 + pattern.startswith("^", i + 1)
            atoms = []
            if pattern.startswith("]", start):  # a leading ] is literal
                atoms.append("]")
                start += 1
            out.append(pattern[i:start])
            i = start
            continue
        elif char == "^":
            anchored |= "m" not in flags[-1]
        elif char == "$" and "m" not in flags[-1]:
            anchored = True
            out.append(_EOL.format(name=f"{_EOL_GROUP}{eols}"))
            eols += 1
            i += 1
            continue
        elif char in _TURKISH_I and "i" in flags[-1]:
            # Python's (?i) also folds the Turkish dotted and dotless i into i; RE2's
            # (Unicode simple case folding) does not
            out.append(f"[{_DOTTED_I}]")
            i += 1
            continue
        elif char == "{" and (count := _LAZY_COUNT.match(pattern, i)):
            # Python reads {,n} as {0,n} (and {,} as *); RE2 as the literal text
            out.append("{0" + count.group()[1:])
            i = count.end()
            continue
        elif pattern.startswith("(?#", i):  # a comment (RE2 has none): dropped
            i = _comment_end(pattern, i)
            continue
        elif char == "(":
            inner = flags[-1]
            if spec := _FLAGS.match(pattern, i):
                on, off = spec["on"], spec["off"] or ""
                inner = "".join(f for f in "im" if (f in inner or f in on) and f not in off)
                # (?u) is Python's default for a str pattern; RE2 does not know it
                out.append(_spell_flags(on.replace("u", ""), spec["off"], spec["end"]))
                i = spec.end()
                if spec["end"] == ")":  # (?i): for the rest of the enclosing group
                    flags[-1] = inner
                else:
                    flags.append(inner)
                continue
            flags.append(inner)
        elif char == ")" and len(flags) > 1:
            flags.pop()
        out.append(char)
        i += 1
    return _Scanned("".join(out), anchored)


_TURKISH_I = "iI\u0130\u0131"
_ESCAPED_CHAR = re.compile(r"\\x(?:\{(?P<hex>[0-9a-fA-F]{1,6})\}|(?P<hex2>[0-9a-fA-F]{2}))")
_DOTTED_I = r"iI\x{130}\x{131}"


def _holds_an_i(atoms: list[str]) -> bool:
    """Whether a class, by its literal characters and ranges, holds one of _TURKISH_I."""
    k = 0
    while k < len(atoms):
        if k + 2 < len(atoms) and atoms[k + 1] == "-" and atoms[k] and atoms[k + 2]:
            low, high = atoms[k], atoms[k + 2]
            if any(low <= c <= high for c in _TURKISH_I):
                return True
            k += 3
            continue
        if atoms[k] and atoms[k] in _TURKISH_I:
            return True
        k += 1
    return False


def _comment_end(pattern: str, i: int) -> int:
    """Where the comment (?#...) at pattern[i] ends: after its first unescaped ")"."""
    j = i + 3
    while j < len(pattern) and pattern[j] != ")":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1


def _spell_flags(on: str, off: str | None, end: str) -> str:
    if off is not None:
        return f"(?{on}-{off}{end}"
    if on:
        return f"(?{on}{end}"
    return "(?:" if end == ":" else ""


_LAZY_COUNT = re.compile(r"\{,[0-9]*\}")
_FLAGS = re.compile(r"\(\?(?P<on>[a-zA-Z]*)(?:-(?P<off>[a-zA-Z]*))?(?P<end>[:)])")


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
    if letter == "b" and in_class:  # (Python's backspace; RE2 has no \b in a class)
        return i + 2, r"\x08"
    if letter in "bB" and not in_class:
        beside = [c for c in (pattern[i - 1 : i], pattern[i + 2 : i + 3]) if c and not c.isascii()]
        if beside:
            raise PatternError(
                f"has \\{letter} next to {beside[0]!r}: RE2's word boundaries know only "
                f"ASCII letters, digits and _, so beside {beside[0]!r} \\{letter} means the "
                "opposite of what it means in Python; drop it there"
            )
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
