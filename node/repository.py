"""The model repository: every version found under a root directory, loaded or not.

`scan_repository` loads `ROOT/<model>/<version>/` for every model and version; a broken
version becomes an UNAVAILABLE entry with the reason (also logged at ERROR) and never
stops the others from loading. `ModelRepository` answers lookups by name and version
for the servicer (ModelInfer, ModelMetadata, ModelReady, RepositoryIndex).

Entries live in a lock-protected `{name: {version: entry}}` map and are replaced
whole, so loading or unloading versions at runtime (RepositoryModelLoad/Unload) only
has to build new entries and swap them in; readers always see a consistent entry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hybridroute.node.loading import LoadedModel, ModelLoadError, load_version
from hybridroute.protos.tensors import quoted

__all__ = [
    "ModelNotFound",
    "ModelNotReady",
    "ModelRepository",
    "RepositoryError",
    "State",
    "VersionEntry",
    "load_entry",
    "parse_version",
    "scan_model",
    "scan_repository",
    "version_dirs",
]

log = logging.getLogger(__name__)

State = Literal["READY", "UNAVAILABLE"]


class RepositoryError(Exception):
    """Base of lookup failures; the message is safe to return to a client."""


class ModelNotFound(RepositoryError, LookupError):
    """No such model, or no such version of it."""


class ModelNotReady(RepositoryError):
    """The model or version exists but could not be loaded."""


@dataclass(frozen=True)
class VersionEntry:
    """One `<model>/<version>` directory: READY with its model, or UNAVAILABLE with why."""

    name: str
    version: int
    path: Path
    state: State
    reason: str = ""
    model: LoadedModel | None = None

    @property
    def ready(self) -> bool:
        return self.state == "READY" and self.model is not None


MAX_VERSION = 2**63 - 1  # versions travel as int64 (RepositoryModelLoad's int64_param)
_MAX_VERSION_DIGITS = len(str(MAX_VERSION))


def parse_version(text: str) -> int | None:
    """`text` as a version number (ASCII digits, 1 to 2**63 - 1), or None.

    The length is checked before `int()`: a caller can send thousands of digits, and
    Python refuses to convert more than 4300 (a ValueError that would surface as an
    internal error) after spending quadratic time on fewer.
    """
    if not 0 < len(text) <= _MAX_VERSION_DIGITS or not text.isascii() or not text.isdigit():
        return None
    number = int(text)
    return number if 1 <= number <= MAX_VERSION else None


def _version_number(directory: Path) -> int | None:
    """A version directory's number, or None if its name is not a version number."""
    return parse_version(directory.name)


def load_entry(name: str, version: int, path: Path) -> VersionEntry:
    """Load one version directory into an entry; failures become UNAVAILABLE entries."""
    try:
        model = load_version(path)
    except ModelLoadError as exc:
        reason = str(exc)
    except Exception as exc:  # a bug or an exotic file must not take the node down
        reason = f"{name}/{version}: unexpected error while loading: {type(exc).__name__}: {exc}"
    else:
        log.info("model %s/%s READY (%s)", name, version, path)
        return VersionEntry(name, version, path, "READY", model=model)
    log.error("model %s/%s UNAVAILABLE: %s", name, version, reason)
    return VersionEntry(name, version, path, "UNAVAILABLE", reason=reason)


def version_dirs(model_dir: Path, *, warn: bool = True) -> dict[int, Path]:
    """The version directories under `model_dir` by number (hidden ones are skipped:
    e.g. a package still being written)."""
    found: dict[int, Path] = {}
    if not model_dir.is_dir():
        return found
    for child in sorted(model_dir.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        version = _version_number(child)
        if version is None:
            if warn:
                log.warning(
                    "ignoring %s: version directories are positive integers below 2**63", child
                )
            continue
        found[version] = child
    return found


def scan_model(model_dir: Path) -> list[VersionEntry]:
    """Load every version under `model_dir`, oldest first."""
    dirs = version_dirs(model_dir)
    return [load_entry(model_dir.name, v, dirs[v]) for v in sorted(dirs)]


def scan_repository(root: Path) -> list[VersionEntry]:
    """Load every version of every model under `root`, sorted by name and version."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    entries: list[VersionEntry] = []
    for model_dir in sorted(root.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        found = scan_model(model_dir)
        if not found:
            log.warning("model directory %s holds no version directories", model_dir)
        entries.extend(found)
    return entries


class ModelRepository:
    """Thread-safe lookups over the entries of one repository (`root` is informational,
    kept for runtime loading)."""

    def __init__(self, entries: Iterable[VersionEntry] = (), *, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self._lock = threading.RLock()
        self._models: dict[str, dict[int, VersionEntry]] = {}
        for entry in entries:
            self._put(entry)

    @classmethod
    def load(cls, root: Path) -> ModelRepository:
        """Scan `root` and hold the result."""
        return cls(scan_repository(root), root=root)

    def _put(self, entry: VersionEntry) -> None:
        with self._lock:
            self._models.setdefault(entry.name, {})[entry.version] = entry

    def put(self, entry: VersionEntry) -> VersionEntry | None:
        """Add or replace one version's entry (a runtime load); returns the entry it
        replaced. Readers see either the old entry or the new one, never a mix."""
        with self._lock:
            old = self._models.get(entry.name, {}).get(entry.version)
            self._put(entry)
            return old

    def remove(self, name: str, version: int) -> VersionEntry | None:
        """Forget one version (a runtime unload); returns its entry, if there was one."""
        with self._lock:
            versions = self._models.get(name, {})
            old = versions.pop(version, None)
            if not versions:
                self._models.pop(name, None)
            return old

    def names(self) -> list[str]:
        """Model names, sorted."""
        with self._lock:
            return sorted(self._models)

    def knows(self, name: str) -> bool:
        """Whether any version of `name` exists (READY or not)."""
        with self._lock:
            return bool(self._models.get(name))

    def has_ready(self, name: str) -> bool:
        """Whether `name` has at least one READY version."""
        with self._lock:
            return any(e.ready for e in self._models.get(name, {}).values())

    def entries(self, name: str) -> list[VersionEntry]:
        """All entries of model `name`, oldest first; ModelNotFound if there are none."""
        with self._lock:
            versions = self._models.get(name)
            if not versions:
                known = ", ".join(sorted(self._models)) or "none"
                raise ModelNotFound(f"unknown model {quoted(name)} (available models: {known})")
            return [versions[v] for v in sorted(versions)]

    def versions(self, name: str, *, ready_only: bool = False) -> list[int]:
        """Version numbers of `name`, ascending (all, or only READY ones)."""
        return [e.version for e in self.entries(name) if e.ready or not ready_only]

    def index(self) -> list[VersionEntry]:
        """Every entry, sorted by name and version (RepositoryIndex)."""
        with self._lock:
            return [e for name in sorted(self._models) for e in self.entries(name)]

    def entry(self, name: str, version: str | int | None = None) -> VersionEntry:
        """The entry for `name` and `version` (None or "" = the newest READY version)."""
        entries = self.entries(name)
        if version is None or version == "":
            ready = [e for e in entries if e.ready]
            if not ready:
                reasons = "; ".join(f"version {e.version}: {e.reason}" for e in entries)
                raise ModelNotReady(f"model {name!r} has no READY version ({reasons})")
            return ready[-1]
        wanted = _parse_version(version)
        found = next((e for e in entries if e.version == wanted), None)
        if found is None:
            available = ", ".join(str(e.version) for e in entries)
            raise ModelNotFound(
                f"model {name!r} has no version {quoted(str(version))} "
                f"(available versions: {available})"
            )
        return found

    def entry_or_none(self, name: str, version: int) -> VersionEntry | None:
        """The entry of exactly `name`/`version`, or None (no lookup errors)."""
        with self._lock:
            return self._models.get(name, {}).get(version)

    def get(self, name: str, version: str | int | None = None) -> LoadedModel:
        """The loaded model for `name` and `version`; ModelNotFound or ModelNotReady."""
        entry = self.entry(name, version)
        if not entry.ready or entry.model is None:
            raise ModelNotReady(
                f"model {name!r} version {entry.version} is not ready: {entry.reason}"
            )
        return entry.model

    def is_ready(self, name: str, version: str | int | None = None) -> bool:
        """Whether `get(name, version)` would succeed (ModelReady)."""
        try:
            self.get(name, version)
        except RepositoryError:
            return False
        return True


def _parse_version(version: str | int) -> int | None:
    if isinstance(version, int):
        return version
    return parse_version(version.strip())
