"""The live policy: loaded at start, reloaded on SIGHUP or when the file changes.

Reload is atomic: a request takes `store.current` once and is decided by that object
to the end, so in-flight requests finish under the policy they started with. A new
policy that fails to compile (or, later, to verify) is refused: the last good one
keeps serving, and the refusal is logged, counted and shown by `hybridroute status`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from hybridroute.config import ConfigError
from hybridroute.router.policy import Policy, compile_policy

__all__ = ["PolicyStore", "ReloadResult"]

log = logging.getLogger(__name__)

Apply = Callable[[Policy], Awaitable[None]]


@dataclass(frozen=True)
class ReloadResult:
    accepted: bool
    version_hash: str | None
    error: str | None
    at: float


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class PolicyStore:
    def __init__(self, path: Path, apply: Apply) -> None:
        self.path = path
        self._apply = apply
        self._lock = asyncio.Lock()
        self._stamp = _stamp(path)
        self.current: Policy = compile_policy(path)  # raises ConfigError: router won't start
        self.loaded_at = time.time()
        self.last_refused: ReloadResult | None = None
        self.history: list[ReloadResult] = []
        for warning in self.current.warnings:
            log.warning("policy: %s", warning)

    async def start(self) -> None:
        await self._apply(self.current)

    async def reload(self, why: str) -> ReloadResult:
        """Try the file as it is now; keep the current policy if it is not valid."""
        async with self._lock:
            self._stamp = _stamp(self.path)
            try:
                policy = await asyncio.to_thread(compile_policy, self.path)
                await self._apply(policy)
            except (ConfigError, OSError, ValueError) as exc:
                result = ReloadResult(False, None, str(exc), time.time())
                self.last_refused = result
                log.error(
                    "policy reload (%s) refused; still serving %s:\n%s",
                    why,
                    self.current.version_hash[:12],
                    exc,
                )
            else:
                self.current, self.loaded_at = policy, time.time()
                result = ReloadResult(True, policy.version_hash, None, self.loaded_at)
                log.info("policy reloaded (%s): %s", why, policy.version_hash[:12])
                for warning in policy.warnings:
                    log.warning("policy: %s", warning)
            self.history.append(result)
            del self.history[:-20]
            return result

    async def watch(self, interval: float = 1.0) -> None:
        """Reload whenever the file's identity, size or mtime changes."""
        while True:
            await asyncio.sleep(interval)
            if _stamp(self.path) != self._stamp:
                await self.reload("file changed")
