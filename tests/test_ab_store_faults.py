"""Fault 4: PostgreSQL restarts while online predictions are logged and outcomes recorded.

A private cluster (initdb + pg_ctl, its own port, tests/servers.py) is restarted for real with
`pg_ctl restart -m fast` and `-m immediate`; one COMMIT acknowledgement is cut on its way back to
the client (the commit took effect, the client sees an error: what a restart at the wrong moment
does). The audit after each: rows answered = rows in the store, `recount()` equals the running
sums, every outcome counted once and reported once. The same faults hit the real
`record-outcomes` flow (its reads, its write, a first open), and a database that stays away
fails it with StoreUnavailableError, having written nothing. Bounded: about a minute in all.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from glob import glob

import pandas as pd
import pytest

from blocks.ab_policy import ABPolicy
from blocks.mlflow_config import DEFAULT_DOCUMENT
from flows.ab_testing import record_outcomes
from tasks.ab import ABStore, StoreUnavailableError, dispose_engines
from tasks.prediction_log import PredictionLog

from tests.servers import CommitAckCutter, PrivatePostgres, free_port

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def private_pg():
    if not (shutil.which("pg_ctl") or glob("/usr/lib/postgresql/*/bin/pg_ctl")):
        if os.environ.get("MLOPS_REQUIRE_POSTGRES") == "1":
            pytest.fail("no PostgreSQL server binaries (pg_ctl) but MLOPS_REQUIRE_POSTGRES=1")
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) to start a private cluster")
    pg = PrivatePostgres(free_port()).start()
    try:
        yield pg
    finally:
        dispose_engines()
        pg.close()


def new_test(store: ABStore):
    return store.create_test(
        model_name="m", champion_version=1, challenger_version=2, traffic_split=0.5,
        metric_type="conversion", higher_is_better=True, min_samples_per_arm=10,
        min_duration_days=0.0, alpha=0.05, power=0.8, srm_threshold=0.001,
        sequential_tuning=10_000, test_id=f"m-20260101-{uuid.uuid4().hex[:6]}")


def assert_audit(store: ABStore, test) -> dict:
    """recount() (aggregation of the log) equals the running sums, field by field."""
    recount, sums = store.recount(test), store.arm_totals(test)
    for arm, counted in recount.items():
        kept = sums[arm]
        assert (kept.routed, kept.predictions, kept.n) == (
            counted["routed"], counted["predictions"], counted["n"]), arm
        assert kept.total == pytest.approx(counted["total"])
        assert kept.total_sq == pytest.approx(counted["total_sq"])
    return {k: sum(v[k] for v in recount.values()) for k in ("routed", "predictions", "n")}


def test_a_lost_commit_acknowledgement_is_not_counted_twice(private_pg):
    """The commit reaches the database, its answer does not (connection cut, then a restart):
    the store retries with the batch id, finds it, and returns the first result."""
    cutter = CommitAckCutter(private_pg.port, on_cut=lambda: private_pg.restart("fast"))
    try:
        store = ABStore(private_pg.create_database(f"faults_ack_{uuid.uuid4().hex[:6]}")
                        .replace(f":{private_pg.port}/", f":{cutter.port}/"))
        test = new_test(store)
        keys = [f"k{i}" for i in range(100)]
        cutter.armed.set()
        routed = store.log_predictions(test, keys, [i % 2 for i in range(100)], ["1"] * 100,
                                       [0.5] * 100, [1] * 100)
        assert cutter.cuts == 1 and routed == {"champion": 50, "challenger": 50}
        assert assert_audit(store, test) == {"routed": 100, "predictions": 100, "n": 0}

        cutter.armed.set()
        counts = store.record_outcomes(test, keys[:40], [1.0] * 40, [2] * 40, batch_id="b-1")
        assert cutter.cuts == 2
        # the first call's counts, not "40 duplicates" as a plain re-run would report
        assert (counts.recorded, counts.duplicates) == (40, 0)
        before = store.fingerprint()
        again = store.record_outcomes(test, keys[:40], [1.0] * 40, [2] * 40, batch_id="b-1")
        assert again == counts and store.fingerprint() == before
        assert assert_audit(store, test) == {"routed": 100, "predictions": 100, "n": 40}
    finally:
        cutter.close()


def test_restarts_under_load_lose_nothing_and_count_nothing_twice(private_pg):
    """A serving-like writer (PredictionLog, flushing every 20 ms) and an outcome client run
    while the database restarts four times (fast and immediate) and one acknowledgement is cut."""
    cutter = CommitAckCutter(private_pg.port)
    store = ABStore(private_pg.create_database(f"faults_load_{uuid.uuid4().hex[:6]}")
                    .replace(f":{private_pg.port}/", f":{cutter.port}/"))
    test = new_test(store)
    known = [f"u{i}" for i in range(2000)]  # routed before the load: outcomes join to them
    store.log_predictions(test, known, [i % 2 for i in range(2000)], ["1"] * 2000, [0.5] * 2000,
                          [1] * 2000)
    plog = PredictionLog(store, flush_seconds=0.02, flush_rows=200)
    plog.start()
    stop, answered, reported, escaped = threading.Event(), [0], [0], []

    def serve():
        i = 0
        while not stop.is_set():
            keys = [f"k{i + j}" for j in range(20)]
            plog.add(test, keys, [j % 2 for j in range(20)], ["1"] * 20, [0.5] * 20)
            answered[0] += 20
            i += 20
            time.sleep(0.005)

    def record():  # a client that sends each chunk of outcomes once
        for start in range(0, len(known), 50):
            if stop.is_set():
                return
            chunk = known[start:start + 50]
            try:
                reported[0] += store.record_outcomes(test, chunk, [float(k[-1] in "13579")
                                                                   for k in chunk],
                                                     [3] * len(chunk)).recorded
            except Exception as exc:  # noqa: BLE001 - counted: the assertion below names it
                escaped.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.03)

    threads = [threading.Thread(target=serve), threading.Thread(target=record)]
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        for mode in ("fast", "immediate", "fast", "immediate"):
            time.sleep(1.0)
            private_pg.restart(mode)
        cutter.armed.set()
        deadline = time.monotonic() + 10
        while cutter.cuts == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        plog.close()
        cutter.close()
    elapsed = time.monotonic() - started
    totals = assert_audit(ABStore(private_pg.url(store.engine.url.database)), test)
    print(f"4 restarts + {cutter.cuts} cut ack in {elapsed:.1f} s: answered {answered[0]}, "
          f"logged {plog.logged}, in store {totals['predictions'] - 2000}; outcomes reported "
          f"{reported[0]}, in store {totals['n']}")
    assert cutter.cuts == 1 and not escaped, escaped[:3]
    assert (plog.logged, plog.dropped) == (answered[0], 0)
    assert totals["predictions"] == answered[0] + 2000  # nothing lost, nothing twice
    assert reported[0] == totals["n"] and totals["n"] > 0
    assert elapsed < 60


def test_a_database_that_stays_away_is_a_clear_error_and_keeps_the_rows(private_pg):
    store = ABStore(private_pg.create_database(f"faults_away_{uuid.uuid4().hex[:6]}"))
    test = new_test(store)
    store.unavailable_seconds = 1.0
    plog = PredictionLog(store)
    plog.add(test, ["a", "b", "c"], [0, 1, 0], ["1", "0", "1"], [0.9, 0.1, 0.8])
    private_pg.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError,
                           match=r"did not answer for 1 s .*batch b-2 of outcomes was not "
                                 r"written or was written once: retry with the same batch id"):
            store.record_outcomes(test, ["a"], [1.0], [1], batch_id="b-2")
        assert time.monotonic() - started < 10
        assert plog.flush() == 0 and (plog.logged, plog.dropped) == (0, 0)  # kept, not lost
    finally:
        private_pg.start()
    assert plog.flush() == 3
    assert assert_audit(store, test) == {"routed": 3, "predictions": 3, "n": 0}


# --------------------------------------------------------------------------- the flow
class WaitLog(logging.Handler):
    """Counts the store's "does not answer; retrying" warnings: proof a fault hit a call."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self._logger = logging.getLogger("tasks.ab")

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> "WaitLog":
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)


def routed_test(url: str, prefix: str, n: int):
    """A test with `n` routed keys (every key has a prediction, none an outcome yet)."""
    store = ABStore(url)
    test = new_test(store)
    keys = [f"{prefix}{i}" for i in range(n)]
    store.log_predictions(test, keys, [i % 2 for i in range(n)], ["1"] * n, [0.5] * n, [1] * n)
    return store, test, keys


def outcome_file(folder, keys: list[str], name: str) -> str:
    path = folder / f"{name}.csv"
    pd.DataFrame({"id": keys, "y": [int(k[-1] in "13579") for k in keys]}).to_csv(path,
                                                                                 index=False)
    return str(path)


def test_the_record_outcomes_flow_counts_each_outcome_once_through_restarts(private_pg, state_dir,
                                                                            tmp_path):
    """Six files of 1,000 outcomes through the real flow while the database restarts five times
    (fast and immediate) and the COMMIT of one file's write loses its acknowledgement."""
    name = f"faults_flow_{uuid.uuid4().hex[:6]}"
    private_pg.create_database(name)
    cutter = CommitAckCutter(private_pg.port)
    url = cutter.url(name)
    _, test, keys = routed_test(url, "c", 6000)
    files = [outcome_file(tmp_path, keys[i * 1000:(i + 1) * 1000], f"outcomes-{i}")
             for i in range(6)]
    ABPolicy(database_url=url).save(DEFAULT_DOCUMENT, overwrite=True)
    stop, restarts = threading.Event(), []

    def restart_now_and_then():
        for mode in ("fast", "immediate", "fast", "immediate", "fast"):
            if stop.wait(0.7):
                return
            private_pg.restart(mode)
            restarts.append(mode)

    restarter = threading.Thread(target=restart_now_and_then)
    reports, seconds = [], []
    try:
        with WaitLog() as waits:
            restarter.start()
            for i, path in enumerate(files):
                dispose_engines()  # each run opens the store anew, as a fresh worker process
                if i == 3:
                    # opened here instead (its schema check commits): the run's first COMMIT
                    # is then its write of outcomes, retried with its batch id after the cut
                    ABStore(url)
                    cutter.armed.set()
                started = time.monotonic()
                reports.append(record_outcomes(test.test_id, path, "id", "y"))
                seconds.append(time.monotonic() - started)
            restarter.join(timeout=120)
            resent = record_outcomes(test.test_id, files[2], "id", "y")
    finally:
        stop.set()
        restarter.join(timeout=120)
        ABPolicy.delete(DEFAULT_DOCUMENT)
        cutter.close()
    totals = assert_audit(ABStore(private_pg.url(name)), test)
    kinds = {k: sum(line.startswith(k) for line in waits.lines)
             for k in ("opening", "reading", "writing")}
    print(f"{len(restarts)} restarts + {cutter.cuts} cut ack, waits {kinds}, "
          f"{cutter.refused} refused connections; flow runs "
          f"{', '.join(f'{s:.1f}' for s in seconds)} s; recorded "
          f"{[r.recorded for r in reports]}, in store {totals['n']}; re-sent file: "
          f"{resent.recorded} new, {resent.duplicates} duplicates")
    assert len(restarts) == 5 and cutter.cuts == 1
    assert waits.lines, "no restart hit a call of the flow: the test proved nothing"
    assert [r.recorded for r in reports] == [1000] * 6
    assert all(r.duplicates == r.unknown_keys == r.conflicting == 0 for r in reports)
    assert totals == {"routed": 6000, "predictions": 6000, "n": 6000}
    assert (resent.recorded, resent.duplicates) == (0, 1000)


def test_a_database_that_stays_away_fails_the_flow_clearly_and_writes_nothing(
        private_pg, state_dir, tmp_path, monkeypatch):
    url = private_pg.create_database(f"faults_flow_away_{uuid.uuid4().hex[:6]}")
    store, test, keys = routed_test(url, "a", 1000)
    path = outcome_file(tmp_path, keys, "outcomes")
    ABPolicy(database_url=url).save(DEFAULT_DOCUMENT, overwrite=True)
    monkeypatch.setattr(ABStore, "unavailable_seconds", 2.0)
    before = store.fingerprint()
    private_pg.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError,
                           match=r"A/B store postgresql\+psycopg2://postgres@127.0.0.1:\d+/"
                                 r"faults_flow_away_\w+\?sslmode=disable did not answer for 2 s "
                                 r"while reading A/B test m-.*; nothing was written\. Check that "
                                 r"the database server is up .* run the call again"):
            record_outcomes(test.test_id, path, "id", "y")
        read_wait = time.monotonic() - started
        dispose_engines()  # as in a process that starts now: its first open waits too
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError,
                           match=r"cannot open the A/B store at postgresql\+psycopg2://.*: it did "
                                 r"not answer for 2 s \(OperationalError: .*\); nothing was "
                                 r"written\. Check that the database server is up"):
            record_outcomes(test.test_id, path, "id", "y")
        open_wait = time.monotonic() - started
    finally:
        private_pg.start()
    try:
        print(f"database away: the flow failed after {read_wait:.1f} s (read), "
              f"{open_wait:.1f} s (first open)")
        assert read_wait < 15 and open_wait < 15
        assert ABStore(url).fingerprint() == before  # nothing half-written
        assert record_outcomes(test.test_id, path, "id", "y").recorded == 1000  # and it is back
    finally:
        ABPolicy.delete(DEFAULT_DOCUMENT)
