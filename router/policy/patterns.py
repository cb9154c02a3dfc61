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
outside multiline mode matches before a final "\\n" too, `{,n}` is a repeat, and
`\\Z`, `\\xHH`, octal escapes, `\\uXXXX` and `\\N{NAME}` keep their Python spelling,
as `compile_pattern` rewrites them in RE2's syntax (`_to_re2`), as it does (?i)'s
folding of the Turkish dotted and dotless i, `[\\b]`, (?#comments) and (?u).
Exceptions: `\\b` and `\\B` are ASCII word boundaries (RE2 has no other), so beside
an atom that can match a non-ASCII letter or digit (a non-ASCII character or escape,
a class holding one, (?i) i) they are refused, but beside atoms holding every ASCII
letter or digit (`\\w`, `\\d`, `.`, `[\\w.-]`), which are let through: see
`_Neighbours`; `\\W` or `\\S` inside a character class is refused (RE2 cannot spell
its Unicode meaning there; `\\p{L}` is "any letter"), and RE2's Unicode tables may be
newer than Python's. RE2's own syntax works too (`\\p{Greek}`, `[[:alpha:]]`,
`\\Q...\\E`). tests/test_patterns_re2.py holds both engines to this.

Also refused: control characters (a double-quoted YAML "\\bEMP" holds a backspace, not
a word boundary), a `$` followed by an atom that can match the newline it matched
before, a pattern that can match the empty string (it fires everywhere, or its empty
matches use up the finding budget of the detector), and programs too big for RE2's
DFA to run in its memory budget (it would fall back to a slower automaton).
"""

from __future__ import annotations

import functools
import itertools
import re
import string
import unicodedata
import warnings
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
                "pattern in single quotes ('\\bEMP-[0-9]{6}\\b') so the regex sees them"
            )
    options = re2.Options()
    options.log_errors = False  # (RE2 would print the error on stderr too)
    options.max_mem = _MAX_MEM
    spelled = _to_re2(pattern)  # (a PatternError of its own says why)
    try:
        compiled = re2.compile(spelled, options)
    except re2.error as exc:
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
                # Python goes on from before the "\n" RE2 consumed: a match may start there
                last = self.regex.search(text, end)
                if last is not None and last.end() > last.start():
                    yield last.start(), last.end()
                return
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
    the i, m and s flags on or off are all it needs to know, and for \\b, \\B and $
    which atom (a character, an escape, a class, a group) stands next to them."""
    out: list[str] = []
    anchored = False
    flags = [""]  # per open group: which of i, m and s are on in it
    atoms: list[str] | None = None  # in a class: its characters so far (None: escapes)
    eols = 0
    near = _Neighbours(pattern)
    class_start = 0
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\" and i + 1 < n:
            start = i
            i, piece = _escape(pattern, i, atoms is not None)
            spelled = _ESCAPED_CHAR.fullmatch(piece)
            code = chr(min(int(spelled["hex"], 16), 0x10FFFF)) if spelled else ""
            if atoms is not None:
                atoms.append(code)
            elif piece in ("\\b", "\\B"):
                near.boundary(piece)
            elif piece not in _ZERO_WIDTH:
                near.atom(re.escape(code) if code else pattern[start:i], flags[-1])
                if code and code in _TURKISH_I and "i" in flags[-1]:
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
                near.atom(pattern[class_start : i + 1], flags[-1])
            else:
                atoms.append(char)
        elif char == "[":
            class_start = i
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
            near.end_of_text()
            out.append(_EOL.format(name=f"{_EOL_GROUP}{eols}"))
            eols += 1
            i += 1
            continue
        elif char in _TURKISH_I and "i" in flags[-1]:
            # Python's (?i) also folds the Turkish dotted and dotless i into i; RE2's
            # (Unicode simple case folding) does not
            near.atom(char, flags[-1])
            out.append(f"[{_DOTTED_I}]")
            i += 1
            continue
        elif char == "{" and (count := _LAZY_COUNT.match(pattern, i)):
            # Python reads {,n} as {0,n} (and {,} as *); RE2 as the literal text
            out.append("{0" + count.group()[1:])
            i = count.end()
            continue
        elif char == "{" and (count := _COUNT.match(pattern, i)):
            out.append(count.group())
            i = count.end()
            continue
        elif pattern.startswith("(?#", i):  # a comment (RE2 has none): dropped
            i = _comment_end(pattern, i)
            continue
        elif char == "(":
            inner = flags[-1]
            if spec := _FLAGS.match(pattern, i):
                on, off = spec["on"], spec["off"] or ""
                inner = "".join(f for f in "ims" if (f in inner or f in on) and f not in off)
                # (?u) is Python's default for a str pattern; RE2 does not know it
                out.append(_spell_flags(on.replace("u", ""), spec["off"], spec["end"]))
                i = spec.end()
                if spec["end"] == ")":  # (?i): for the rest of the enclosing group
                    flags[-1] = inner
                else:
                    flags.append(inner)
                    near.open()
                continue
            flags.append(inner)
            near.open()
            if name := _GROUP_NAME.match(pattern, i):
                out.append(name.group())
                i = name.end()
                continue
        elif char == ")" and len(flags) > 1:
            flags.pop()
            near.close()
        elif char == "|":
            near.alternative()
        elif char not in "*+?)$":
            near.atom(char if char == "." else re.escape(char), flags[-1])
        out.append(char)
        i += 1
    return _Scanned("".join(out), anchored)


_ZERO_WIDTH = ("\\A", "\\z", "\\G")
_COUNT = re.compile(r"\{[0-9]+(?:,[0-9]*)?\}")
_GROUP_NAME = re.compile(r"\(\?P?<[A-Za-z_][A-Za-z_0-9]*>|\(\?:")


class _Neighbours:
    """Checks the atoms next to each \\b, \\B and $ (outside multiline mode) as `_scan`
    meets them: the atom before (or the group that ends there) and the atom after (or
    the group that starts there). Refuses, with PatternError:

    - \\b or \\B beside an atom that can match a non-ASCII letter or digit (Python's
      word character, RE2's non-word one), where RE2 finds no boundary that Python
      does, or the reverse, and misses the match. Exempt: the Kelvin sign and the long
      s, which (?i) k and s match in Python, as no text spells a word with them.
    - $ followed by an atom that can match a newline: in Python it matches the "\\n"
      that ends the text after $ matched before it; on RE2 the $ consumed it."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.before: str | None = None  # the last atom (a Python pattern), if any
        self.wanting: str | None = None  # a boundary waiting for the atom after it
        self.after_eol = False  # a $ waiting for the atom after it
        self.groups: list[tuple[str | None, list[str]]] = []  # (waiting, atoms) per group

    def atom(self, source: str, flags: str) -> None:
        spelled = _with_flags(source, flags)
        if self.wanting is not None:
            self._check(self.wanting, spelled)
            self.wanting = None
        if self.after_eol and _can_match(spelled, "\n"):
            raise PatternError(
                f"has $ followed by {source!r}, which can match a newline: Python's $ "
                "also matches before a newline that ends the text, and then "
                f"{source!r} matches that newline; on RE2 the $ has used it up. Write "
                "\\Z (the very end) or \\n?\\Z instead of the $"
            )
        self.after_eol = False
        self.before = spelled
        for _, inside in self.groups:
            inside.append(spelled)

    def boundary(self, piece: str) -> None:
        if self.before is not None:
            self._check(piece, self.before)
        self.wanting = piece

    def end_of_text(self) -> None:
        self.after_eol = True

    def open(self) -> None:
        self.groups.append((self.wanting, []))
        self.wanting = None
        self.before = None

    def close(self) -> None:
        if not self.groups:
            return
        wanting, inside = self.groups.pop()
        if wanting is not None:
            for spelled in inside:
                self._check(wanting, spelled)
        # the group as the atom before what follows: any of its atoms may end it
        self.before = "|".join(f"(?:{s})" for s in inside) or None
        self.wanting = None

    def alternative(self) -> None:
        self.before = None
        self.wanting = None
        self.after_eol = False

    def _check(self, piece: str, spelled: str) -> None:
        example = _non_ascii_word(spelled)
        if example is None:
            return
        flagged = _FLAGGED.fullmatch(spelled)
        source = flagged["inner"] if flagged else spelled
        raise PatternError(
            f"has {piece} next to {source!r}: RE2's word boundaries know only ASCII "
            f"letters, digits and _, and {source!r} can match {example!r}, a word "
            f"character to Python but not to RE2, so there {piece} misses matches "
            f"Python finds. Write the atom in ASCII if ASCII is meant ([A-Za-z]), "
            f"drop the {piece}, or spell the boundary as a character, e.g. "
            "(?:^|[^\\w]) before and (?:[^\\w]|$) after"
        )


_FLAGGED = re.compile(r"\(\?[is]+:(?P<inner>.*)\)", re.DOTALL)


def _with_flags(source: str, flags: str) -> str:
    on = "".join(f for f in "is" if f in flags)
    return f"(?{on}:{source})" if on else source


def _can_match(spelled: str, text: str) -> bool:
    """Whether the atom (a Python pattern) matches somewhere in `text`; True when Python
    cannot read it (RE2's own syntax: \\p{..}, \\Q..\\E, \\x{..})."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return re.search(spelled, text) is not None
    except re.error:
        return True


def _non_ascii_word(spelled: str) -> str | None:
    """A non-ASCII word character (to Python) that the atom can match, or None. None
    too for an atom that matches every ASCII digit or every ASCII letter (\\w, \\d,
    [\\w.-], .): RE2 then finds the boundary at the first ASCII one, so a match starts
    or ends elsewhere but is missed only where no ASCII letter or digit stands in the
    run next to the boundary (see tests/test_patterns_re2.py's KNOWN)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = re.compile(spelled)
    except re.error:
        return "\u00e9"
    for ascii_kind in (string.digits, string.ascii_letters):
        if all(compiled.fullmatch(c) for c in ascii_kind):
            return None
    for c in "\u00e9\u00d6\u0130\u0131\u0661":
        if compiled.fullmatch(c):
            return c
    found = compiled.search(_non_ascii_words())
    return found.group()[:1] if found else None


@functools.cache
def _non_ascii_words() -> str:
    """Every non-ASCII character Python's \\w matches but the Kelvin sign and long s."""
    return "".join(
        c
        for c in map(chr, range(0x80, 0x110000))
        if c.isalnum() and c not in "\u212a\u017f" and not 0xD800 <= ord(c) < 0xE000
    )


_TURKISH_I = "iI\u0130\u0131"
_ESCAPED_CHAR = re.compile(r"\\x\{(?P<hex>[0-9a-fA-F]{1,6})\}")
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


_HEX2 = re.compile(r"\{(?P<hex>[0-9a-fA-F]{1,6})\}|[0-9a-fA-F]{2}")
_OCTAL = re.compile(r"[0-7]{1,3}")
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
    if letter == "Q":  # RE2's literal quoting: copied through to its \E
        end = pattern.find("\\E", i + 2)
        end = len(pattern) if end < 0 else end + 2
        return end, pattern[i:end]
    if letter == "x":  # \xHH (and RE2's \x{H...}): spelled \x{..} for `_scan`
        hex2 = _HEX2.match(pattern, i + 2)
        if hex2:
            return hex2.end(), f"\\x{{{hex2['hex'] or hex2.group()}}}"
    if letter in "01234567":  # octal, by Python's rules (in a class, any \N is one)
        octal = _OCTAL.match(pattern, i + 1)
        assert octal is not None
        digits = octal.group()
        if letter == "0" or in_class:
            digits = digits[:3]
        elif len(digits) < 3:  # \1 to \99: a backreference (which RE2 refuses)
            return i + 2, pattern[i : i + 2]
        if int(digits, 8) > 0o377:
            raise PatternError(f"bad escape \\{digits}: octal escapes go up to \\377")
        return i + 1 + len(digits), f"\\x{{{int(digits, 8):x}}}"
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
