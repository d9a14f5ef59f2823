"""Served traffic that feeds monitoring: a sample of the rows the service answered, kept in SQL.

Plain module (no Prefect import). The REST service calls :meth:`ServedTrafficSampler.offer` on the
request path of every prediction; a share of the rows (the monitoring policy's
``served_sample_rate``) is buffered in memory and written in batches by a background thread to
the ``served_rows`` table of the A/B store's database (SQLite in the state folder by default,
PostgreSQL when the ABPolicy block names one) -- one source of truth that every service worker
writes and any machine running a flow can read.

``served_rows``: one row per sampled served row -- ``model_name``, ``version``, ``served_ms``
(integer milliseconds since the Unix epoch, UTC) and ``features`` (the row's columns as one JSON
object). Indexed on ``(model_name, served_ms)``, what :func:`load_served` and the retention
(:func:`prune_served`) read. The table has its own schema, created on first use; it is not one
of the A/B tables (tasks/ab.py) and needs no migration of them.

A data reference ``served:<model>:<window>`` (``served:churn:24h``, ``7d``, ``90m``) names the
rows of a model served in the last window; tasks/data.py resolves it with :func:`load_served_ref`,
so ``check_drift(model_name, data="served:churn:24h")`` checks the served traffic.
"""
from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping, Sequence

import numpy as np
import orjson
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tasks.errors import ConfigurationError, DataError

log = logging.getLogger(__name__)

SERVED_PREFIX = "served:"
WINDOW_PATTERN = re.compile(r"^(\d+(?:\.\d+)?)([mhd])$")
WINDOW_UNITS = {"m": "minutes", "h": "hours", "d": "days"}
DELETE_CHUNK = 10_000  # rows per DELETE: short write transactions beside a serving service
MAX_REF_ROWS = 200_000  # a served: reference reads at most about this many rows (thinned evenly)

metadata = sa.MetaData()
BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
served_table = sa.Table(
    "served_rows", metadata,
    sa.Column("id", BigInt, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(100), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("served_ms", sa.BigInteger, nullable=False),
    sa.Column("features", sa.Text, nullable=False),
    sa.Index("served_rows_model_time", "model_name", "served_ms"),
)

_READY: set[str] = set()
_READY_LOCK = threading.Lock()


def served_engine(url: str | None = None) -> Engine:
    """The A/B store's engine (`url`, else the ABPolicy in force) with `served_rows` created."""
    from tasks.ab import get_engine, schema_transaction

    if url is None:
        from blocks.ab_policy import resolve_ab_policy

        url = resolve_ab_policy().store_url()
    from blocks.ab_policy import normalise_database_url

    url = normalise_database_url(url)
    engine = get_engine(url)
    with _READY_LOCK:
        if url not in _READY:
            with schema_transaction(engine) as conn:
                metadata.create_all(conn, checkfirst=True)
            _READY.add(url)
    return engine


# --------------------------------------------------------------------------- the sampler
@dataclass
class _Pending:
    model_name: str
    version: int
    served_ms: int
    rows: pd.DataFrame | Mapping[str, Sequence[Any]]
    positions: np.ndarray | None  # rows to keep; None: all of them


def _json_lines(columns: Mapping[str, Sequence[Any]],
                positions: np.ndarray | None) -> list[str] | None:
    """The rows of ``{column: [values]}`` as JSON objects, with orjson (NaN becomes null, as with
    pandas' to_json). The service offers one such dict per request: a DataFrame and a to_json per
    offer held the GIL about 0.25 ms each, a burst of hundreds of ms every flush that stalled the
    worker's event loop (measured with py-spy --gil under load). None when a value is of a type
    orjson does not write (the caller then takes the pandas path)."""
    names = list(columns)
    values = [columns[c] for c in names]
    n = len(values[0]) if values else 0
    try:
        return [orjson.dumps(dict(zip(names, [v[i] for v in values])),
                             option=orjson.OPT_SERIALIZE_NUMPY).decode()
                for i in (range(n) if positions is None else positions.tolist())]
    except TypeError:
        return None


def _size(item: _Pending) -> int:
    """Rows of a buffered offer that were kept."""
    if item.positions is not None:
        return len(item.positions)
    if isinstance(item.rows, pd.DataFrame):
        return len(item.rows)
    return len(next(iter(item.rows.values()))) if item.rows else 0


class ServedTrafficSampler:
    """Keep a random share of served rows, written in batches from a background thread.

    ``offer`` costs a random draw for a single row (and an append when it is kept); batches draw
    one number per row and keep a reference to the rows (a DataFrame: pandas copies on write, so
    the caller may reuse it; a ``{column: [values]}`` dict: the caller must not change its lists
    afterwards). The JSON encoding and the database write happen in the writer thread, every
    ``flush_seconds`` or as soon as ``flush_rows`` rows are waiting. At most ``max_buffer_rows``
    wait in memory: beyond that, rows are dropped and counted in ``dropped`` (the database is
    slower than the traffic; the writer logs a warning with the count after its next write).

    Args:
        sample_rate: Share of served rows kept, in [0, 1] (0 keeps nothing, no thread starts).
        url: SQLAlchemy URL of the store; None: the A/B store the ABPolicy in force names.
        flush_rows: Write as soon as this many sampled rows wait.
        flush_seconds: Write at least this often while rows wait.
        max_buffer_rows: Rows kept in memory at most while the database lags.
        seed: Seed of the sampling draws (tests); None: random.
    """

    def __init__(self, sample_rate: float, url: str | None = None, flush_rows: int = 1000,
                 flush_seconds: float = 5.0, max_buffer_rows: int = 200_000,
                 seed: int | None = None) -> None:
        if not isinstance(sample_rate, (int, float)) or not 0.0 <= float(sample_rate) <= 1.0:
            raise ConfigurationError(f"sample_rate must be a share in [0, 1], not {sample_rate!r} "
                                     "(0.1 keeps one served row in ten)")
        if flush_rows < 1 or flush_seconds <= 0 or max_buffer_rows < flush_rows:
            raise ConfigurationError(
                f"need flush_rows >= 1, flush_seconds > 0 and max_buffer_rows >= flush_rows; got "
                f"{flush_rows}, {flush_seconds}, {max_buffer_rows}")
        self.sample_rate = float(sample_rate)
        self.flush_rows, self.flush_seconds = int(flush_rows), float(flush_seconds)
        self.max_buffer_rows = int(max_buffer_rows)
        self.written = 0   # rows written to the database
        self.dropped = 0   # sampled rows dropped because the buffer was full
        self._dropped_reported = 0
        self.last_error: BaseException | None = None
        self._random = random.Random(seed).random
        self._rng = np.random.default_rng(seed)
        self._buffer: deque[_Pending] = deque()
        self._buffered = 0
        self._lock = threading.Lock()       # buffer
        self._write_lock = threading.Lock()  # one writer at a time (thread or flush())
        self._wake = threading.Event()
        self._closed = False
        self._engine = served_engine(url) if self.sample_rate > 0 else None
        self._thread: threading.Thread | None = None
        if self.sample_rate > 0:
            self._thread = threading.Thread(target=self._run, name="served-traffic-writer",
                                            daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------- request path
    def offer(self, model_name: str, version: int,
              rows: pd.DataFrame | Mapping[str, Sequence[Any]]) -> None:
        """Maybe keep some of `rows` (the features a version just answered): a DataFrame, or the
        columns as ``{column: [values]}`` -- what the service holds after checking a request;
        pass that rather than building a DataFrame on the request path (the writer thread builds
        it only for the rows kept). Never blocks on the database."""
        rate = self.sample_rate
        if rate <= 0.0 or self._closed:
            return
        if isinstance(rows, pd.DataFrame):
            n = len(rows)
        else:
            n = len(next(iter(rows.values()))) if rows else 0
        if n == 1:
            if rate < 1.0 and self._random() >= rate:
                return
            positions, kept = None, 1
        else:
            if n == 0:
                return
            if rate >= 1.0:
                positions, kept = None, n
            else:
                positions = np.flatnonzero(self._rng.random(n) < rate)
                kept = len(positions)
                if kept == 0:
                    return
        item = _Pending(model_name, int(version), int(time.time() * 1000), rows, positions)
        with self._lock:
            if self._buffered + kept > self.max_buffer_rows:
                self.dropped += kept
                return
            self._buffer.append(item)
            self._buffered += kept
            full = self._buffered >= self.flush_rows
        if full:
            self._wake.set()

    # ---------------------------------------------------------------- writing
    @property
    def pending(self) -> int:
        """Sampled rows not written yet."""
        return self._buffered

    def _take(self) -> list[_Pending]:
        with self._lock:
            items = list(self._buffer)
            self._buffer.clear()
            self._buffered = 0
        return items

    @staticmethod
    def _records(items: list[_Pending]) -> list[dict[str, Any]]:
        out = []
        for item in items:
            if not isinstance(item.rows, pd.DataFrame):
                lines = _json_lines(item.rows, item.positions)
                if lines is not None:
                    out.extend({"model_name": item.model_name, "version": item.version,
                                "served_ms": item.served_ms, "features": line} for line in lines)
                    continue
            frame = item.rows if isinstance(item.rows, pd.DataFrame) else pd.DataFrame(item.rows)
            frame = frame if item.positions is None else frame.iloc[item.positions]
            # one C-level JSON encoding per batch; NaN becomes null, timestamps ISO strings
            lines = frame.to_json(orient="records", lines=True, date_format="iso").splitlines()
            out.extend({"model_name": item.model_name, "version": item.version,
                        "served_ms": item.served_ms, "features": line} for line in lines)
        return out

    def flush(self) -> int:
        """Write every buffered row now; returns how many were written. A database error is
        raised (the rows stay buffered for the next attempt)."""
        with self._write_lock:
            items = self._take()
            if not items:
                return 0
            records = self._records(items)
            try:
                # BEGIN IMMEDIATE on SQLite (tasks/ab.py): no lock upgrade between writers
                with self._engine.execution_options(ab_write=True).begin() as conn:
                    conn.execute(sa.insert(served_table), records)
            except BaseException:
                with self._lock:  # put them back, in front, within the memory bound
                    room = self.max_buffer_rows - self._buffered
                    keep = []
                    for item in items:
                        size = _size(item)
                        if size <= room:
                            keep.append(item)
                            room -= size
                        else:
                            self.dropped += size
                    self._buffer.extendleft(reversed(keep))
                    self._buffered += sum(_size(i) for i in keep)
                raise
            self.written += len(records)
            return len(records)

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            if self._closed:
                break
            try:
                self.flush()
                self.last_error = None
                if self.dropped > self._dropped_reported:
                    log.warning("served traffic: %d sampled rows dropped since the last write "
                                "(more than max_buffer_rows=%d waited for the database)",
                                self.dropped - self._dropped_reported, self.max_buffer_rows)
                    self._dropped_reported = self.dropped
            except Exception as exc:  # the service keeps answering; say why rows wait
                self.last_error = exc
                log.error("served traffic: cannot write %d sampled rows to %s (%s); retrying in "
                          "%.0f s, %d dropped so far", self.pending, self._engine.url, exc,
                          self.flush_seconds, self.dropped)

    def close(self) -> None:
        """Stop the writer and write what is buffered (graceful shutdown). Raises a database
        error of that last write."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.flush_seconds))
        if self._engine is not None:
            self.flush()

    def __enter__(self) -> "ServedTrafficSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sampler_from_policy(policy: Any = None, url: str | None = None,
                        **options: Any) -> ServedTrafficSampler:
    """A sampler at the monitoring policy's ``served_sample_rate`` (the saved `default`
    document, else the built-in default) -- what the service builds at start."""
    if policy is None:
        from blocks.monitoring import resolve_monitoring_policy

        policy = resolve_monitoring_policy()
    return ServedTrafficSampler(policy.served_sample_rate, url=url, **options)


# --------------------------------------------------------------------------- reading
def _ms(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1000)


def load_served(model_name: str, since: datetime, until: datetime | None = None,
                url: str | None = None, limit: int | None = None,
                every: int = 1) -> pd.DataFrame:
    """The sampled served rows of `model_name` with since <= time < until (now when None), oldest
    first, as a DataFrame of their features (naive datetimes are UTC). With `limit`, the newest
    `limit` rows of the window; with `every` > 1, only rows whose id is a multiple of it (an even
    thinning over the whole window). Empty when none."""
    engine = served_engine(url)
    t = served_table.c
    query = sa.select(t.features).where(t.model_name == model_name, t.served_ms >= _ms(since))
    if every > 1:
        query = query.where(t.id % every == 0)
    if until is not None:
        query = query.where(t.served_ms < _ms(until))
    if limit is not None:
        newest = (query.add_columns(t.served_ms, t.id)
                  .order_by(t.served_ms.desc(), t.id.desc()).limit(limit).subquery())
        query = sa.select(newest.c.features).order_by(newest.c.served_ms, newest.c.id)
    else:
        query = query.order_by(t.served_ms, t.id)
    with engine.connect() as conn:
        lines = conn.execute(query).scalars().all()
    if not lines:
        return pd.DataFrame()
    # one JSON document: about twice as fast as json.loads per row
    return pd.DataFrame(json.loads("[" + ",".join(lines) + "]"))


def count_served(model_name: str, since: datetime, until: datetime | None = None,
                 url: str | None = None) -> int:
    """Sampled served rows of `model_name` in the window (an index-only count)."""
    t = served_table.c
    query = sa.select(sa.func.count()).select_from(served_table).where(
        t.model_name == model_name, t.served_ms >= _ms(since))
    if until is not None:
        query = query.where(t.served_ms < _ms(until))
    with served_engine(url).connect() as conn:
        return int(conn.execute(query).scalar_one())


def parse_window(window: str) -> timedelta:
    """'24h' / '7d' / '90m' / '1.5h' -> timedelta; anything else is a DataError."""
    match = WINDOW_PATTERN.match(window.strip())
    if not match or float(match.group(1)) <= 0:
        raise DataError(f"window {window!r} is not a duration; use a positive number followed by "
                        "m, h or d, e.g. served:churn:24h, served:churn:7d, served:churn:90m")
    return timedelta(**{WINDOW_UNITS[match.group(2)]: float(match.group(1))})


def is_served_ref(ref: Any) -> bool:
    return isinstance(ref, str) and ref.startswith(SERVED_PREFIX)


def parse_served_ref(ref: str) -> tuple[str, timedelta]:
    """'served:<model>:<window>' -> (model, window)."""
    body = ref[len(SERVED_PREFIX):]
    model_name, sep, window = body.rpartition(":")
    if not sep or not model_name or not window:
        raise DataError(f"{ref!r} is not a served-traffic reference; expected "
                        "served:<model>:<window>, e.g. served:customer_churn:24h")
    from tasks.registry import validate_model_name

    try:
        validate_model_name(model_name)
    except ValueError as exc:
        raise DataError(f"{ref!r}: {exc}") from None
    return model_name, parse_window(window)


def load_served_ref(ref: str, now: datetime | None = None,
                    max_rows: int = MAX_REF_ROWS) -> pd.DataFrame:
    """The rows a ``served:<model>:<window>`` reference names; an empty window is a DataError.

    A window holding more than `max_rows` rows is thinned evenly over its whole span (every k-th
    row by id) to about `max_rows`: a drift check gains nothing from millions of rows, and
    reading costs about 50 us a row (bench/monitoring.py)."""
    model_name, window = parse_served_ref(ref)
    until = now or datetime.now(timezone.utc)
    since = until - window
    total = count_served(model_name, since, until)
    every = max(1, -(-total // max_rows))  # ceil
    frame = load_served(model_name, since, until, every=every) if total else pd.DataFrame()
    if frame.empty:
        raise DataError(
            f"no served rows of model {model_name!r} between {since:%Y-%m-%d %H:%M} and "
            f"{until:%Y-%m-%d %H:%M} UTC ({ref!r}); the service samples served rows at the "
            "monitoring policy's served_sample_rate (MonitoringPolicy block): check that the "
            "model was served in that window and the rate is above 0, or widen the window")
    return frame


# --------------------------------------------------------------------------- retention
def prune_served(retention_days: float | None, max_rows_per_model: int | None,
                 url: str | None = None, now: datetime | None = None) -> int:
    """Delete served rows older than `retention_days` and, per model, all but the newest
    `max_rows_per_model`. Returns the rows deleted (in short transactions of DELETE_CHUNK, so a
    serving service writing beside it waits at most one chunk)."""
    engine = served_engine(url)
    t = served_table.c
    deleted = 0
    if retention_days is not None:
        cutoff = _ms((now or datetime.now(timezone.utc)) - timedelta(days=retention_days))
        deleted += delete_in_chunks(engine, served_table,
                                    lambda n: sa.select(t.id).where(t.served_ms < cutoff).limit(n))
    if max_rows_per_model is not None:
        with engine.connect() as conn:
            counts = conn.execute(sa.select(t.model_name, sa.func.count())
                                  .group_by(t.model_name)).all()
        for model_name, count in counts:
            excess = int(count) - max_rows_per_model
            if excess > 0:
                deleted += delete_in_chunks(
                    engine, served_table, lambda n, m=model_name: sa.select(t.id)
                    .where(t.model_name == m).order_by(t.served_ms, t.id).limit(n), total=excess)
    return deleted


def delete_in_chunks(engine: Engine, table: sa.Table, ids: Any, total: int | None = None) -> int:
    """Delete the rows of `table` whose `id` `ids(n)` selects (at most n ids a call), one write
    transaction per DELETE_CHUNK rows, until none is left or `total` are gone. Returns the rows
    deleted. Short transactions: a service writing beside it waits for one chunk at most."""
    writer = engine.execution_options(ab_write=True)  # BEGIN IMMEDIATE on SQLite (tasks/ab.py)
    deleted = 0
    while total is None or deleted < total:
        n = DELETE_CHUNK if total is None else min(DELETE_CHUNK, total - deleted)
        with writer.begin() as conn:
            chosen = conn.execute(ids(n)).scalars().all()
            if not chosen:
                break
            deleted += conn.execute(sa.delete(table).where(table.c.id.in_(chosen))).rowcount
        if len(chosen) < n:
            break
    return deleted


def served_counts(url: str | None = None) -> dict[str, int]:
    """Served rows per model (the retention report and tests)."""
    engine = served_engine(url)
    t = served_table.c
    with engine.connect() as conn:
        return {m: int(n) for m, n in conn.execute(
            sa.select(t.model_name, sa.func.count()).group_by(t.model_name)).all()}
