"""Retention of what serving accumulates: the A/B prediction log and the sampled served rows.

The prediction log (``ab_predictions``, tasks/ab.py) keeps a row per answered prediction while a
test runs; once a test is concluded its verdict, final results and per-arm sums
(``ab_arm_stats``, ``ab_units`` with the outcomes) stay, and only its per-prediction rows may go:
older than ``prediction_log_retention_days`` and beyond the newest ``prediction_log_max_rows``
(ABPolicy block). Rows of an active test are never deleted -- every DELETE re-reads the tests'
status in its own transaction. (After pruning, ``ABStore.recount(test)`` of a concluded test
counts fewer predictions than its running sums, which stay the record.)

Sampled served rows (tasks/served_traffic.py) go after ``served_retention_days`` and beyond the
newest ``served_max_rows`` per model (MonitoringPolicy block).

Plain functions below; the Prefect tasks `prune_predictions_task` / `prune_served_task` wrap them
for flows/serving.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.ab import ABStore, predictions_table, tests_table, to_ms
from tasks.served_traffic import delete_in_chunks, prune_served, served_counts


@dataclass
class PredictionLogPrune:
    deleted: int
    remaining_concluded: int  # prediction rows of concluded tests left
    active_rows: int          # prediction rows of active tests (never touched)


def _concluded_pks():
    return sa.select(tests_table.c.pk).where(tests_table.c.status == "concluded")


def _count(conn, concluded: bool) -> int:
    p = predictions_table.c
    where = p.test_pk.in_(_concluded_pks()) if concluded else p.test_pk.not_in(_concluded_pks())
    return int(conn.execute(sa.select(sa.func.count()).select_from(predictions_table)
                            .where(where)).scalar_one())


def prune_predictions(store: ABStore, retention_days: float | None, max_rows: int | None,
                      now: datetime | None = None) -> PredictionLogPrune:
    """Delete prediction rows of concluded tests older than `retention_days`, then all but the
    newest `max_rows` of them. Rows of active tests stay."""
    p = predictions_table.c
    deleted = 0
    if retention_days is not None:
        cutoff = to_ms((now or datetime.now(timezone.utc)) - timedelta(days=retention_days))
        deleted += delete_in_chunks(store.engine, predictions_table, lambda n: sa.select(p.id).where(
            p.test_pk.in_(_concluded_pks()), p.predicted_ms < cutoff).limit(n))
    if max_rows is not None:
        with store.engine.connect() as conn:
            excess = _count(conn, concluded=True) - max_rows
        if excess > 0:
            deleted += delete_in_chunks(store.engine, predictions_table, lambda n: sa.select(p.id)
                                        .where(p.test_pk.in_(_concluded_pks()))
                                        .order_by(p.predicted_ms, p.id).limit(n), total=excess)
    with store.engine.connect() as conn:
        return PredictionLogPrune(deleted=deleted, remaining_concluded=_count(conn, True),
                                  active_rows=_count(conn, False))


@task(name="prune-prediction-log", cache_policy=NO_CACHE)
def prune_predictions_task(store_url: str, retention_days: float | None,
                           max_rows: int | None) -> PredictionLogPrune:
    return prune_predictions(ABStore(store_url), retention_days, max_rows)


@task(name="prune-served-rows", cache_policy=NO_CACHE)
def prune_served_task(store_url: str, retention_days: float | None,
                      max_rows_per_model: int | None) -> tuple[int, dict[str, int]]:
    """(rows deleted, rows left per model)."""
    deleted = prune_served(retention_days, max_rows_per_model, url=store_url)
    return deleted, served_counts(store_url)


def retention_markdown(report) -> str:
    """The Prefect artifact of one prune_prediction_log run."""
    def limit(days, rows, per=""):
        parts = [f"older than {days:g} days" if days is not None else None,
                 f"beyond the newest {rows:,}{per}" if rows is not None else None]
        return " or ".join(p for p in parts if p) or "nothing (no limit set)"

    served = ", ".join(f"{m}: {n:,}" for m, n in sorted(report.served_remaining.items())) or "none"
    return "\n".join([
        "## Prediction log and served rows retention", "",
        "| store | deleted | left |", "|---|---|---|",
        f"| A/B prediction log, concluded tests | {report.predictions_deleted:,} | "
        f"{report.predictions_remaining_concluded:,} |",
        f"| A/B prediction log, active tests (never pruned) | 0 | {report.predictions_active:,} |",
        f"| sampled served rows | {report.served_deleted:,} | "
        f"{sum(report.served_remaining.values()):,} |", "",
        f"- prediction log: deleted rows of concluded tests "
        f"{limit(report.prediction_log_retention_days, report.prediction_log_max_rows)} "
        "(ABPolicy block)",
        f"- served rows: deleted rows {limit(report.served_retention_days, report.served_max_rows, ' per model')} "
        "(MonitoringPolicy block)",
        f"- served rows left per model: {served}",
        f"- store: `{report.store}`", ""])


@task(name="publish-retention-artifact", cache_policy=NO_CACHE)
def publish_retention(report) -> str:
    from prefect.artifacts import create_markdown_artifact

    key = "prediction-log-retention"
    create_markdown_artifact(
        key=key, markdown=retention_markdown(report),
        description=f"{report.predictions_deleted:,} prediction rows and {report.served_deleted:,} "
                    "served rows deleted")
    return key
