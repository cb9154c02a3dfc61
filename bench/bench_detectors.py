"""Benchmark: what the built-in PII detectors cost per request.

Scans a realistic 1 KB and 64 KB request text, with and without PII, using all six
built-in detectors in one Scanner (as the router does), and prints the median of five
runs of N scans in microseconds per scan. A second table scans ~900 KB texts (near the
default scan limit) that ordinary prose does not exercise: a column of numbers, a
table of numbers, prose with one non-ASCII character. The detectors run on the
router's event loop, so what one such request costs stalls every other request.

    .venv/bin/python -m bench.bench_detectors
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

from hybridroute.router.policy.detectors import BUILTIN, Scanner

__all__ = ["main", "make_text"]

# Prompt-like prose full of numbers that are not PII: dates, versions, order and
# ticket ids, amounts, times. This is what keeps the digit pass busy.
CLEAN = [
    "Summarise the support ticket below and suggest a reply in a friendly tone.",
    "The customer says order 20240115-0042 arrived on 2024-01-17 with two items missing.",
    "They were charged 149.99 EUR twice and want the duplicate refunded within 5 days.",
    "Our logs show the checkout service on version 4.12.3 returned HTTP 502 at 14:32:07.",
    "Ticket INV-2024-000123 was escalated to tier 2 after 3 failed attempts.",
    "Average latency rose from 38 ms to 412 ms between 09:00 and 11:30 UTC.",
    "Please list the next steps, the owner of each, and a deadline for every step.",
    "Warehouse 7 shipped 1,234 parcels last week, 12 percent more than the week before.",
    "Batch 88120 of the nightly export finished in 42 minutes with 0 errors.",
    "The model card lists 50 trees, a max depth of 12 and an accuracy of 0.953.",
]
# The same kind of text carrying one piece of PII per sentence.
PII = [
    "Please call the customer back on +1-415-555-0132 before noon.",
    "Her card ending in the number 4111 1111 1111 1111 was charged twice.",
    "The refund goes to IBAN DE89 3704 0044 0532 0130 00 as agreed.",
    "Send the confirmation to jane.doe@example.com and copy the account manager.",
    "The requests came from 203.0.113.7 and 2001:db8::8a2e:370:7334 overnight.",
    "For the tax form she gave her SSN as 078-05-1120 on the phone.",
]
CASES = (("1 KB", 1024, 2000), ("64 KB", 65536, 40))
LARGE = 900_000


def make_text(size: int, with_pii: bool, seed: int = 7) -> str:
    """Sentences drawn at random until `size` characters; one in four carries PII."""
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < size:
        pool = PII if with_pii and rng.random() < 0.25 else CLEAN
        sentence = rng.choice(pool)
        parts.append(sentence)
        length += len(sentence) + 1
    return " ".join(parts)[:size]


def worst_cases(size: int = LARGE, seed: int = 7) -> dict[str, str]:
    """Texts of `size` characters, ordinary prose first (the yardstick)."""
    rng = random.Random(seed)
    prose = make_text(size, False)
    middle = size // 2
    numbers = "".join(f"{rng.randrange(10_000):04d}\n" for _ in range(size // 5 + 1))[:size]

    def table(cell: Callable[[], str]) -> str:
        rows: list[str] = []
        length = 0
        while length < size:
            rows.append("\t".join(cell() for _ in range(8)) + "\n")
            length += len(rows[-1])
        return "".join(rows)[:size]

    def one(char: str) -> str:
        return prose[:middle] + char + prose[middle + 1 :]

    return {
        "prose": prose,
        "4-digit numbers, one a line": numbers,
        "the same after a card word": "Card numbers:\n" + numbers[: size - 14],
        "TSV of numbers": table(lambda: str(rng.randrange(10 ** rng.randint(1, 6)))),
        "TSV of decimals": table(
            lambda: f"{rng.randrange(10 ** rng.randint(1, 5))}.{rng.randrange(100)}"
        ),
        "prose, one NBSP": one("\u00a0"),
        "prose, one emoji": one("\U0001f600"),
        "prose, one ZWSP": one("\u200b"),
        "prose, NBSP per sentence": prose.replace(". ", ".\u00a0"),
    }


def median_us(scanner: Scanner, text: str, scans: int, runs: int = 5) -> float:
    """Median over `runs` of the mean time of `scans` scans, in microseconds."""
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        for _ in range(scans):
            scanner.scan(text)
        samples.append((time.perf_counter() - began) / scans * 1e6)
    return statistics.median(samples)


def main() -> None:
    scanner = Scanner(BUILTIN.values())
    print(f"{'text size':>9} {'PII':>4} {'N scans':>8} {'findings':>8} {'us/scan':>9} {'MB/s':>7}")
    for label, size, scans in CASES:
        for with_pii in (False, True):
            text = make_text(size, with_pii)
            findings = len(scanner.scan(text))
            us = median_us(scanner, text, scans)
            mb_s = len(text) / us
            print(
                f"{label:>9} {'yes' if with_pii else 'no':>4} {scans:>8} "
                f"{findings:>8} {us:>9.1f} {mb_s:>7.1f}"
            )
    print("(median of 5 runs of N scans; all six built-in detectors in one Scanner)")
    print()
    print(f"{'~900 KB text':<28} {'findings':>8} {'ms/scan':>8} {'x prose':>8}")
    prose_us = 0.0
    for label, text in worst_cases().items():
        findings = len(scanner.scan(text))
        us = median_us(scanner, text, 1)
        prose_us = prose_us or us
        print(f"{label:<28} {findings:>8} {us / 1000:>8.1f} {us / prose_us:>8.1f}")
    print("(median of 5 scans)")


if __name__ == "__main__":
    main()
