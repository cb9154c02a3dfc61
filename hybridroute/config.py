"""Strict YAML configuration: pydantic models plus the line of every key.

Every YAML file hybridroute reads (router config, policies, `model.yaml`, policy test
cases) goes through `load_model`, so an error always names the file, the line and the
key path, e.g.::

    policies/default.yaml:42: rules[3].match.labell: unknown key (allowed: caller, label, ...)

Key paths read like Python: `pools.onprem.zone`, `rules[3].match`, and a mapping key
that is not a plain name in brackets, `pools['bad name'].zone` or `pools[True]` (YAML
reads an unquoted `on` as a boolean). Every key and list item has its own line.

Models derive from `Strict`, which forbids unknown keys and coercion surprises.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

__all__ = [
    "ConfigError",
    "Located",
    "PathKey",
    "Strict",
    "load_model",
    "load_yaml",
    "render_path",
    "validate",
]

M = TypeVar("M", bound=BaseModel)
# A path into parsed YAML: mapping keys as they were parsed (str, but also int, float,
# bool or None for unquoted keys such as `1` or `on`) and list indices (int).
PathKey = tuple[str | int | float | bool | None, ...]


class Strict(BaseModel):
    """Base for configuration models: unknown keys are errors, instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class ConfigError(Exception):
    """A configuration file is unreadable or invalid. `str()` is `file:line: where: what`."""

    def __init__(self, source: str, problems: list[tuple[int | None, str, str]]) -> None:
        self.source = source
        self.problems = problems  # (line, key path, message)
        super().__init__(self._render())

    def _render(self) -> str:
        lines = []
        for line, where, message in self.problems:
            loc = f"{self.source}:{line}" if line else self.source
            lines.append(f"{loc}: {where}: {message}" if where else f"{loc}: {message}")
        return "\n".join(lines)

    @property
    def first_line(self) -> int | None:
        return self.problems[0][0] if self.problems else None


@dataclass
class Located:
    """Parsed YAML data and the 1-based line of every mapping key and sequence item.

    `lines` is keyed by the paths of the parsed data: mapping keys as parsed, not as
    text, so `("pools", True)` is the line of an unquoted `on:` key under `pools`.
    """

    data: Any
    source: str
    lines: dict[PathKey, int] = field(default_factory=dict)

    def line_of(self, path: PathKey) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


# Deeper than any configuration needs; far enough from Python's recursion limit that
# validating the data cannot hit it either.
_MAX_DEPTH = 100

# More values than any configuration holds. Without aliases a file cannot hold more
# than its size allows; with them ("billion laughs": each level an alias list of the
# one below) a few hundred bytes expand to billions, and a policy reload would hang
# the router's event loop while memory runs out.
_MAX_VALUES = 200_000


class _Builder:
    """Builds one document's data from its nodes, recording the line of every key and
    item (`lines`).

    `active` holds the nodes being built around the current one: an alias to one of
    them (`a: &x [*x]`) would make the data contain itself, which no configuration
    means and which would recurse without end here and in validation. `left` counts
    down the values still allowed, an alias's once per use: that is what the data holds.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.lines: dict[PathKey, int] = {}
        self.active: set[int] = set()
        self.left = _MAX_VALUES

    def value(self, node: yaml.Node, path: PathKey) -> Any:
        line = self.lines.setdefault(path, node.start_mark.line + 1)  # its key's, for an alias
        self.left -= 1
        if self.left < 0:
            message = f"the document expands to more than {_MAX_VALUES:,} values"
            raise _Problem(line, (), message + " (aliases count each time they are used)")
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, line, path)
        if id(node) in self.active:
            message = "recursive alias: it refers to a node that contains it, so the data "
            raise _Problem(line, path, message + "would contain itself; write the values out")
        if len(path) >= _MAX_DEPTH:
            raise _Problem(line, (), f"nested more than {_MAX_DEPTH} levels deep")
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                return [self._item(item, (*path, i)) for i, item in enumerate(node.value)]
            return self._scalar(node, line, path)
        finally:
            self.active.discard(id(node))

    def _scalar(self, node: yaml.Node, line: int, path: PathKey) -> Any:
        """PyYAML's constructors raise plain errors for some values (`2020-13-01` is a
        date with month 13, `!!bool maybe`): they are problems of this file and line."""
        try:
            return self.loader.construct_object(node, deep=True)
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            tag = str(node.tag).rpartition(":")[2] or "value"
            detail = f" ({exc})" if isinstance(exc, ValueError) else ""
            raise _Problem(line, path, f"cannot be read as a YAML {tag}{detail}") from None

    def _item(self, node: yaml.Node, path: PathKey) -> Any:
        self.lines[path] = node.start_mark.line + 1
        return self.value(node, path)

    def _mapping(self, node: yaml.MappingNode, path: PathKey) -> dict[Any, Any]:
        loader = self.loader
        loader.flatten_mapping(node)  # merges `<<: *base` keys into this mapping
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Problem(line, path, "mapping keys must be scalars")
            key = self._scalar(key_node, line, path)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise _Problem(line, path, "mapping keys must be scalars")
            if key in out:
                raise _Problem(line, path, f"duplicate key {key!r}")
            child = (*path, key)
            self.lines[child] = line
            out[key] = self.value(value_node, child)
        return out


class _Problem(Exception):
    def __init__(self, line: int, path: PathKey, message: str) -> None:
        super().__init__(message)
        self.line, self.path, self.message = line, path, message


# A mapping key that reads unambiguously after a dot.
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def render_path(path: PathKey) -> str:
    """`path` as it reads naturally: `pools.onprem.zone`, `rules[3].route`, and keys that
    are not plain names in brackets, `pools['bad name']`, `pools[True]`, `pools[2]`."""
    out = ""
    for part in path:
        if isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def load_yaml(path: str | Path, *, text: str | None = None) -> Located:
    """Parse one YAML document, recording lines. Syntax errors become `ConfigError`, and
    so does what no configuration is: data that contains itself through an alias,
    nesting deeper than `_MAX_DEPTH` (either would otherwise be a `RecursionError`), or
    aliases expanding to more than `_MAX_VALUES` values (memory and time unbounded)."""
    source = str(path)
    try:
        content = Path(path).read_text(encoding="utf-8") if text is None else text
    except FileNotFoundError:
        raise ConfigError(source, [(None, "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [(None, "", f"cannot read: {exc}")]) from exc
    try:
        loader = _UniqueKeyLoader(content)  # its reader refuses control characters at once
    except yaml.YAMLError as exc:
        raise _yaml_error(source, content, exc) from None
    builder = _Builder(loader)
    try:
        node = loader.get_single_node()
        data = {} if node is None else builder.value(node, ())
    except _Problem as exc:
        raise ConfigError(source, [(exc.line, render_path(exc.path), exc.message)]) from None
    except RecursionError:  # PyYAML's composer recurses once per level of nesting
        # (deeper than _MAX_DEPTH, which `_Builder` refuses with the line of the node)
        where = loader.get_mark().line + 1
        raise ConfigError(
            source, [(where, "", f"nested more than {_MAX_DEPTH} levels deep")]
        ) from None
    except yaml.YAMLError as exc:
        raise _yaml_error(source, content, exc) from None
    finally:
        loader.dispose()
    return Located(data=data, source=source, lines=builder.lines)


def _yaml_error(source: str, content: str, exc: yaml.YAMLError) -> ConfigError:
    """PyYAML's error as `file:line: invalid YAML: problem`."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character no YAML may hold
        line = content.count("\n", 0, exc.position) + 1
        problem = f"character U+{exc.character:04X} is not allowed in YAML; remove it"
        return ConfigError(source, [(line, "", f"invalid YAML: {problem}")])
    mark = getattr(exc, "problem_mark", None)
    where = int(mark.line) + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc)
    return ConfigError(source, [(where, "", f"invalid YAML: {problem}")])


def _describe(error: ErrorDetails, model: type[BaseModel], path: PathKey, key: bool) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, path[:-1])
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing"
    return f"invalid key: {error['msg']}" if key else str(error["msg"])


def _allowed_keys(model: type[BaseModel], parent: PathKey) -> list[str]:
    """Field names (aliases) of the sub-model at `parent`, for 'unknown key' hints."""
    annotation: Any = model
    for part in parent:
        annotation = _inner(annotation, part)
    found = next((a for a in _arms(annotation) if _is_model(a)), None)
    fields = found.model_fields if found is not None else {}
    return [f.alias or n for n, f in fields.items()]


def _inner(annotation: Any, part: object) -> Any:
    """The type of what `part` (a field, a mapping key or an index) leads to inside a
    value of type `annotation`; None when that is not known."""
    for arm in _arms(annotation):
        if _is_model(arm):
            fields = arm.model_fields.items()
            info = next((f for n, f in fields if (f.alias or n) == part), None)
            if info is not None:
                return info.annotation
            continue
        origin, args = typing.get_origin(arm), typing.get_args(arm)
        if not isinstance(origin, type) or not args:
            continue
        if issubclass(origin, Mapping):
            return args[-1]
        if issubclass(origin, Sequence | AbstractSet) and isinstance(part, int):
            fixed = origin is tuple and Ellipsis not in args
            return (args[part] if part < len(args) else None) if fixed else args[0]
    return None


def _arms(annotation: Any) -> list[Any]:
    """`annotation` without `Annotated` wrappers, split into the members of a union."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _arms(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [arm for arg in typing.get_args(annotation) for arm in _arms(arg)]
    return [annotation]


def _is_model(annotation: Any) -> typing.TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


# Items pydantic puts into an error's `loc` that are not keys in the file: the union
# member tried, a validator's wrapper, and the marker of an error in a mapping key.
_UNION_TAGS = {"str", "int", "float", "bool", "list[str]", "dict[str,str]"}
_KEY_ERROR = "[key]"


def _resolve(data: Any, loc: tuple[str | int, ...]) -> tuple[PathKey, bool]:
    """A pydantic error location as a path into `data`, and whether the error is about
    the mapping key at the end of that path rather than its value.

    pydantic reports mapping keys as strings or ints: an unquoted `on:` key as 1, a
    `1.5:` key as '1.5'. Each is matched to the key as parsed, so the path finds the
    key's line and renders as written (`pools[True]`).
    """
    key_error = bool(loc) and loc[-1] == _KEY_ERROR
    path: list[str | int | float | bool | None] = []
    node = data
    for part in loc[:-1] if key_error else loc:
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
            continue
        found, key = _key_in(node, part) if isinstance(node, dict) else (False, None)
        if found:
            path.append(key)
            node = node[key]
        elif not (isinstance(part, str) and (part in _UNION_TAGS or part.startswith("function-"))):
            path.append(part)  # not in the data (a missing key): as reported
            node = None
    return tuple(path), key_error


def _key_in(mapping: dict[Any, Any], part: str | int) -> tuple[bool, Any]:
    """Whether `mapping` has the key pydantic reports as `part`, and that key."""
    if isinstance(part, str) and part in mapping:
        return True, part
    for key in mapping:
        if isinstance(part, int) and not isinstance(key, str) and key == part:
            return True, key  # int, or the bool pydantic reports as 0 or 1
        if isinstance(part, str) and not isinstance(key, str) and str(key) == part:
            return True, key  # float or None, reported as its str()
    return False, None


def validate(located: Located, model: type[M], *, context: dict[str, Any] | None = None) -> M:
    """Validate parsed data against `model`; every problem names its line and key path."""
    try:
        return model.model_validate(located.data, context=context)
    except ValidationError as exc:
        problems: list[tuple[int | None, str, str]] = []
        for error in exc.errors():
            path, key = _resolve(located.data, tuple(error["loc"]))
            message = _describe(error, model, path, key)
            problems.append((located.line_of(path), render_path(path), message))
        raise ConfigError(located.source, problems) from None


def load_model(path: str | Path, model: type[M], *, context: dict[str, Any] | None = None) -> M:
    """Load a YAML file and validate it against `model` in one step."""
    return validate(load_yaml(path), model, context=context)
