"""Strict YAML config: every error names the file, the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridroute.config import ConfigError, Strict, load_model


class Limits(Strict):
    max_rows: int = 10


class Route(Strict):
    name: str
    zone: str
    limits: Limits = Limits()


class Doc(Strict):
    routes: list[Route]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf.yaml"
    path.write_text(text)
    return path


def test_valid_document_loads(tmp_path: Path) -> None:
    doc = load_model(_write(tmp_path, "routes:\n  - name: a\n    zone: onprem\n"), Doc)
    assert doc.routes[0].name == "a" and doc.routes[0].limits.max_rows == 10


def test_unknown_key_names_file_line_key_and_the_allowed_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "routes:\n  - name: a\n    zone: onprem\n    limits:\n      max_row: 3\n")
    with pytest.raises(ConfigError) as info:
        load_model(path, Doc)
    assert str(info.value) == (
        f"{path}:5: routes[0].limits.max_row: unknown key (allowed: max_rows)"
    )


def test_wrong_type_and_missing_key_are_each_reported_with_their_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "routes:\n  - name: a\n  - name: b\n    zone: cloud\n"
                  "    limits: {max_rows: lots}\n")
    with pytest.raises(ConfigError) as info:
        load_model(path, Doc)
    text = str(info.value)
    assert f"{path}:2: routes[0].zone: required key is missing" in text
    assert f"{path}:5: routes[1].limits.max_rows: Input should be a valid integer" in text


def test_duplicate_keys_are_refused_not_silently_overwritten(tmp_path: Path) -> None:
    path = _write(tmp_path, "routes:\n  - name: a\n    zone: onprem\n    zone: cloud\n")
    with pytest.raises(ConfigError, match=r"conf.yaml:4: routes\[0\]: duplicate key 'zone'"):
        load_model(path, Doc)


def test_syntax_errors_and_missing_files_say_where(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"conf.yaml:2: invalid YAML"):
        load_model(_write(tmp_path, "routes:\n  - name: a: b\n"), Doc)
    with pytest.raises(ConfigError, match=r"nope.yaml: file not found"):
        load_model(tmp_path / "nope.yaml", Doc)
