"""Automated retraining: should_retrain, retrain_model, retraining_check, retraining_history.
The schedule is the `retraining-check/default` deployment in prefect.yaml (cron 02:00 and a
trigger on `mlops.model.drift-detected`).

retrain_model: hold the model's slot → load the labelled data → check it against the champion →
split a gate slice off the rows the champion never saw → train a challenger on the rest (the
training flow's search) → score both on the gate rows → decide → (approval) → promote inside a
transaction that restores the champion if anything after the alias move fails → record → alert.
"""
from __future__ import annotations

import math
import time
from datetime import datetime, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.transactions import transaction
from pydantic import Field

from blocks.monitoring import resolve_monitoring_policy
from blocks.retraining_policy import RetrainingPolicy, resolve_retraining_policy
from flows.parameters import DataRef, data_flow
from flows.training import train_model
from tasks.alerts import dispatch, retraining_alert
from tasks.events import emit_model_event
from tasks.prefect_api import run_subflow
from tasks.registry import (alias_map, clear_pending_approval, get_registered_model,
                            mark_pending_approval, mlflow_client, model_slug, validate_model_name)
from tasks.retraining import (RetrainingInProgressError, active_ab_tests, data_drift, find_unseen,
                              gate_scratch, history_table, hours_since_last, keep_as_challenger,
                              latest_drift, load_champion, load_history, load_labelled, mark_seen,
                              plan_gate, production_metric, promote_champion, read_schema,
                              record_retraining, retraining_slot, score_gate, store_gate_slice,
                              undo_interrupted_promotion, verify_champion)
from tasks.retraining_rules import (RetrainDecision, RetrainResult, Signal, Trigger, age_signal,
                                    cooldown_signal, decide, drift_signal, gate_verdict,
                                    metric_floor, metric_signal, rows_signal, schema_differences,
                                    sentence)
from tasks.schedules import ScheduleInfo, upsert_schedule

__all__ = ["should_retrain", "retrain_model", "retraining_check", "retraining_history",
           "RetrainDecision", "RetrainResult", "Signal", "PromotionApproval",
           "RetrainingInProgressError", "lifecycle_step", "schedule_retraining_check",
           "ScheduleInfo"]

RETRAINED_EVENT = "mlops.model.retrained"
APPROVAL_POLL_S = 2


class PromotionApproval(RunInput):
    """The form a person fills in the Prefect UI to let a challenger become champion."""

    approve: bool = Field(description="Promote the challenger that passed the gate.")
    reviewer: str = Field(default="", description="Who decided (recorded in the history).")
    note: str = Field(default="", description="Why (recorded in the history).")


def _policy(model_name: str, policy: str | None) -> RetrainingPolicy:
    return resolve_retraining_policy(model_name, policy)


@data_flow(name="should-retrain", log_prints=True)
def should_retrain(model_name: str, data: DataRef | None = None, target: str | None = None,
                   policy: str | None = None) -> RetrainDecision:
    """Whether the champion should be retrained now, why, and every signal beside its threshold.

    Triggers (any one; every one that fired is a reason): the newest check_drift of the champion
    above the MonitoringPolicy's drift_threshold; the drift of the labelled rows the champion
    never saw against its training profile above that threshold; the champion's primary metric
    on those rows worse than the floor; the champion older than max_model_age_days.
    Requirements (each): at least min_new_rows labelled rows the champion has not seen;
    cooldown_hours since the last retraining. Unpacks as `(should_retrain, reason, metrics)`.

    Args:
        model_name: Registered model whose champion is checked.
        data: Labelled rows (a csv/parquet path, a folder of batches or an s3:// URI; a
            DataFrame from Python); empty: the RetrainingPolicy's training_data.
        target: Label column of data; empty: the policy's target.
        policy: Name of a saved RetrainingPolicy document; empty: the model's, else "default".
    """
    validate_model_name(model_name)
    settings = _policy(model_name, policy)
    monitoring = resolve_monitoring_policy(settings.monitoring_policy)
    champion = load_champion(model_name)
    if data is None and settings.training_data and (target or settings.target):
        data, target = settings.training_data, target or settings.target
    view = None
    if data is not None:
        view = find_unseen(load_labelled(data), target or champion.target, champion)

    drift_score, drift_detail = latest_drift(champion)
    data_drift_score, data_drift_detail = data_drift(champion, view, monitoring)
    value, value_detail = production_metric(champion, view)
    floor = metric_floor(champion.metric, champion.holdout.get(champion.metric),
                         settings.min_production_metric, monitoring.max_relative_degradation)
    age_days = (datetime.now(timezone.utc) - champion.created_at).total_seconds() / 86400
    signals = [
        drift_signal(drift_score, monitoring.drift_threshold, drift_detail),
        drift_signal(data_drift_score, monitoring.drift_threshold, data_drift_detail,
                     "data_drift_score"),
        metric_signal(champion.metric, value, floor, value_detail),
        age_signal(age_days, settings.max_model_age_days),
        rows_signal(None if view is None else view.n_unseen, settings.min_new_rows,
                    "no labelled data" if view is None else view.how),
        cooldown_signal(hours_since_last(load_history(model_name, 20)), settings.cooldown_hours),
    ]
    go, reasons = decide(signals, has_labelled_data=view is not None,
                         no_data=settings.labelled_data_problem(model_name, policy))
    decision = RetrainDecision(should_retrain=go, reasons=reasons, signals=signals,
                               model_name=model_name, champion_version=champion.version,
                               checked_at=datetime.now(timezone.utc))
    _publish_decision(decision)
    get_run_logger().info("%s v%s: %s -- %s", model_name, champion.version,
                          "RETRAIN" if go else "no retraining", decision.reason)
    return decision


@data_flow(name="retrain-model", log_prints=True, persist_result=True)
def retrain_model(model_name: str, data: DataRef, target: str, reason: str = "manual",
                  trigger: Trigger = "manual", policy: str | None = None,
                  time_budget_s: float | None = None,
                  max_trials: int | None = None) -> RetrainResult:
    """Train a challenger on labelled data and promote it only if it beats the champion on the
    same held-out rows by the policy's promotion_margin (and passes the sanity checks).

    Not promoted: the new version keeps `challenger`, the champion is untouched, `why` says
    why. With an active A/B test of the model the challenger is registered but `champion` does
    not move. One retraining per model at a time (a second is refused).

    Args:
        model_name: Registered model to retrain.
        data: Labelled rows (a csv/parquet path, a folder of batches or an s3:// URI; a
            DataFrame from Python).
        target: Label column of data.
        reason: Why (recorded in the retraining history).
        trigger: What started it: manual, schedule or event.
        policy: Name of a saved RetrainingPolicy document; empty: the model's, else "default".
        time_budget_s: Training budget in seconds; empty: the policy's time_budget_s.
        max_trials: Trials of the challenger's search (reproducible); empty: the policy's
            max_trials, else the time budget decides.
    """
    started, started_at = time.monotonic(), datetime.now(timezone.utc)
    logger = get_run_logger()
    validate_model_name(model_name)
    settings = _policy(model_name, policy)
    monitoring = resolve_monitoring_policy(settings.monitoring_policy)
    monitoring.check_channels()
    get_registered_model(mlflow_client(), model_name)  # an unknown model is refused here
    with retraining_slot(model_name, settings.slot_lease_s), gate_scratch() as scratch:
        # a promotion left unverified by a run that died is undone before the champion is read
        undo_interrupted_promotion(model_name)
        champion = load_champion(model_name)
        result = RetrainResult(model_name=model_name, trigger=trigger, reason=reason,
                               champion_version=champion.version, decision="failed",
                               metric=champion.metric, margin=settings.promotion_margin,
                               started_at=started_at)
        # bad input is refused here, before anything is trained, registered or recorded
        view = find_unseen(load_labelled(data), target, champion)
        plan = plan_gate(view, champion, settings, scratch)
        gate_path = str(plan.gate_path)
        result.gate_rows, result.gate_sha256 = plan.n_gate, plan.gate_sha256
        logger.info("gate slice: %d of %d unseen rows (%s); challenger trains on %d rows",
                    plan.n_gate, plan.n_unseen, plan.how, plan.n_train)
        try:
            # a Prefect server restart while the search starts waits for the API, not fails
            trained = run_subflow(train_model, str(plan.train_path), target, model_name,
                                  metric=champion.metric,
                                  time_budget_s=time_budget_s or settings.time_budget_s,
                                  max_trials=max_trials or settings.max_trials,
                                  promote="never")
            result.challenger_version = trained.version
            mark_seen(trained.run_id, plan.seen_all, len(view.frame))
            store_gate_slice(trained.run_id, plan)
            champion_scores, challenger_scores = score_gate(
                model_name, champion.version, trained.version, gate_path)
            result.champion_metrics, result.challenger_metrics = champion_scores, challenger_scores
            result.champion_score = champion_scores.get(champion.metric)
            result.challenger_score = challenger_scores.get(champion.metric)

            floor = settings.min_production_metric
            verdict = gate_verdict(champion.metric, champion_scores, challenger_scores,
                                   settings.promotion_margin, floor,
                                   schema_differences(champion.schema, read_schema(trained.run_id)))
            result.why = verdict.why
            keep_as_challenger(model_name, trained.version, f"retraining ({trigger}): {reason}")
            if verdict.promote:
                _decide_promotion(result, settings, gate_path)
            else:
                result.decision = "not_promoted"
            if result.promoted:
                with transaction():
                    promote_champion(model_name, trained.version,
                                     f"retraining ({trigger}): {verdict.why}")
                    verify_champion(model_name, trained.version, gate_path, champion.metric,
                                    result.challenger_score)
                    _finish(result, started, gate_path, champion.experiment_id)
            else:
                _finish(result, started, gate_path, champion.experiment_id)
        except BaseException as exc:
            if result.run_id is None:  # not recorded yet: the history keeps the failure too
                result.decision, result.promoted = "failed", False
                result.why = f"{type(exc).__name__}: {exc}"[:2000]
                try:
                    _finish(result, started, gate_path, champion.experiment_id)
                except Exception as record_error:  # the original error matters more
                    logger.error("could not record the failed retraining: %s", record_error)
            raise

    emit_model_event(model_name, RETRAINED_EVENT, {
        "trigger": trigger, "reason": reason, "decision": result.decision,
        "promoted": result.promoted, "champion_version": result.champion_version,
        "challenger_version": result.challenger_version, "metric": result.metric,
        "champion_score": result.champion_score, "challenger_score": result.challenger_score})
    alert = retraining_alert(model_name, result.challenger_version, result.promoted,
                             result.decision, result.why, monitoring,
                             [f"trigger: {trigger}; reason: {reason}",
                              f"gate: {result.gate_rows} rows the champion never saw"])
    dispatch(alert, monitoring)
    _publish_result(result)
    logger.info("%s: v%s vs champion v%s on %s gate rows -> %s (%s)", model_name,
                result.challenger_version, result.champion_version, result.gate_rows,
                result.decision, result.why)
    return result


def _decide_promotion(result: RetrainResult, settings: RetrainingPolicy, gate_path: str) -> None:
    """Gate passed: an active A/B test holds the champion; else ask a person when required."""
    tests = active_ab_tests(result.model_name)
    if tests:
        result.decision = "held_ab_test"
        result.why += (f"; promotion held: A/B test {', '.join(tests)} is active for "
                       f"{result.model_name} (conclude it first)")
        return
    if settings.require_approval:
        timeout = max(1, math.ceil(settings.approval_timeout_hours * 3600))
        get_run_logger().warning(
            "waiting up to %g h for a person to approve v%s (Prefect UI: Resume this run)",
            settings.approval_timeout_hours, result.challenger_version)
        create_markdown_artifact(
            key=f"retraining-approval-{model_slug(result.model_name)}",
            markdown=f"## Approve {result.model_name} v{result.challenger_version}?\n\n"
                     f"{result.why}.\n\nResume this flow run with `approve: true` to promote it.",
            description=f"approval needed: {result.model_name} v{result.challenger_version}")
        # retention spares the version while a person decides, even if `challenger` moves on
        mark_pending_approval(result.model_name, result.challenger_version, timeout)
        try:
            answer = pause_flow_run(wait_for_input=PromotionApproval, timeout=timeout,
                                    poll_interval=APPROVAL_POLL_S)
        except FlowPauseTimeout:
            _resume_after_pause_timeout(result)
            result.decision = "approval_timed_out"
            result.why += (f"; not approved within approval_timeout_hours "
                           f"{settings.approval_timeout_hours:g} h")
            return
        finally:
            clear_pending_approval(result.model_name, result.challenger_version)
        result.approved_by = answer.reviewer or "(unnamed)"
        if not answer.approve:
            result.decision = "rejected_by_approver"
            result.why += f"; rejected by {result.approved_by}" + \
                (f": {answer.note}" if answer.note else "")
            return
        result.why += f"; approved by {result.approved_by}" + (f": {answer.note}" if answer.note else "")
    result.decision, result.promoted = "promoted", True


def _resume_after_pause_timeout(result: RetrainResult) -> None:
    """Put this run back to Running after its approval wait timed out.

    A Prefect pause timeout means "fail the run": once the pause has expired the server turns
    any later state of the run into Failed ("The flow was paused and never resumed"). For us the
    timeout is a decision (not promoted), which the run must still record and end Completed
    with. Prefect has no way to resume at the timeout instead (PrefectHQ/prefect#11683 proposes
    one); until it does, the run moves itself out of the expired pause with the public client.
    """
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Running(
            message=f"approval of v{result.challenger_version} timed out: not promoted"),
            force=True)


def _finish(result: RetrainResult, started: float, gate_path: str | None,
            experiment_id: str | None) -> None:
    result.champion_after = alias_map(mlflow_client(), result.model_name).get("champion")
    result.duration_s = round(time.monotonic() - started, 2)
    result.run_id = record_retraining(result, gate_path, experiment_id)


@flow(name="retraining-check", log_prints=True)
def retraining_check(model_name: str, trigger: Trigger = "schedule",
                     policy: str | None = None) -> RetrainResult | RetrainDecision:
    """Scheduled (02:00) and drift-event-triggered: should_retrain on the RetrainingPolicy's
    labelled data, then retrain_model when it says so. Returns the retraining, or the decision
    when there was none.

    Without labelled data configured for the model there is nothing to retrain on: the run
    reports the signals and what to configure, and ends Completed. An unknown model is an error.
    A Prefect server restart as a subflow starts delays it until the API answers (up to 180 s,
    tasks/prefect_api.py) instead of failing the run.

    Args:
        model_name: Registered model to check.
        trigger: What started it: schedule, event or manual (recorded in the history).
        policy: Name of a saved RetrainingPolicy document; empty: the model's, else "default".
    """
    validate_model_name(model_name)
    settings = _policy(model_name, policy)
    problem = settings.labelled_data_problem(model_name, policy)
    if problem:
        decision = run_subflow(should_retrain, model_name, policy=policy)
        get_run_logger().warning("%s: nothing to retrain on -- %s", model_name, problem)
        return decision
    data, target = settings.training_data, settings.target
    decision = run_subflow(should_retrain, model_name, data, target, policy=policy)
    if not decision.should_retrain:
        return decision
    return run_subflow(retrain_model, model_name, data, target, reason=decision.reason,
                       trigger=trigger, policy=policy)


@flow(name="retraining-history", log_prints=True)
def retraining_history(model_name: str, limit: int = 100) -> list[RetrainResult]:
    """Every retraining of the model (newest first): time, trigger, reason, both versions' scores
    on the gate rows, decision and versions; also published as artifact retraining-history-<model>.

    Args:
        model_name: Registered model.
        limit: How many retrainings to return, newest first.
    """
    validate_model_name(model_name)
    history = load_history(model_name, limit)
    if history:
        create_table_artifact(key=f"retraining-history-{model_slug(model_name)}",
                              table=history_table(history),
                              description=f"{model_name}: {len(history)} retraining(s), newest first")
    return history


# --------------------------------------------------------------------------- UI
def _publish_decision(decision: RetrainDecision) -> None:
    rows = "\n".join(
        f"| {s.name} | {s.role} | {'n/a' if s.value is None else f'{s.value:.4g}'} | "
        f"{'n/a' if s.threshold is None else f'{s.threshold:.4g}'} | "
        f"{'-' if not s.evaluated else ('yes' if s.fired else 'no')} | {sentence(s)} |"
        for s in decision.signals)
    create_markdown_artifact(
        key=f"retraining-check-{model_slug(decision.model_name)}",
        markdown=f"## {decision.model_name} v{decision.champion_version}: "
                 f"{'retrain' if decision.should_retrain else 'no retraining'}\n\n"
                 + "\n".join(f"- {r}" for r in decision.reasons)
                 + "\n\n| signal | role | value | threshold | fired / holds | reading |\n"
                   "|---|---|---|---|---|---|\n" + rows + "\n",
        description=f"should_retrain: {decision.should_retrain}")


def _publish_result(result: RetrainResult) -> None:
    def f(x):
        return "n/a" if x is None else f"{x:.4f}"

    create_markdown_artifact(
        key=f"retraining-{model_slug(result.model_name)}",
        markdown=f"## {result.model_name}: {result.decision.replace('_', ' ')}\n\n"
                 f"- trigger: {result.trigger}; reason: {result.reason}\n"
                 f"- gate: {result.gate_rows} rows neither version trained on "
                 f"(sha256 {result.gate_sha256 or 'n/a'})\n"
                 f"- {result.metric}: champion v{result.champion_version} "
                 f"{f(result.champion_score)} vs challenger v{result.challenger_version} "
                 f"{f(result.challenger_score)} (margin {result.margin})\n"
                 f"- verdict: {result.why}\n- champion now: v{result.champion_after}\n"
                 f"- MLflow run: {result.run_id}\n",
        description=f"{result.model_name}: {result.decision}")


# --------------------------------------------------------------------------- lifecycle step
def lifecycle_step(story) -> None:
    """The main job's retraining chapter: the champion meets the drifted batch, should_retrain
    weighs the signals, retrain_model trains a challenger and the gate decides on rows neither
    version has seen."""
    import pandas as pd

    from flows.drift import check_drift
    from tasks.demo_data import TARGET

    name = story.model_name
    labelled = story.data["early"].with_name("churn_labelled.csv")
    # the labelled table grows: every customer labelled so far, then the drifted batch's outcomes
    pd.concat([pd.read_csv(story.data["grown"]), pd.read_csv(story.data["drifted"])],
              ignore_index=True).to_csv(labelled, index=False)
    check = check_drift(name, str(story.data["drifted"]))
    decision = should_retrain(name, str(labelled), TARGET)
    story.say(f"retrain?  champion v{decision.champion_version}: "
              f"{'yes' if decision.should_retrain else 'no'} -- {decision.reason}")
    if not any(s.fired for s in decision.signals if s.role == "trigger"):
        return
    if not decision.should_retrain:  # a rerun of the demo within the cooldown: retrain by hand
        story.say("retrain   retraining by hand (retrain_model is not held by the cooldown)")
    result = retrain_model(name, str(labelled), TARGET, reason=decision.reason,
                           time_budget_s=story.budget_s, max_trials=story.max_trials)
    story.say(f"retrain   v{result.challenger_version} trained; gate on {result.gate_rows} "
              f"customers neither version saw: {result.metric} champion v{result.champion_version} "
              f"{result.champion_score:.4f} vs v{result.challenger_version} "
              f"{result.challenger_score:.4f}")
    story.say(f"retrain   decision {result.decision}: {result.why}; champion is "
              f"v{result.champion_after} (drift score was {check.score:.2f})")


# --------------------------------------------------------------------------- schedules
@flow(name="schedule-retraining-check")
def schedule_retraining_check(model_name: str, cron: str = "0 2 * * *", timezone: str = "UTC",
                              active: bool = True) -> ScheduleInfo:
    """Add (or update) a schedule of the `retraining-check/default` deployment that checks
    `model_name`: one schedule per model, so asking again changes it instead of adding one.

    Args:
        model_name: Registered model the scheduled check runs for.
        cron: When, as a cron expression (default 02:00 daily).
        timezone: IANA time zone of the cron expression.
        active: Whether the schedule creates runs.
    """
    validate_model_name(model_name)
    info = upsert_schedule(f"{retraining_check.name}/default",
                           f"retraining-check-{model_slug(model_name)}", cron, timezone, active,
                           {"model_name": model_name})
    get_run_logger().info("%s schedule %s of %s for %s: %s (%s), %s",
                          "added" if info.created else "updated", info.slug, info.deployment,
                          model_name, cron, timezone, "active" if active else "inactive")
    return info
