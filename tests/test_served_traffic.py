"""Served traffic kept for monitoring (tasks/served_traffic.py): the sampler on the request path,
its background writer and graceful close, the reader, and `served:<model>:<window>` references,
against the real SQLite A/B store of a fresh state folder."""
from __future__ import annotations

import math
import threading
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from blocks.ab_policy import normalise_database_url
from tasks.data import load_table
from tasks.errors import ConfigurationError, DataError
from tasks.served_traffic import (ServedTrafficSampler, load_served, load_served_ref,
                                  parse_window, served_counts, served_engine, served_table)
from tests.conftest import ROOT


def rows(n: int, start: int = 0) -> pd.DataFrame:
    i = np.arange(start, start + n)
    return pd.DataFrame({"tenure": i % 72, "monthly_charges": 20.0 + (i % 100) * 0.5,
                         "contract": np.where(i % 3 == 0, "Month-to-month", "Two year"),
                         "partner": (i % 2).astype("int64")})


def test_every_row_offered_at_rate_1_is_read_back_after_close(state_dir):
    """close() writes what is still buffered: rows answered = rows kept at rate 1, values equal."""
    sampler = ServedTrafficSampler(1.0, flush_rows=10_000, flush_seconds=60)
    sent = []
    for k in range(50):
        single = rows(1, start=k)
        sampler.offer("churn", 3, single)
        sent.append(single)
    batch = rows(30, start=100)
    sampler.offer("churn", 4, batch)
    sent.append(batch)
    sampler.offer("other", 1, rows(5))
    assert sampler.pending == 85 and served_counts() == {}  # nothing written before the flush
    sampler.close()
    assert sampler.written == 85 and sampler.pending == 0
    assert served_counts() == {"churn": 80, "other": 5}

    back = load_served("churn", datetime.now(timezone.utc) - timedelta(minutes=5))
    expected = pd.concat(sent, ignore_index=True)
    pd.testing.assert_frame_equal(back[expected.columns], expected, check_dtype=False)
    assert back["tenure"].dtype.kind == "i" and back["contract"].dtype.kind in "OT"
    sampler.offer("churn", 3, rows(1))  # after close: ignored, nothing half-written
    assert served_counts() == {"churn": 80, "other": 5}


def test_column_dicts_are_kept_like_frames(state_dir):
    """The service holds checked columns as {column: [values]}: offered as such, the kept rows read
    back as the same rows; sampled batches keep only the drawn rows."""
    sent = rows(40)
    columns = {c: sent[c].tolist() for c in sent.columns}
    with ServedTrafficSampler(1.0) as sampler:
        sampler.offer("churn", 2, columns)
        sampler.offer("churn", 2, {c: v[:1] for c, v in columns.items()})
        sampler.offer("churn", 2, {})
    back = load_served("churn", datetime.now(timezone.utc) - timedelta(minutes=5))
    expected = pd.concat([sent, sent.iloc[:1]], ignore_index=True)
    pd.testing.assert_frame_equal(back[expected.columns], expected, check_dtype=False)

    with ServedTrafficSampler(0.5, seed=1) as sampler:
        sampler.offer("half", 2, columns)
    kept = load_served("half", datetime.now(timezone.utc) - timedelta(minutes=5))
    assert 5 < len(kept) < 35
    merged = kept.merge(sent, how="left", indicator=True)  # every kept row is one of those sent
    assert (merged["_merge"] == "both").all()


def test_column_dicts_with_missing_values_read_back_as_the_frame_would(state_dir):
    """What the service offers after checking rows (floats with NaN, ints, text with None, a
    drawn subset of a batch) reads back as the same rows offered as a DataFrame would."""
    columns = {"tenure": [1, 5, 9, 12], "monthly_charges": [20.5, math.nan, 30.0, 41.25],
               "contract": ["Two year", None, "Month-to-month", "One year"],
               "senior": [0.0, 1.0, math.nan, 0.0]}
    with ServedTrafficSampler(1.0) as sampler:
        sampler.offer("as_dict", 2, columns)
        sampler.offer("as_frame", 2, pd.DataFrame(columns))
    since = datetime.now(timezone.utc) - timedelta(minutes=5)
    pd.testing.assert_frame_equal(load_served("as_dict", since), load_served("as_frame", since))
    back = load_served("as_dict", since)
    assert back["monthly_charges"].isna().tolist() == [False, True, False, False]
    assert back["contract"].isna().tolist() == [False, True, False, False]

    with ServedTrafficSampler(0.5, seed=3) as sampler:  # a drawn subset: only those rows
        sampler.offer("subset", 2, {c: v * 25 for c, v in columns.items()})
    kept = load_served("subset", since)
    assert 20 < len(kept) < 80 and set(kept["tenure"]) <= {1, 5, 9, 12}
    assert (kept[kept["tenure"] == 5]["monthly_charges"].isna()).all()


def test_background_writer_flushes_without_a_call(state_dir):
    with ServedTrafficSampler(1.0, flush_rows=20, flush_seconds=0.2) as sampler:
        sampler.offer("churn", 1, rows(25))  # above flush_rows: wakes the writer at once
        deadline = time.monotonic() + 10
        while served_counts().get("churn") != 25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served_counts() == {"churn": 25}
        sampler.offer("churn", 1, rows(3))  # below flush_rows: written by the timer
        deadline = time.monotonic() + 10
        while served_counts().get("churn") != 28 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served_counts() == {"churn": 28}


def test_sample_rate_keeps_that_share_of_rows(state_dir):
    """Single rows and batches are sampled row by row at the rate (binomial bounds, 5 sigma)."""
    rate, n_single, n_batches = 0.2, 4000, 40
    sampler = ServedTrafficSampler(rate, flush_rows=100_000, flush_seconds=60, seed=3)
    one = rows(1)
    for _ in range(n_single):
        sampler.offer("churn", 1, one)
    for k in range(n_batches):
        sampler.offer("churn", 1, rows(100, start=k * 100))
    sampler.close()
    n = n_single + n_batches * 100
    kept = served_counts()["churn"]
    assert abs(kept - rate * n) < 5 * math.sqrt(n * rate * (1 - rate)), kept
    with ServedTrafficSampler(0.0) as none:  # rate 0: no thread, no writes
        none.offer("churn", 1, rows(100))
        assert none.pending == 0
    assert served_counts()["churn"] == kept


def test_full_buffer_drops_and_counts_instead_of_blocking(state_dir, caplog):
    sampler = ServedTrafficSampler(1.0, flush_rows=10, flush_seconds=0.05, max_buffer_rows=50)
    sampler._write_lock.acquire()  # the writer is stuck (a slow database)
    try:
        for k in range(8):
            sampler.offer("churn", 1, rows(10, start=k * 10))
        assert sampler.pending == 50 and sampler.dropped == 30
    finally:
        sampler._write_lock.release()
    deadline = time.monotonic() + 10
    while "30 sampled rows dropped" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    sampler.close()
    assert served_counts() == {"churn": 50}
    assert "30 sampled rows dropped since the last write" in caplog.text


def test_offer_is_cheap_on_the_request_path(state_dir):
    """Microseconds per call: the median of 2,000 single-row offers at 10 % stays far below a
    millisecond (bench/served_traffic.py measures it against a bare call)."""
    sampler = ServedTrafficSampler(0.1, flush_rows=500, flush_seconds=0.5)
    one = rows(1)
    costs = []
    for _ in range(2000):
        t = time.perf_counter_ns()
        sampler.offer("churn", 1, one)
        costs.append(time.perf_counter_ns() - t)
    sampler.close()
    assert float(np.median(costs)) < 100_000  # 100 us: a generous bound on a busy 2-core box


def test_window_selects_rows_by_time(state_dir):
    engine = served_engine()
    now = datetime.now(timezone.utc)
    ms = lambda d: int(d.timestamp() * 1000)  # noqa: E731
    with engine.begin() as conn:
        conn.execute(sa.insert(served_table), [
            {"model_name": "churn", "version": 1, "served_ms": ms(now - timedelta(hours=h)),
             "features": f'{{"tenure": {h}}}'} for h in (1, 5, 30, 200)])
    assert sorted(load_table("served:churn:6h").frame["tenure"]) == [1, 5]
    assert sorted(load_table("served:churn:2d").frame["tenure"]) == [1, 5, 30]
    assert sorted(load_table("served:churn:90m").frame["tenure"]) == [1]
    assert load_table("served:churn:24h").ref == "served:churn:24h"
    assert list(load_served("churn", now - timedelta(days=30), limit=2)["tenure"]) == [5, 1]


@pytest.mark.parametrize("ref, message", [
    ("served:churn", "served:<model>:<window>"),
    ("served::24h", "served:<model>:<window>"),
    ("served:churn:24", "not a duration"),
    ("served:churn:-1h", "not a duration"),
    ("served:churn:0d", "not a duration"),
    ("served:churn:1w", "not a duration"),
    ("served:bad name:24h", "invalid model name"),
])
def test_bad_references_are_refused_with_the_expected_form(state_dir, ref, message):
    with pytest.raises(DataError, match=message):
        load_table(ref)


def test_an_empty_window_is_a_clear_error(state_dir):
    with ServedTrafficSampler(1.0) as sampler:
        sampler.offer("other", 1, rows(3))
    with pytest.raises(DataError, match=r"no served rows of model 'churn'.*served_sample_rate"):
        load_served_ref("served:churn:24h")


@pytest.mark.parametrize("kwargs", [dict(sample_rate=1.5), dict(sample_rate=-0.1),
                                    dict(sample_rate=0.5, flush_rows=0),
                                    dict(sample_rate=0.5, flush_seconds=0),
                                    dict(sample_rate=0.5, flush_rows=100, max_buffer_rows=10)])
def test_bad_sampler_settings_are_refused(state_dir, kwargs):
    with pytest.raises(ConfigurationError):
        ServedTrafficSampler(**kwargs)


def test_windows_parse():
    assert parse_window("24h") == timedelta(hours=24)
    assert parse_window("1.5d") == timedelta(days=1.5)
    assert parse_window("90m") == timedelta(minutes=90)


def test_concurrent_offers_from_threads_lose_nothing(state_dir):
    """The service calls offer from many threads: every kept row is written exactly once."""
    sampler = ServedTrafficSampler(1.0, flush_rows=200, flush_seconds=0.05)
    one = rows(1)

    def serve():
        for _ in range(500):
            sampler.offer("churn", 1, one)

    threads = [threading.Thread(target=serve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sampler.close()
    assert served_counts() == {"churn": 2000} and sampler.written == 2000


def test_a_large_window_is_thinned_evenly_over_its_span(state_dir):
    """Above max_rows a served: reference keeps every k-th row of the whole window, not only the
    newest ones."""
    engine = served_engine()
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        conn.execute(sa.insert(served_table), [
            {"model_name": "churn", "version": 1,
             "served_ms": int((now - timedelta(minutes=1000 - i)).timestamp() * 1000),
             "features": f'{{"minute": {i}}}'} for i in range(1000)])
    frame = load_served_ref("served:churn:24h", max_rows=100)
    assert len(frame) == 100
    assert frame["minute"].min() < 20 and frame["minute"].max() > 980
    assert len(load_served_ref("served:churn:24h")) == 1000


@pytest.mark.postgres
def test_postgres_store_keeps_reads_thins_and_prunes(request, state_dir):
    """The same table on PostgreSQL (the production A/B store): written by two samplers at once
    (two service workers), read back, thinned, pruned."""
    from tasks.served_traffic import prune_served
    from tests.test_ab_store import shared_postgres_url

    url = shared_postgres_url(request)
    model = f"pg_{request.node.name[-8:]}_{int(time.time() * 1000) % 10**8}"
    workers = [ServedTrafficSampler(1.0, url=url, flush_rows=50, flush_seconds=0.05)
               for _ in range(2)]
    threads = [threading.Thread(target=lambda s=s: [s.offer(model, 1, rows(10, start=k * 10))
                                                   for k in range(30)]) for s in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in workers:
        s.close()
    since = datetime.now(timezone.utc) - timedelta(minutes=5)
    back = load_served(model, since, url=url)
    assert len(back) == 600 and sorted(back["tenure"].unique()) == sorted(rows(300)["tenure"].unique())
    assert len(load_served(model, since, url=url, every=3)) in range(190, 211)
    with served_engine(url).begin() as conn:
        conn.execute(sa.update(served_table).where(served_table.c.model_name == model,
                                                   served_table.c.id % 2 == 0)
                     .values(served_ms=served_table.c.served_ms - 40 * 86_400_000))
    assert prune_served(retention_days=30, max_rows_per_model=None, url=url) >= 300
    assert served_counts(url).get(model) == 300
    assert prune_served(retention_days=None, max_rows_per_model=100, url=url) >= 200
    assert served_counts(url).get(model) == 100


def test_the_service_sampler_follows_the_monitoring_policy(state_dir):
    from blocks.monitoring import MonitoringPolicy
    from tasks.served_traffic import sampler_from_policy

    with sampler_from_policy() as default:  # nothing saved: the built-in 10 %
        assert default.sample_rate == 0.1
    with sampler_from_policy(MonitoringPolicy(served_sample_rate=0.0)) as off:
        off.offer("churn", 1, rows(50))
        assert off.pending == 0 and off._thread is None


def test_a_failed_write_keeps_the_rows_for_the_next_one(state_dir):
    """The table disappears under the writer (a database problem): flush raises the database's
    error, the rows stay buffered, and the next write after the repair stores them once."""
    from sqlalchemy.exc import OperationalError

    from tasks.served_traffic import metadata

    sampler = ServedTrafficSampler(1.0, flush_rows=1000, flush_seconds=60)
    engine = served_engine()
    served_table.drop(engine)
    sampler.offer("churn", 1, rows(7))
    with pytest.raises(OperationalError, match="served_rows"):
        sampler.flush()
    assert sampler.pending == 7 and sampler.written == 0
    metadata.create_all(engine)
    sampler.close()
    assert served_counts() == {"churn": 7} and sampler.written == 7


def test_an_unreachable_store_is_refused_at_start(state_dir, monkeypatch):
    from tasks.ab import ABStore, StoreError

    # nothing listens there: the first open waits as for a restarting server, briefly here
    monkeypatch.setattr(ABStore, "unavailable_seconds", 1.0)

    from tests.servers import free_port
    with pytest.raises(StoreError, match="cannot open the A/B store"):
        ServedTrafficSampler(0.5, url=f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")


STARTING_WORKER = """
import pathlib, sys, time
from tasks.ab import open_store
from tasks.served_traffic import ServedTrafficSampler
url, barrier, me, n = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
(barrier / me).touch()
while len(list(barrier.iterdir())) < n:  # everything imported: start together
    time.sleep(0.005)
ServedTrafficSampler(0.5, url=url).close()  # what a service worker builds at start
open_store(url)
"""


@pytest.mark.postgres
@pytest.mark.parametrize("attempt", [1, 2])
def test_service_workers_starting_together_on_a_fresh_postgres_store_all_start(tmp_path, attempt):
    """`make up PROFILE=production` starts the service's workers at the same moment on a fresh
    A/B database, and each creates the tables it needs. PostgreSQL fails one of two concurrent
    CREATE TABLEs, and a worker whose start fails stops the whole service (uvicorn's supervisor):
    every worker must start, and the tables exist once."""
    import subprocess
    import sys

    from tests.conftest import fresh_postgres_database

    with fresh_postgres_database("mlops_served_start") as url:
        barrier = tmp_path / "barrier"
        barrier.mkdir()
        workers = [subprocess.Popen([sys.executable, "-c", STARTING_WORKER, url, str(barrier),
                                     str(i), "4"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
                   for i in range(4)]
        errors = [w.communicate(timeout=120)[1] for w in workers]
        assert [w.returncode for w in workers] == [0, 0, 0, 0], "\n".join(e[-1500:] for e in errors)
        engine = sa.create_engine(normalise_database_url(url))
        try:
            assert {"served_rows", "ab_tests", "ab_predictions"} <= set(
                sa.inspect(engine).get_table_names())
        finally:
            engine.dispose()
