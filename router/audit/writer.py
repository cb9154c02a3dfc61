"""The audit writer: the one thread that owns the audit database connection.

`AuditStore` (the router's sink) queues entries; `Writer.run` takes whatever is queued,
encodes it (`audit.codec`), commits it in one transaction with a checkpoint when one
is due, and settles every waiting future with one call into the event loop. When a
commit fails it refuses (see `audit.store` for the contract), keeps the refused
records in the backlog, and probes until writing the backlog succeeds. What a
reopened file must look like to be written again is `audit.file.ChainFile`'s business.

While failing, entries still flow through the queue: the writer refuses them at once
(no waiting on a broken disk), so `record()` needs no check of its own and there is no
window between "the store looked fine" and "the store failed" where one slips by.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from hybridroute.router.audit import db as auditdb
from hybridroute.router.audit.events import AUDIT_REFUSAL, AuditEvent, AuditNote, AuditUnavailable
from hybridroute.router.audit.file import (
    PROBE_SECONDS,
    ChainFile,
    Entry,
    FileMoved,
    ForeignChain,
    describe_error,
)
from hybridroute.router.config import AuditConfig

__all__ = ["WAL_CHECKPOINTED", "Entry", "Item", "Queued", "Writer"]

log = logging.getLogger(__name__)

_MAX_BATCH = 512
_WITHHELD = "reply withheld: the audit trail could not be written"


@dataclass
class Item:
    """A queued entry and the future its caller awaits in its event loop."""

    entry: Entry
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop


def _settle(items: Sequence[Item], error: str | None) -> None:
    """Resolve the futures of `items`: one hop into each event loop per batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for item in items:
        by_loop.setdefault(item.loop, []).append(item.future)
    for loop, futures in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, futures, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            continue


def _resolve(futures: list[asyncio.Future[None]], error: str | None) -> None:
    for future in futures:
        if future.done():  # the caller was cancelled
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(AuditUnavailable(error))


class Writer(ChainFile):
    """The writer thread's loop (`run`) over a `ChainFile`."""

    def __init__(self, config: AuditConfig, q: queue.SimpleQueue[Queued]) -> None:
        super().__init__(config)
        self.queue = q
        self.failure: str | None = None
        self.failed_at = 0.0
        self.next_probe = 0.0
        self.refused = 0  # requests refused since the failure began
        self.dropped = 0  # of those, records that did not fit in the backlog
        self.on_change: Callable[[], None] = lambda: None
        self.tail_due = False  # the background WAL checkpoint ran: finish it

    def run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._take(self._wait_seconds())
            if self.failure is not None:
                self._refuse(batch)
                if stopping or time.monotonic() >= self.next_probe:
                    self._probe()
            elif batch:
                self._commit(batch)
            elif self.seal_due is not None and time.monotonic() >= self.seal_due:
                self._seal("interval")
            if self.tail_due and self.failure is None:
                self._checkpoint_tail()
        self._shutdown()

    def _checkpoint_tail(self) -> None:
        """After the background checkpoint: the rest of the WAL, so it restarts (see
        `audit.db`). A failure here is harmless (the commits report real trouble)."""
        self.tail_due = False
        if self.conn is None:
            return
        try:
            auditdb.checkpoint_tail(self.conn)
        except sqlite3.Error as exc:
            log.debug("audit WAL tail checkpoint skipped: %s", exc)

    def _wait_seconds(self) -> float | None:
        due = self.next_probe if self.failure is not None else self.seal_due
        return None if due is None else max(0.0, due - time.monotonic())

    def _take(self, timeout: float | None) -> tuple[list[Item], bool]:
        try:
            first = self.queue.get(timeout=timeout) if timeout != 0 else self.queue.get_nowait()
        except queue.Empty:
            return [], False
        items: list[Queued] = [first]
        while len(items) < _MAX_BATCH:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        batch = [i for i in items if isinstance(i, Item)]
        self.tail_due = self.tail_due or any(i is WAL_CHECKPOINTED for i in items)
        return batch, None in items

    def _commit(self, batch: list[Item]) -> None:
        try:
            if self.conn is None:
                raise FileMoved(f"{self.path} is not open")
            self.write(self.conn, [i.entry for i in batch], None)
        except Exception as exc:
            self._fail(exc)
            self._refuse(batch)
            return
        _settle(batch, None)

    def _seal(self, reason: str) -> None:
        try:
            if self.conn is None:
                raise FileMoved(f"{self.path} is not open")
            self.write(self.conn, [], reason)
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        reason = describe_error(exc, self.path, self.config.commit_timeout)
        if not isinstance(exc, sqlite3.Error | OSError | FileMoved | ForeignChain):
            # Type only: an exception text may quote what was being encoded.
            log.error("audit: unexpected %s writing the trail", type(exc).__name__)
        if isinstance(exc, FileMoved):
            self.let_go()
        self.close()
        if self.failure is None:
            self.failed_at = time.time()
            log.error("audit trail cannot be written, refusing requests: %s", reason)
        elif reason != self.failure:
            log.error("audit trail still cannot be written: %s", reason)
        self.failure = reason
        self.next_probe = time.monotonic() + PROBE_SECONDS
        self.on_change()

    def _refuse(self, batch: list[Item]) -> None:
        """Keep the records of what is refused (as refused), and fail their futures."""
        for item in batch:
            entry = item.entry
            if isinstance(entry, AuditEvent) and entry.error != AUDIT_REFUSAL:
                entry = replace(entry, withheld=entry.code, code="UNAVAILABLE", error=_WITHHELD)
            for seq, (hash_hex, attempted) in self.attempted.items():
                if attempted is item.entry:
                    self.attempted[seq] = (hash_hex, entry)
                    self.amend.add(seq)
            if len(self.backlog) < self.config.backlog:
                self.backlog.append(entry)
            else:
                self.dropped += 1
            self.refused += 1
        _settle(batch, self.failure or "audit trail unavailable")

    def _probe(self) -> None:
        """Try to write the backlog; success ends the failure."""
        self.next_probe = time.monotonic() + PROBE_SECONDS
        try:
            if self.conn is None:
                self.reopen()
            assert self.conn is not None
            recovered = AuditNote(
                "audit.recovered",
                {
                    "failed_at_us": int(self.failed_at * 1_000_000),
                    "reason": self.failure or "",
                    "refused": self.refused,
                    "dropped": self.dropped,
                },
            )
            self.write(self.conn, [*self.pending, *self.backlog, recovered], None)
            self.conn.execute(f"PRAGMA busy_timeout = {int(self.config.commit_timeout * 1000)}")
        except Exception as exc:
            self._fail(exc)
            return
        log.warning(
            "audit trail writable again after %.1fs; %d refused requests recorded%s",
            time.time() - self.failed_at,
            self.refused - self.dropped,
            f", {self.dropped} beyond the backlog only counted" if self.dropped else "",
        )
        self.pending, self.attempted, self.amend = [], {}, set()
        self.backlog.clear()
        self.refused = self.dropped = 0
        self.failure = None
        self.on_change()

    def _shutdown(self) -> None:
        if self.failure is not None:
            self._probe()
        if self.failure is not None:
            log.error(
                "audit: stopping with the trail unwritable (%s); %d refused requests' "
                "records could not be written",
                self.failure,
                len(self.backlog),
            )
        elif self.head.seq > self.sealed_seq:
            self._seal("shutdown")
        if self.conn is not None and self.failure is None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.close()
        late, _ = self._take(0)  # queued while we stopped: nobody will write them now
        _settle(late, "the audit store is closed")


class WalCheckpointed:
    """Queued by the background WAL checkpointer each time it ran: the writer thread
    then finishes the checkpoint on its own connection (`audit.db`)."""


WAL_CHECKPOINTED = WalCheckpointed()

# What the writer's queue carries: an entry to write, a checkpoint to finish, or None
# (stop).
Queued = Item | WalCheckpointed | None
