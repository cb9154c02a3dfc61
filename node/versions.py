"""Version policies: which versions of a model a node keeps loaded (Triton's latest-N).

A policy is declared per model in `model.yaml` (`version_policy:`), or given per node
(`hybridroute node serve --version-policy`). Three forms, as in Triton:

- `{latest: N}`: the newest N versions that load;
- `{specific: [1, 3]}`: exactly these versions;
- `{all: true}`: every version found.

Why "newest N that load" rather than "the N highest numbers": a version that fails to
load must never push a serving version out (the rollout rule of this project), so a
broken v3 under `latest: 2` leaves v2 and v1 serving.

The policy of a model is the one declared by its newest version that loaded (a new
version can change it, but only once it loads: a broken one never decides), else the
node's default. It is applied when
the node starts and after every successful load; an explicit unload is never undone
by it, and the version an operator has just loaded is never unloaded by it.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import Field, model_validator

from hybridroute.config import Strict

__all__ = ["DEFAULT_POLICY", "VersionPolicy", "parse_policy", "to_keep"]


class VersionPolicy(Strict):
    """One of `latest`, `specific` or `all` (see the module docstring)."""

    latest: int | None = Field(default=None, ge=1)
    specific: tuple[int, ...] | None = None
    all: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        chosen = [self.latest is not None, self.specific is not None, self.all]
        if sum(chosen) != 1:
            raise ValueError("give exactly one of latest: N, specific: [versions], all: true")
        if self.specific is not None and (not self.specific or any(v < 1 for v in self.specific)):
            raise ValueError("specific lists one or more positive version numbers")
        return self

    def allows(self, version: int) -> bool:
        """Whether `version` may be loaded at all (only `specific` excludes some)."""
        return self.specific is None or version in self.specific

    def describe(self) -> str:
        """The policy as the command-line flag spells it, for messages."""
        if self.latest is not None:
            return f"latest:{self.latest}"
        if self.specific is not None:
            return "specific:" + ",".join(str(v) for v in self.specific)
        return "all"


DEFAULT_POLICY = VersionPolicy(latest=2)
"""Node default: the new version and the one before it (rollback and canary need both)."""


def parse_policy(text: str) -> VersionPolicy:
    """`latest:N`, `specific:1,3` or `all` (the `--version-policy` flag) -> a policy."""
    kind, _, value = text.strip().partition(":")
    try:
        if kind == "all" and not value:
            return VersionPolicy(all=True)
        if kind == "latest":
            return VersionPolicy(latest=int(value))
        if kind == "specific":
            return VersionPolicy(specific=tuple(int(v) for v in value.split(",")))
    except ValueError as exc:  # int() or the validator (pydantic's error is a ValueError)
        raise ValueError(f"version policy {text!r}: {_first_line(exc)}") from None
    raise ValueError(f"version policy {text!r}: expected latest:N, specific:V1,V2 or all")


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def to_keep(policy: VersionPolicy, ready: Iterable[int], *, pinned: int | None = None) -> set[int]:
    """Which of the `ready` versions the policy keeps loaded; `pinned` (the version an
    operator just loaded) is always kept and counts towards `latest`."""
    versions = sorted(set(ready), reverse=True)
    if policy.all:
        keep = set(versions)
    elif policy.specific is not None:
        keep = {v for v in versions if v in policy.specific}
    else:
        assert policy.latest is not None
        slots = policy.latest - (1 if pinned is not None else 0)
        keep = set([v for v in versions if v != pinned][: max(0, slots)])
    if pinned is not None:
        keep.add(pinned)
    return keep
