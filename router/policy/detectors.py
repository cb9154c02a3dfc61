"""PII detectors the policy engine runs over request text.

Every request is scanned and its text is untrusted, so each pattern is anchored on a
rare character or bounded (linear worst case), and the digit-based detectors share one
pass. A false negative sends sensitive data to the cloud while a false positive only
costs cloud capacity: checksums (Luhn, mod-97, ``ipaddress``) carry precision, formats
are broad, and only weak forms (bare SSN or phone digits, card groups one to a line)
need a context word. Findings hold offsets, never values (invariant 4); any failure is
a ScanError, so the caller fails closed (invariant 2).

This module holds the findings, the built-in detectors, custom regex detectors and
the `Scanner` that runs them: everything on the request path. Custom patterns come
from the policy, so they run on RE2 (linear time whatever the pattern), vetted and
compiled at load by `patterns`.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from itertools import accumulate, islice
from typing import Protocol

from hybridroute.router.policy.patterns import CustomPattern, PatternError, compile_pattern

__all__ = [
    "BUILTIN",
    "MAX_CUSTOM_MATCHES",
    "Detector",
    "DetectorError",
    "Finding",
    "ScanError",
    "Scanner",
    "TextTooLarge",
    "regex_detector",
]


@dataclass(frozen=True, slots=True)
class Finding:
    """Where a detector fired: offsets only, so no repr or log line can carry the value."""

    detector: str
    start: int
    end: int


class Detector(Protocol):
    """Anything with a name that yields findings for a text."""

    @property
    def name(self) -> str: ...

    def find(self, text: str) -> Iterator[Finding]: ...


class ScanError(Exception):
    """The text could not be scanned: the caller must treat it as sensitive."""


class TextTooLarge(ScanError):
    """Longer than the scanner accepts: bounds what one request can cost."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"text of {size} characters exceeds the scan limit of {limit}")
        self.size, self.limit = size, limit


class DetectorError(ScanError):
    """A detector raised. Only its name and the exception type are kept: the original
    message might quote the scanned text."""

    def __init__(self, detector: str, kind: str) -> None:
        super().__init__(f"detector {detector!r} failed with {kind}")
        self.detector = detector


_CONTEXT = {
    "us_ssn": re.compile(r"\b(?:ssns?\b|ss#|social[\s-]*sec|soc\.?\s*sec)", re.I),
    "phone": re.compile(
        r"\b(?:(?:tele|cell)?phones?|tel|mobile|cell|fax|sms|whatsapp|call(?:ing)?|contact)\b", re.I
    ),
    "credit_card": re.compile(
        r"card|\b(?:cc|pan|cvv|cvc|visa|master|amex|discover|maestro|credit|debit)\b", re.I
    ),
}
# The card words anywhere, even inside a longer word: when none is near a run of digit
# groups, `_has_context` finds none near any part of it (the window it searches may cut
# a word short, "pan|el", and then matches where the whole word does not).
_CARD_WORD_ANYWHERE = re.compile(_CONTEXT["credit_card"].pattern.replace(r"\b", ""), re.I)
_VERSION_BEFORE = re.compile(r"\b(?:version|ver|v|release|build|rev)\.?[\s:#]*\Z", re.I)
_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def _has_context(text: str, start: int, end: int, kind: str) -> bool:
    """A context word within 48 characters before or 24 after a weak candidate."""
    return _CONTEXT[kind].search(text, max(0, start - 48), end + 24) is not None


def _luhn_ok(number: str) -> bool:
    total = sum(map(int, number[-1::-2])) + sum(_DOUBLED[int(c)] for c in number[-2::-2])
    return total % 10 == 0 and number.count(number[0]) != len(number)


def _ssn_ok(d: str) -> bool:
    """SSA never issues area 000, 666 or 9xx, group 00 or serial 0000."""
    bad = d[:3] in ("000", "666") or d[0] == "9" or d[3:5] == "00" or d[5:] == "0000"
    return not bad and d.count(d[0]) != 9


def _ip_ok(candidate: str, parse: Callable[[str], object]) -> bool:
    try:
        parse(candidate)
    except ValueError:
        return False
    return True


def _word_at(text: str, index: int) -> bool:
    return 0 <= index < len(text) and (text[index].isalnum() or text[index] == "_")


def _free(text: str, start: int, end: int, not_after: str) -> bool:
    """The span is not stuck to a word, nor right after one of `not_after`."""
    before = text[start - 1 : start]
    glued = _word_at(text, start - 1) or _word_at(text, end)
    return not glued and not (before and before in not_after)


# --- the digit pass: cards, SSNs, North-American phones, IPv4, IBAN entry --------------

# A run of digit groups. A "strict" separator is one space, dash or dot, and groups so
# joined form a segment: the unit the SSN, phone and IPv4 rules read. A "loose" one
# (two spaces or a tab, a dash or a line break with a space or tab either side) joins
# segments into one run only for the card rule: a card read out, retyped into a form or
# wrapped in a PDF keeps its groups, not its single spaces. A match starts at a
# number's first digit and only right after two letters (IBAN check digits), with 9+
# digits ahead (the fewest an SSN, phone or card has), in the shape of a dotted quad, or
# with 15 digits or separators ahead (as the shortest loosely written card has), so the
# dates, amounts and versions of ordinary prose never reach Python. (That last test
# counts characters, not digits: a character class costs next to nothing per number.)
_SEP = r"(?>[ \t]?(?:-|\r?\n|\r)[ \t]?|[ \t]{1,2})"  # (atomic: the longest that fits)
_CLUSTER = re.compile(
    r"[0-9](?<![0-9][0-9])(?:(?<=[A-Za-z]{2}[0-9])|(?=[0-9 .\-\t\r\n]{6})"
    r"(?:(?=(?:[ .\-]?[0-9]){8})|(?=[0-9]{0,2}(?:\.[0-9]{1,3}){3})|(?=[0-9 .\-\t\r\n]{15})))"
    rf"(?:[ .\-]?[0-9]|({_SEP})[0-9])*+"
)  # (group 1 takes part when a loose separator does)
_DIGITS = re.compile(r"[0-9]+")
_STRICT = (" ", "-", ".")
# A cluster with loose separators may be a column or a table of numbers of a hundred
# thousand groups: the card rule and the segment rules pick what they read in it by
# regex, so most of its groups never reach Python. (Patterns that open with a character
# class rather than a lookbehind let the engine skip ahead: 2-3 ms over 900 KB, not 15.)
# - a separator with no tab or line break in it, and one a card may cross without a
#   card word near (spaces and dashes: a dot ends a card);
_NOT_TABLE = re.compile(r"[ .\-](?<=[0-9][ .\-])[ .\-]{0,2}(?=[0-9])")
_CROSSABLE = re.compile(r"[ \-](?<=[0-9][ \-])[ \-]{0,2}(?=[0-9])")
# - a group a card may start at without a card word: 4+ digits, and 13+ or a space or a
#   dash after a digit within 31 characters (the most that 18 digits and three of the
#   four separators a laid-out card has take; a strictly joined card is met sooner);
_CARD_START = re.compile(
    r"[0-9](?<![0-9][0-9])(?=[0-9]{3})(?:(?=[0-9]{12})|(?=[0-9 .\-\t\r\n]{0,30}?[0-9][ \-]))"
)
_LONG_GROUP = re.compile(r"[0-9](?<![0-9][0-9])(?=[0-9]{12})")
# - how far a card reaches from its start (19 digits and 18 single separators, or 4 of
#   up to 4 characters: 37), and how near an end of a cluster a card must start to have
#   a card word near (48 characters before it, or 24 after its end);
_CARD_REACH = 48
_NEAR_END = 64
# - a segment that may hold an SSN, a phone or a dotted quad: its first digit (not after
#   a digit, nor after a digit and a strict separator), 9+ digits or 4+ groups in it,
#   then all of it;
_SEGMENT_WORTH_READING = re.compile(
    r"[0-9](?=[0-9 .\-]{6})(?<![0-9][0-9])(?<![0-9][ .\-][0-9])"
    r"(?=(?:[ .\-]?[0-9]){8}|(?:[0-9]*[ .\-][0-9]){3})"
    r"[0-9]*(?:[ .\-][0-9]+)*+"
)
_STRICT_CHAIN = re.compile(r"[0-9]*(?:[ .\-][0-9]+)*+")
# - and in a table of numbers (no separator but tabs and line breaks), only a group of
#   9+ digits can be an SSN, a phone or a card.
_NINE_DIGITS = re.compile(r"[0-9]{9,}")
_GAPS = re.compile(r"([^0-9]+)")
# How a card's groups are printed: 4-4-4-4 (13 to 19 digits: the last group shorter or
# a fifth one), or the 4-6-5 / 4-6-4 of American Express and Diners Club.
_CARD_LAYOUTS = frozenset(
    (
        *((4, 4, 4, n) for n in range(1, 5)),
        *((4, 4, 4, 4, n) for n in range(1, 4)),
        (4, 6, 5),
        (4, 6, 4),
    )
)


def _glued(text: str, start: int, end: int) -> bool:
    """A number stuck to a word ("v1.2.3.4", "INV2024", "1.2.3.4-beta") or after "+"
    (the international phone pass owns those) is not one for the digit pass."""
    if not _free(text, start, end, "+"):
        return True
    if text[start - 1 : start] == "." and _word_at(text, start - 2):
        return True
    return text[end : end + 1] in ("-", ".") and text[end + 1 : end + 2].isalpha()


class _Run:
    """Digit groups and what joins them, e.g. "078-05-1120" -> 078 | 05 | 1120 joined by
    "-" twice: a segment (groups joined by strict separators), or a stretch of a cluster
    with loose separators in it (`_Run.loose`, for the card rule)."""

    __slots__ = ("digits", "lens", "seps", "spans", "text", "word_near")

    def __init__(self, text: str, spans: list[tuple[int, int]]) -> None:
        self.text = text
        self.spans = spans
        self.seps = [text[b] for _, b in spans[:-1]]
        self.digits = [text[a:b] for a, b in spans]
        self.lens = [b - a for a, b in spans]
        self.word_near: bool | None = None  # a card word around the run: looked up once

    @classmethod
    def loose(cls, text: str, start: int, end: int) -> _Run:
        """The groups from `start` to `end` with loose separators among them, split by
        one regex call (per group, only C code runs here)."""
        parts = _GAPS.split(text[start:end])  # group, separator, group, ..., group
        offsets = list(accumulate(map(len, parts), initial=start))
        run = cls.__new__(cls)
        run.text, run.word_near = text, None
        run.digits, run.seps = parts[0::2], parts[1::2]
        run.lens = list(map(len, run.digits))
        run.spans = list(zip(offsets[0::2], offsets[1::2], strict=True))
        return run

    def finding(self, name: str, first: int, last: int) -> Finding:
        return Finding(name, self.spans[first][0], self.spans[last][1])

    def isolated(self, first: int, last: int, banned: str) -> bool:
        """Groups first..last are not continued by a banned separator on either side."""
        before = first == 0 or self.seps[first - 1] not in banned
        return before and (last >= len(self.seps) or self.seps[last] not in banned)

    def context(self, first: int, last: int, kind: str) -> bool:
        return _has_context(self.text, self.spans[first][0], self.spans[last][1], kind)

    def cards(self, out: list[Finding], inside_glued: Container[int]) -> None:
        """A card starts at a group of 4+ digits (every issuer's layout does) and spans
        whole groups joined by spaces or dashes; the longest Luhn-valid span wins, so
        "4111 1111 1111 1111 1225" still yields the card. The card itself may be stuck
        to a word ("card_4111...", "id4111...x": the checksum, not the edges, is the
        evidence), but may not follow "+" (a phone) nor start inside a segment stuck to
        a word (the groups of "DE89 3704 0044 ..." belong to an IBAN). Loosely joined
        groups must be laid out like a card, and groups joined only by line breaks or
        tabs (a column or a row of a table far more often than a card) need a card word
        near them."""
        i = 0
        while i < len(self.digits):
            ok = self.lens[i] >= 4 and i not in inside_glued
            last = self._card_end(i) if ok else None
            if last is not None and self.text[self.spans[i][0] - 1 : self.spans[i][0]] != "+":
                out.append(self.finding("credit_card", i, last))
            i = i + 1 if last is None else last + 1

    def _card_end(self, first: int) -> int | None:
        number, ends = "", []
        for j in range(first, len(self.digits)):
            number += self.digits[j]
            if len(number) > 19 or (j > first and self.seps[j - 1] == "."):
                break
            if len(number) >= 13:
                ends.append((j, number))
        return next((j for j, n in reversed(ends) if _luhn_ok(n)), None)

    def loose_card_end(self, first: int) -> int | None:
        """`_card_end` for a run with loose separators: groups joined by any of them must
        be laid out like a card, and if every separator holds a tab or a line break need
        a card word; both are checked before the checksum, which most spans of a table
        of numbers then never reach."""
        lens, seps = self.lens, self.seps
        digits, strict, table, ends = 0, True, True, []
        for j in range(first, len(lens)):
            if j > first:
                sep = seps[j - 1]
                if sep == ".":
                    break
                strict = strict and sep in _STRICT
                table = table and bool(sep.strip(" -"))  # (a tab or a line break in it)
            digits += lens[j]
            if digits > 19:
                break
            if digits >= 13 and (strict or tuple(lens[first : j + 1]) in _CARD_LAYOUTS):
                ends.append((j, table and not strict))
            if not strict and j - first == 4:  # (no layout has more than five groups)
                break
        for j, needs_word in reversed(ends):
            if needs_word and not self._card_word(first, j):
                continue
            if _luhn_ok("".join(self.digits[first : j + 1])):
                return j
        return None

    def _card_word(self, first: int, last: int) -> bool:
        """A card word near groups first..last; none near the whole run (looked up
        once) means none near any part of it."""
        if self.word_near is None:
            self.word_near = _card_word_around(self.text, self.spans[0][0], self.spans[-1][1])
        return self.word_near and self.context(first, last, "credit_card")

    def ssns(self, out: list[Finding]) -> None:
        """AAA-GG-SSSS, AAA GG SSSS or AAA.GG.SSSS (one delimiter, not inside a longer
        run) fire alone; nine bare digits need a context word such as "SSN"."""
        d, seps, lens = self.digits, self.seps, self.lens
        for i in range(len(d)):
            if lens[i : i + 3] == [3, 2, 4] and seps[i] in "- ." and seps[i + 1] == seps[i]:
                last, ok = i + 2, self.isolated(i, i + 2, seps[i])
            elif lens[i] == 9:
                last, ok = i, self.isolated(i, i, "-.") and self.context(i, i, "us_ssn")
            else:
                continue
            if ok and _ssn_ok("".join(d[i : last + 1])):
                out.append(self.finding("us_ssn", i, last))

    def phones(self, out: list[Finding]) -> None:
        """415-555-0132, 415.555.0132, 415 555-0132 and 1-415-555-0132 fire alone;
        415 555 0132 and 4155550132 need a context word ("order 4155550132" does not
        fire). Area code and exchange start with 2-9."""
        d, seps, lens = self.digits, self.seps, self.lens
        for i in range(len(d)):
            if lens[i : i + 3] == [3, 3, 4] and seps[i + 1] in (seps[i], "-"):
                first = i - 1 if i and d[i - 1] == "1" else i
                last, weak, number = i + 2, seps[i + 1] == " ", d[i] + d[i + 1]
                ok = self.isolated(first, last, seps[i] + seps[i + 1])
            else:
                first, last, weak, number = i, i, True, d[i][-10:]
                ok = lens[i] == 10 or (lens[i] == 11 and d[i][0] == "1")
                ok = ok and self.isolated(i, i, "-.")
            ok = ok and number[0] >= "2" and number[3] >= "2"  # NANP area code and exchange
            if ok and (not weak or self.context(first, last, "phone")):
                out.append(self.finding("phone", first, last))

    def ipv4s(self, out: list[Finding]) -> None:
        """Only a dotted run of exactly four groups is an address (1.2.3.4.5 is not),
        and not right after a word like "version"."""
        i = 0
        while "." in self.seps and i < len(self.digits):
            j = i
            while j < len(self.seps) and self.seps[j] == ".":
                j += 1
            start, end = self.spans[i][0], self.spans[j][1]
            ok = j - i == 3 and max(self.lens[i : j + 1]) <= 3
            ok = ok and _ip_ok(self.text[start:end], ipaddress.IPv4Address)
            if ok and not _VERSION_BEFORE.search(self.text, max(0, start - 24), start):
                out.append(Finding("ip_address", start, end))
            i = j + 1


def _numeric(text: str, m: re.Match[str], names: frozenset[str], out: list[Finding]) -> None:
    start, end = m.span()
    if "iban" in names and start >= 2 and text[start - 2 : start].isalpha():
        _iban(text, start - 2, out)
    if m.start(1) < 0:  # one segment: the common case, kept lean
        _segment(text, start, end, names, out)
    elif _NOT_TABLE.search(text, start, end) is None and not (
        "credit_card" in names and _card_word_around(text, start, end)
    ):
        # Groups joined only by tabs and line breaks, no card word near: a column or a
        # table of numbers. Each group is a segment of its own, and only one of 9+
        # digits can be anything (a card then needs 13, an SSN 9, a phone 10).
        for group in _NINE_DIGITS.finditer(text, start, end):
            _segment(text, group.start(), group.end(), names, out)
    else:
        _loose(text, start, end, names, out)


def _card_word_around(text: str, start: int, end: int) -> bool:
    """A card word, or a word holding one, in the context window of a run of digit
    groups: none there means none in the window of any part of it (the run itself
    holds only digits and separators)."""
    before = _CARD_WORD_ANYWHERE.search(text, max(0, start - 48), start)
    return before is not None or _CARD_WORD_ANYWHERE.search(text, end, end + 24) is not None


def _segment(text: str, start: int, end: int, names: frozenset[str], out: list[Finding]) -> None:
    """Digit groups joined by strict separators only."""
    cards = "credit_card" in names
    glued = _glued(text, start, end)
    if glued and not (cards and text[start : start + 4].isdigit()):
        return  # (stuck to a word, only a card starting at its first group may be)
    run = _Run(text, [d.span() for d in _DIGITS.finditer(text, start, end)])
    digits = sum(run.lens)
    if cards and digits >= 13:
        run.cards(out, range(1, len(run.spans)) if glued else ())
    for name, method, fewest in () if glued else _SEGMENT_DETECTORS:
        if digits >= fewest and name in names:
            method(run, out)


def _loose(text: str, start: int, end: int, names: frozenset[str], out: list[Finding]) -> None:
    """Digit groups some of which a loose separator joins: the card rule reads across
    it, the other rules each segment (groups joined by strict separators) on its own."""
    if "credit_card" in names:
        _loose_cards(text, start, end, out)
    # (The cluster is read alone: its first group starts a segment even after "1.".)
    for m in _SEGMENT_WORTH_READING.finditer(text[start:end]):
        first, last = m.start() + start, m.end() + start
        if _glued(text, first, last):
            continue
        segment = _Run(text, [d.span() for d in _DIGITS.finditer(text, first, last)])
        digits = sum(segment.lens)
        for name, method, fewest in _SEGMENT_DETECTORS:
            if digits >= fewest and name in names:
                method(segment, out)


def _loose_cards(text: str, start: int, end: int, out: list[Finding]) -> None:
    """The card rule (`_Run.cards`) over a cluster with loose separators, tried only at
    the groups a card may start at (`_card_starts`). Those close together share one
    run, built to reach past the last of them as far as a card can."""
    starts = _card_starts(text, start, end)
    glue = _SegmentGlue(text, start)
    done = start  # where the last card found ends: the next one starts after it
    k = 0
    while k < len(starts):
        j = k + 1
        while j < len(starts) and starts[j] - starts[j - 1] <= _CARD_REACH:
            j += 1
        run = _Run.loose(text, starts[k], _group_end(text, starts[j - 1], end))
        for at in starts[k:j]:
            if at < done or glue.inside(text, at, end):
                continue
            i = bisect_left(run.spans, (at,))
            last = run.loose_card_end(i) if run.lens[i] >= 4 else None
            if last is not None:
                done = run.spans[last][1]
                if text[at - 1 : at] != "+":
                    out.append(run.finding("credit_card", i, last))
        k = j


def _card_starts(text: str, start: int, end: int) -> list[int]:
    """Where groups a card may start at begin. A card joined only by tabs and line
    breaks needs a card word near it, and none can be inside the cluster (digits and
    separators only): so away from the cluster's ends only a group of 13+ digits, or
    one a space or a dash follows closely enough, may start one."""
    if end - start <= 2 * _NEAR_END:
        return [m.start() for m in _DIGITS.finditer(text, start, end)]
    found = {m.start() for m in _DIGITS.finditer(text, start, start + _NEAR_END)}
    found.update(
        m.start()
        for m in _DIGITS.finditer(text, end - _NEAR_END, end)
        if not text[m.start() - 1].isdigit()
    )
    crossable = _CROSSABLE.search(text, start, end) is not None
    found.update(
        m.start() for m in (_CARD_START if crossable else _LONG_GROUP).finditer(text, start, end)
    )
    return sorted(found)


def _group_end(text: str, at: int, end: int) -> int:
    """Where the last group that ends within _CARD_REACH of the group at `at` ends, or
    that group itself if it is longer: as far as a card starting there can reach."""
    own = _DIGITS.match(text, at)
    own_end = own.end() if own else at
    reach = at + _CARD_REACH
    if reach >= end:
        return end
    if own_end >= reach:
        return own_end
    while text[reach].isdigit() or not text[reach - 1].isdigit():
        reach -= 1  # (back to a group's end: own_end at the latest)
    return reach


class _SegmentGlue:
    """Whether a group of a loose cluster is inside (not first in) a segment stuck to a
    word, where no card may start. Asked in increasing order, it reads each segment
    once."""

    __slots__ = ("first", "glued", "last", "start")

    def __init__(self, text: str, start: int) -> None:
        self.start = start  # the cluster's
        self.first = self.last = -1  # the segment last read
        self.glued = False

    def inside(self, text: str, at: int, end: int) -> bool:
        if at - 2 < self.start or text[at - 1] not in _STRICT or not text[at - 2].isdigit():
            return False  # (the first group of its segment)
        if not self.first <= at < self.last:
            first = at - 2
            while True:  # back over digits, then over a strict separator after a digit
                while first > self.start and text[first - 1].isdigit():
                    first -= 1
                if first - 2 < self.start or text[first - 1] not in _STRICT:
                    break
                if not text[first - 2].isdigit():
                    break
                first -= 2
            chain = _STRICT_CHAIN.match(text, at, end)
            self.first, self.last = first, chain.end() if chain else at
            self.glued = _glued(text, self.first, self.last)
        return self.glued


_SEGMENT_DETECTORS = (  # (name, method, fewest digits it can fire on)
    ("us_ssn", _Run.ssns, 9),
    ("phone", _Run.phones, 10),
    ("ip_address", _Run.ipv4s, 4),
)
_NUMERIC_NAMES = frozenset({"iban", "credit_card", *(entry[0] for entry in _SEGMENT_DETECTORS)})

# --- IBAN -------------------------------------------------------------------------------

_IBAN_LENGTHS = {
    code: int(length)
    for code, length in re.findall(
        r"([A-Z]{2})(\d\d)",
        "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BI27 BR29 BY28 CH21 CR22 CY28 CZ24 "
        "DE22 DJ27 DK18 DO28 EE20 EG29 ES24 FI18 FK18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 "
        "GT28 HN28 HR21 HU28 IE22 IL23 IQ23 IS26 IT27 JO30 KW30 KZ20 LB28 LC32 LI21 LT20 "
        "LU20 LV21 LY25 MC27 MD24 ME22 MK19 MN20 MR27 MT31 MU30 NI28 NL18 NO15 OM23 PK24 "
        "PL28 PS29 PT25 QA29 RO24 RS22 RU33 SA24 SC31 SD18 SE24 SI19 SK24 SM27 SO23 ST25 "
        "SV28 TL23 TN24 TR26 UA29 VA22 VG24 XK20 YE30",
    )
}
_IBAN = re.compile(r"[A-Za-z]{2}[0-9]{2}(?:[ ]?[A-Za-z0-9]){11,30}+")


def _iban(text: str, start: int, out: list[Finding]) -> None:
    """A registry country, then exactly that country's length of characters (grouped by
    spaces or not), ISO 7064 mod-97 == 1, in any case: a registry length and the
    checksum are what make it an IBAN, and people type account numbers in lower case."""
    m = None if _word_at(text, start - 1) else _IBAN.match(text, start)
    length = _IBAN_LENGTHS.get(text[start : start + 2].upper(), 0) if m else 0
    kept: list[str] = []
    end = start
    while m and end < m.end() and len(kept) < length:
        if text[end] != " ":
            kept.append(text[end])
        end += 1
    if not length or len(kept) < length or _word_at(text, end):
        return
    compact = "".join(kept)
    rearranged = (compact[4:] + compact[:4]).upper()
    if int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1:
        out.append(Finding("iban", start, end))


# --- passes anchored on a literal: "+" and "(" phones, "@" email, ":" IPv6 --------------

_INTL_PHONE = re.compile(r"\+[1-9][0-9]{0,2}(?:[ .\-]?(?:\([0-9]{1,4}\)|[0-9]{1,5}))*+")
_PAREN_PHONE = re.compile(r"\([2-9][0-9]{2}\)[ ]?[2-9][0-9]{2}[-. ][0-9]{4}(?![0-9]|[-.][0-9])")
# Letters and digits of any script: internationalised addresses (RFC 6531) such as
# "jürgen@bücher.de" are personal data too.
_LOCAL_REVERSED = re.compile(r"[\w.%+\-']{1,64}")
_DOMAIN = re.compile(r"(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.){1,8}[^\W\d_]{2,63}(?![\w-])")
_V6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
_V6_REVERSED = re.compile(r"[0-9A-Fa-f:]{0,39}")
_V6_FORWARD = re.compile(r"[0-9A-Fa-f:.]{1,45}")


def _phones(text: str, out: list[Finding]) -> None:
    """A + form with 8-15 digits (E.164; 10+ when written without separators), or
    (415) 555-0132."""
    for m in _INTL_PHONE.finditer(text) if "+" in text else ():
        start, end = m.span()
        if not _free(text, start, end, "+"):
            continue
        body = m.group()[1:]
        count = sum(map(str.isdigit, body))
        if 8 <= count <= 15 and (count >= 10 or not body.isdigit()):
            out.append(Finding("phone", start, end))
    for m in _PAREN_PHONE.finditer(text) if "(" in text else ():
        if not _word_at(text, m.end()):
            out.append(Finding("phone", m.start(), m.end()))


def _emails(text: str, out: list[Finding]) -> None:
    """Anchored on each '@', the local part read backwards: no other start position is
    ever tried, so 64 KB of "a@a.a" stays linear. The domain needs a dot and a TLD."""
    at = text.find("@")
    while at >= 0:
        domain = _DOMAIN.match(text, at + 1)
        local = _LOCAL_REVERSED.match(text[max(0, at - 64) : at][::-1])
        if domain and local:
            start = at - local.end()
            while text[start] == ".":
                start += 1
            if start < at:
                out.append(Finding("email", start, domain.end()))
        at = text.find("@", domain.end() if domain else at + 1)


def _ipv6s(text: str, out: list[Finding]) -> None:
    """Anchored on ':hex:'. The candidate around it must parse with ``ipaddress`` and
    hold two hex groups, so "::", "std::vector" or "10:30:45" do not fire. Nor do "::1"
    (loopback) and "::" (unspecified): the same on every host, they identify no one,
    and one group after "::" is a Python slice ("x[::2]") far more often than an address.
    A candidate stuck to a word on its left, or opening with a lone colon, follows a
    label ("ip:2001:db8::1" reads back as ":2001:db8::1", "node:fe80::1" as
    "de:fe80::1"), so the address is what follows the label's colon, which may be
    followed by "::" ("peer:::ffff:192.0.2.1") but not by one more lone colon."""
    pos = 0
    while (m := _V6_HINT.search(text, pos)) is not None:
        back = _V6_REVERSED.match(text[max(0, m.start() - 39) : m.start()][::-1])
        start = m.start() - back.end() if back else m.start()
        forward = _V6_FORWARD.match(text, m.start())
        pos = forward.end() if forward else m.end()
        candidate = text[start:pos].rstrip(".")
        if candidate.endswith(":") and not candidate.endswith("::"):
            candidate = candidate[:-1]
        end = start + len(candidate)
        if _word_at(text, end):
            continue
        if _word_at(text, start - 1) or (candidate[:1] == ":" and candidate[1:2] != ":"):
            cut = candidate.find(":") + 1
            rest = candidate[cut:]
            if not cut or not rest or (rest[0] == ":" and rest[:2] != "::"):
                continue  # ("std::vector", "Foo::dead:beef")
            start, candidate = start + cut, rest
        elif start and text[start - 1] in ".:":
            continue
        shaped = "::" in candidate or candidate.count(":") >= 6  # else "10:30:45"
        groups = sum(1 for g in candidate.split(":") if g)
        if shaped and groups >= 2 and _ip_ok(candidate, ipaddress.IPv6Address):
            out.append(Finding("ip_address", start, end))


def _scan_builtins(text: str, names: frozenset[str]) -> list[Finding]:
    out: list[Finding] = []
    if names & _NUMERIC_NAMES:
        for m in _CLUSTER.finditer(text):
            _numeric(text, m, names, out)
    if "phone" in names:
        _phones(text, out)
    if "email" in names and "@" in text:
        _emails(text, out)
    if "ip_address" in names and ":" in text:
        _ipv6s(text, out)
    return out


@dataclass(frozen=True, slots=True)
class _Builtin:
    """A built-in: alone it runs its share of the pass; a Scanner runs it once for all."""

    name: str

    def find(self, text: str) -> Iterator[Finding]:
        names = frozenset((self.name,))
        yield from _dedupe(_in_views(text, lambda view: _scan_builtins(view, names)))


BUILTIN: dict[str, Detector] = {
    name: _Builtin(name)
    for name in ("email", "us_ssn", "credit_card", "iban", "phone", "ip_address")
}

# --- what the detectors read: the text with its disguises taken off --------------------

# The patterns above read ASCII digits, letters, spaces and dashes. Text pasted from a
# PDF, a word processor or a phone, or written to slip past them, carries the same
# value in other characters: fullwidth or other-script digits, non-breaking spaces,
# typographic dashes, and invisible characters (zero-width spaces, soft hyphens, byte
# order marks, combining strokes, control characters) between the digits. So every
# text is read as sent and in up to two views: "folded", each such character replaced
# by its plain ASCII form (one character for one, so positions do not move), and, when
# the text holds invisible characters, "stripped" of them too. The invisible ones are
# not simply dropped from the one view: "id<ZWSP>4111..." must still read as a
# separate number. A view is read in addition to the text as sent, never instead of
# it: a custom pattern may spell the very characters folding replaces ("PN\u2013\d{6}",
# Arabic-Indic digits, a name before a non-breaking space), and a fold can join what
# was apart (a digit of another script stuck to a card). Findings are mapped back to
# positions in the text as sent and their union kept, a value found in several
# readings once (`_dedupe`). Plain ASCII text without control characters, the common
# case, is read as it is at no extra cost.

_ASCII_HIDDEN = bytes((*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F))  # controls
_FILLERS = frozenset((0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0, *range(0xFE00, 0xFE10)))


@dataclass(frozen=True, slots=True)
class _Unicode:
    fold: dict[int, str]  # code point -> its ASCII stand-in
    hidden: frozenset[int]  # invisible: not part of what a value spells
    # Character classes over the BMP plus every astral character: one table lookup
    # per character (an exact class with astral ranges costs a range test per range).
    maybe_special: re.Pattern[str]  # may be in `fold` or `hidden`
    maybe_hidden: re.Pattern[str]  # may be in `hidden`
    maybe_fold: re.Pattern[str]  # may be in `fold`
    fold_char: dict[str, str]  # `fold` by character
    strip: dict[int, None]  # deletes `hidden` (a str.translate table)


def _char_class(points: Iterable[int]) -> str:
    """The BMP code points given, and all astral ones, as a regex character class."""
    spans: list[list[int]] = []
    for point in sorted(p for p in points if p < 0x10000):
        if spans and point == spans[-1][1] + 1:
            spans[-1][1] = point
        else:
            spans.append([point, point])
    inside = "".join(f"\\u{a:04x}-\\u{b:04x}" for a, b in spans)
    return f"[{inside}\\U00010000-\\U0010ffff]"


@cache
def _unicode() -> _Unicode:
    """Built once, by the first Scanner (it takes tens of milliseconds)."""
    fold: dict[int, str] = {}
    hidden = {*_ASCII_HIDDEN, *_FILLERS}
    for point in (*range(0x80, 0x30000), *range(0xE0000, 0xE1000)):
        char = chr(point)
        kind = unicodedata.category(char)
        if point in _FILLERS:
            continue
        if kind in ("Cc", "Cf", "Mn", "Me"):
            hidden.add(point)
        elif (digit := unicodedata.decimal(char, None)) is not None:
            fold[point] = str(digit)
        elif kind == "Zs":
            fold[point] = " "
        elif kind == "Pd" or point == 0x2212:  # dashes and the minus sign
            fold[point] = "-"
        elif kind not in ("Cs", "Co", "Cn"):
            plain = unicodedata.normalize("NFKC", char)
            if len(plain) == 1 and plain.isascii() and plain.isprintable():
                fold[point] = plain
    return _Unicode(
        fold,
        frozenset(hidden),
        re.compile(_char_class([*fold, *hidden])),
        re.compile(_char_class(hidden)),
        re.compile(_char_class(fold)),
        {chr(point): plain for point, plain in fold.items()},
        dict.fromkeys(hidden),
    )


def _fold(text: str, table: _Unicode) -> str:
    """`text` with each character of `table.fold` replaced by its ASCII stand-in.
    str.translate looks every character up (~35 ns each: 30 ms for 900 KB with one
    non-breaking space in it), so only the characters that may fold are visited, by a
    regex; a text crowded with them is translated whole, which is then cheaper."""
    limit = max(64, len(text) >> 6)
    fold_char = table.fold_char

    def plain(m: re.Match[str]) -> str:
        return fold_char.get(m[0], m[0])

    folded, count = table.maybe_fold.subn(plain, text, count=limit)
    return text.translate(table.fold) if count == limit else folded


def _has_hidden(text: str, table: _Unicode) -> bool:
    """Whether `text` holds a character of `table.hidden`. Astral characters all match
    the regex: past a few of them (a text of emoji), one translate pass answers."""
    limit = max(64, len(text) >> 6)
    for n, m in enumerate(table.maybe_hidden.finditer(text)):
        if ord(m[0]) in table.hidden:
            return True
        if n == limit:
            return len(text.translate(table.strip)) != len(text)
    return False


def _in_views(text: str, scan: Callable[[str], list[Finding]]) -> list[Finding]:
    """`scan` run over `text` as sent, then over its folded view if that differs, and
    if there are invisible characters over the stripped view of each, with every
    finding placed on the text as sent. The findings of all readings are returned
    together, duplicates included."""
    found = scan(text)
    if text.isascii():
        if len(text.encode("ascii").translate(None, _ASCII_HIDDEN)) == len(text):
            return found  # (bytes.translate is 5x faster than a regex search here)
        table, folded = _unicode(), text  # (ASCII has nothing to fold)
    else:
        table = _unicode()
        if table.maybe_special.search(text) is None:
            return found
        folded = _fold(text, table)
        if folded != text:
            found += scan(folded)
        if not _has_hidden(folded, table):
            return found
        if folded != text:  # a custom pattern may spell a folded character: strip as sent
            found += _stripped(text, table, scan)
    return found + _stripped(folded, table, scan)


def _stripped(view: str, table: _Unicode, scan: Callable[[str], list[Finding]]) -> list[Finding]:
    """`scan` over `view` without its invisible characters (astral characters that are
    not invisible go too: a view only adds findings), placed on `view`'s positions: a
    position p there is p + (characters removed before it); shifts[j] is where the
    j-th removed character would have been."""
    removed = [m.start() for m in table.maybe_hidden.finditer(view)]
    shifts = [at - j for j, at in enumerate(removed)]
    found = []
    for f in scan(table.maybe_hidden.sub("", view)):
        start = f.start + bisect_right(shifts, f.start)
        end = f.end + bisect_right(shifts, f.end - 1)
        found.append(Finding(f.detector, start, end))
    return found


# --- custom detectors ------------------------------------------------------------------


# Custom patterns run on RE2 (see `patterns`): linear time for one search, but a
# pattern that must read ahead to the end of the text before it can end a match
# ("a(?:[^x]*y)?" over "aaaa...") costs a pass per match, and RE2's Python binding
# costs microseconds per match. So a custom detector reads at most this many matches
# per text (per reading of it): one is enough to make the request sensitive, and the
# audit's count then means "at least".
MAX_CUSTOM_MATCHES = 100


@dataclass(frozen=True, slots=True)
class _RegexDetector:
    name: str
    regex: CustomPattern
    validate: Callable[[str], bool] | None

    def find(self, text: str) -> Iterator[Finding]:
        if not text.isascii() and _has_surrogates(text):
            # RE2 reads UTF-8, which cannot hold a lone surrogate: one "?" for each
            # keeps every position (the router decodes strictly, so only case files
            # can carry them)
            text = text.encode("utf-8", "replace").decode("utf-8")
        for start, end in islice(self.regex.spans(text), MAX_CUSTOM_MATCHES):
            if end > start and (self.validate is None or self.validate(text[start:end])):
                yield Finding(self.name, start, end)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def regex_detector(
    name: str, pattern: str, *, validate: Callable[[str], bool] | None = None
) -> Detector:
    """A detector declared in the policy, run on RE2. A pattern ``compile_pattern``
    refuses is refused here too, so what the policy check passes is what runs."""
    if not name:
        raise ValueError("a custom detector needs a name")
    try:
        compiled = compile_pattern(pattern)
    except PatternError as exc:
        raise ValueError(f"custom detector {name!r}: {exc}") from None
    return _RegexDetector(name, compiled, validate)


# --- the scanner ------------------------------------------------------------------------


def _dedupe(findings: list[Finding]) -> list[Finding]:
    """Drops a finding inside another of the same detector ("(415) 555-0132" within
    "+1 (415) 555-0132", or the same value found in the text as sent and in a view),
    then orders by position."""
    reach: dict[str, int] = {}
    kept = []
    for f in sorted(findings, key=lambda f: (f.start, -f.end, f.detector)):
        if f.end > reach.get(f.detector, -1):
            kept.append(f)
            reach[f.detector] = f.end
    return sorted(kept, key=lambda f: (f.start, f.end, f.detector))


class Scanner:
    """Runs a policy's detectors over a text. The built-ins share one pass; any failure
    becomes a ScanError so the caller fails closed."""

    __slots__ = ("_builtin", "_custom", "max_chars")

    def __init__(self, detectors: Iterable[Detector], *, max_chars: int = 1_000_000) -> None:
        if max_chars < 1:
            raise ValueError("max_chars must be positive")
        chosen = list(detectors)
        self._builtin = frozenset(d.name for d in chosen if isinstance(d, _Builtin))
        self._custom = tuple(d for d in chosen if not isinstance(d, _Builtin))
        self.max_chars = max_chars
        _unicode()  # built now, at policy load, rather than on the first request needing it

    def scan(self, text: str) -> list[Finding]:
        """All findings, ordered by position. Raises TextTooLarge past max_chars."""
        if not isinstance(text, str):
            raise TypeError("Scanner.scan takes a str")
        if len(text) > self.max_chars:
            raise TextTooLarge(len(text), self.max_chars)
        return _dedupe(_in_views(text, self._scan))

    def _scan(self, text: str) -> list[Finding]:
        found: list[Finding] = []
        if self._builtin:
            found = _guarded("builtin", lambda t: _scan_builtins(t, self._builtin), text)
        for detector in self._custom:
            found += _guarded(detector.name, detector.find, text)
        return found


def _guarded(name: str, find: Callable[[str], Iterable[Finding]], text: str) -> list[Finding]:
    try:
        return list(find(text))
    except ScanError:
        raise
    except Exception as exc:  # any failure means "could not scan", never "clean"
        raise DetectorError(name, type(exc).__name__) from None
