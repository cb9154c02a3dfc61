"""Reading the audit trail: filters, rows for people and machines, statistics.

Every filter is applied to the hashed record body (`json_extract`), never to a copy,
so what a query shows is what `audit verify` vouches for. Rows come out in chain order.
A session or caller-supplied request id is searched by its keyed hash (the caller of
`Filters` passes `hmac-sha256:...`, which `KeyedHasher.digest` makes from the value).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "CSV_COLUMNS",
    "Filters",
    "Stats",
    "count",
    "csv_lines",
    "format_time",
    "parse_time",
    "rows",
    "stats",
    "stats_table",
    "table",
]

# Filter name -> the body field it compares (equality).
_FIELDS = {
    "route": "route",
    "zone": "zone",
    "caller": "caller",
    "model": "model",
    "model_version": "model_version",
    "rule": "rule",
    "decision": "outcome",
    "status": "code",
    "session": "session",
    "request_id": "request_id",
    "client_request_id": "client_request_id",
}
# Filters over a fixed vocabulary (gRPC codes are stored as OK, UNAVAILABLE; decisions
# as routed, denied) match in any case: `--status ok` is not a different question.
_ANY_CASE = frozenset({"status", "decision"})
CSV_COLUMNS = (
    *("seq", "time", "kind", "request_id", "caller", "auth", "method", "model", "outcome"),
    *("rule", "sensitive", "reasons", "findings", "route", "zone", "pool", "endpoint"),
    *("attempts", "code", "latency_ms", "bytes_in", "bytes_out", "policy"),
    *("shadow_pool", "shadow_zone", "shadow_version"),  # where a shadow copy went, if any
)
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass
class Filters:
    since_us: int | None = None
    until_us: int | None = None
    kinds: Sequence[str] = ()  # empty: every kind
    sensitive: bool | None = None
    equals: dict[str, str] = field(default_factory=dict)  # keys of _FIELDS
    hashed: dict[str, str] = field(default_factory=dict)  # another value `equals` matches
    policy: str | None = None  # a policy hash or its first characters

    def where(self) -> tuple[str, list[object]]:
        clauses: list[str] = []
        params: list[object] = []
        if self.since_us is not None:
            clauses.append("time_us >= ?")
            params.append(self.since_us)
        if self.until_us is not None:
            clauses.append("time_us < ?")
            params.append(self.until_us)
        if self.kinds:
            clauses.append(f"kind IN ({', '.join('?' * len(self.kinds))})")
            params.extend(self.kinds)
        if self.sensitive is not None:
            clauses.append("json_extract(body, '$.sensitive') = ?")
            params.append(1 if self.sensitive else 0)
        if self.policy:
            clauses.append("substr(json_extract(body, '$.policy'), 1, ?) = ?")
            params.extend([len(self.policy), self.policy.lower()])
        for name, value in sorted(self.equals.items()):
            column = f"json_extract(body, '$.{_FIELDS[name]}')"
            if name in _ANY_CASE:
                clauses.append(f"upper({column}) = upper(?)")
            elif name in self.hashed:  # the name as written, or its keyed hash
                clauses.append(f"{column} IN (?, ?)")
                params.append(self.hashed[name])
            else:
                clauses.append(f"{column} = ?")
            params.append(value)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


# What a time may be: from the epoch (no record is older) to the end of year 9999 (the
# last moment a timestamp can be written as a date). A larger number is almost always
# a unit mistake, milliseconds or microseconds (`time_us` in JSON output) given as
# seconds, and taken as seconds it would filter, or prune, everything.
_MIN_US = 0
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MAX_US = (dt.datetime.max.replace(tzinfo=dt.UTC) - _EPOCH) // dt.timedelta(microseconds=1)


def parse_time(text: str, now: float | None = None) -> int:
    """Unix microseconds from ISO 8601 (no zone: UTC), `now`, unix seconds, or an age
    such as `90s`, `15m`, `2h`, `7d` (that long before now).

    Every number is unix seconds, however few its digits (`0`, `86400`), except eight
    digits that read as a date (YYYYMMDD), which are refused as ambiguous. An age that
    reaches back past 1970 is 1970 (it covers every record). Raises ValueError for any
    other time before 1970 or after year 9999, naming the unit the number was probably
    meant in."""
    now = time.time() if now is None else now
    value = text.strip()
    if value == "now":
        return round(now * 1e6)
    if (m := _RELATIVE.match(value)) is not None:
        # an age older than 1970 reaches back past every record: the epoch, not an error
        return max(_MIN_US, _in_range(text, (now - float(m[1]) * _UNIT[m[2]]) * 1e6, age=True))
    if re.fullmatch(r"\d{8}", value) and _looks_like_a_date(value):
        raise ValueError(
            f"time {text!r} is ambiguous: a date is written {value[:4]}-{value[4:6]}-"
            f"{value[6:]}, unix seconds as {value}.0"
        )
    if re.fullmatch(r"\d+(\.\d+)?", value):  # unix seconds, however few digits
        return _in_range(text, float(value) * 1e6, seconds=True)
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"cannot read time {text!r}: use ISO 8601 (2026-05-10T12:00:00Z), unix "
            "seconds, 'now', or an age like 15m, 2h, 7d"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return _in_range(text, (parsed - _EPOCH) // dt.timedelta(microseconds=1))


def _looks_like_a_date(digits: str) -> bool:
    """YYYYMMDD, a date an audit record could have (ISO 8601's basic form)."""
    try:
        return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).year >= 1970
    except ValueError:
        return False


def _in_range(text: str, time_us: float | int, *, seconds: bool = False, age: bool = False) -> int:
    shown = text if len(text) <= 40 else text[:37] + "..."
    if age and time_us < _MIN_US:
        return _MIN_US
    if time_us != time_us:  # NaN: never a time
        raise ValueError(f"cannot read time {shown!r}")
    if time_us < _MIN_US:
        raise ValueError(f"time {shown!r} is before 1970, older than any audit record")
    if time_us <= _MAX_US:
        return round(time_us)
    if seconds:  # a number: say which unit would make it a date
        for unit, factor in (("milliseconds", 1e3), ("microseconds (like time_us)", 1e6)):
            if (meant := time_us / factor) <= _MAX_US:
                secs = f"{meant / 1e6:.6f}".rstrip("0").rstrip(".")
                raise ValueError(
                    f"time {shown!r} is after the year 9999 as unix seconds (numbers are "
                    f"read as seconds); if it is in {unit}, give {secs} "
                    f"({format_time(round(meant))})"
                )
    raise ValueError(
        f"time {shown!r} is after the year 9999; give unix seconds, an ISO date "
        "(2026-05-10T12:00:00Z) or an age like 7d"
    )


def format_time(time_us: int) -> str:
    """`2026-05-10T12:00:00.000Z`; a value no date can show (a damaged record's) is
    shown as the number, so one bad row does not stop a listing."""
    try:
        moment = _EPOCH + dt.timedelta(microseconds=time_us)
    except OverflowError:
        return f"?{time_us}us"
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def count(conn: sqlite3.Connection, filters: Filters) -> int:
    where, params = filters.where()
    return int(conn.execute(f"SELECT COUNT(*) FROM records{where}", params).fetchone()[0])  # noqa: S608


def rows(
    conn: sqlite3.Connection, filters: Filters, *, last: int | None = None
) -> Iterator[dict[str, object]]:
    """Matching record bodies plus `record_hash` (the chain hash; no body uses that key),
    in chain order; `last`: only the last N."""
    where, params = filters.where()
    inner = f"SELECT seq, body, hash FROM records{where} ORDER BY seq"  # noqa: S608 - bound values
    if last is not None:
        inner += " DESC LIMIT ?"
        params.append(last)
    for _, body, hash_hex in conn.execute(f"SELECT * FROM ({inner}) ORDER BY seq", params):  # noqa: S608
        try:
            record = json.loads(body)
        except ValueError:
            record = {"kind": "unreadable"}
        if isinstance(record, dict):
            record["record_hash"] = hash_hex
            yield record


# --- rendering ------------------------------------------------------------------------

Record = Mapping[str, object]


def _int(r: Record, key: str) -> int:
    value = r.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _list(r: Record, key: str) -> list[object]:
    value = r.get(key)
    return value if isinstance(value, list) else []


def _dict(r: Record, key: str) -> dict[str, object]:
    value = r.get(key)
    return value if isinstance(value, dict) else {}


def _summary(r: Record) -> str:
    """One line for a record that is not a request."""
    kind = r.get("kind")
    if kind in ("policy.load", "policy.reload"):
        verdict = f"accepted {str(r.get('policy'))[:12]}" if r.get("accepted") else "REFUSED"
        signed = f" signed by {r['signed_by']}" if r.get("signed_by") else ""
        error = str(r.get("error") or "").splitlines()
        return f"{verdict}{signed} ({r.get('why')})" + (f": {error[0]}" if error else "")
    if kind == "router.start":
        changed = " CONFIG CHANGED" if r.get("config_changed") else ""
        return f"v{r.get('version')} pid {r.get('pid')} port {r.get('port')}{changed}"
    if kind == "cert.change":
        after = _dict(r, "after")
        fingerprint = after.get("sha256") or after.get("public_key_sha256") or after.get("error")
        return f"{r.get('role')} is now {str(fingerprint)[:16]}"
    if kind == "audit.recovered":
        return f"after: {r.get('reason')}; {r.get('refused')} refused, {r.get('dropped')} dropped"
    skip = {"kind", "seq", "time_us", "record_hash"}
    return " ".join(f"{k}={v}" for k, v in sorted(r.items()) if k not in skip)[:120]


def _request_cells(r: Record) -> list[str]:
    sensitive = {True: "yes", False: "no"}.get(r.get("sensitive") is True, "?")
    if "sensitive" not in r:
        sensitive = "?"
    where = f"{r.get('route', '')}/{r.get('zone', '')}" if r.get("route") else "-"
    withheld = f" (withheld {r['withheld']})" if r.get("withheld") else ""
    shadow = _dict(r, "shadow")
    mirrored = f"{shadow.get('pool')}/{shadow.get('zone')} v{shadow.get('version')}"
    return [
        str(r.get("outcome", "")),
        str(r.get("caller") or "-"),
        str(r.get("model") or "-"),
        str(r.get("rule") or "-"),
        sensitive,
        where,
        mirrored if shadow else "-",
        f"{r.get('code', '')}{withheld}",
        f"{_int(r, 'latency_us') / 1000:.1f}",
        ",".join(str(x) for x in _list(r, "reasons"))[:60],
    ]


_HEAD = ["time (UTC)", "seq", "what", "caller", "model", "rule", "sens", "route/zone", "shadow"]
_HEAD += ["code", "ms", "reasons"]


def table(records: Iterable[Record]) -> str:
    """Aligned columns for a terminal; other records get a one-line summary."""
    lines: list[list[str]] = []
    for r in records:
        stamp, seq = format_time(_int(r, "time_us")), str(r.get("seq"))
        if r.get("kind") == "request":
            lines.append([stamp, seq, *_request_cells(r)])
        else:
            lines.append([stamp, seq, f"{r.get('kind')}: {_summary(r)}"])
    widths = [len(h) for h in _HEAD]
    for cells in lines:
        if len(cells) == len(_HEAD):
            widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]
    out = []
    for cells in [_HEAD, *lines]:
        padded = [c.ljust(w) for c, w in zip(cells, widths, strict=False)]
        if len(cells) < len(_HEAD):
            padded[-1] = cells[-1]
        out.append("  ".join(padded).rstrip())
    return "\n".join(out)


def _cell(value: object) -> object:
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else value


def csv_lines(records: Iterable[Record]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        findings = _dict(r, "findings")
        values = {
            **r,
            "time": format_time(_int(r, "time_us")),
            "latency_ms": _int(r, "latency_us") / 1000,
            "reasons": ";".join(str(x) for x in _list(r, "reasons")),
            "findings": ";".join(f"{k}={v}" for k, v in sorted(findings.items())),
            **{f"shadow_{k}": v for k, v in _dict(r, "shadow").items()},
        }
        writer.writerow([_cell(values.get(c)) for c in CSV_COLUMNS])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


# --- statistics -----------------------------------------------------------------------


@dataclass
class Stats:
    """What `audit stats` reports, over requests only."""

    requests: int = 0
    sensitive: int = 0
    by: dict[str, Counter[str]] = field(default_factory=dict)  # route, zone, decision, code
    denials_by_rule: Counter[str] = field(default_factory=Counter)
    latency_us: dict[str, list[int]] = field(default_factory=dict)  # OK requests, per route

    def to_dict(self) -> dict[str, object]:
        share = round(self.sensitive / self.requests, 4) if self.requests else 0.0
        return {
            "requests": self.requests,
            "sensitive": self.sensitive,
            "sensitive_share": share,
            **{f"by_{k}": dict(v.most_common()) for k, v in self.by.items()},
            "denials_by_rule": dict(self.denials_by_rule.most_common()),
            "latency_ms": {
                route: {"count": len(v), "p50": _percentile(v, 0.5), "p99": _percentile(v, 0.99)}
                for route, v in sorted(self.latency_us.items())
            },
        }


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1000 if ordered else 0.0


def stats(conn: sqlite3.Connection, filters: Filters) -> Stats:
    filters.kinds = ("request",)
    where, params = filters.where()
    fields = ["route", "zone", "outcome", "code", "sensitive", "rule", "latency_us"]
    select = ", ".join(f"json_extract(body, '$.{f}')" for f in fields)
    out = Stats(by={k: Counter() for k in ("route", "zone", "decision", "code")})
    sql = f"SELECT {select} FROM records{where}"  # noqa: S608 - fixed columns, bound values
    for route, zone, outcome, code, sens, rule, lat in conn.execute(sql, params):
        out.requests += 1
        out.sensitive += 1 if sens else 0
        route = route or "(none)"
        for key, value in (("route", route), ("zone", zone or "(none)")):
            out.by[key][str(value)] += 1
        out.by["decision"][str(outcome)] += 1
        out.by["code"][str(code)] += 1
        if outcome == "denied":
            out.denials_by_rule[str(rule)] += 1
        if code == "OK":
            out.latency_us.setdefault(route, []).append(int(lat or 0))
    return out


def stats_table(data: Stats) -> str:
    total = data.requests
    share = data.sensitive / total if total else 0.0
    out = [f"requests   {total}", f"sensitive  {data.sensitive} ({share:.1%})"]
    sections = [*((k, data.by[k]) for k in ("route", "zone", "decision", "code"))]
    sections.append(("denials", data.denials_by_rule))
    for title, counts in sections:
        cells = ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in counts.most_common())
        out.append(f"{title:<10} {cells or '-'}")
    out.append("latency of OK requests per route (ms):")
    out.append(f"  {'route':<16} {'count':>7} {'p50':>8} {'p99':>8}")
    for route, values in sorted(data.latency_us.items()):
        p50, p99 = _percentile(values, 0.5), _percentile(values, 0.99)
        out.append(f"  {route:<16} {len(values):>7} {p50:>8.2f} {p99:>8.2f}")
    return "\n".join(out)
