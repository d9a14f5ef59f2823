"""Serving housekeeping (docs/python-api.md): `prune_prediction_log` applies the retention of the
A/B prediction log and of the sampled served rows (tasks/retention.py says what goes and what
never does). Deployment `prune-prediction-log/default` in prefect.yaml runs it daily.
"""
from __future__ import annotations

import time

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from blocks.ab_policy import resolve_ab_policy
from blocks.monitoring import resolve_monitoring_policy
from tasks.ab import ABStore
from tasks.retention import prune_predictions_task, prune_served_task, publish_retention

__all__ = ["prune_prediction_log", "RetentionReport"]


class RetentionReport(BaseModel):
    """The result of ``prune_prediction_log``."""

    predictions_deleted: int = Field(description="prediction rows of concluded tests deleted")
    predictions_remaining_concluded: int = Field(
        description="prediction rows of concluded tests left")
    predictions_active: int = Field(
        description="prediction rows of active tests (never pruned)")
    served_deleted: int = Field(description="sampled served rows deleted")
    served_remaining: dict[str, int] = Field(
        default_factory=dict, description="sampled served rows left, per model")
    prediction_log_retention_days: float | None = None
    prediction_log_max_rows: int | None = None
    served_retention_days: float | None = None
    served_max_rows: int | None = None
    store: str = Field("", description="the A/B store's database (password hidden)")
    duration_s: float = 0.0


@flow(name="prune-prediction-log", log_prints=True)
def prune_prediction_log(policy: str | None = None) -> RetentionReport:
    """Delete old rows of the A/B prediction log (concluded tests only) and of the sampled
    served traffic, as the ABPolicy (prediction_log_retention_days, prediction_log_max_rows) and
    MonitoringPolicy (served_retention_days, served_max_rows) blocks say.

    Args:
        policy: Name of a saved MonitoringPolicy block document; empty: "default", else the
            built-in defaults (30 days, 1,000,000 rows per model).
    """
    started = time.monotonic()
    ab_policy, monitoring = resolve_ab_policy(), resolve_monitoring_policy(policy)
    store = ABStore(ab_policy.store_url())
    predictions = prune_predictions_task(store.url, ab_policy.prediction_log_retention_days,
                                         ab_policy.prediction_log_max_rows)
    served_deleted, served_left = prune_served_task(store.url, monitoring.served_retention_days,
                                                    monitoring.served_max_rows)
    report = RetentionReport(
        predictions_deleted=predictions.deleted,
        predictions_remaining_concluded=predictions.remaining_concluded,
        predictions_active=predictions.active_rows, served_deleted=served_deleted,
        served_remaining=served_left,
        prediction_log_retention_days=ab_policy.prediction_log_retention_days,
        prediction_log_max_rows=ab_policy.prediction_log_max_rows,
        served_retention_days=monitoring.served_retention_days,
        served_max_rows=monitoring.served_max_rows, store=store.describe(),
        duration_s=round(time.monotonic() - started, 3))
    publish_retention(report)
    get_run_logger().info("retention: %d prediction rows of concluded tests and %d served rows "
                          "deleted (%d active-test rows kept)", report.predictions_deleted,
                          report.served_deleted, report.predictions_active)
    return report
