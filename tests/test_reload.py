"""Policy reloads against real files: what the file watcher sees while a file is being
written, replaced or broken, and a reload cancelled half-way (`PolicyStore`)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from support import free_port
from test_router import _policy_text

from hybridroute.config import ConfigError
from hybridroute.router.policy.schema import Policy
from hybridroute.router.policy.store import PolicyStore


async def _nothing(policy: Policy) -> None:
    return None


def _text() -> str:
    return _policy_text([free_port()], free_port())


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _until(check: Callable[[], bool], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _watching(
    path: Path, body: Callable[[PolicyStore], Awaitable[None]], apply: object = _nothing
) -> None:
    async def run() -> None:
        store = PolicyStore(path, apply)  # type: ignore[arg-type]
        watcher = asyncio.create_task(store.watch(interval=0.05))
        try:
            await body(store)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    asyncio.run(run())


def test_a_policy_written_in_place_is_not_loaded_half_written(tmp_path: Path) -> None:
    """Editors and scripts that rewrite the file in place leave a moment where only the
    start of it is there. A prefix of the shipped policy that stops before its rules is
    itself a valid policy, one that no longer denies unknown callers: the watcher must
    wait for the write to settle instead of loading that."""
    path = tmp_path / "policy.yaml"
    old = _text().encode()
    path.write_bytes(old)
    new = old.replace(b"pin_ttl: 30m", b"pin_ttl: 20m")
    assert new != old
    prefix = new[: new.index(b"\nrules:")]

    async def body(store: PolicyStore) -> None:
        with path.open("wb") as f:  # truncate, write a part, and the rest a moment later
            f.write(prefix)
            f.flush()
            await asyncio.sleep(0.2)  # four polls of the watcher
            f.write(new[len(prefix) :])
        await _until(lambda: store.current.version_hash == _sha(new))
        seen = [r.version_hash for r in store.history if r.accepted]
        assert _sha(prefix) not in seen
        assert all(r.accepted for r in store.history), [r.error for r in store.history]

    _watching(path, body)


def test_the_watcher_outlives_a_file_yaml_cannot_read(tmp_path: Path) -> None:
    """A NUL byte (a file cut short on some file systems, or a binary put there by
    mistake) is refused like any invalid policy, with the file named; the watcher goes
    on and loads the next good version."""
    path = tmp_path / "policy.yaml"
    good = _text()
    path.write_text(good)

    async def body(store: PolicyStore) -> None:
        before = store.current.version_hash
        path.write_bytes(good.encode() + b"\x00")
        await _until(lambda: store.last_refused is not None)
        assert store.last_refused is not None and store.last_refused.error is not None
        assert str(path) in store.last_refused.error
        assert store.current.version_hash == before
        fixed = (good + "\n# fixed\n").encode()
        path.write_bytes(fixed)
        await _until(lambda: store.current.version_hash == _sha(fixed))

    _watching(path, body)


def test_a_reload_called_off_half_way_is_still_picked_up_by_the_watcher(tmp_path: Path) -> None:
    """A reload the admin API started and its caller then abandoned (deadline) is
    cancelled before the new policy took effect: the watcher must still see the file
    as changed, not as handled."""
    path = tmp_path / "policy.yaml"
    text = _text()
    path.write_text(text)
    release = asyncio.Event()
    calls = 0

    async def slow_first(policy: Policy) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first reload: its new endpoints take their time
            await release.wait()

    async def run() -> None:
        store = PolicyStore(path, slow_first)
        await store.start()
        new = (text + "\n# changed\n").encode()
        path.write_bytes(new)
        reload = asyncio.create_task(store.reload("admin API"))
        await _until(lambda: calls == 2)
        reload.cancel()
        await asyncio.gather(reload, return_exceptions=True)
        assert store.current.version_hash != _sha(new)
        watcher = asyncio.create_task(store.watch(interval=0.05))
        try:
            await _until(lambda: store.current.version_hash == _sha(new))
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    asyncio.run(run())


def test_a_router_does_not_start_on_a_file_yaml_cannot_read(tmp_path: Path) -> None:
    """Refused as an invalid policy naming the file (`router serve`: exit 2 and the
    reason), not an exception from the YAML reader."""
    path = tmp_path / "policy.yaml"
    path.write_bytes(_text().encode() + b"\x00")
    with pytest.raises(ConfigError) as info:
        PolicyStore(path, _nothing)
    assert str(path) in str(info.value) and "invalid YAML" in str(info.value)


def test_a_policy_made_readable_again_is_loaded_by_the_watcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new policy put in place by another user is refused as unreadable; the fix,
    chmod or chown, changes neither its content, its size nor its mtime, so the watcher
    must go by the ctime as well or it never loads the policy."""
    path = tmp_path / "policy.yaml"
    text = _text()
    path.write_text(text)
    real_read = Path.read_bytes

    def read_bytes(p: Path) -> bytes:  # what the kernel does for a non-root router
        if p == path and not stat.S_IMODE(p.stat().st_mode) & stat.S_IRUSR:
            raise PermissionError(13, "Permission denied", str(p))
        return real_read(p)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)

    async def body(store: PolicyStore) -> None:
        new = (text + "\n# changed\n").encode()
        staged = tmp_path / "policy.yaml.new"
        staged.write_bytes(new)
        os.chmod(staged, 0)
        os.replace(staged, path)
        await _until(lambda: store.last_refused is not None)
        assert store.last_refused is not None and "Permission denied" in str(
            store.last_refused.error
        )
        before = path.stat()
        os.chmod(path, 0o644)  # the fix
        after = path.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        )
        await _until(lambda: store.current.version_hash == _sha(new))

    _watching(path, body)
