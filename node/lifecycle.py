"""Loading and unloading model versions while a node serves (the repository RPCs).

What a rollout needs from a node, and how it is met:

* No failed request. A new version is loaded in a loader thread while the old one
  keeps serving, then swapped into the repository in one step on the event loop;
  requests that arrive afterwards and ask for no particular version get the newest
  READY one. The old version's batcher is drained, not dropped: requests already
  queued on it finish on it (`DataPlane.retire`).
* A broken version changes nothing that serves. A version that fails to load becomes
  an UNAVAILABLE entry with its reason (RepositoryIndex shows it) and the call fails
  with FAILED_PRECONDITION and that reason; a failed reload of a READY version keeps
  the files loaded before. The version policy is only applied after a success, and is
  only ever taken from a version that loaded: a broken new version cannot declare a
  policy that unloads the working ones or refuses a rollback to them.
* No accidental outage. Unloading the last READY version of a model is refused
  unless forced: the node cannot know whether a route still sends that model traffic.

Loads and unloads of one model are serialised; versions of different models load one
at a time in a dedicated thread, so estimator threads keep answering requests.

A load or unload, once started, runs to its end even if its caller gives up (an admin
call past its deadline): stopping half way would leave a drained batcher's callers
unanswered, health SERVING for a removed model, the gauges and the drift monitor
out of step with the repository. The caller is told only that it stopped waiting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from hybridroute.config import ConfigError, load_model
from hybridroute.node.dataplane import DataPlane
from hybridroute.node.loading import LoadedModel
from hybridroute.node.modelconfig import CONFIG_FILE, ModelConfig, valid_model_name
from hybridroute.node.repository import (
    ModelNotFound,
    ModelRepository,
    RepositoryError,
    VersionEntry,
    load_entry,
    version_dirs,
)
from hybridroute.node.versions import DEFAULT_POLICY, VersionPolicy, to_keep
from hybridroute.protos.tensors import quoted

__all__ = [
    "IndexRow",
    "InvalidModelName",
    "LoadFailed",
    "ModelLifecycle",
    "Refused",
    "VersionTracker",
    "policy_for",
    "scan_with_policy",
]

log = logging.getLogger(__name__)

NOT_LOADED = "not loaded"

T = TypeVar("T")


class LoadFailed(RepositoryError):
    """A version did not load; serving versions are untouched. The message says why."""


class Refused(RepositoryError):
    """The operation would break a rule (last READY version, version policy)."""


class InvalidModelName(RepositoryError, ValueError):
    """A model name that cannot be a repository directory (e.g. contains '/')."""


class VersionTracker(Protocol):
    """Told when a version starts or stops serving (the drift monitor)."""

    def track(self, model: LoadedModel) -> None: ...

    def forget(self, name: str, version: int) -> None: ...


@dataclass(frozen=True)
class IndexRow:
    """One line of RepositoryIndex: a loaded, failed or merely present version."""

    name: str
    version: int
    state: str
    reason: str = ""


def policy_for(
    dirs: dict[int, Path], default: VersionPolicy
) -> tuple[VersionPolicy, str, int | None]:
    """The policy of a model: the declaration of the newest version in `dirs` whose
    model.yaml parses, else `default`; where it came from (for messages); and that
    deciding version (None when there is none). Callers pass only versions that loaded
    (or are about to be loaded, and are dropped from `dirs` if they fail)."""
    for version in sorted(dirs, reverse=True):
        try:
            config = load_model(dirs[version] / CONFIG_FILE, ModelConfig)
        except (ConfigError, OSError):
            continue  # a broken newest version does not get to decide
        if config.version_policy is not None:
            where = f"{dirs[version].parent.name}/{version}/{CONFIG_FILE}"
            return config.version_policy, where, version
        return default, "the node's --version-policy", version
    return default, "the node's --version-policy", None


def _candidates(policy: VersionPolicy, dirs: dict[int, Path]) -> list[int]:
    """Versions on disk the policy may load, newest first (the order they are tried)."""
    newest_first = sorted(dirs, reverse=True)
    return [v for v in newest_first if policy.allows(v)]


def scan_with_policy(
    root: Path, default: VersionPolicy = DEFAULT_POLICY
) -> tuple[list[VersionEntry], dict[tuple[str, int], str]]:
    """Load what each model's policy selects under `root`: newest first until the
    policy is satisfied (failed versions do not count). Returns the entries and, for
    versions left on disk, why they were not loaded."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    entries: list[VersionEntry] = []
    notes: dict[tuple[str, int], str] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if model_dir.name.startswith("."):
            continue
        dirs = version_dirs(model_dir)
        if not dirs:
            log.warning("model directory %s holds no version directories", model_dir)
        # The policy comes from the newest version that loads: try each deciding
        # version first, and if it fails, let the next one decide.
        mine: dict[int, VersionEntry] = {}
        while True:
            usable = {v: p for v, p in dirs.items() if v not in mine or mine[v].ready}
            policy, _, decider = policy_for(usable, default)
            if decider is None or decider in mine or not policy.allows(decider):
                break
            mine[decider] = load_entry(model_dir.name, decider, dirs[decider])
            if mine[decider].ready:
                break
        ready = 0
        for version in _candidates(policy, dirs):
            if policy.latest is not None and ready >= policy.latest:
                break
            if version not in mine:
                mine[version] = load_entry(model_dir.name, version, dirs[version])
            ready += mine[version].ready
        entries.extend(mine.values())
        loaded = set(mine)
        for version in set(dirs) - loaded:
            notes[(model_dir.name, version)] = (
                f"{NOT_LOADED}: outside version policy {policy.describe()}"
            )
    return sorted(entries, key=lambda e: (e.name, e.version)), notes


class ModelLifecycle:
    """Runtime loads and unloads over one repository root (see the module docstring)."""

    def __init__(
        self,
        repository: ModelRepository,
        root: Path,
        dataplane: DataPlane,
        *,
        default_policy: VersionPolicy = DEFAULT_POLICY,
        tracker: VersionTracker | None = None,
        on_change: Callable[[], Awaitable[None]] | None = None,
        notes: dict[tuple[str, int], str] | None = None,
    ) -> None:
        self.repository = repository
        self.root = Path(root)
        self.default_policy = default_policy
        self._dataplane = dataplane
        self._tracker = tracker
        self._on_change = on_change
        self._notes = dict(notes or {})
        self._locks: dict[str, asyncio.Lock] = {}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
        self._operations: set[asyncio.Task[Any]] = set()  # loads and unloads running

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ queries

    def index(self) -> list[IndexRow]:
        """Every known version plus every version directory on disk, by name and
        version; versions that are not loaded say why."""
        rows = {
            (e.name, e.version): IndexRow(e.name, e.version, e.state, e.reason)
            for e in self.repository.index()
        }
        if self.root.is_dir():
            for model_dir in self.root.iterdir():
                if model_dir.name.startswith(".") or not model_dir.is_dir():
                    continue
                for version in version_dirs(model_dir, warn=False):
                    key = (model_dir.name, version)
                    reason = self._notes.get(key, NOT_LOADED)
                    rows.setdefault(key, IndexRow(*key, "UNAVAILABLE", reason))
        return [rows[key] for key in sorted(rows)]

    # -------------------------------------------------------------------- loads

    def _model_dirs(self, name: str) -> dict[int, Path]:
        if not valid_model_name(name):
            raise InvalidModelName(f"{quoted(name)} is not a model name")
        dirs = version_dirs(self.root / name, warn=False)
        if not dirs:
            raise ModelNotFound(f"the repository {self.root} has no versions of model {name!r}")
        return dirs

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _to_the_end(self, operation: Coroutine[Any, Any, T]) -> T:
        """Run `operation` in a task of its own that a cancelled caller does not cancel
        (see the module docstring)."""
        task = asyncio.get_running_loop().create_task(operation)
        self._operations.add(task)
        task.add_done_callback(self._operations.discard)
        return await asyncio.shield(task)

    async def load(self, name: str, version: int | None = None, *, by: str = "") -> list[int]:
        """Load `version` of `name` (None: what the model's policy selects), then apply
        the policy. Returns the versions unloaded by the policy."""
        self._model_dirs(name)  # a bad or unknown name fails here, before it gets a lock
        return await self._to_the_end(self._load(name, version, by=by))

    async def _load(self, name: str, version: int | None, *, by: str) -> list[int]:
        async with self._lock(name):
            dirs = self._model_dirs(name)  # again: the disk may have changed meanwhile
            if version is None:
                return await self._load_by_policy(name, dirs)
            if version not in dirs:
                on_disk = ", ".join(str(v) for v in sorted(dirs))
                raise ModelNotFound(
                    f"model {name!r} has no version directory {version} (on disk: {on_disk})"
                )
            # Only versions that loaded (and this one, which must load before the policy
            # is applied) decide the policy: never a newer version that failed.
            deciders = set(self._ready(name)) | {version}
            policy, source, _ = policy_for(
                {v: p for v, p in dirs.items() if v in deciders}, self.default_policy
            )
            if not policy.allows(version):
                raise Refused(
                    f"the version policy of {name!r} ({policy.describe()}, from {source}) "
                    f"does not include version {version}"
                )
            await self._load_one(name, version, dirs[version], by=by)
            return await self._apply_policy(name, policy, pinned=version)

    async def _load_one(self, name: str, version: int, path: Path, *, by: str) -> None:
        loop = asyncio.get_running_loop()
        entry = await loop.run_in_executor(self._loader, load_entry, name, version, path)
        old = self.repository.entry_or_none(name, version)
        if not entry.ready:
            if old is not None and old.ready:
                kept = replace(
                    old,
                    reason=f"reload failed, still serving the files loaded before: {entry.reason}",
                )
                self.repository.put(kept)
            else:
                self.repository.put(entry)
            await self._changed()
            raise LoadFailed(f"{name}/{version} did not load: {entry.reason}")
        self.repository.put(entry)  # from here on, new requests get the new model
        self._notes.pop((name, version), None)
        if old is not None and old.ready:
            await self._dataplane.retire(name, version)
        if self._tracker is not None and entry.model is not None:
            self._tracker.track(entry.model)
        log.info("model %s/%s loaded%s", name, version, f" (by {by})" if by else "")
        await self._changed()

    def _ready(self, name: str) -> list[int]:
        return (
            self.repository.versions(name, ready_only=True) if self.repository.knows(name) else []
        )

    async def _load_by_policy(self, name: str, dirs: dict[int, Path]) -> list[int]:
        failures: list[str] = []
        failed: set[int] = set()
        ready = set(self._ready(name))

        async def attempt(version: int) -> bool:
            try:
                await self._load_one(name, version, dirs[version], by="")
            except LoadFailed as exc:
                failures.append(str(exc))
                failed.add(version)
                return False
            ready.add(version)
            return True

        # The policy comes from the newest version that loads: load each deciding
        # version first; if it fails, the next one decides.
        while True:
            usable = {v: p for v, p in dirs.items() if v not in failed}
            policy, _, decider = policy_for(usable, self.default_policy)
            if decider is None or decider in ready or not policy.allows(decider):
                break
            if await attempt(decider):
                break
        kept = 0  # newest-first versions the policy keeps that are READY
        for version in _candidates(policy, dirs):
            if policy.latest is not None and kept >= policy.latest:
                break
            if version in failed or (version not in ready and not await attempt(version)):
                continue
            kept += 1
        if failures:  # a failed load unloads nothing: the versions serving stay
            serving = ", ".join(str(v) for v in self._ready(name)) or "none"
            raise LoadFailed(
                "; ".join(failures) + f" (nothing unloaded; serving versions: {serving})"
            )
        return await self._apply_policy(name, policy, pinned=None)

    async def _apply_policy(
        self, name: str, policy: VersionPolicy, *, pinned: int | None
    ) -> list[int]:
        ready = self._ready(name)
        drop = sorted(set(ready) - to_keep(policy, ready, pinned=pinned))
        for version in drop:
            note = f"{NOT_LOADED}: unloaded by version policy {policy.describe()}"
            await self._remove(name, version, note)
            log.info("model %s/%s unloaded by version policy %s", name, version, policy.describe())
        return drop

    # ------------------------------------------------------------------ unloads

    async def unload(
        self, name: str, version: int | None = None, *, force: bool = False, by: str = ""
    ) -> list[int]:
        """Unload `version` of `name` (None: every version); refuses to take away the
        last READY version unless `force`. Returns the versions unloaded."""
        self.repository.entries(name)  # ModelNotFound before an unknown name gets a lock
        return await self._to_the_end(self._unload(name, version, force=force, by=by))

    async def _unload(self, name: str, version: int | None, *, force: bool, by: str) -> list[int]:
        async with self._lock(name):
            entries = self.repository.entries(name)  # again: a load may have run meanwhile
            known = {e.version: e for e in entries}
            if version is not None and version not in known:
                listed = ", ".join(str(v) for v in sorted(known))
                raise ModelNotFound(f"model {name!r} has no loaded version {version} ({listed})")
            targets = sorted(known) if version is None else [version]
            remaining = [e for e in entries if e.ready and e.version not in targets]
            if not remaining and any(known[v].ready for v in targets) and not force:
                what = "every version" if version is None else f"version {version}"
                raise Refused(
                    f"refusing to unload {what} of {name!r}: that leaves no READY version, "
                    "and a route may still send it traffic (force it: models unload --force)"
                )
            suffix = f" by {by}" if by else ""
            for target in targets:
                await self._remove(name, target, f"{NOT_LOADED}: unloaded{suffix}")
                log.info("model %s/%s unloaded%s", name, target, suffix)
            return targets

    async def _remove(self, name: str, version: int, note: str) -> None:
        old = self.repository.remove(name, version)
        self._notes[(name, version)] = note
        if old is not None and old.ready and self._tracker is not None:
            self._tracker.forget(name, version)
        await self._changed()  # health says NOT_SERVING as soon as no request gets it
        if old is not None and old.ready:
            await self._dataplane.retire(name, version)  # queued requests finish first

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change()
