"""Strict YAML config: every error names the file, the line and the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

from hybridroute.config import ConfigError, Strict, load_model, load_yaml, render_path


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
    path = _write(
        tmp_path, "routes:\n  - name: a\n    zone: onprem\n    limits:\n      max_row: 3\n"
    )
    with pytest.raises(ConfigError) as info:
        load_model(path, Doc)
    assert str(info.value) == (
        f"{path}:5: routes[0].limits.max_row: unknown key (allowed: max_rows)"
    )


def test_wrong_type_and_missing_key_are_each_reported_with_their_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "routes:\n  - name: a\n  - name: b\n    zone: cloud\n    limits: {max_rows: lots}\n",
    )
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


def test_a_control_character_is_an_error_with_its_line_not_a_traceback(tmp_path: Path) -> None:
    """PyYAML's reader refuses NUL and other control characters before parsing."""
    for char in ("\x00", "\x07"):
        path = _write(tmp_path, f"routes:\n  - name: a{char}b\n")
        with pytest.raises(ConfigError, match=r"conf.yaml:2: invalid YAML: character U\+00"):
            load_model(path, Doc)


def test_values_pyyaml_cannot_construct_are_errors_with_their_line(tmp_path: Path) -> None:
    """A date with month 13 or `!!bool maybe` made PyYAML raise plain Python errors,
    which got past every handler (router start, reload, policy check)."""
    cases = [
        (
            "routes: []\nwhen: 2020-13-01\n",
            r"conf.yaml:2: when: cannot be read as a YAML timestamp",
        ),
        ("routes: []\nok: !!bool maybe\n", r"conf.yaml:2: ok: cannot be read as a YAML bool"),
        ("routes: []\n? !!bool maybe\n: 1\n", r"conf.yaml:2: cannot be read as a YAML bool"),
    ]
    for text, expected in cases:
        with pytest.raises(ConfigError, match=expected):
            load_model(_write(tmp_path, text), Doc)


def test_self_containing_or_absurdly_deep_yaml_is_an_error_with_its_line(
    tmp_path: Path,
) -> None:
    """Either would recurse without end (a RecursionError traceback, no file:line)."""
    nested = "routes:\n  - &r\n    name: a\n    limits: {max_rows: *r}\n"
    for text, line, where in [
        ("a: &x [*x]\n", 1, r"a\[0\]"),
        (nested, 4, r"routes\[0\]\.limits\.max_rows"),  # the line of the alias
        ("a: &m\n  <<: {b: *m}\n", 2, "a.b"),  # through a merge key
    ]:
        with pytest.raises(ConfigError, match=rf"conf.yaml:{line}: {where}: recursive alias"):
            load_model(_write(tmp_path, text), Doc)
    for depth in (150, 10_000):  # PyYAML can read the first, not the second
        text = "routes: []\nx: " + "[" * depth + "]" * depth + "\n"
        with pytest.raises(ConfigError, match=r"conf.yaml:2: nested more than 100 levels"):
            load_model(_write(tmp_path, text), Doc)
    # An anchor used beside itself, not inside, is just shared data.
    text = "routes:\n  - &a {name: a, zone: onprem}\n  - *a\n"
    assert [r.name for r in load_model(_write(tmp_path, text), Doc).routes] == ["a", "a"]


def test_aliases_that_expand_beyond_any_configuration_are_refused_quickly(
    tmp_path: Path,
) -> None:
    """ "Billion laughs": 300 bytes whose aliases expand to 10^9 values would hang a
    policy reload and exhaust memory; refused with the line where the budget ran out."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = _write(tmp_path, "routes: []\n" + "\n".join(levels) + "\n")
    with pytest.raises(ConfigError) as caught:
        load_model(path, Doc)
    message = str(caught.value)
    assert re.search(r"conf.yaml:\d+: the document expands to more than 200,000 values", message)
    # Sharing data through aliases stays fine well below the bound.
    text = (
        "routes: []\nbase: &b ["
        + ", ".join(["v"] * 1000)
        + "]\nuses: ["
        + ", ".join(["*b"] * 50)
        + "]\n"
    )
    assert load_yaml(_write(tmp_path, text)).data["uses"][49][999] == "v"


# --- key paths inside mappings of user-named entries ------------------------------------


def _plain_name(value: object) -> object:
    if isinstance(value, bool):
        raise PydanticCustomError("name", "YAML reads on/off/yes/no as booleans; quote it")
    if isinstance(value, str) and " " in value:
        raise PydanticCustomError("name", "a name has no spaces")
    return value


class Pool(Strict):
    zone: Literal["onprem", "cloud"]
    size: int = 1


class Pools(Strict):
    pools: dict[Annotated[str, BeforeValidator(_plain_name)], Pool]
    tags: dict[str, str | int] = {}


def _errors(tmp_path: Path, text: str, model: type[Strict] = Pools) -> list[str]:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_model(path, model)
    return [line.removeprefix(f"{path}:") for line in str(info.value).splitlines()]


def test_a_value_inside_a_named_entry_reads_as_a_dotted_path(tmp_path: Path) -> None:
    text = "pools:\n  onprem:\n    zone: moon\n"
    assert _errors(tmp_path, text) == [
        "3: pools.onprem.zone: Input should be 'onprem' or 'cloud'",
    ]


def test_a_key_that_is_not_a_plain_name_is_quoted_in_brackets(tmp_path: Path) -> None:
    text = "pools:\n  ok: {zone: onprem}\n  'bad name':\n    zone: moon\n"
    assert _errors(tmp_path, text) == [
        "3: pools['bad name']: invalid key: a name has no spaces",
        "4: pools['bad name'].zone: Input should be 'onprem' or 'cloud'",
    ]


def test_a_boolean_key_renders_as_written_with_its_own_line(tmp_path: Path) -> None:
    text = "pools:\n  a: {zone: onprem}\n  on:\n    zone: cloud\n    size: many\n"
    assert _errors(tmp_path, text) == [
        "3: pools[True]: invalid key: YAML reads on/off/yes/no as booleans; quote it",
        "5: pools[True].size: Input should be a valid integer, unable to parse string as an "
        "integer",
    ]


def test_numeric_and_null_keys_render_by_value_with_their_own_line(tmp_path: Path) -> None:
    text = "pools:\n  a: {zone: onprem}\n  7: {zone: cloud}\n  1.5: {zone: cloud}\n  ~: {zone: x}\n"
    found = _errors(tmp_path, text)
    assert "3: pools[7]: invalid key: Input should be a valid string" in found
    assert "4: pools[1.5]: invalid key: Input should be a valid string" in found
    assert "5: pools[None]: invalid key: Input should be a valid string" in found
    assert "5: pools[None].zone: Input should be 'onprem' or 'cloud'" in found


def test_keys_named_like_pydantic_union_members_are_kept_in_the_path(tmp_path: Path) -> None:
    text = "pools:\n  str:\n    zone: moon\ntags:\n  int: [1]\n"
    found = _errors(tmp_path, text)
    assert "3: pools.str.zone: Input should be 'onprem' or 'cloud'" in found
    assert "5: tags.int: Input should be a valid string" in found


def test_an_unknown_key_inside_a_named_entry_lists_the_allowed_keys(tmp_path: Path) -> None:
    text = "pools:\n  onprem:\n    zone: onprem\n    sise: 2\n"
    assert _errors(tmp_path, text) == ["4: pools.onprem.sise: unknown key (allowed: zone, size)"]


def test_render_path_reads_like_python() -> None:
    assert render_path(("routes", 0, "limits", "max_rows")) == "routes[0].limits.max_rows"
    assert render_path(("pools", "on-prem_2", "zone")) == "pools.on-prem_2.zone"
    assert render_path(("pools", "gpu.large")) == "pools['gpu.large']"
    assert render_path(("pools", "1st", True, None)) == "pools['1st'][True][None]"
    assert render_path(()) == ""
