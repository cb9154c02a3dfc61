"""Strict YAML configuration: pydantic models plus the line of every key.

Every YAML file hybridroute reads (router config, policies, `model.yaml`, policy test
cases) goes through `load_model`, so an error always names the file, the line and the
key path, e.g.::

    policies/default.yaml:42: rules[3].match.labell: unknown key (allowed: caller, label, ...)

Models derive from `Strict`, which forbids unknown keys and coercion surprises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "Located", "Strict", "load_model", "load_yaml", "validate"]

M = TypeVar("M", bound=BaseModel)
PathKey = tuple[str | int, ...]


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
    """Parsed YAML data and the 1-based line of every mapping key and sequence item."""

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


def _construct(node: yaml.Node, path: PathKey, lines: dict[PathKey, int], loader: Any) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise _Problem(key_node.start_mark.line + 1, path, "mapping keys must be scalars")
            if key in out:
                raise _Problem(key_node.start_mark.line + 1, path, f"duplicate key {key!r}")
            child = (*path, str(key))
            lines[child] = key_node.start_mark.line + 1
            out[key] = _construct(value_node, child, lines, loader)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            child = (*path, i)
            lines[child] = item.start_mark.line + 1
            items.append(_construct(item, child, lines, loader))
        return items
    return loader.construct_object(node, deep=True)


class _Problem(Exception):
    def __init__(self, line: int, path: PathKey, message: str) -> None:
        super().__init__(message)
        self.line, self.path, self.message = line, path, message


def _render_path(path: PathKey) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_yaml(path: str | Path, *, text: str | None = None) -> Located:
    """Parse one YAML document, recording lines. Syntax errors become `ConfigError`."""
    source = str(path)
    try:
        content = Path(path).read_text(encoding="utf-8") if text is None else text
    except FileNotFoundError:
        raise ConfigError(source, [(None, "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [(None, "", f"cannot read: {exc}")]) from exc
    loader = _UniqueKeyLoader(content)
    lines: dict[PathKey, int] = {}
    try:
        node = loader.get_single_node()
        data = {} if node is None else _construct(node, (), lines, loader)
    except _Problem as exc:
        raise ConfigError(source, [(exc.line, _render_path(exc.path), exc.message)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [(line, "", f"invalid YAML: {problem}")]) from None
    finally:
        loader.dispose()
    return Located(data=data, source=source, lines=lines)


def _describe(error: Any, model: type[BaseModel], loc: PathKey) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing"
    return str(error["msg"])


def _allowed_keys(model: type[BaseModel], parent: PathKey) -> list[str]:
    """Field names (aliases) of the sub-model at `parent`, for 'unknown key' hints."""
    current: Any = model
    for part in parent:
        if isinstance(part, int) or current is None:
            continue
        fields = getattr(current, "model_fields", None)
        if not fields:
            return []
        info = next((f for n, f in fields.items() if (f.alias or n) == part), None)
        current = _model_in(info.annotation) if info is not None else None
    fields = getattr(current, "model_fields", None) or {}
    return [f.alias or n for n, f in fields.items()]


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def validate(located: Located, model: type[M], *, context: dict[str, Any] | None = None) -> M:
    """Validate parsed data against `model`; every problem names its line and key path."""
    try:
        return model.model_validate(located.data, context=context)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(p for p in error["loc"] if not str(p).startswith("function-"))
            loc = tuple(p for p in loc if p not in _UNION_TAGS)
            problems.append(
                (located.line_of(loc), _render_path(loc), _describe(error, model, loc))
            )
        raise ConfigError(located.source, problems) from None


# pydantic inserts the union member's name into `loc`; those are not keys in the file.
_UNION_TAGS = {"str", "int", "float", "bool", "list[str]", "dict[str,str]"}


def load_model(path: str | Path, model: type[M], *, context: dict[str, Any] | None = None) -> M:
    """Load a YAML file and validate it against `model` in one step."""
    return validate(load_yaml(path), model, context=context)
