"""The durable audit trail: a hash-chained SQLite file, written before every reply.

`AuditStore` is the router's `AuditSink`. `record()` hands the event to one writer
thread, which owns the connection, and waits for a future that the writer resolves
only after COMMIT returned with `synchronous=FULL` (the record is on disk). Whatever
is queued when the writer comes round goes into one transaction (group commit), and
every future of that transaction is settled with one call into the event loop, so a
burst of requests costs one fsync, not one each.

Tamper evidence (see `audit.codec`): each record hashes its canonical body with the
previous hash; a signed checkpoint seals the chain every `checkpoint_every` records, at
most `checkpoint_seconds` after an unsealed record, and at shutdown.

Failing closed: when a commit fails (disk full, file unwritable, removed or replaced,
database locked past `commit_timeout`), every waiting request gets `AuditUnavailable`
(the front door answers UNAVAILABLE) and `failure` says why (health NOT_SERVING,
`hybridroute status`). The records of those refused requests are not dropped: they
are kept, marked with the answer they would have had, in a bounded backlog. The writer
probes every `_PROBE_SECONDS`; the probe *is* writing the backlog plus an
`audit.recovered` record, so when it commits, nothing is missing and `failure` clears
by itself. If the file was removed, the probe starts a new file that continues the
chain from a signed checkpoint of the old head (`audit.continued`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import sys
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from hybridroute.router.audit.db import WalCheckpointer, WriterLock
from hybridroute.router.audit.events import AuditEvent, AuditNote, AuditUnavailable
from hybridroute.router.audit.file import TailNotOurs
from hybridroute.router.audit.metrics import AuditMetrics
from hybridroute.router.audit.writer import WAL_CHECKPOINTED, Entry, Item, Queued, Writer
from hybridroute.router.config import AuditConfig

__all__ = ["AuditStore"]

log = logging.getLogger(__name__)

_SWITCH_INTERVAL = 0.0005


class AuditStore:
    """The router's durable `AuditSink` (see the module docstring)."""

    def __init__(self, config: AuditConfig, *, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self._queue: queue.SimpleQueue[Queued] = queue.SimpleQueue()
        self._writer: Writer | None = None
        self._thread: threading.Thread | None = None
        self._lock = WriterLock(config.db)
        self._wal = WalCheckpointer(config.db, done=lambda: self._queue.put(WAL_CHECKPOINTED))
        self._registry = registry
        self.on_change: Callable[[], None] = lambda: None  # called in the event loop

    async def start(self) -> None:
        """Open (or create) the database and the keys; raises if that is impossible."""
        try:
            self._lock.acquire()
            writer = Writer(self.config, self._queue)
            await asyncio.to_thread(writer.open)
        except (sqlite3.Error, ValueError, OSError, TailNotOurs) as exc:  # printed by `serve`
            self._lock.release()
            raise OSError(f"cannot open the audit trail {self.config.db}: {exc}") from None
        loop = asyncio.get_running_loop()
        writer.on_change = lambda: _call_soon(loop, self.on_change)
        writer.detach_wal = self._wal.detach
        if self._registry is not None:
            metrics = AuditMetrics(self._registry, lambda: self.failure, self._queue.qsize)
            writer.observe = metrics.observe
        # The writer needs the GIL briefly after each commit; under a busy event loop it
        # waits up to one switch interval for it (5 ms by default: that wait, not the
        # fsync, dominated the commit time). 0.5 ms keeps commits prompt.
        sys.setswitchinterval(min(sys.getswitchinterval(), _SWITCH_INTERVAL))
        self._writer = writer
        self._thread = threading.Thread(target=writer.run, name="audit-writer", daemon=True)
        self._thread.start()
        self._wal.start()
        log.info(
            "audit trail %s (chain %s, seq %d)", self.config.db, writer.chain[:12], writer.head.seq
        )

    async def record(self, event: AuditEvent) -> None:
        await self._submit(event)

    def note(self, note: AuditNote) -> asyncio.Future[None]:
        return self._submit(note)

    def _submit(self, entry: Entry) -> asyncio.Future[None]:
        """Queue `entry` now; the future settles when it is committed or refused."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self._thread is None or not self._thread.is_alive():
            future.set_exception(AuditUnavailable("the audit store is not running"))
        else:
            self._queue.put(Item(entry, future, loop))
        return future

    @property
    def failure(self) -> str | None:
        if self._writer is None:
            return "the audit store is not open"
        return self._writer.failure

    def describe(self) -> dict[str, object]:
        """What the router's start record says about its trail."""
        w = self._writer
        assert w is not None
        return {
            "db": str(self.config.db),
            "chain": w.chain,
            "hmac_key_id": w.hasher.key_id,
            "signing_key_id": w.signing_key_id,
            "checkpoint_every": self.config.checkpoint_every,
            "checkpoint_ms": round(self.config.checkpoint_seconds * 1000),
            "commit_timeout_ms": round(self.config.commit_timeout * 1000),
            "tail": w.tail_problem or "ok",
        }

    @property
    def last_start(self) -> dict[str, object] | None:
        """The body of the previous `router.start` record, if any."""
        return None if self._writer is None else self._writer.last_start

    async def close(self) -> None:
        """Write what is queued, seal the chain with a checkpoint, close the file."""
        if self._thread is None:
            return
        await asyncio.to_thread(self._wal.stop)
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self._lock.release()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)
