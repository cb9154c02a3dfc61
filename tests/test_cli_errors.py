"""What the `hybridroute audit ...` commands say when they are given something wrong: a
time in the wrong unit, a future prune, a file that is not an audit trail, a locked
one, an output that cannot be written, a reader that goes away. Each is one line and
exit 2 (or a quiet 141 for a closed pipe), never a traceback, and nothing is changed."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from test_audit_verify import _tamper, copy_trail, trail  # noqa: F401 - `trail` is a fixture

from hybridroute.cli import main
from hybridroute.router.audit import db as audit_db
from hybridroute.router.audit.db import connect_readonly


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _records(db: Path) -> int:
    with contextlib.closing(connect_readonly(db)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])


def _checkpoint_time_us(db: Path, seq: int) -> int:
    with contextlib.closing(connect_readonly(db)) as conn:
        sql = "SELECT time_us FROM checkpoints WHERE seq = ?"
        return int(conn.execute(sql, (seq,)).fetchone()[0])


# --------------------------------------------------------------------- times (finding A)


def _prune(
    capsys: pytest.CaptureFixture[str], source: Path, tmp_path: Path, before: str
) -> tuple[Path, tuple[int, str, str]]:
    """`audit prune --before BEFORE` on a copy of the trail in `source`: (the copy, the
    outcome)."""
    db = copy_trail(source, tmp_path)
    key = str(tmp_path / "audit-signing.pub")
    return db, _cli(capsys, "audit", "prune", "--db", str(db), "--key", key, "--before", before)


def test_prune_refuses_a_millisecond_time_before_removing_anything(
    trail: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cut_us = _checkpoint_time_us(trail / "audit.db", 20)
    millis = str(cut_us // 1000)  # what a JavaScript or Java clock gives
    db, (code, out, err) = _prune(capsys, trail, tmp_path, millis)
    assert code == 2 and out == ""
    assert "after the year 9999 as unix seconds" in err
    assert f"if it is in milliseconds, give {cut_us // 1000 / 1000:.3f}".rstrip("0") in err
    assert "Traceback" not in err
    assert _records(db) == 46  # nothing was pruned


def test_prune_refuses_a_time_in_the_future(
    trail: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db, (code, out, err) = _prune(capsys, trail, tmp_path, "2999-01-01")
    assert code == 2 and out == ""
    assert "in the future" in err and "give a past time" in err
    assert _records(db) == 46


def test_a_microsecond_time_is_refused_with_the_unit_it_looks_like(
    trail: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = str(trail / "audit.db")
    micros = str(_checkpoint_time_us(trail / "audit.db", 20))  # like `time_us` in --format json
    for command in ("query", "stats", "export"):
        code, out, err = _cli(capsys, "audit", command, "--db", db, "--since", micros)
        assert code == 2 and out == "", command
        assert "--since" in err and "if it is in microseconds" in err, command


def test_a_record_with_an_impossible_time_does_not_stop_a_listing(
    trail: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = copy_trail(trail, tmp_path)
    _tamper(db, "UPDATE records SET body = json_set(body, '$.time_us', 1000000000000000000) "
                "WHERE seq = 17")  # fmt: skip
    code, out, _ = _cli(capsys, "audit", "query", "--db", str(db), "--limit", "0")
    assert code == 0 and len(out.splitlines()) == 47
    code, out, _ = _cli(capsys, "audit", "query", "--db", str(db), "--format", "csv")
    assert code == 0 and len(out.splitlines()) == 47


# ------------------------------------------------------------- bad databases (finding D)


def _not_audit_dbs(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    empty = tmp_path / "empty.db"
    empty.touch()
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
    return {"text": text, "empty": empty, "other sqlite": other}


@pytest.mark.parametrize("command", ["query", "stats", "export", "verify", "prune"])
def test_a_file_that_is_not_an_audit_database_is_named_as_such(
    command: str, tmp_path: Path, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = {
        "verify": ["--key", str(pki / "audit-signing.pub")],
        "prune": ["--key", str(pki / "audit-signing.pub"), "--before", "90d"],
    }.get(command, [])
    for what, path in _not_audit_dbs(tmp_path).items():
        before = path.read_bytes()
        code, out, err = _cli(capsys, "audit", command, "--db", str(path), *extra)
        assert code == 2 and out == "", (command, what)
        assert f"{path} is not an audit database" in err, (command, what, err)
        assert "Traceback" not in err
        assert path.read_bytes() == before  # looked at, never changed


@pytest.fixture
def locked(
    trail: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Path]:
    """A copy of the trail another process holds an exclusive lock on; readers wait
    0.1 s for it, not the real 5."""
    db = copy_trail(trail, tmp_path)
    real = audit_db.connect_readonly

    def impatient(path: Path) -> sqlite3.Connection:
        conn = real(path)
        conn.execute("PRAGMA busy_timeout = 100")
        return conn

    monkeypatch.setattr(audit_db, "connect_readonly", impatient)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE meta SET value = value WHERE key = 'chain'")
    yield db
    holder.execute("ROLLBACK")
    holder.close()


@pytest.mark.parametrize("command", ["query", "stats", "export", "verify"])
def test_a_locked_database_says_retry(
    command: str, locked: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--key", str(locked.with_name("audit-signing.pub"))] if command == "verify" else []
    code, out, err = _cli(capsys, "audit", command, "--db", str(locked), *extra)
    assert code == 2 and out == ""
    assert f"{locked} is locked by another process" in err and "retry" in err


def test_export_to_a_missing_directory_says_so(
    trail: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = tmp_path / "no-such-dir" / "export.jsonl"
    argv = ["audit", "export", "--db", str(trail / "audit.db"), "--output", str(target)]
    code, out, err = _cli(capsys, *argv)
    assert code == 2 and out == ""
    assert f"cannot write {target}: No such file or directory" in err


def test_export_into_a_file_does_not_create_it_for_a_bad_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "export.jsonl"
    bad = _not_audit_dbs(tmp_path)["other sqlite"]
    code, _, _ = _cli(capsys, "audit", "export", "--db", str(bad), "--output", str(target))
    assert code == 2 and not target.exists()


class _ClosedPipe(io.StringIO):
    """stdout whose reader went away after the first line, like `... | head -1`."""

    def write(self, text: str) -> int:
        if "\n" in self.getvalue():
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)

    def writelines(self, lines: Iterable[str]) -> None:  # type: ignore[override]
        for line in lines:
            self.write(line)


@pytest.mark.parametrize(
    "argv",
    [
        ["query", "--format", "json", "--limit", "0"],
        ["query", "--format", "csv"],
        ["query"],
        ["export"],
        ["stats"],
    ],
)
def test_a_reader_that_goes_away_ends_the_command_quietly(
    argv: list[str],
    trail: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    capsys.readouterr()
    monkeypatch.setattr("sys.stdout", _ClosedPipe())
    code = main(["audit", *argv, "--db", str(trail / "audit.db")])
    assert code == 141  # as for a program ended by SIGPIPE
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ query options (E)


def test_a_negative_limit_is_refused(
    trail: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["audit", "query", "--db", str(trail / "audit.db"), "--limit", "-1"])
    assert exit_.value.code == 2
    assert "--limit: must be 0 (all) or more, not -1" in capsys.readouterr().err


def test_status_and_decision_filters_match_in_any_case(
    trail: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = str(trail / "audit.db")

    def seqs(*filters: str) -> list[int]:
        argv = ["audit", "query", "--db", db, "--format", "json", *filters]
        code, out, _ = _cli(capsys, *argv)
        assert code == 0
        return [json.loads(line)["seq"] for line in out.splitlines()]

    assert len(seqs("--status", "UNAVAILABLE")) == 11
    assert seqs("--status", "unavailable") == seqs("--status", "UNAVAILABLE")
    assert seqs("--status", "ok") == seqs("--status", "OK") != []
    assert seqs("--decision", "DENIED") == seqs("--decision", "denied") != []


@pytest.mark.parametrize("format_", ["table", "json", "csv"])
def test_a_query_that_matches_nothing_says_so_on_stderr(
    format_: str,
    trail: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = trail / "audit.db"
    argv = ["audit", "query", "--db", str(db), "--zone", "nowhere", "--format", format_]
    code, out, err = _cli(capsys, *argv)
    assert code == 0  # a query that finds nothing is no error (as documented)
    assert err == f"no records match the filters ({db} holds 46)\n"
    # stdout stays what a script parses: nothing, or CSV's header alone; no bare table header
    assert out == ("" if format_ != "csv" else out.splitlines()[0] + "\n")
    assert format_ != "csv" or out.startswith("seq,time,kind,")


def test_a_query_that_matches_something_says_nothing_on_stderr(
    trail: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    for format_ in ("table", "json", "csv"):
        argv = ["audit", "query", "--db", str(trail / "audit.db"), "--format", format_]
        code, out, err = _cli(capsys, *argv, "--zone", "onprem")
        assert code == 0 and out and err == "", format_


def test_verify_without_a_key_names_both_ways_to_give_one(
    trail: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # no .hybridroute/stack.json to fall back on
    for command in (["verify"], ["prune", "--before", "90d"]):
        code, out, err = _cli(capsys, "audit", *command, "--db", str(trail / "audit.db"))
        assert code == 2 and out == "", command
        assert "--key FILE" in err and "--stack FILE" in err, (command, err)
    code, _, err = _cli(capsys, "audit", "hash", "x")
    assert code == 2 and "--key FILE" in err and "--stack FILE" in err, err
    code, _, err = _cli(capsys, "audit", "query", "--session", "x")  # its option is --hmac-key
    assert code == 2 and "give --hmac-key FILE" in err and "--stack FILE" in err, err


def test_a_broken_pipe_that_is_not_stdouts_is_not_hidden(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Exit 141 says "your reader went away"; a socket's broken pipe while stdout is
    fine is a real error and must show as one."""
    import hybridroute.cli as cli

    def lost_connection(argv: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_run", lost_connection)
    with pytest.raises(BrokenPipeError):
        cli.main(["status"])
