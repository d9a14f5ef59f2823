"""prune_prediction_log: old prediction rows of concluded tests and old served rows go, rows of an
active test stay whatever their age, the counts are in the flow's result (real Prefect API, the
SQLite A/B store of a fresh state folder)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from flows.serving import RetentionReport, prune_prediction_log
from tasks.ab import ABStore, open_store, predictions_table
from tasks.retention import prune_predictions
from tasks.served_traffic import served_counts, served_engine, served_table
from tests.test_drift_flows import read_artifacts

NOW = datetime.now(timezone.utc)


def ms(days_ago: float) -> int:
    return int((NOW - timedelta(days=days_ago)).timestamp() * 1000)


def new_test(store: ABStore, model: str, test_id: str):
    return store.create_test(model_name=model, champion_version=1, challenger_version=2,
                             traffic_split=0.5, metric_type="conversion", higher_is_better=True,
                             min_samples_per_arm=10, min_duration_days=0, alpha=0.05, power=0.8,
                             srm_threshold=0.001, sequential_tuning=1000, test_id=test_id)


def log(store: ABStore, test, days_ago: list[float], prefix: str) -> None:
    n = len(days_ago)
    store.log_predictions(test, [f"{prefix}{i}" for i in range(n)], [i % 2 for i in range(n)],
                          ["Yes"] * n, [0.7] * n, [ms(d) for d in days_ago])


def prediction_ages(store: ABStore, test) -> list[int]:
    with store.engine.connect() as conn:
        return sorted(round((NOW.timestamp() * 1000 - t) / 86_400_000) for t in conn.execute(
            sa.select(predictions_table.c.predicted_ms)
            .where(predictions_table.c.test_pk == test.pk)).scalars())


@pytest.fixture
def stores(state_dir):
    """A concluded test (rows 200, 120, 10 and 1 days old), an active one (rows as old), and
    served rows 40 and 1 days old."""
    store = open_store()
    done = new_test(store, "churn", "churn-20260101-aaaaaa")
    log(store, done, [200, 120, 10, 1], "d")
    done = store.close_test(done, forced=True, conclusion="test", final_results={})
    active = new_test(store, "churn", "churn-20261101-bbbbbb")
    log(store, active, [200, 120, 10, 1], "a")
    with served_engine().begin() as conn:
        conn.execute(sa.insert(served_table), [
            {"model_name": m, "version": 1, "served_ms": ms(d), "features": "{}"}
            for m in ("churn", "other") for d in (40, 1)])
    return store, done, active


def test_old_rows_go_and_active_test_rows_stay(stores):
    store, done, active = stores
    arms_before = store.arm_totals(done)

    report = prune_prediction_log()  # built-in policies: 90 days of predictions, 30 of served rows

    assert isinstance(report, RetentionReport)
    assert (report.predictions_deleted, report.predictions_remaining_concluded,
            report.predictions_active) == (2, 2, 4)
    assert prediction_ages(store, done) == [1, 10]
    assert prediction_ages(store, active) == [1, 10, 120, 200]  # a running test keeps every row
    assert report.served_deleted == 2 and report.served_remaining == {"churn": 1, "other": 1}
    assert served_counts() == {"churn": 1, "other": 1}
    assert store.arm_totals(done) == arms_before  # the concluded test's record is untouched
    assert (report.prediction_log_retention_days, report.served_retention_days) == (90.0, 30.0)

    published = read_artifacts("prediction-log-retention")
    assert published and "| A/B prediction log, concluded tests | 2 | 2 |" in published[-1].data

    again = prune_prediction_log()  # idempotent
    assert (again.predictions_deleted, again.served_deleted) == (0, 0)


def test_an_unknown_policy_is_refused_before_anything_is_deleted(stores):
    from tasks.errors import ConfigurationError

    store, done, active = stores
    before = store.row_counts()
    with pytest.raises(ConfigurationError, match="no saved MonitoringPolicy document named 'nope'"):
        prune_prediction_log(policy="nope")
    assert store.row_counts() == before and served_counts() == {"churn": 2, "other": 2}


def test_row_limit_keeps_the_newest_rows_of_concluded_tests(stores, monkeypatch):
    monkeypatch.setattr("tasks.served_traffic.DELETE_CHUNK", 2)  # several chunks per limit
    store, done, active = stores
    result = prune_predictions(store, retention_days=None, max_rows=1)
    assert (result.deleted, result.remaining_concluded, result.active_rows) == (3, 1, 4)
    assert prediction_ages(store, done) == [1]
    assert prediction_ages(store, active) == [1, 10, 120, 200]
    nothing = prune_predictions(store, retention_days=None, max_rows=0)
    assert nothing.deleted == 1 and prediction_ages(store, active) == [1, 10, 120, 200]


def test_served_row_limit_is_per_model(stores, monkeypatch):
    from tasks.served_traffic import prune_served

    monkeypatch.setattr("tasks.served_traffic.DELETE_CHUNK", 1)

    assert prune_served(retention_days=None, max_rows_per_model=1) == 2
    assert served_counts() == {"churn": 1, "other": 1}


def test_bad_retention_settings_are_refused():
    from pydantic import ValidationError

    from blocks.ab_policy import ABPolicy
    from blocks.monitoring import MonitoringPolicy

    for bad in (dict(prediction_log_retention_days=0), dict(prediction_log_max_rows=-1)):
        with pytest.raises(ValidationError):
            ABPolicy(**bad)
    for bad in (dict(served_retention_days=-1), dict(served_max_rows=0),
                dict(served_sample_rate=1.2), dict(metrics_cache_seconds=0)):
        with pytest.raises(ValidationError):
            MonitoringPolicy(**bad)
