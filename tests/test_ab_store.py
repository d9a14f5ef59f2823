"""The A/B SQL store (tasks/ab.py) on SQLite and PostgreSQL: versioned schema, running sums equal
to the log's aggregation (and to pandas), outcome accounting, one active test per model under a
race, concurrent writers, closed tests, results that never read the log, the policy block."""
from __future__ import annotations

import threading
import uuid
from contextlib import ExitStack

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from scipy import stats

from blocks.ab_policy import ABPolicy, normalise_database_url, resolve_ab_policy
from blocks.mlflow_config import DEFAULT_DOCUMENT
from tasks import ab
from tasks.ab import (ABStore, ABTestClosedError, ABTestNotFoundError, ActiveTestExistsError,
                      StoreError, dispose_engines, open_store)
from tasks.ab_tasks import analyse, read_results, series

from tests.conftest import fresh_postgres_database

_PG_KEY = pytest.StashKey[dict]()


def shared_postgres_url(request) -> str:
    """One PostgreSQL database per test session for every A/B test module, dropped at the end."""
    cache = request.config.stash.setdefault(_PG_KEY, {})
    if "url" not in cache:
        stack = ExitStack()
        cache["url"] = stack.enter_context(fresh_postgres_database("mlops_ab_test"))
        stack.callback(dispose_engines)  # runs first: no pooled connection keeps the database
        request.config.add_cleanup(stack.close)
    return cache["url"]


def empty_store(url: str) -> None:
    store = open_store(url)
    with store.engine.begin() as conn:
        if store.backend == "postgresql":
            conn.exec_driver_sql("TRUNCATE ab_tests, ab_arm_stats, ab_units, ab_predictions, "
                                 "ab_snapshots")
        else:
            for name in ("ab_snapshots", "ab_predictions", "ab_units", "ab_arm_stats", "ab_tests"):
                conn.exec_driver_sql(f"DELETE FROM {name}")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    if request.param == "sqlite":
        yield ABStore(f"sqlite:///{tmp_path / 'ab.db'}")
        return
    url = shared_postgres_url(request)
    yield ABStore(url)
    empty_store(url)


def new_test(store: ABStore, model: str = "m", split: float = 0.5, metric: str = "conversion",
             **kw):
    spec = dict(model_name=model, champion_version=1, challenger_version=2, traffic_split=split,
                metric_type=metric, higher_is_better=True, min_samples_per_arm=10,
                min_duration_days=0.0, alpha=0.05, power=0.8, srm_threshold=0.001,
                sequential_tuning=10_000, test_id=f"{model}-20260101-{uuid.uuid4().hex[:6]}")
    spec.update(kw)
    return store.create_test(**spec)


def log(store, test, keys, arms, t=1):
    return store.log_predictions(test, keys, arms, ["No"] * len(keys), [0.5] * len(keys),
                                 [t] * len(keys))


# --------------------------------------------------------------------------- schema
def test_schema_is_created_automatically_and_versioned(store):
    with store.engine.connect() as conn:
        names = set(sa.inspect(conn).get_table_names())
        version = conn.execute(sa.text("SELECT version FROM ab_schema_version")).scalar_one()
    assert set(ab.TABLES) <= names and version == ab.SCHEMA_VERSION == 2
    dispose_engines()
    assert ABStore(store.url).row_counts()["ab_schema_version"] == 1  # reopening adds nothing


def test_a_newer_schema_is_refused_and_an_older_one_migrated(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'ab.db'}"
    ABStore(url)
    dispose_engines()
    # a later release: version 3 adds a column; opening the version-2 database migrates it
    monkeypatch.setattr(ab, "SCHEMA_VERSION", 3)
    monkeypatch.setitem(ab.MIGRATIONS, 2, lambda conn: conn.exec_driver_sql(
        "ALTER TABLE ab_tests ADD COLUMN owner VARCHAR(100)"))
    migrated = ABStore(url)
    with migrated.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version FROM ab_schema_version")).scalar_one() == 3
        assert "owner" in {c["name"] for c in sa.inspect(conn).get_columns("ab_tests")}
    dispose_engines()
    monkeypatch.setattr(ab, "SCHEMA_VERSION", 2)
    with pytest.raises(StoreError, match="schema version 3, newer than this code's 2: upgrade"):
        ABStore(url)


def test_a_version_1_store_gets_the_batch_table_and_keeps_its_rows(tmp_path):
    """The 1 -> 2 migration (batch ids of idempotent writes) on a store made by version 1."""
    url = f"sqlite:///{tmp_path / 'ab.db'}"
    store = ABStore(url)
    test = new_test(store)
    log(store, test, ["a", "b"], [0, 1])
    with store.engine.begin() as conn:  # what a version-1 database looks like
        conn.exec_driver_sql("DROP TABLE ab_batches")
        conn.exec_driver_sql("UPDATE ab_schema_version SET version = 1")
    dispose_engines()
    migrated = ABStore(url)
    assert migrated.row_counts()["ab_batches"] == 0
    assert migrated.row_counts()["ab_predictions"] == 2
    log(migrated, test, ["c"], [0])
    assert migrated.row_counts()["ab_batches"] == 1


def test_a_batch_id_makes_a_retried_write_count_once(store):
    """A client that retries a write whose answer it never got (same batch id) gets the first
    result back and changes nothing; a bad batch id is refused before any write."""
    test = new_test(store)
    first = store.log_predictions(test, ["a", "b", "a"], [0, 1, 0], ["1"] * 3, [0.5] * 3,
                                  [1] * 3, batch_id="p-1")
    before = store.fingerprint()
    again = store.log_predictions(test, ["a", "b", "a"], [0, 1, 0], ["1"] * 3, [0.5] * 3,
                                  [1] * 3, batch_id="p-1")
    assert again == first == {"champion": 1, "challenger": 1}
    assert store.fingerprint() == before
    counts = store.record_outcomes(test, ["a", "b"], [1.0, 0.0], [2, 2], batch_id="o-1")
    assert store.record_outcomes(test, ["a", "b"], [1.0, 0.0], [2, 2], batch_id="o-1") == counts
    assert counts.recorded == 2
    assert store.recount(test)["champion"]["predictions"] == 2
    with pytest.raises(ab.DataError, match="batch id 'no spaces' is not valid"):
        store.log_predictions(test, ["c"], [0], ["1"], [0.5], [1], batch_id="no spaces")
    assert store.row_counts()["ab_predictions"] == 3


def test_unusable_urls_are_clear_errors(monkeypatch):
    # nothing listens on port 1: the first open waits as for a restarting server, briefly here
    monkeypatch.setattr(ABStore, "unavailable_seconds", 1.0)
    with pytest.raises(StoreError, match="unsupported A/B store URL 'mysql://h/db'"):
        ABStore("mysql://h/db")
    with pytest.raises(StoreError, match=r"cannot open the A/B store at postgresql\+psycopg2://"
                                         r"u:\*\*\*@127.0.0.1:1/db"):
        ABStore("postgresql://u:secret@127.0.0.1:1/db")


# --------------------------------------------------------------------------- sums and log
def test_running_sums_equal_the_sql_aggregation_and_pandas(store):
    rng = np.random.default_rng(0)
    test = new_test(store, split=0.3)
    universe = [f"u{i}" for i in range(3000)]
    for batch in range(4):
        keys = list(rng.choice(universe, 1500))  # repeats within and across batches
        arms = [int(hash_arm(k)) for k in keys]
        log(store, test, keys, arms, t=batch)
    reports = []
    for batch in range(3):
        keys = list(rng.choice(universe, 1200)) + ["never-routed"]
        values = list((rng.random(len(keys)) < 0.3).astype(float))
        reports.append((len(keys), store.record_outcomes(test, keys, values, [10 + batch] * len(keys))))
    for n_rows, r in reports:
        assert r.recorded + r.duplicates + r.unknown_keys + r.conflicting == n_rows
    assert sum(r.unknown_keys for _, r in reports) >= 3
    assert sum(r.conflicting for _, r in reports) > 0  # the same key drawn with another value
    sums = store.arm_totals(test)
    recount = store.recount(test)
    with store.engine.connect() as conn:
        units = pd.read_sql(sa.select(ab.units_table).where(ab.units_table.c.test_pk == test.pk), conn)
        preds = pd.read_sql(sa.select(ab.predictions_table), conn)
    for code, name in ab.ARM_NAMES.items():
        arm = units[units.arm == code]
        expected = {"routed": len(arm), "n": int(arm.outcome.notna().sum()),
                    "total": float(arm.outcome.sum()), "total_sq": float((arm.outcome ** 2).sum()),
                    "predictions": int((preds.arm == code).sum())}
        assert recount[name] == pytest.approx(expected)
        got = sums[name]
        assert {"routed": got.routed, "n": got.n, "total": got.total, "total_sq": got.total_sq,
                "predictions": got.predictions} == pytest.approx(expected)
    assert len(preds) == 6000 and sums["champion"].routed + sums["challenger"].routed == units.shape[0]
    snaps = store.snapshots(test)
    assert [s["seq"] for s in snaps] == [1, 2, 3]
    assert snaps[-1]["champion_n"] == sums["champion"].n


def hash_arm(key: str) -> int:
    from tasks.routing import is_challenger

    return int(is_challenger("seed", [key], 0.3)[0])


def test_continuous_results_equal_welch_on_the_raw_values(store):
    test = new_test(store, metric="continuous", split=0.4)
    rng = np.random.default_rng(1)
    keys = [f"k{i}" for i in range(400)]
    arms = [1 if i % 5 < 2 else 0 for i in range(400)]
    log(store, test, keys, arms)
    values = np.where(np.array(arms) == 1, rng.lognormal(3.1, 0.5, 400), rng.lognormal(3.0, 0.5, 400))
    store.record_outcomes(test, keys, values, [5] * 400)
    results = analyse(test, store.arm_totals(test))
    chal, champ = values[np.array(arms) == 1], values[np.array(arms) == 0]
    welch = stats.ttest_ind(chal, champ, equal_var=False)
    assert results.p_value == pytest.approx(welch.pvalue, rel=1e-7)
    assert results.difference == pytest.approx(chal.mean() - champ.mean(), rel=1e-9)
    assert results.arms["challenger"].variance == pytest.approx(chal.var(ddof=1), rel=1e-7)
    assert results.arms["champion"].successes is None and results.arms["champion"].rate is None
    frame = series(test, store.snapshots(test))
    assert frame.difference.iloc[-1] == pytest.approx(results.difference)


def test_results_read_the_running_sums_never_the_log(state_dir):
    store = open_store()
    test = new_test(store)
    log(store, test, [f"k{i}" for i in range(200)], [i % 2 for i in range(200)])
    store.record_outcomes(test, [f"k{i}" for i in range(200)], [i % 3 == 0 for i in range(200)],
                          [2] * 200)
    statements = []
    listener = lambda conn, cursor, statement, *rest: statements.append(statement)  # noqa: E731
    sa.event.listen(store.engine, "before_cursor_execute", listener)
    try:
        results = read_results.fn(test.test_id)
        series(test, store.snapshots(test))
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", listener)
    assert results.arms["champion"].n == 100 and statements
    assert not [s for s in statements if "ab_units" in s or "ab_predictions" in s]


def test_the_audit_aggregation_uses_the_covering_index(tmp_path):
    store = ABStore(f"sqlite:///{tmp_path / 'ab.db'}")
    u = ab.units_table.c
    query = (sa.select(u.arm, sa.func.count(), sa.func.count(u.outcome), sa.func.sum(u.outcome),
                       sa.func.sum(u.outcome * u.outcome)).where(u.test_pk == 1).group_by(u.arm))
    sql = str(query.compile(store.engine, compile_kwargs={"literal_binds": True}))
    with store.engine.connect() as conn:
        plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
    assert "COVERING INDEX ab_units_covering" in plan


# --------------------------------------------------------------------------- states, races
def test_one_active_test_per_model_even_when_two_creators_race(store):
    barrier = threading.Barrier(4)
    outcomes = []

    def create(i):
        barrier.wait()
        try:
            outcomes.append(new_test(store, model="raced", test_id=f"raced-20260101-00000{i}").test_id)
        except ActiveTestExistsError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [o for o in outcomes if isinstance(o, str)]
    assert len(winners) == 1 and len(outcomes) == 4
    assert all("already has an active A/B test" in str(o) for o in outcomes if o not in winners)
    assert store.active_test("raced").test_id == winners[0]
    assert store.row_counts()["ab_arm_stats"] == 2


def test_concurrent_writers_never_lose_an_increment(store):
    test = new_test(store)
    keys = [f"k{i}" for i in range(2000)]
    errors = []

    def writer(i):
        try:
            part = keys[i * 400:(i + 1) * 400 + 200]  # overlapping ranges
            log(store, test, part, [hash(k) % 2 for k in part])
            store.record_outcomes(test, part, [1.0] * len(part), [3] * len(part))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(5)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    sums, recount = store.arm_totals(test), store.recount(test)
    for name in ("champion", "challenger"):
        assert (sums[name].routed, sums[name].n, sums[name].predictions) == (
            recount[name]["routed"], recount[name]["n"], recount[name]["predictions"])
    assert sums["champion"].routed + sums["challenger"].routed == 2000
    assert sums["champion"].n + sums["challenger"].n == 2000


def test_keys_the_caller_knows_are_routed_add_predictions_only(store):
    test = new_test(store)
    assert log(store, test, ["a", "b"], [0, 1]) == {"champion": 1, "challenger": 1}
    new = store.log_predictions(test, ["a", "b", "c", "c"], [1, 0, 1, 1], ["No"] * 4, [0.5] * 4,
                                [2] * 4, routed={"a", "b"})
    assert new == {"champion": 0, "challenger": 1}
    totals = store.arm_totals(test)
    assert (totals["champion"].routed, totals["challenger"].routed) == (1, 2)
    assert sum(t.predictions for t in totals.values()) == 6
    with store.engine.connect() as conn:
        arms = dict(conn.execute(sa.select(ab.units_table.c.unit_key, ab.units_table.c.arm)
                                 .where(ab.units_table.c.test_pk == test.pk)).all())
    assert arms == {"a": 0, "b": 1, "c": 1}


def test_a_closed_test_takes_no_writes(store):
    test = new_test(store)
    log(store, test, ["a", "b"], [0, 1])
    closed = store.close_test(test, forced=True, conclusion="done", final_results={"x": 1})
    assert closed.status == "concluded" and closed.forced and closed.final_results == {"x": 1}
    before = store.fingerprint()
    with pytest.raises(ABTestClosedError, match="was concluded at .* create a new test"):
        log(store, test, ["c"], [0])
    with pytest.raises(ABTestClosedError):
        store.record_outcomes(test, ["a"], [1.0], [1])
    with pytest.raises(ABTestClosedError, match="already concluded"):
        store.close_test(test, forced=False, conclusion="again", final_results={})
    assert store.fingerprint() == before
    assert store.active_test("m") is None
    # the next test of the model routes with a new seed (a fresh store: the same seeds)
    again = new_test(store)
    assert again.status == "active" and (test.seed, again.seed) == ("m#1", "m#2")


def test_unknown_and_malformed_test_ids(store):
    with pytest.raises(ABTestNotFoundError, match="no A/B test 'm-20990101-000000'"):
        store.get_test("m-20990101-000000")
    with pytest.raises(ABTestNotFoundError, match="is not an A/B test id"):
        store.get_test("M; DROP TABLE ab_tests")


def test_snapshots_are_thinned_to_a_bounded_number_of_points(tmp_path):
    store = ABStore(f"sqlite:///{tmp_path / 'ab.db'}")
    test = new_test(store)
    keys = [f"k{i}" for i in range(100)]
    log(store, test, keys, [i % 2 for i in range(100)])
    for i in range(0, 100, 2):
        store.record_outcomes(test, keys[i:i + 2], [1.0, 0.0], [i, i])
    snaps = store.snapshots(test, max_points=10)
    assert len(snaps) <= 11 and snaps[-1]["seq"] == 50 and snaps[-1]["at_ms"] == 98


# --------------------------------------------------------------------------- the policy block
def test_policy_urls_and_resolution(state_dir):
    assert normalise_database_url("postgresql://u:p@h:5432/db") == "postgresql+psycopg2://u:p@h:5432/db"
    assert normalise_database_url("postgres://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert normalise_database_url("sqlite:////x/ab.db") == "sqlite:////x/ab.db"
    policy = resolve_ab_policy()  # nothing saved: the embedded defaults
    assert policy.store_url() == f"sqlite:///{state_dir.resolve() / 'ab.db'}"
    assert (policy.min_samples_per_arm, policy.min_duration_days, policy.alpha, policy.power,
            policy.srm_threshold) == (1000, 7, 0.05, 0.8, 0.001)
    ABPolicy(database_url="postgresql://u:p@db.example:5432/ab", min_samples_per_arm=250,
             min_duration_days=14).save(DEFAULT_DOCUMENT, overwrite=True)
    try:
        saved = resolve_ab_policy()
        assert saved.store_url() == "postgresql+psycopg2://u:p@db.example:5432/ab"
        assert (saved.min_samples_per_arm, saved.min_duration_days) == (250, 14)
        assert "p@db" not in repr(saved)  # the URL (with its password) is a secret
    finally:
        ABPolicy.delete(DEFAULT_DOCUMENT)
    with pytest.raises(ValueError):
        ABPolicy(alpha=1.5)
