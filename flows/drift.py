"""Drift detection and production monitoring (docs/python-api.md): check_drift, evaluate_production,
profile_model. The MLOps deployment guide's `get_drift_score` / `get_performance_metrics` and its alerts.

check_drift reads only the version's stored profile (never the training data): load the policy,
the reference and the batch → compare (the MLflow run opens meanwhile) → record in MLflow (+ plot)
while the alert (above the alert threshold) goes out and the UI artifacts are written → event
when drifted. Bad input raises and leaves nothing recorded.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger

from blocks.monitoring import MonitoringPolicy, resolve_monitoring_policy
from flows.parameters import DataRef, data_flow
from tasks.alerts import dispatch, drift_alert, performance_alert
from tasks.drift import (DriftReport, FeatureDrift, PerformanceReport, ProfileInfo,
                         ProfileNotFoundError, compare_batch, discard_run, drift_links, elapsed,
                         evaluate_batch, load_batch, load_reference, open_drift_run,
                         publish_drift, publish_evaluation, record_drift_check,
                         record_evaluation, store_profile)
from tasks.events import emit_model_event
from tasks.registry import validate_model_name

__all__ = ["check_drift", "evaluate_production", "profile_model", "DriftReport", "FeatureDrift",
           "PerformanceReport", "ProfileInfo", "ProfileNotFoundError", "lifecycle_step",
           "drifted_batch"]

DRIFT_EVENT = "mlops.model.drift-detected"
DEGRADED_EVENT = "mlops.model.performance-degraded"


def _policy(policy: str | None) -> MonitoringPolicy:
    resolved = resolve_monitoring_policy(policy)
    resolved.check_channels()
    return resolved


@data_flow(name="check-drift", log_prints=True)
def check_drift(model_name: str, data: DataRef, version: int | str = "champion",
                policy: str | None = None) -> DriftReport:
    """Compare a batch of recent inputs with the stored training profile of a model version.

    Args:
        model_name: Registered model to check.
        data: Recent inputs: a csv/parquet path, a folder (its newest file), an s3://bucket/key
            URI, an s3://bucket/prefix/ (its newest object), or served:<model>:<window> (the
            rows the API served in the last window, e.g. served:customer_churn:24h); a
            DataFrame from Python.
        version: A version number or an alias (champion, challenger, Production, Staging).
        policy: Name of a saved MonitoringPolicy block document (thresholds, alert channels);
            empty: the one named "default", else the built-in defaults.
    """
    started = time.monotonic()
    validate_model_name(model_name)
    # the profile (MLflow), the batch (file, S3 or memory) and the policy (a block) are read at
    # the same time
    reference = load_reference.submit(model_name, version)
    batch = load_batch.submit(data)
    settings = _policy(policy)
    reference = reference.result()
    run = open_drift_run.submit(reference)  # the MLflow run is created while the comparison runs
    try:
        report = compare_batch(reference, batch.result(), settings)
    except BaseException:
        discard_run(reference, run)  # a check that could not be made leaves no run behind
        raise

    recorded = drift_links(run.result(), reference, report)
    report.run_id, report.plot_uri = recorded.run_id, recorded.plot_uri
    # MLflow is filled while the alert goes out and the Prefect artifacts are written
    recording = record_drift_check.submit(report.model_copy(deep=True), reference, run)
    alert = drift_alert(model_name, report.version, report.score, report.drifted_features,
                        settings, report.data_ref, recorded.run_url or recorded.plot_uri)
    report.alerted = alert is not None
    report.alerts_sent, report.alert_errors = dispatch(alert, settings)
    publish_drift(report, recorded)
    recording.result()
    if report.drifted:  # after the run is complete: what reacts to the event reads it
        emit_model_event(model_name, DRIFT_EVENT, {
            "version": report.version, "score": report.score, "threshold": report.threshold,
            "drifted_features": report.drifted_features, "data_ref": report.data_ref,
            "run_id": report.run_id})
    report.duration_s = elapsed(started)
    get_run_logger().info("%s v%s: drift score %.3f (threshold %.2f) -> %s; drifted: %s",
                          model_name, report.version, report.score, report.threshold,
                          "DRIFTED" if report.drifted else "not drifted",
                          ", ".join(report.drifted_features) or "none")
    return report


@data_flow(name="evaluate-production", log_prints=True)
def evaluate_production(model_name: str, data: DataRef, target: str, version: int | str = "champion",
                        policy: str | None = None) -> PerformanceReport:
    """Score labelled production data with a version and compare with its holdout metrics.

    Degraded: accuracy below the policy's accuracy_alert_threshold (classification) or R² below
    r2_alert_threshold (regression), or the primary metric worse than the holdout by more than
    max_relative_degradation. Alerts go to the policy's channels when degraded.

    Args:
        model_name: Registered model to evaluate.
        data: Labelled production rows: a csv/parquet path, a folder (its newest file) or an
            s3:// URI; a DataFrame from Python.
        target: Column with the true labels or values.
        version: A version number or an alias (champion, challenger, Production, Staging).
        policy: Name of a saved MonitoringPolicy block document; empty: "default", else the
            built-in defaults.
    """
    started = time.monotonic()
    validate_model_name(model_name)
    reference = load_reference.submit(model_name, version, need_profile=False, read_profile=False)
    batch = load_batch.submit(data)
    settings = _policy(policy)
    reference = reference.result()
    report = evaluate_batch(reference, batch.result(), target, settings)

    recorded = record_evaluation(report, reference)
    report.run_id = recorded.run_id
    if report.degraded:
        emit_model_event(model_name, DEGRADED_EVENT, {
            "version": report.version, "metrics": report.metrics, "reasons": report.reasons,
            "data_ref": report.data_ref, "run_id": report.run_id})
    alert = performance_alert(model_name, report.version, report.reasons, settings,
                              report.data_ref, report.n_rows, recorded.run_url)
    report.alerted = alert is not None
    report.alerts_sent, report.alert_errors = dispatch(alert, settings)
    report.duration_s = elapsed(started)
    publish_evaluation(report)
    return report


@data_flow(name="profile-model", log_prints=True)
def profile_model(model_name: str, version: int | str, data: DataRef,
                  overwrite: bool = False) -> ProfileInfo:
    """Store the drift profile of a version registered before profiles existed (or outside
    train_model), from the data it was trained on. With the target column in the data and no
    stored importances, permutation importances are computed too (else the drift score weighs
    every feature the same).

    Args:
        model_name: Registered model.
        version: A version number or an alias (champion, challenger, Production, Staging).
        data: The rows the version was trained on: a csv/parquet path or s3:// URI; a DataFrame
            from Python.
        overwrite: Replace a profile the version already has.
    """
    validate_model_name(model_name)
    reference = load_reference(model_name, version, need_profile=False)
    batch = load_batch(data)
    info = store_profile(reference, batch, overwrite)
    get_run_logger().info("profiled %s v%s: %d rows, %d features (run %s)", model_name,
                          info.version, info.n_rows, len(info.features), info.run_id)
    return info


# --------------------------------------------------------------------------- lifecycle step
def drifted_batch(frame: pd.DataFrame, seed: int = 11) -> pd.DataFrame:
    """A later batch of customers after a month-to-month promotion: resampled so that new,
    short-tenure, month-to-month customers dominate (real rows, so every column stays coherent)."""
    rng = np.random.default_rng(seed)
    weight = np.where(frame["contract"] == "Month-to-month", 6.0, 1.0)
    weight = weight * np.where(frame["tenure"] <= 12, 4.0, 1.0)
    index = rng.choice(len(frame), size=len(frame), replace=True, p=weight / weight.sum())
    return frame.iloc[index].reset_index(drop=True)


def lifecycle_step(story) -> None:
    """The main job's drift step: a drifted later batch is flagged with its top features; the
    undrifted evaluation batch is not. The champion (v1 at this point) is checked."""
    evaluation = Path(story.data["evaluation"])
    drifted_path = evaluation.with_name("churn_drifted.csv")
    drifted_batch(pd.read_csv(evaluation)).to_csv(drifted_path, index=False)
    story.data["drifted"] = drifted_path

    report = check_drift(story.model_name, str(drifted_path))
    top = ", ".join([f"{f.name} (PSI {f.psi:.2f})" for f in report.features if f.drifted][:4])
    story.say(f"drift     later batch ({report.n_current} customers, month-to-month promo) vs "
              f"v{report.version}'s profile: score {report.score:.2f} > {report.threshold:.2f} "
              f"-> {'DRIFTED' if report.drifted else 'not drifted'}; top: {top or 'none'}")
    calm = check_drift(story.model_name, str(evaluation))
    story.say(f"drift     evaluation batch ({calm.n_current} customers): score {calm.score:.2f} "
              f"-> {'DRIFTED' if calm.drifted else 'not drifted'}"
              + (f" ({', '.join(calm.drifted_features)})" if calm.drifted_features else ""))
