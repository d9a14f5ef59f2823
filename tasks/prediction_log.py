"""The buffered prediction log of online A/B tests (no Prefect import).

The hot path appends each answered batch to an in-memory buffer (a list append under a lock);
a background thread writes the buffer with `ABStore.log_predictions` every `flush_seconds` (or
sooner once `flush_rows` wait), one transaction per test per flush, never one database round trip
per request. `close()` stops the thread and writes what is left: the service calls it on graceful
shutdown, so rows answered = rows logged.

Each worker remembers the last `routed_keys` ids the store routed for a test (an LRU): their
rows skip the routing insert (the store keeps the first arm anyway, and the hash gives returning
ids the same arm), so a pool of returning users adds prediction rows only, not index entries.

A write that fails because the database does not answer keeps the rows for the next flush (up to
`max_buffered_rows`, then the oldest are dropped and counted in `dropped`, with an error in the
log). Each flushed batch has an id that stays with its rows until they are written: the store
remembers the ids it committed, so a batch whose commit went through but whose acknowledgement was
lost is not logged a second time by the next flush. Rows of a test concluded meanwhile cannot be
logged any more (the store refuses them): they are counted in `dropped` and named in the log.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

from tasks.ab import ABStore, ABTestClosedError, TestRecord

logger = logging.getLogger("api.serving")


@dataclass
class _Pending:
    test: TestRecord
    keys: list[str] = field(default_factory=list)
    arms: list[int] = field(default_factory=list)
    predictions: list[str | None] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)
    times_ms: list[int] = field(default_factory=list)
    batch_id: str | None = None  # set when first written; kept while the rows wait for a retry


class PredictionLog:
    """Buffered, batched writes of answered rows into the A/B store."""

    def __init__(self, store: ABStore, flush_seconds: float = 0.2, flush_rows: int = 1000,
                 max_buffered_rows: int = 1_000_000, routed_keys: int = 200_000):
        self.store = store
        self.routed_keys = routed_keys
        # test id -> the ids this worker logged for it, newest last (the writer thread's only)
        self._routed: dict[str, OrderedDict[str, None]] = {}
        self.flush_seconds, self.flush_rows = flush_seconds, flush_rows
        self.max_buffered_rows = max_buffered_rows
        self._pending: dict[str, _Pending] = {}
        self._unwritten: list[_Pending] = []  # failed batches, retried first with their own ids
        self._buffered = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.logged = 0  # rows written
        self.dropped = 0  # rows that could not be written (test concluded, buffer full)

    def add(self, test: TestRecord, keys: Sequence[str], arms: Sequence[int],
            predictions: Sequence[Any], scores: Sequence[float | None]) -> None:
        """Queue answered rows (cheap: no I/O)."""
        now = int(time.time() * 1000)
        with self._lock:
            p = self._pending.get(test.test_id)
            if p is None:
                p = self._pending[test.test_id] = _Pending(test)
            p.keys.extend(keys)
            p.arms.extend(arms)
            p.predictions.extend(None if v is None else str(v) for v in predictions)
            p.scores.extend(scores)
            p.times_ms.extend([now] * len(keys))
            self._buffered += len(keys)
            full = self._buffered >= self.flush_rows
        if full:
            self._wake.set()

    def flush(self) -> int:
        """Write everything buffered now; the number of rows written."""
        with self._flush_lock:
            with self._lock:
                batches = self._unwritten + list(self._pending.values())
                self._pending, self._unwritten, self._buffered = {}, [], 0
            written = 0
            for p in batches:
                written += self._write(p)
            return written

    def _write(self, p: _Pending) -> int:
        n = len(p.keys)
        p.batch_id = p.batch_id or uuid.uuid4().hex
        routed = self._routed.setdefault(p.test.test_id, OrderedDict())
        try:
            self.store.log_predictions(p.test, p.keys, p.arms, p.predictions, p.scores,
                                       p.times_ms, batch_id=p.batch_id, routed=routed.keys())
        except ABTestClosedError as exc:
            self._routed.pop(p.test.test_id, None)
            self.dropped += n
            logger.error("%d answered rows of A/B test %s were not logged: %s", n,
                         p.test.test_id, exc)
            return 0
        except Exception as exc:
            self._requeue(p)
            logger.error("could not log %d predictions of A/B test %s (kept for the next "
                         "flush): %s: %s", n, p.test.test_id, type(exc).__name__, exc)
            return 0
        self.logged += n
        self._remember(routed, p.keys)
        return n

    def _remember(self, routed: OrderedDict[str, None], keys: list[str]) -> None:
        if self.routed_keys <= 0:
            return
        for k in keys:
            if k in routed:
                routed.move_to_end(k)
            else:
                routed[k] = None
        for _ in range(len(routed) - self.routed_keys):
            routed.popitem(last=False)

    def _requeue(self, p: _Pending) -> None:
        # kept whole under its batch id, never merged with newer rows: the failed write may have
        # committed, and only the same id with the same rows lets the store recognise it
        with self._lock:
            self._unwritten.append(p)
            waiting = self._unwritten + list(self._pending.values())
            excess = sum(len(x.keys) for x in waiting) - self.max_buffered_rows
            # the oldest whole batches go first (a cut batch would no longer match its id)
            while excess > 0 and self._unwritten:
                old = self._unwritten.pop(0)
                self.dropped += len(old.keys)
                excess -= len(old.keys)
                logger.error("prediction log buffer full: dropped the %d oldest rows of A/B "
                             "test %s", len(old.keys), old.test.test_id)
            self._buffered = sum(len(x.keys) for x in self._unwritten + list(self._pending.values()))

    def start(self) -> None:
        def loop():
            while not self._stop.is_set():
                self._wake.wait(self.flush_seconds)
                self._wake.clear()
                self.flush()

        self._thread = threading.Thread(target=loop, name="prediction-log", daemon=True)
        self._thread.start()

    def close(self) -> int:
        """Stop the background writer and write what is left; rows written by this call."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return self.flush()
