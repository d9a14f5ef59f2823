"""The A/B-test store: tests, routed predictions and outcomes in SQL (SQLAlchemy 2.x).

SQLite in the state folder by default, PostgreSQL when an `ABPolicy` block names a URL
(docs/architecture.md). No Prefect import: the flows reach it through tasks/ab_tasks.py.

Tables (schema version 1; `ab_schema_version` says which version a database holds and
:func:`ensure_schema` creates or migrates it the first time a process opens the database):

* ``ab_tests`` -- one row per test: model, the two versions, split, metric, the rules copied from
  the policy at creation, status, conclusion. ``active_model`` equals ``model_name`` while the test
  is active and is NULL afterwards; its UNIQUE constraint makes "one active test per model" hold
  even for two creators racing each other.
* ``ab_units`` -- one row per routed entity key and test: its arm and, once recorded, its outcome.
  Primary key (test, key), so "routed keys" and "keys with an outcome" are distinct keys.
* ``ab_predictions`` -- every prediction (test, arm, version, key, time, prediction, score); a key
  scored three times has three rows here and one in ``ab_units``.
* ``ab_arm_stats`` -- per (test, arm) running sums: routed keys, predictions, outcomes n, sum and
  sum of squares of the outcomes. Updated in the same transaction as every write, so results read
  two rows whatever the size of the log (docs/architecture.md, "SQL aggregation").
* ``ab_snapshots`` -- the running sums after each batch of outcomes (one row per batch), for the
  lift-over-time plot.
* ``ab_batches`` (schema version 2) -- the id and the result of every write of predictions or
  outcomes, inserted in the same transaction as the rows. A write whose COMMIT reached the
  database but whose acknowledgement was lost (a restart, a dropped connection) is retried with the
  same id; the retry finds the id and returns the first result instead of counting the rows again.
  Kept ``BATCH_MEMORY_DAYS`` days (pruned by the writes themselves).

:meth:`ABStore.recount` recomputes the sums from the log with one aggregation over the covering
index ``ab_units_covering (test_pk, arm, outcome)``: the audit of the running sums (and what
`bench/ab.py` compares against).

A write of predictions or outcomes that fails because the database does not answer (a restart, a
connection cut) is retried with its batch id for up to ``ABStore.unavailable_seconds``, then
raises :class:`StoreUnavailableError`; nothing is lost or counted twice either way. Reads (the
test, its sums, the recount, ...) and the first open in a process (engine and schema check) wait
the same way (:func:`until_answered`): tests/test_ab_store_faults.py restarts a private
PostgreSQL under load and under the record-outcomes flow to prove it. Other writes (create,
conclude) are not retried: they fail at once.

Writes on SQLite run in ``BEGIN IMMEDIATE`` transactions (one writer at a time, no lock upgrade
deadlocks) in WAL mode; on PostgreSQL the rows a write reads are locked ``FOR UPDATE`` and the
per-arm sums are updated with ``SET n = n + :d``, so concurrent writers never lose an increment.
Times are stored as integer milliseconds since the Unix epoch (UTC).
"""
from __future__ import annotations

import json
import logging
import math
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import AbstractSet, Any, Callable, Iterable, Iterator, Literal, Sequence, TypeVar

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from tasks.errors import DataError, MlopsError

SCHEMA_VERSION = 2
CHAMPION_ARM, CHALLENGER_ARM = 0, 1
ARM_NAMES = {CHAMPION_ARM: "champion", CHALLENGER_ARM: "challenger"}
ARM_CODES = {v: k for k, v in ARM_NAMES.items()}
MetricType = Literal["conversion", "continuous"]
TEST_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,79}$")
MAX_KEY_CHARS = 200
CHUNK = 5000  # keys per IN (...) lookup: below SQLite's 32,766 bound variables
WRITE_RETRIES = 3
UNAVAILABLE_SECONDS = 30.0  # how long a batch write waits for a database that does not answer
BATCH_MEMORY_DAYS = 7  # how long a batch id is remembered (longer than any client keeps a retry)
_PG_LOCK_KEY = 7_166_353_451  # pg_advisory_xact_lock key serialising schema creation/migration
# errors no wait cures: waiting would only delay their message
_PERMANENT_MARKERS = ("does not exist", "authentication failed", "pg_hba.conf",
                      "permission denied", "no such table", "unable to open database file")
_T = TypeVar("_T")
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- errors
class ABTestError(MlopsError):
    """Base class of A/B-test errors."""


class ABTestNotFoundError(ABTestError, LookupError):
    """No test with that id in the store."""


class ABTestStateError(ABTestError, RuntimeError):
    """The test's state forbids the operation (closed, a second active test, not ready)."""


class ABTestClosedError(ABTestStateError):
    """The test was concluded: no more predictions, outcomes or conclusions."""


class ActiveTestExistsError(ABTestStateError):
    """The model already has an active test."""


class ABTestNotReadyError(ABTestStateError):
    """Guardrails not met: concluding needs force=True."""


class StoreError(ABTestError, RuntimeError):
    """The database cannot be used as an A/B store (schema newer than the code, concurrent
    writers that kept colliding, ...)."""


class StoreUnavailableError(StoreError):
    """The database did not answer for the whole wait (``ABStore.unavailable_seconds``) of a
    batch write, a read or the first open in a process. A batch was not written, or was written
    exactly once (retrying with the same batch id is safe); a read or an open wrote nothing."""


# --------------------------------------------------------------------------- schema
metadata = sa.MetaData()
BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

schema_version_table = sa.Table(
    "ab_schema_version", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at_ms", sa.BigInteger, nullable=False),
)

tests_table = sa.Table(
    "ab_tests", metadata,
    sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("test_id", sa.String(80), nullable=False, unique=True),
    sa.Column("model_name", sa.String(100), nullable=False, index=True),
    sa.Column("active_model", sa.String(100), nullable=True, unique=True),
    sa.Column("champion_version", sa.Integer, nullable=False),
    sa.Column("challenger_version", sa.Integer, nullable=False),
    sa.Column("traffic_split", sa.Float, nullable=False),
    sa.Column("metric_type", sa.String(16), nullable=False),
    sa.Column("higher_is_better", sa.Boolean, nullable=False, default=True),
    sa.Column("seed", sa.String(80), nullable=False),
    sa.Column("min_samples_per_arm", sa.Integer, nullable=False),
    sa.Column("min_duration_days", sa.Float, nullable=False),
    sa.Column("alpha", sa.Float, nullable=False),
    sa.Column("power", sa.Float, nullable=False),
    sa.Column("srm_threshold", sa.Float, nullable=False),
    sa.Column("sequential_tuning", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at_ms", sa.BigInteger, nullable=False),
    sa.Column("concluded_at_ms", sa.BigInteger, nullable=True),
    sa.Column("forced", sa.Boolean, nullable=False, default=False),
    sa.Column("promoted", sa.Boolean, nullable=False, default=False),
    sa.Column("conclusion", sa.Text, nullable=True),
    sa.Column("final_results", sa.Text, nullable=True),
    sa.Column("mlflow_run_id", sa.String(64), nullable=True),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.CheckConstraint("status IN ('active', 'concluded')", name="ab_tests_status"),
    sa.CheckConstraint("traffic_split > 0 AND traffic_split < 1", name="ab_tests_split"),
    sa.CheckConstraint("metric_type IN ('conversion', 'continuous')", name="ab_tests_metric"),
)

arm_stats_table = sa.Table(
    "ab_arm_stats", metadata,
    sa.Column("test_pk", sa.Integer, sa.ForeignKey("ab_tests.pk", ondelete="CASCADE"),
              primary_key=True, autoincrement=False),
    sa.Column("arm", sa.SmallInteger, primary_key=True, autoincrement=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("routed", sa.BigInteger, nullable=False, default=0),
    sa.Column("predictions", sa.BigInteger, nullable=False, default=0),
    sa.Column("n", sa.BigInteger, nullable=False, default=0),
    sa.Column("total", sa.Float, nullable=False, default=0.0),
    sa.Column("total_sq", sa.Float, nullable=False, default=0.0),
    sa.Column("first_prediction_ms", sa.BigInteger, nullable=True),
    sa.Column("last_prediction_ms", sa.BigInteger, nullable=True),
    sa.Column("last_outcome_ms", sa.BigInteger, nullable=True),
)

units_table = sa.Table(
    "ab_units", metadata,
    sa.Column("test_pk", sa.Integer, sa.ForeignKey("ab_tests.pk", ondelete="CASCADE"),
              primary_key=True, autoincrement=False),
    sa.Column("unit_key", sa.String(MAX_KEY_CHARS), primary_key=True),
    sa.Column("arm", sa.SmallInteger, nullable=False),
    sa.Column("first_seen_ms", sa.BigInteger, nullable=False),
    sa.Column("outcome", sa.Float, nullable=True),
    sa.Column("outcome_ms", sa.BigInteger, nullable=True),
    # covers the audit aggregation: per arm count(*), count(outcome), sum(outcome), sum(outcome^2)
    sa.Index("ab_units_covering", "test_pk", "arm", "outcome"),
)

predictions_table = sa.Table(
    "ab_predictions", metadata,
    sa.Column("id", BigInt, primary_key=True, autoincrement=True),
    sa.Column("test_pk", sa.Integer, sa.ForeignKey("ab_tests.pk", ondelete="CASCADE"),
              nullable=False),
    sa.Column("unit_key", sa.String(MAX_KEY_CHARS), nullable=False),
    sa.Column("arm", sa.SmallInteger, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("predicted_ms", sa.BigInteger, nullable=False),
    sa.Column("prediction", sa.String(200), nullable=True),
    sa.Column("score", sa.Float, nullable=True),
)

snapshots_table = sa.Table(
    "ab_snapshots", metadata,
    sa.Column("test_pk", sa.Integer, sa.ForeignKey("ab_tests.pk", ondelete="CASCADE"),
              primary_key=True, autoincrement=False),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    *[sa.Column(f"{arm}_{field}", kind, nullable=False)
      for arm in ("champion", "challenger")
      for field, kind in (("routed", sa.BigInteger), ("n", sa.BigInteger), ("total", sa.Float),
                          ("total_sq", sa.Float))],
)

# no foreign key to ab_tests: a batch id is a uuid, rows of a deleted test are pruned by age
batches_table = sa.Table(
    "ab_batches", metadata,
    sa.Column("test_pk", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("result", sa.Text, nullable=False),
    sa.Column("at_ms", sa.BigInteger, nullable=False),
    sa.Index("ab_batches_age", "test_pk", "at_ms"),
)

TABLES = ("ab_tests", "ab_arm_stats", "ab_units", "ab_predictions", "ab_snapshots",
          "ab_batches", "ab_schema_version")

#: version -> function migrating a database from that version to the next one (same
#: transaction as the version bump).
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: lambda conn: batches_table.create(conn),  # 1 -> 2: batch ids of idempotent writes
}


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class TestRecord:
    """One row of ``ab_tests``."""

    __test__ = False  # not a pytest class

    pk: int
    test_id: str
    model_name: str
    champion_version: int
    challenger_version: int
    traffic_split: float
    metric_type: str
    higher_is_better: bool
    seed: str
    min_samples_per_arm: int
    min_duration_days: float
    alpha: float
    power: float
    srm_threshold: float
    sequential_tuning: float
    status: str
    created_at_ms: int
    concluded_at_ms: int | None
    forced: bool
    promoted: bool
    conclusion: str | None
    final_results: dict | None
    mlflow_run_id: str | None
    description: str

    @property
    def created_at(self) -> datetime:
        return from_ms(self.created_at_ms)

    @property
    def concluded_at(self) -> datetime | None:
        return None if self.concluded_at_ms is None else from_ms(self.concluded_at_ms)

    def version_of(self, arm: str) -> int:
        return self.champion_version if arm == "champion" else self.challenger_version


@dataclass(frozen=True)
class ArmTotals:
    """The running sums of one arm."""

    arm: str
    version: int
    routed: int
    predictions: int
    n: int
    total: float
    total_sq: float
    first_prediction_ms: int | None = None
    last_prediction_ms: int | None = None
    last_outcome_ms: int | None = None


@dataclass(frozen=True)
class OutcomeCounts:
    recorded: int
    duplicates: int
    unknown_keys: int
    conflicting: int
    recorded_by_arm: dict[str, int]


def now_ms() -> int:
    return int(time.time() * 1000)


def to_ms(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def new_test_id(model_slug: str) -> str:
    """`<model-slug>-<yyyymmdd>-<6 hex>`: a valid Prefect artifact key part (lowercase letters,
    digits, dashes) that sorts by creation day."""
    slug = (model_slug[:40].strip("-") or "model")
    return f"{slug}-{datetime.now(timezone.utc):%Y%m%d}-{secrets.token_hex(3)}"


def check_test_id(test_id: Any) -> str:
    if not isinstance(test_id, str) or not TEST_ID_PATTERN.match(test_id):
        raise ABTestNotFoundError(
            f"{test_id!r} is not an A/B test id (ids look like customer-churn-20261105-a1b2c3: "
            "lowercase letters, digits and dashes); list_active_ab_tests() shows the active ones")
    return test_id


# --------------------------------------------------------------------------- engines
_ENGINES: "OrderedDict[str, Engine]" = OrderedDict()
_ENGINES_LOCK = threading.Lock()
_MAX_ENGINES = 8


def _sqlite_engine(url: str) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):  # pragma: no cover - exercised on every connect
        # SQLAlchemy emits BEGIN itself (below): disable the sqlite3 driver's own, which skips
        # SELECTs and DDL (SQLAlchemy docs, "Transactions with SQLite and the sqlite3 driver").
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):  # pragma: no cover - exercised on every transaction
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("ab_write")
                             else "BEGIN")

    return engine


def get_engine(url: str, wait: float | None = None) -> Engine:
    """One engine per URL and process (schema checked once, when it is created).

    The first open waits for a database that does not answer (a restart) for up to `wait`
    seconds (default ``ABStore.unavailable_seconds``), then raises StoreUnavailableError."""
    with _ENGINES_LOCK:
        engine = _ENGINES.get(url)
        if engine is not None:
            _ENGINES.move_to_end(url)
            return engine
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        engine = _sqlite_engine(url)
    elif backend == "postgresql":
        engine = sa.create_engine(url, pool_pre_ping=True)
    else:
        raise StoreError(f"unsupported A/B store URL {make_url(url).render_as_string()!r}: use "
                         "sqlite:///path/ab.db or postgresql+psycopg2://user:pw@host:5432/db")
    shown = make_url(url).render_as_string(hide_password=True)
    try:
        until_answered(
            lambda: ensure_schema(engine), ABStore.unavailable_seconds if wait is None else wait,
            f"opening the A/B store {shown} (schema check)",
            lambda waited, cause: (
                f"cannot open the A/B store at {shown}: it did not answer for {waited:.0f} s "
                f"({cause}); nothing was written. Check that the database server is up and that "
                "the URL (ABPolicy block) is right, then run the call again"))
    except OperationalError as exc:  # not a wait: a missing database, a refused password, ...
        engine.dispose()
        raise StoreError(f"cannot open the A/B store at {shown}: {exc.orig}") from exc
    except Exception:
        engine.dispose()
        raise
    with _ENGINES_LOCK:
        _ENGINES[url] = engine
        while len(_ENGINES) > _MAX_ENGINES:
            _, old = _ENGINES.popitem(last=False)
            old.dispose()
    return engine


def dispose_engines() -> None:
    """Close every cached engine (tests and benchmarks that drop databases call this)."""
    with _ENGINES_LOCK:
        while _ENGINES:
            _, engine = _ENGINES.popitem()
            engine.dispose()


@contextmanager
def schema_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that alone, among all processes, creates or migrates tables of this database:
    a PostgreSQL advisory lock, SQLite's write lock. Two PostgreSQL sessions running the same
    CREATE TABLE at once fail one of them (a unique violation in pg_type, even with IF NOT
    EXISTS): the service's workers start at the same moment on a fresh store."""
    with engine.execution_options(ab_write=True).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        yield conn


def ensure_schema(engine: Engine) -> int:
    """Create the tables on an empty database, migrate an older one; returns the version.
    Serialised between processes (schema_transaction)."""
    with schema_transaction(engine) as conn:
        if not sa.inspect(conn).has_table("ab_schema_version"):
            metadata.create_all(conn)
            conn.execute(sa.insert(schema_version_table).values(
                id=1, version=SCHEMA_VERSION, updated_at_ms=now_ms()))
            return SCHEMA_VERSION
        current = conn.execute(sa.select(schema_version_table.c.version)
                               .where(schema_version_table.c.id == 1)).scalar_one()
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"the A/B store holds schema version {current}, newer than this code's "
                f"{SCHEMA_VERSION}: upgrade mlops-flows (never downgrade a shared store)")
        for version in range(current, SCHEMA_VERSION):
            MIGRATIONS[version](conn)
            conn.execute(sa.update(schema_version_table).where(schema_version_table.c.id == 1)
                         .values(version=version + 1, updated_at_ms=now_ms()))
        return SCHEMA_VERSION


# --------------------------------------------------------------------------- waiting
def unanswered(exc: BaseException) -> bool:
    """Whether a database error means "the server does not answer now": a refused or cut
    connection, "the database system is starting up" / "is shutting down", a session ended by a
    restart. A missing database or table, a refused password are not: no wait cures them."""
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    text = str(exc.orig or exc).lower()
    return not any(marker in text for marker in _PERMANENT_MARKERS)


def until_answered(attempt: Callable[[], _T], seconds: float, doing: str,
                   failure: Callable[[float, str], str]) -> _T:
    """`attempt()`, run again while the database does not answer (:func:`unanswered`), with
    pauses growing from 0.1 s to 1 s, for up to `seconds`; then StoreUnavailableError with
    `failure(waited seconds, cause)` as its message. `attempt` must be safe to run again: a
    read, a transaction that rolled back, a batch write that replays its batch id."""
    waited_since, pause = None, 0.1
    while True:
        try:
            return attempt()
        except (OperationalError, InterfaceError) as exc:
            if not unanswered(exc):
                raise
            cause = (f"{type(exc.orig or exc).__name__}: "
                     f"{' '.join(str(exc.orig or exc).split())[:200]}")
            if waited_since is None:
                waited_since = time.monotonic()
                log.warning("%s: the database does not answer (%s); retrying for up to %.0f s",
                            doing, cause, seconds)
            waited = time.monotonic() - waited_since
            if waited >= seconds:
                raise StoreUnavailableError(failure(waited, cause)) from exc
            time.sleep(min(pause, max(0.0, seconds - waited)))
            pause = min(pause * 2, 1.0)


# --------------------------------------------------------------------------- helpers
def _chunks(seq: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


def _as_bool(value: Any) -> bool:
    return bool(value) if value is not None else False


def _record(row: Any) -> TestRecord:
    m = row._mapping
    return TestRecord(
        pk=int(m["pk"]), test_id=m["test_id"], model_name=m["model_name"],
        champion_version=int(m["champion_version"]), challenger_version=int(m["challenger_version"]),
        traffic_split=float(m["traffic_split"]), metric_type=m["metric_type"],
        higher_is_better=_as_bool(m["higher_is_better"]), seed=m["seed"],
        min_samples_per_arm=int(m["min_samples_per_arm"]),
        min_duration_days=float(m["min_duration_days"]), alpha=float(m["alpha"]),
        power=float(m["power"]), srm_threshold=float(m["srm_threshold"]),
        sequential_tuning=float(m["sequential_tuning"]), status=m["status"],
        created_at_ms=int(m["created_at_ms"]),
        concluded_at_ms=None if m["concluded_at_ms"] is None else int(m["concluded_at_ms"]),
        forced=_as_bool(m["forced"]), promoted=_as_bool(m["promoted"]),
        conclusion=m["conclusion"],
        final_results=json.loads(m["final_results"]) if m["final_results"] else None,
        mlflow_run_id=m["mlflow_run_id"], description=m["description"] or "")


def _totals(row: Any) -> ArmTotals:
    m = row._mapping
    return ArmTotals(arm=ARM_NAMES[int(m["arm"])], version=int(m["version"]),
                     routed=int(m["routed"]), predictions=int(m["predictions"]), n=int(m["n"]),
                     total=float(m["total"]), total_sq=float(m["total_sq"]),
                     first_prediction_ms=m["first_prediction_ms"],
                     last_prediction_ms=m["last_prediction_ms"],
                     last_outcome_ms=m["last_outcome_ms"])


def _insert(conn: Connection, table: sa.Table):
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


_SQLITE_ROUTE = ("INSERT INTO ab_units (test_pk, unit_key, arm, first_seen_ms) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT DO NOTHING")
_SQLITE_LOG = ("INSERT INTO ab_predictions (test_pk, unit_key, arm, version, predicted_ms, "
               "prediction, score) VALUES (?, ?, ?, ?, ?, ?, ?)")


class _Collision(Exception):
    """A concurrent writer changed rows between our read and our write: retry the transaction."""


@dataclass(frozen=True)
class _Batch:
    """The identity of one write of predictions or outcomes (see ``ab_batches``)."""

    test_pk: int
    batch_id: str
    kind: str
    encode: Callable[[Any], dict]
    decode: Callable[[dict], Any]

    def replay(self, conn: Connection) -> Any | None:
        """The result of this batch if it was committed before, else None."""
        b = batches_table.c
        stored = conn.execute(sa.select(b.result).where(
            b.test_pk == self.test_pk, b.batch_id == self.batch_id)).scalar()
        return None if stored is None else self.decode(json.loads(stored))

    def record(self, conn: Connection, result: Any) -> None:
        b = batches_table.c
        at = now_ms()
        conn.execute(sa.insert(batches_table).values(
            test_pk=self.test_pk, batch_id=self.batch_id, kind=self.kind,
            result=json.dumps(self.encode(result)), at_ms=at))
        conn.execute(sa.delete(batches_table).where(
            b.test_pk == self.test_pk, b.at_ms < at - BATCH_MEMORY_DAYS * 86_400_000))


def _check_batch_id(batch_id: str | None) -> str:
    if batch_id is None:
        return uuid.uuid4().hex
    if not isinstance(batch_id, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", batch_id):
        raise DataError(f"batch id {str(batch_id)[:80]!r} is not valid: 1 to 64 letters, digits "
                        "or _.:- (a uuid4 hex works)")
    return batch_id


# --------------------------------------------------------------------------- the store
class ABStore:
    """The A/B tables in one database. Cheap to construct: engines are cached per URL."""

    #: how long a batch write, a read or the first open waits for a database that does not
    #: answer (a restart) before StoreUnavailableError; per store, or here for every store
    unavailable_seconds: float = UNAVAILABLE_SECONDS

    def __init__(self, url: str):
        from blocks.ab_policy import normalise_database_url

        self.url = normalise_database_url(url)
        self.engine = get_engine(self.url, wait=self.unavailable_seconds)
        self._writer = self.engine.execution_options(ab_write=True)

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def describe(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def _read(self, what: str, work: Callable[[Connection], _T]) -> _T:
        """`work(conn)` on a fresh connection, run again while the database does not answer
        (a restart) for up to `unavailable_seconds`."""
        def attempt() -> _T:
            with self.engine.connect() as conn:
                return work(conn)

        return until_answered(
            attempt, self.unavailable_seconds, f"reading {what} from {self.describe()}",
            lambda waited, cause: (
                f"the A/B store {self.describe()} did not answer for {waited:.0f} s while reading "
                f"{what} ({cause}); nothing was written. Check that the database server is up and "
                "that the URL (ABPolicy block) is right, then run the call again: outcomes "
                "recorded before count as duplicates, never twice"))

    def _write(self, work: Callable[[Connection], Any], batch: _Batch | None = None) -> Any:
        """Run `work` in one write transaction, retried when a concurrent writer collided.

        With a `batch`, also retried while the database does not answer (for up to
        `unavailable_seconds`): the batch id is recorded in the same transaction, so a retry of
        a write that did commit returns the first result and writes nothing."""
        if batch is None:
            return self._write_once(work, None)
        return until_answered(
            lambda: self._write_once(work, batch), self.unavailable_seconds,
            f"writing batch {batch.batch_id} of {batch.kind} to {self.describe()}",
            lambda waited, cause: (
                f"the A/B store {self.describe()} did not answer for {waited:.0f} s ({cause}); "
                f"batch {batch.batch_id} of {batch.kind} was not written or was written once: "
                "retry with the same batch id once the database is back (check that it runs and "
                "that the URL of the ABPolicy block is right)"))

    def _write_once(self, work: Callable[[Connection], Any], batch: _Batch | None) -> Any:
        collisions = 0
        while True:
            try:
                with self._writer.begin() as conn:
                    if batch is not None:
                        done = batch.replay(conn)
                        if done is not None:
                            return done
                    result = work(conn)
                    if batch is not None:
                        batch.record(conn, result)
                    return result
            except _Collision:
                collisions += 1
                if collisions == WRITE_RETRIES:
                    raise StoreError("concurrent writers kept changing the same A/B test rows; "
                                     "nothing was written, retry the call") from None
                time.sleep(0.05 * collisions)
            except IntegrityError:
                if batch is None:
                    raise
                collisions += 1  # the same batch id committed by a concurrent replay: replay it
                if collisions == WRITE_RETRIES:
                    raise

    # ---------------------------------------------------------------- tests
    def create_test(self, *, model_name: str, champion_version: int, challenger_version: int,
                    traffic_split: float, metric_type: str, higher_is_better: bool,
                    min_samples_per_arm: int, min_duration_days: float, alpha: float,
                    power: float, srm_threshold: float, sequential_tuning: float,
                    test_id: str, description: str = "", created_at_ms: int | None = None
                    ) -> TestRecord:
        """Insert an active test and its two arm rows; ActiveTestExistsError if the model has one.

        The routing seed is `<model>#<n>` for the model's n-th test in this store, not the random
        test id: a fresh store replays the same traffic into the same arms (the main job prints
        the same A/B figures on every run), while each new test of a model still reshuffles who
        sees the challenger."""
        check_test_id(test_id)
        created = created_at_ms if created_at_ms is not None else now_ms()

        def work(conn: Connection) -> int:
            earlier = conn.execute(sa.select(sa.func.count()).select_from(tests_table).where(
                tests_table.c.model_name == model_name)).scalar_one()
            seed = f"{model_name[:70]}#{earlier + 1}"  # the routing-seed column holds 80 characters
            pk = conn.execute(sa.insert(tests_table).values(
                test_id=test_id, model_name=model_name, active_model=model_name,
                champion_version=int(champion_version), challenger_version=int(challenger_version),
                traffic_split=float(traffic_split), metric_type=metric_type,
                higher_is_better=bool(higher_is_better), seed=seed,
                min_samples_per_arm=int(min_samples_per_arm),
                min_duration_days=float(min_duration_days), alpha=float(alpha), power=float(power),
                srm_threshold=float(srm_threshold), sequential_tuning=float(sequential_tuning),
                status="active", created_at_ms=created, forced=False, promoted=False,
                description=description or "")).inserted_primary_key[0]
            conn.execute(sa.insert(arm_stats_table), [
                {"test_pk": pk, "arm": arm, "version": int(v), "routed": 0, "predictions": 0,
                 "n": 0, "total": 0.0, "total_sq": 0.0}
                for arm, v in ((CHAMPION_ARM, champion_version),
                               (CHALLENGER_ARM, challenger_version))])
            return pk

        try:
            self._write(work)
        except IntegrityError:
            active = self.active_test(model_name)
            if active is not None:
                raise ActiveTestExistsError(
                    f"model {model_name!r} already has an active A/B test {active.test_id!r} "
                    f"(v{active.champion_version} vs v{active.challenger_version}); conclude it "
                    "with conclude_ab_test first (one active test per model)") from None
            raise
        return self.get_test(test_id)

    def get_test(self, test_id: str) -> TestRecord:
        check_test_id(test_id)
        row = self._read(f"A/B test {test_id}", lambda conn: conn.execute(
            sa.select(tests_table).where(tests_table.c.test_id == test_id)).first())
        if row is None:
            active = [t.test_id for t in self.list_tests(status="active")][:10]
            raise ABTestNotFoundError(
                f"no A/B test {test_id!r} in the store {self.describe()}; active tests: "
                f"{', '.join(active) or 'none'}")
        return _record(row)

    def active_test(self, model_name: str) -> TestRecord | None:
        row = self._read(f"the active A/B test of {model_name!r}", lambda conn: conn.execute(
            sa.select(tests_table).where(tests_table.c.active_model == model_name)).first())
        return None if row is None else _record(row)

    def list_tests(self, model_name: str | None = None, status: str | None = "active"
                   ) -> list[TestRecord]:
        query = sa.select(tests_table).order_by(tests_table.c.created_at_ms.desc(),
                                                tests_table.c.pk.desc())
        if model_name is not None:
            query = query.where(tests_table.c.model_name == model_name)
        if status is not None:
            query = query.where(tests_table.c.status == status)
        return self._read("the list of A/B tests",
                          lambda conn: [_record(r) for r in conn.execute(query)])

    def arm_totals(self, test: TestRecord) -> dict[str, ArmTotals]:
        """The running sums: two primary-key rows, whatever the size of the log."""
        rows = self._read(f"the arm totals of A/B test {test.test_id}", lambda conn: conn.execute(
            sa.select(arm_stats_table).where(arm_stats_table.c.test_pk == test.pk)).all())
        return {t.arm: t for t in map(_totals, rows)}

    def state(self, test_id: str) -> tuple[TestRecord, dict[str, ArmTotals]]:
        """The test and its running sums read in one transaction (a consistent pair)."""
        check_test_id(test_id)

        def work(conn: Connection) -> tuple[Any, list[Any]]:
            with conn.begin():
                row = conn.execute(sa.select(tests_table)
                                   .where(tests_table.c.test_id == test_id)).first()
                if row is None:
                    return None, []
                return row, conn.execute(sa.select(arm_stats_table).where(
                    arm_stats_table.c.test_pk == row._mapping["pk"])).all()

        row, rows = self._read(f"A/B test {test_id} and its arm totals", work)
        if row is None:
            return self.get_test(test_id), {}  # raises the not-found error
        return _record(row), {t.arm: t for t in map(_totals, rows)}

    def _require_active(self, conn: Connection, test: TestRecord, lock: bool = True) -> None:
        query = sa.select(tests_table.c.status, tests_table.c.concluded_at_ms).where(
            tests_table.c.pk == test.pk)
        if lock and conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None or row.status != "active":
            when = (f" at {from_ms(row.concluded_at_ms):%Y-%m-%d %H:%M} UTC"
                    if row is not None and row.concluded_at_ms else "")
            raise ABTestClosedError(
                f"A/B test {test.test_id!r} was concluded{when}: it takes no more predictions or "
                "outcomes; create a new test with create_ab_test")

    # ---------------------------------------------------------------- predictions
    def log_predictions(self, test: TestRecord, keys: Sequence[str], arms: Sequence[int],
                        predictions: Sequence[str | None], scores: Sequence[float | None],
                        times_ms: Sequence[int], batch_id: str | None = None,
                        routed: AbstractSet[str] = frozenset()) -> dict[str, int]:
        """Log every prediction and route new keys, in one transaction.

        `arms` are 0 (champion) / 1 (challenger) per row, as routed by the caller; a key already
        routed keeps its first arm (sticky). Returns the number of newly routed keys per arm.
        `batch_id` names these rows: a second call with the same id writes nothing and returns
        the first call's result (give the same id when retrying the same rows; one is made up
        when None). `routed`: keys the caller saw this store route in this test before (no
        routing insert for them: the online log of a pool of returning users).
        """
        batch = _Batch(test.pk, _check_batch_id(batch_id), "predictions", dict, dict)
        n = len(keys)
        if not (len(arms) == len(predictions) == len(scores) == len(times_ms) == n):
            raise ValueError("keys, arms, predictions, scores and times_ms must have equal lengths")
        too_long = [k for k in keys if len(k) > MAX_KEY_CHARS]
        if too_long:
            raise DataError(f"{len(too_long)} ids are longer than {MAX_KEY_CHARS} characters "
                            f"(e.g. {too_long[0][:40]!r}...); use shorter entity ids")
        arms = [int(a) for a in arms]
        versions = {CHAMPION_ARM: test.champion_version, CHALLENGER_ARM: test.challenger_version}
        first_seen: dict[str, tuple[int, int]] = {}
        for k, a, t in zip(keys, arms, times_ms):
            if k not in first_seen and k not in routed:
                first_seen[k] = (a, int(t))
        unit_rows = [{"test_pk": test.pk, "unit_key": k, "arm": a, "first_seen_ms": t}
                     for k, (a, t) in first_seen.items()]
        pred_rows = [(test.pk, k, a, versions[a], int(t), None if p is None else str(p)[:200],
                      None if s is None or (isinstance(s, float) and math.isnan(s)) else float(s))
                     for k, a, p, s, t in zip(keys, arms, predictions, scores, times_ms)]
        per_arm_predictions = {a: arms.count(a) for a in (CHAMPION_ARM, CHALLENGER_ARM)}
        t_min = int(min(times_ms)) if n else None
        t_max = int(max(times_ms)) if n else None

        def work(conn: Connection) -> dict[str, int]:
            self._require_active(conn, test)
            new = {CHAMPION_ARM: 0, CHALLENGER_ARM: 0}
            if conn.dialect.name == "sqlite":
                # the driver's executemany on plain tuples: SQLAlchemy's per-row parameter
                # processing was about half the CPU of a serving flush (cProfile); the driver
                # sums the rows an executemany inserted, so one per arm counts the new keys
                for arm in (CHAMPION_ARM, CHALLENGER_ARM):
                    rows = [(test.pk, r["unit_key"], arm, r["first_seen_ms"])
                            for r in unit_rows if r["arm"] == arm]
                    if rows:
                        new[arm] = conn.exec_driver_sql(_SQLITE_ROUTE, rows).rowcount
                conn.exec_driver_sql(_SQLITE_LOG, pred_rows)
            else:
                stmt = (_insert(conn, units_table).on_conflict_do_nothing()
                        .returning(units_table.c.arm))
                for chunk in _chunks(unit_rows, 20_000):
                    for (arm,) in conn.execute(stmt, list(chunk)):
                        new[int(arm)] += 1
                columns = ("test_pk", "unit_key", "arm", "version", "predicted_ms", "prediction",
                           "score")
                for chunk in _chunks(pred_rows, 50_000):
                    conn.execute(sa.insert(predictions_table),
                                 [dict(zip(columns, row)) for row in chunk])
            s = arm_stats_table.c
            for arm in (CHAMPION_ARM, CHALLENGER_ARM):
                if not (new[arm] or per_arm_predictions[arm]):
                    continue
                conn.execute(sa.update(arm_stats_table)
                             .where(s.test_pk == test.pk, s.arm == arm)
                             .values(routed=s.routed + new[arm],
                                     predictions=s.predictions + per_arm_predictions[arm],
                                     first_prediction_ms=sa.func.coalesce(s.first_prediction_ms, t_min),
                                     last_prediction_ms=sa.case(
                                         (s.last_prediction_ms.is_(None), t_max),
                                         (s.last_prediction_ms < t_max, t_max),
                                         else_=s.last_prediction_ms)))
            return {ARM_NAMES[a]: c for a, c in new.items()}

        if n == 0:
            return {"champion": 0, "challenger": 0}
        return self._write(work, batch)

    # ---------------------------------------------------------------- outcomes
    def record_outcomes(self, test: TestRecord, keys: Sequence[str], values: Sequence[float],
                        times_ms: Sequence[int], batch_id: str | None = None) -> OutcomeCounts:
        """Join outcomes to routed keys; one transaction.

        Per row: a key never routed in this test -> unknown; a key whose stored outcome equals the
        value (or that repeats an earlier row of this batch) -> duplicate; a key whose stored
        outcome differs, or that appears with different values within the batch -> conflicting
        (rejected); otherwise recorded. recorded + duplicates + unknown + conflicting = rows.
        `batch_id` as in :meth:`log_predictions`: a retry returns the first call's counts.
        """
        batch = _Batch(test.pk, _check_batch_id(batch_id), "outcomes", asdict,
                       lambda d: OutcomeCounts(**d))
        keys = list(keys)
        vals = np.asarray(values, dtype=float)
        times = [int(t) for t in times_ms]
        if not (len(keys) == len(vals) == len(times)):
            raise ValueError("keys, values and times_ms must have equal lengths")
        batch_values: dict[str, set[float]] = {}
        for k, v in zip(keys, vals.tolist()):
            batch_values.setdefault(k, set()).add(v)
        unique_keys = list(batch_values)

        def work(conn: Connection) -> OutcomeCounts:
            self._require_active(conn, test)
            existing: dict[str, tuple[int, float | None]] = {}
            u = units_table.c
            for chunk in _chunks(unique_keys):
                query = sa.select(u.unit_key, u.arm, u.outcome).where(
                    u.test_pk == test.pk, u.unit_key.in_(list(chunk)))
                if conn.dialect.name == "postgresql":
                    query = query.with_for_update()
                for key, arm, outcome in conn.execute(query):
                    existing[key] = (int(arm), None if outcome is None else float(outcome))
            recorded = duplicates = unknown = conflicting = 0
            to_write: dict[str, tuple[float, int, int]] = {}
            for k, v, t in zip(keys, vals.tolist(), times):
                if k not in existing:
                    unknown += 1
                    continue
                arm, stored = existing[k]
                if stored is not None:
                    if stored == v:
                        duplicates += 1
                    else:
                        conflicting += 1
                elif len(batch_values[k]) > 1:
                    conflicting += 1
                elif k in to_write:
                    duplicates += 1
                else:
                    to_write[k] = (v, t, arm)
                    recorded += 1
            by_arm = {CHAMPION_ARM: [0, 0.0, 0.0], CHALLENGER_ARM: [0, 0.0, 0.0]}
            if to_write:
                stmt = (sa.update(units_table)
                        .where(u.test_pk == sa.bindparam("p"), u.unit_key == sa.bindparam("k"),
                               u.outcome.is_(None))
                        .values(outcome=sa.bindparam("v"), outcome_ms=sa.bindparam("t")))
                rows = [{"p": test.pk, "k": k, "v": v, "t": t} for k, (v, t, _) in to_write.items()]
                changed = 0
                for chunk in _chunks(rows, 50_000):
                    changed += conn.execute(stmt, list(chunk)).rowcount
                if changed != len(rows):
                    raise _Collision()
                for v, _, arm in to_write.values():
                    acc = by_arm[arm]
                    acc[0] += 1
                    acc[1] += v
                    acc[2] += v * v
                last = max(t for _, t, _ in to_write.values())
                s = arm_stats_table.c
                for arm, (cnt, tot, tot_sq) in by_arm.items():
                    if not cnt:
                        continue
                    conn.execute(sa.update(arm_stats_table)
                                 .where(s.test_pk == test.pk, s.arm == arm)
                                 .values(n=s.n + cnt, total=s.total + tot,
                                         total_sq=s.total_sq + tot_sq,
                                         last_outcome_ms=sa.case(
                                             (s.last_outcome_ms.is_(None), last),
                                             (s.last_outcome_ms < last, last),
                                             else_=s.last_outcome_ms)))
                self._snapshot(conn, test, at_ms=last)
            return OutcomeCounts(recorded, duplicates, unknown, conflicting,
                                 {ARM_NAMES[a]: int(acc[0]) for a, acc in by_arm.items()})

        if not keys:
            return OutcomeCounts(0, 0, 0, 0, {"champion": 0, "challenger": 0})
        return self._write(work, batch)

    def _snapshot(self, conn: Connection, test: TestRecord, at_ms: int) -> None:
        rows = {ARM_NAMES[int(r.arm)]: r for r in conn.execute(
            sa.select(arm_stats_table).where(arm_stats_table.c.test_pk == test.pk))}
        seq = conn.execute(sa.select(sa.func.coalesce(sa.func.max(snapshots_table.c.seq), 0))
                           .where(snapshots_table.c.test_pk == test.pk)).scalar_one() + 1
        values = {"test_pk": test.pk, "seq": seq, "at_ms": int(at_ms)}
        for arm, r in rows.items():
            values.update({f"{arm}_routed": r.routed, f"{arm}_n": r.n, f"{arm}_total": r.total,
                           f"{arm}_total_sq": r.total_sq})
        conn.execute(sa.insert(snapshots_table).values(**values))

    def snapshots(self, test: TestRecord, max_points: int = 400) -> list[dict[str, Any]]:
        """The running sums after each outcome batch, thinned to at most ~`max_points` rows
        (every k-th batch plus the last) so reading them stays bounded."""
        sn = snapshots_table.c

        def work(conn: Connection) -> list[dict[str, Any]]:
            last = conn.execute(sa.select(sa.func.max(sn.seq)).where(sn.test_pk == test.pk)).scalar()
            if not last:
                return []
            step = max(1, math.ceil(last / max_points))
            query = sa.select(snapshots_table).where(sn.test_pk == test.pk)
            if step > 1:
                query = query.where(sa.or_(sn.seq % step == 0, sn.seq == last))
            return [dict(r._mapping) for r in conn.execute(query.order_by(sn.seq))]

        return self._read(f"the snapshots of A/B test {test.test_id}", work)

    # ---------------------------------------------------------------- conclusion
    def close_test(self, test: TestRecord, *, forced: bool, conclusion: str,
                   final_results: dict, promoted: bool = False) -> TestRecord:
        """Mark the test concluded (compare-and-set on status: a second concluder fails)."""
        t = tests_table.c

        def work(conn: Connection) -> None:
            changed = conn.execute(
                sa.update(tests_table).where(t.pk == test.pk, t.status == "active")
                .values(status="concluded", active_model=None, concluded_at_ms=now_ms(),
                        forced=bool(forced), promoted=bool(promoted), conclusion=conclusion,
                        final_results=json.dumps(final_results, default=str))).rowcount
            if changed != 1:
                raise ABTestClosedError(f"A/B test {test.test_id!r} was already concluded")

        self._write(work)
        return self.get_test(test.test_id)

    def update_conclusion(self, test: TestRecord, *, promoted: bool, conclusion: str,
                          final_results: dict) -> TestRecord:
        self._write(lambda conn: conn.execute(
            sa.update(tests_table).where(tests_table.c.pk == test.pk)
            .values(promoted=bool(promoted), conclusion=conclusion,
                    final_results=json.dumps(final_results, default=str))))
        return self.get_test(test.test_id)

    def reopen_test(self, test: TestRecord) -> None:
        """Undo close_test (used when the promotion that followed it failed)."""
        self._write(lambda conn: conn.execute(
            sa.update(tests_table).where(tests_table.c.pk == test.pk)
            .values(status="active", active_model=test.model_name, concluded_at_ms=None,
                    forced=False, promoted=False, conclusion=None, final_results=None)))

    def set_mlflow_run(self, test: TestRecord, run_id: str) -> None:
        self._write(lambda conn: conn.execute(
            sa.update(tests_table).where(tests_table.c.pk == test.pk,
                                         tests_table.c.mlflow_run_id.is_(None))
            .values(mlflow_run_id=run_id)))

    # ---------------------------------------------------------------- audit
    def recount(self, test: TestRecord, predictions: bool = True) -> dict[str, dict[str, float]]:
        """Per-arm sums recomputed from the log by SQL aggregation over the covering index
        (never loads the log into Python): routed keys, n, total, total_sq, and (unless
        `predictions=False`) the prediction count, which scans ``ab_predictions``."""
        u, p = units_table.c, predictions_table.c

        def work(conn: Connection) -> tuple[list[Any], dict[int, int]]:
            rows = conn.execute(
                sa.select(u.arm, sa.func.count(), sa.func.count(u.outcome),
                          sa.func.coalesce(sa.func.sum(u.outcome), 0.0),
                          sa.func.coalesce(sa.func.sum(u.outcome * u.outcome), 0.0))
                .where(u.test_pk == test.pk).group_by(u.arm)).all()
            preds = dict(conn.execute(sa.select(p.arm, sa.func.count()).where(p.test_pk == test.pk)
                                      .group_by(p.arm)).all()) if predictions else {}
            return rows, preds

        rows, preds = self._read(f"the recount of A/B test {test.test_id}", work)
        out = {name: {"routed": 0, "n": 0, "total": 0.0, "total_sq": 0.0,
                      "predictions": int(preds.get(code, 0))} for code, name in ARM_NAMES.items()}
        for arm, routed, n, total, total_sq in rows:
            out[ARM_NAMES[int(arm)]].update(routed=int(routed), n=int(n), total=float(total),
                                            total_sq=float(total_sq))
        return out

    def rebuild_arm_stats(self, test: TestRecord) -> dict[str, dict[str, float]]:
        """Reset the running sums to :meth:`recount` (repair after a manual edit of the log, or
        after a bulk load that bypassed the store) and add a snapshot of them."""
        counts = self.recount(test)
        s = arm_stats_table.c

        def work(conn: Connection) -> None:
            for name, c in counts.items():
                conn.execute(sa.update(arm_stats_table)
                             .where(s.test_pk == test.pk, s.arm == ARM_CODES[name])
                             .values(routed=c["routed"], n=c["n"], total=c["total"],
                                     total_sq=c["total_sq"], predictions=c["predictions"]))
            self._snapshot(conn, test, at_ms=now_ms())

        self._write(work)
        return counts

    def row_counts(self) -> dict[str, int]:
        """Rows per A/B table (tests use it to prove a refused call changed nothing)."""
        return self._read("the row counts", lambda conn: {
            name: int(conn.execute(sa.select(sa.func.count()).select_from(
                metadata.tables[name])).scalar_one()) for name in TABLES})

    def fingerprint(self) -> dict[str, Any]:
        """Row counts plus the mutable columns of tests and arm sums: equal before and after a
        refused call."""
        def work(conn: Connection) -> tuple[list[tuple], list[tuple]]:
            tests = [tuple(r) for r in conn.execute(
                sa.select(tests_table.c.test_id, tests_table.c.status, tests_table.c.active_model,
                          tests_table.c.promoted, tests_table.c.forced)
                .order_by(tests_table.c.pk))]
            arms = [tuple(r) for r in conn.execute(
                sa.select(arm_stats_table).order_by(arm_stats_table.c.test_pk,
                                                    arm_stats_table.c.arm))]
            return tests, arms

        tests, arms = self._read("the fingerprint", work)
        return {"rows": self.row_counts(), "tests": tests, "arms": arms}


def open_store(url: str | None = None) -> ABStore:
    """The store at `url`, else the one the policy in force names (SQLite in the state folder
    when no `ABPolicy` document is saved)."""
    if url is None:
        from blocks.ab_policy import resolve_ab_policy

        url = resolve_ab_policy().store_url()
    return ABStore(url)
