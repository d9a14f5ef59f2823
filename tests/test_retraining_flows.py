"""Retraining flows against a real Prefect API and the embedded MLflow store.

One weak champion is trained once for the module (on churn rows with 40 % of the labels flipped);
each test registers its own copy of it under its own model name, so tests do not share aliases,
policies or history. Failures are injected by replacing one of our own steps, never Prefect or
MLflow.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prefect import task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter,
                                            FlowRunFilterState, FlowRunFilterStateType)
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run

import flows.retraining as retraining_flows
import flows.training as training_flows
from blocks.retraining_policy import RetrainingPolicy, document_name
from flows.ab_testing import conclude_ab_test, create_ab_test
from flows.drift import check_drift, drifted_batch
from flows.registry import compare_versions, promote_model, register_model
from flows.retraining import (RetrainDecision, RetrainingInProgressError, RetrainResult,
                              retrain_model, retraining_check, retraining_history, should_retrain)
from flows.training import train_model
from tasks.demo_data import churn_frame
from tasks.errors import DataError, ModelNotFoundError
from tasks.registry import alias_map, mlflow_client, model_slug, read_alias_history
from tasks.retraining import retraining_slot
from tests.budgets import ONE_LINEAR_TRIAL
from tests.test_drift_flows import read_artifacts, read_events
from tests.test_registry import log_tiny_model, saved_mlflow_config

BUDGET = 4


@dataclass
class Base:
    model_uri: str
    run_id: str
    old: pd.DataFrame      # the rows the champion was given (noisy labels)
    new: pd.DataFrame      # labelled rows it never saw (true labels)
    folder: Path

    def labelled(self, name: str, frame: pd.DataFrame | None = None) -> str:
        path = self.folder / f"{name}.csv"
        (pd.concat([self.old, self.new], ignore_index=True) if frame is None else frame
         ).to_csv(path, index=False)
        return str(path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("retraining")
    patch = pytest.MonkeyPatch()
    patch.setenv("MLOPS_HOME", str(folder / "state"))
    try:
        frame = churn_frame().sample(1800, random_state=3).reset_index(drop=True)
        old = frame.iloc[:300].copy()
        flip = np.random.default_rng(0).random(len(old)) < 0.4
        old.loc[flip, "churn"] = np.where(old.loc[flip, "churn"] == "Yes", "No", "Yes")
        old_path = folder / "old.csv"
        old.to_csv(old_path, index=False)
        trained = train_model(str(old_path), "churn", "rt_base", **ONE_LINEAR_TRIAL)
        yield Base(trained.model_uri, trained.run_id, old, frame.iloc[300:].reset_index(drop=True),
                   folder)
    finally:
        patch.undo()


@pytest.fixture
def model(base, request):
    """A fresh registered model whose champion (v1) is the module's weak base model."""

    name = "rt_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.removeprefix("test_").lower())[-44:]
    register_model(name, model_uri=base.model_uri, run_id=base.run_id)
    promote_model(name, 1, "champion", reason="test setup")
    return name


def save_policy(name: str, **settings) -> None:
    defaults = dict(min_new_rows=100, cooldown_hours=0, time_budget_s=BUDGET, max_trials=2)
    RetrainingPolicy(**{**defaults, **settings}).save(document_name(name), overwrite=True)


def row_keys(frame: pd.DataFrame) -> pd.Series:
    """One comparable string per row (numbers as floats, missing as empty)."""
    cols = sorted(frame.columns)
    norm = pd.DataFrame({c: (frame[c].astype(float) if pd.api.types.is_numeric_dtype(frame[c])
                             else frame[c]).astype("string").fillna("") for c in cols})
    return norm.agg("|".join, axis=1)


def versions(name: str) -> list[int]:
    client = mlflow_client()
    return sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))


# --------------------------------------------------------------------------- the gate
def test_a_better_challenger_is_promoted_after_scoring_both_on_the_same_unseen_rows(base, model,
                                                                                   caplog):
    save_policy(model)
    result = retrain_model(model, base.labelled(model), "churn", reason="test: fresh labels")

    assert isinstance(result, RetrainResult)
    assert (result.champion_version, result.challenger_version) == (1, 2)
    assert result.decision == "promoted" and result.promoted
    assert result.challenger_score > result.champion_score
    assert alias_map(mlflow_client(), model) == {"champion": 2}
    assert result.champion_after == 2

    # The gate rows are stored with the record: both versions score on them exactly as recorded,
    # and none of them is a row the champion was given.
    import mlflow

    gate_file = mlflow.artifacts.download_artifacts(run_id=result.run_id,
                                                    artifact_path="retraining/gate.parquet")
    gate = pd.read_parquet(gate_file)
    assert len(gate) == result.gate_rows > 0
    again = compare_versions(model, 1, 2, data=gate_file).scores_on_data
    assert again["1"]["roc_auc"] == pytest.approx(result.champion_score, abs=1e-12)
    assert again["2"]["roc_auc"] == pytest.approx(result.challenger_score, abs=1e-12)
    assert not row_keys(gate).isin(row_keys(base.old)).any()
    # The challenger's run keeps its training rows and the gate rows, and names them as its data;
    # nothing of the slice stays in the worker's state folder (another worker reads MLflow).
    run_id = mlflow_client().get_model_version(model, "2").run_id
    ref = mlflow_client().get_run(run_id).data.tags["mlops.data_ref"]
    assert ref == f"runs:/{run_id}/mlops/gate-slice/train.parquet"
    train_rows = pd.read_parquet(mlflow.artifacts.download_artifacts(ref))
    slice_gate = pd.read_parquet(mlflow.artifacts.download_artifacts(
        f"runs:/{run_id}/mlops/gate-slice/gate.parquet"))
    assert slice_gate.equals(gate) and len(train_rows) > 0
    assert not row_keys(train_rows).isin(row_keys(gate)).any()
    from blocks.mlflow_config import state_dir

    assert not (state_dir() / "retraining").exists()

    history = retraining_history(model)
    assert [(h.trigger, h.decision, h.challenger_version) for h in history] == [
        ("manual", "promoted", 2)]
    assert history[0].reason == "test: fresh labels"
    moves = read_alias_history(mlflow_client(), model)
    assert moves[-1]["kind"] == "retrain" and moves[-1]["to"] in (2, None)

    # the UI, the event bus and the alert channel (log, by default) hear of it
    [event] = read_events("mlops.model.retrained", model)
    assert event.payload["decision"] == "promoted" and event.payload["challenger_version"] == 2
    assert f"[mlops] retraining: {model} v2 promoted to champion" in caplog.text


def test_a_challenger_short_of_the_margin_stays_challenger_and_an_ab_test_holds_promotion(base, model):
    save_policy(model, promotion_margin=0.5)  # no roc_auc gain of 0.5 exists
    first = retrain_model(model, base.labelled(model), "churn")
    assert first.decision == "not_promoted" and not first.promoted
    assert "less than promotion_margin 0.5000" in first.why
    assert alias_map(mlflow_client(), model) == {"champion": 1, "challenger": 2}

    # While an A/B test of the model is active, a challenger that passes the gate is registered
    # and becomes challenger, but `champion` does not move.
    test_id = create_ab_test(model, traffic_split=0.2)
    try:
        save_policy(model, promotion_margin=0.0)
        held = retrain_model(model, base.labelled(model), "churn")
        assert held.decision == "held_ab_test" and not held.promoted
        assert test_id in held.why
        assert alias_map(mlflow_client(), model) == {"champion": 1, "challenger": 3}
    finally:
        conclude_ab_test(test_id, promote_winner=False, force=True)
    assert [h.decision for h in retraining_history(model)] == ["held_ab_test", "not_promoted"]


# --------------------------------------------------------------------------- failures
@task
def failing_verification(*args, **kwargs):
    raise RuntimeError("injected: the model store went away after the alias moved")


def test_a_failure_after_the_alias_moved_restores_the_previous_champion(base, model, monkeypatch):
    save_policy(model)
    monkeypatch.setattr(retraining_flows, "verify_champion", failing_verification)
    with pytest.raises(RuntimeError, match="injected"):
        retrain_model(model, base.labelled(model), "churn")

    # read back from MLflow: the old champion is in place, the new version is only challenger
    assert alias_map(mlflow_client(), model) == {"champion": 1, "challenger": 2}
    moves = read_alias_history(mlflow_client(), model)
    assert [(m["alias"], m["to"], m["kind"]) for m in moves[-3:]] == [
        ("challenger", None, "retrain"), ("champion", 1, "rollback"), ("challenger", 2, "rollback")]
    [record] = retraining_history(model)
    assert record.decision == "failed" and not record.promoted
    assert "injected" in record.why and record.champion_after == 1


@task
def crashing_refit(*args, **kwargs):
    raise MemoryError("injected: the training step crashed")


def test_a_crash_of_the_training_step_leaves_no_alias_and_no_version(base, model, monkeypatch):
    save_policy(model)
    monkeypatch.setattr(training_flows, "refit_and_log", crashing_refit)
    with pytest.raises(MemoryError):
        retrain_model(model, base.labelled(model), "churn")
    assert alias_map(mlflow_client(), model) == {"champion": 1}
    assert versions(model) == [1]
    [record] = retraining_history(model)
    assert record.decision == "failed" and record.challenger_version is None


def test_two_retrainings_of_one_model_never_run_together(base, model):
    # The first run holds the model's slot while it waits for a person's approval, so the two
    # overlap for certain (two runs merely started together may not: on an idle machine the
    # first can finish before the second reaches the slot).
    save_policy(model, require_approval=True)
    outcome, worker, paused = start_retraining_that_pauses(base, model)
    try:
        with pytest.raises(RetrainingInProgressError, match="another retraining of") as refused:
            retrain_model(model, base.labelled(model), "churn")
        assert "nothing was changed" in str(refused.value)
        assert versions(model) == [1, 2]  # one challenger, not two
    finally:  # never leave a paused run behind
        resume_flow_run(paused.id, run_input={"approve": False, "reviewer": "ana", "note": ""})
        worker.join(timeout=120)
    [result] = outcome
    assert isinstance(result, RetrainResult) and result.decision == "rejected_by_approver", result
    assert [h.decision for h in retraining_history(model)] == ["rejected_by_approver"]

    # Two holders arriving at the same moment: exactly one gets the slot, the other is refused.
    start, outcomes = threading.Barrier(2), []

    def hold():
        start.wait()
        try:
            with retraining_slot(model):
                time.sleep(5)  # longer than the two arrivals are apart, even under load
            outcomes.append("held")
        except RetrainingInProgressError:
            outcomes.append("refused")

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["held", "refused"], outcomes
    with retraining_slot(model) as slot:  # the slot is free again afterwards
        assert slot.startswith("mlops-retraining-rt-")


# --------------------------------------------------------------------------- approval
def start_retraining_that_pauses(base, model: str):
    """retrain_model in a thread, returned once its run is paused for approval: (the list its
    result or exception lands in, the thread, the paused flow run)."""
    outcome: list[object] = []

    def run():
        try:
            outcome.append(retrain_model(model, base.labelled(model), "churn"))
        except Exception as exc:  # collected and asserted by the test
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    return outcome, worker, _paused_run(model)


def _paused_run(model_name: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain-model"])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            for run in runs:
                if run.parameters.get("model_name") == model_name:
                    return run
            time.sleep(0.5)
    raise AssertionError(f"no paused retrain-model run of {model_name} within {timeout}s")


@pytest.mark.parametrize("approve", [True, False])
def test_with_approval_required_a_person_decides_in_the_ui(base, model, approve):
    save_policy(model, require_approval=True)
    outcome, worker, paused = start_retraining_that_pauses(base, model)
    try:
        assert alias_map(mlflow_client(), model) == {"champion": 1, "challenger": 2}  # not yet
    finally:  # never leave a paused run behind
        resume_flow_run(paused.id, run_input={"approve": approve, "reviewer": "ana",
                                              "note": "looked at the gate table"})
        worker.join(timeout=120)
    [result] = outcome
    if approve:
        assert result.decision == "promoted" and result.approved_by == "ana"
        assert alias_map(mlflow_client(), model) == {"champion": 2}
    else:
        assert result.decision == "rejected_by_approver" and not result.promoted
        assert "rejected by ana: looked at the gate table" in result.why
        assert alias_map(mlflow_client(), model) == {"champion": 1, "challenger": 2}


def test_an_approval_nobody_gives_in_time_is_recorded_as_timed_out(base, model):
    save_policy(model, require_approval=True, approval_timeout_hours=0.001)  # 3.6 s
    outcome, worker, paused = start_retraining_that_pauses(base, model)  # nobody resumes it
    worker.join(timeout=180)
    [result] = outcome
    assert isinstance(result, RetrainResult), result
    assert result.decision == "approval_timed_out" and not result.promoted
    assert "not approved within approval_timeout_hours 0.001" in result.why
    assert result.approved_by is None
    assert alias_map(mlflow_client(), model) == {"champion": 1, "challenger": 2}

    # the run goes on after the wait and ends Completed; history and the UI say what happened
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(paused.id).state
    assert state.is_completed(), state
    [record] = retraining_history(model)
    assert record.decision == "approval_timed_out"
    [artifact] = read_artifacts(f"retraining-{model_slug(model)}")
    assert artifact.data.startswith(f"## {model}: approval timed out")


def test_a_version_waiting_for_approval_survives_retention_while_its_alias_moves_on(base, model):
    save_policy(model, require_approval=True)
    outcome, worker, paused = start_retraining_that_pauses(base, model)
    try:
        with saved_mlflow_config(keep_versions=1):
            # while a person decides on v2, another challenger arrives and more versions follow
            register_model(model, run_id=log_tiny_model())  # v3
            promote_model(model, 3, "challenger", reason="another candidate")
            register_model(model, run_id=log_tiny_model())  # v4: v2 holds no alias any more
            assert alias_map(mlflow_client(), model) == {"champion": 1, "challenger": 3}
            assert versions(model) == [1, 2, 3, 4]
    finally:  # never leave a paused run behind
        resume_flow_run(paused.id, run_input={"approve": False, "reviewer": "ana"})
        worker.join(timeout=120)
    [result] = outcome
    assert result.decision == "rejected_by_approver" and result.challenger_version == 2
    with saved_mlflow_config(keep_versions=1):
        register_model(model, run_id=log_tiny_model())  # v5: nothing keeps v2 (nor v4) now
    assert versions(model) == [1, 3, 5]


# --------------------------------------------------------------------------- the check
def test_drift_makes_the_check_retrain_with_the_policy_data_and_the_cooldown_holds_the_next(base, model):
    labelled = base.labelled(model)
    save_policy(model, training_data=labelled, target="churn", cooldown_hours=6)
    quiet = should_retrain(model)
    assert isinstance(quiet, RetrainDecision) and not quiet.should_retrain
    signals = {s.name: s for s in quiet.signals}
    assert not signals["drift_score"].evaluated  # no check_drift of v1 yet
    assert signals["new_labelled_rows"].value == pytest.approx(len(base.new), abs=5)
    assert signals["new_labelled_rows"].fired  # enough rows, but no trigger

    report = check_drift(model, drifted_batch(base.new.drop(columns=["churn"])))
    assert report.drifted
    go, reason, metrics = should_retrain(model)
    assert go is True and reason.startswith(f"drift score {report.score:.4g} > drift_threshold")
    assert metrics["drift_score"] == pytest.approx(report.score)

    result = retraining_check(model, trigger="event")
    assert isinstance(result, RetrainResult)
    assert result.trigger == "event" and result.reason == reason
    again = retraining_check(model, trigger="event")
    assert isinstance(again, RetrainDecision) and not again.should_retrain
    assert any(r.startswith("blocked: last retraining") and "< cooldown_hours 6" in r
               for r in again.reasons)
    assert len(retraining_history(model)) == 1


def test_a_check_with_nothing_to_retrain_on_completes_and_says_what_to_configure(base, model,
                                                                                 caplog):
    # no RetrainingPolicy of this model and no 'default' one: no labelled data to retrain on
    state = retraining_check(model, trigger="schedule", return_state=True)
    assert state.is_completed(), state
    decision = state.result()
    assert isinstance(decision, RetrainDecision) and not decision.should_retrain
    [hint] = [r for r in decision.reasons if r.startswith("no labelled data configured")]
    assert f"for model {model!r}: the RetrainingPolicy lacks training_data and target" in hint
    assert f".save({document_name(model)!r}, overwrite=True)" in hint
    assert hint in caplog.text
    [artifact] = read_artifacts(f"retraining-check-{document_name(model)}")
    assert hint in artifact.data and artifact.description == "should_retrain: False"

    # half a policy: the data but no target column
    save_policy(model, training_data=base.labelled(model))
    half = retraining_check(model, trigger="event")
    assert isinstance(half, RetrainDecision) and not half.should_retrain
    assert any("the RetrainingPolicy lacks target;" in r for r in half.reasons), half.reasons
    assert versions(model) == [1] and retraining_history(model) == []

    # a model that does not exist is still an error
    with pytest.raises(ModelNotFoundError, match="no registered model named 'rt_nobody'"):
        retraining_check("rt_nobody")


# --------------------------------------------------------------------------- drift of given rows
def energy_demand(season: str, n: int, seed: int) -> pd.DataFrame:
    """Daily energy demand of a town: heating below 18 degrees, cooling above."""
    rng = np.random.default_rng(seed)
    winter = season == "winter"
    temp = rng.normal(2.0, 4.0, n) if winter else rng.normal(27.0, 3.0, n)
    humidity = rng.normal(80.0, 6.0, n) if winter else rng.normal(55.0, 8.0, n)
    demand = np.where(temp < 18, 3.0 * (18 - temp), 4.0 * (temp - 18)) + rng.normal(0, 2.0, n)
    return pd.DataFrame({"temp": temp.round(2), "humidity": humidity.round(1),
                         "demand": demand.round(2)})


def test_summer_rows_given_to_a_winter_model_report_their_drift_beside_the_fallen_metric(
        state_dir, tmp_path):
    winter, summer = tmp_path / "winter.csv", tmp_path / "summer.csv"
    energy_demand("winter", 400, seed=1).to_csv(winter, index=False)
    energy_demand("summer", 300, seed=2).to_csv(summer, index=False)
    name = "rt_energy_demand"
    train_model(str(winter), "demand", name, **ONE_LINEAR_TRIAL)
    save_policy(name, max_model_age_days=1e-6)  # the age trigger fires too

    decision = should_retrain(name, str(summer), "demand")

    signals = {s.name: s for s in decision.signals}
    assert decision.should_retrain is True
    # every trigger that fired is a reason: the drift of these rows, the metric, the age
    assert [r.split(" ")[0] for r in decision.reasons] == ["data", "rmse", "champion"], \
        decision.reasons
    assert re.fullmatch(r"data drift score [\d.]+ > drift_threshold 0.3 \(on 300 labelled rows "
                        r"v1 has not seen; drifted: .*temp.*\)", decision.reasons[0]), \
        decision.reasons
    assert signals["data_drift_score"].value > 0.9
    assert signals["production_rmse"].fired and signals["model_age_days"].fired
    # the comparison check_drift makes on the same rows, without recording a check
    assert not signals["drift_score"].evaluated
    report = check_drift(name, str(summer))
    assert signals["data_drift_score"].value == pytest.approx(report.score)
    assert signals["data_drift_score"].threshold == report.threshold


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_anything_is_written(base, model):
    save_policy(model)
    before = (versions(model), alias_map(mlflow_client(), model))
    changed = pd.concat([base.old, base.new], ignore_index=True).drop(columns=["tenure"])
    changed["region"] = "north"
    with pytest.raises(DataError, match=r"missing columns \['tenure'\], new columns \['region'\]"):
        retrain_model(model, base.labelled(model + "_schema", changed), "churn")
    with pytest.raises(DataError, match="too few labelled rows .* 30 rows v1 has not seen"):
        retrain_model(model, base.labelled(model + "_few", pd.concat([base.old, base.new[:30]])),
                      "churn")
    with pytest.raises(DataError, match="target 'tenure' is not the one model"):
        retrain_model(model, base.labelled(model), "tenure")
    with pytest.raises(ModelNotFoundError, match="no registered model named 'rt_nobody'"):
        retrain_model("rt_nobody", base.labelled(model), "churn")
    assert (versions(model), alias_map(mlflow_client(), model)) == before
    assert retraining_history(model) == []


# --------------------------------------------------------------------------- the main job
def test_lifecycle_step_shows_the_decision_and_the_gate(base, model):
    from flows.retraining import lifecycle_step

    lines: list[str] = []

    @dataclass
    class Story:
        model_name: str
        data: dict
        budget_s: float = BUDGET
        max_trials: int | None = 2

        def say(self, line: str) -> None:
            lines.append(line)

    early = Path(base.labelled(model + "_early", base.old))
    grown = Path(base.labelled(model + "_grown", pd.concat([base.old, base.new[:900]])))
    drifted = Path(base.labelled(model + "_drifted", drifted_batch(base.new[900:].reset_index(
        drop=True))))
    lifecycle_step(Story(model, {"early": early, "grown": grown, "drifted": drifted}))
    assert lines[0].startswith("retrain?  champion v1: yes -- drift score")
    assert "gate on" in lines[1] and "customers neither version saw" in lines[1]
    decision = retraining_history(model)[0]
    assert f"decision {decision.decision}" in lines[2]
    assert f"champion is v{decision.champion_after}" in lines[2]


def test_a_regression_model_is_gated_on_its_lower_is_better_metric(tmp_path):
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True).frame.sample(frac=1.0, random_state=0)
    old, labelled = tmp_path / "old.csv", tmp_path / "labelled.csv"
    frame.iloc[:120].to_csv(old, index=False)
    frame.to_csv(labelled, index=False)
    name = "rt_diabetes"
    first = train_model(str(old), "target", name, **ONE_LINEAR_TRIAL)
    assert first.metric == "rmse"
    save_policy(name, min_new_rows=100)
    result = retrain_model(name, str(labelled), "target")
    assert result.metric == "rmse" and result.gate_rows == pytest.approx(161, abs=1)
    better = result.challenger_score < result.champion_score
    assert result.promoted is better
    assert alias_map(mlflow_client(), name)["champion"] == (2 if better else 1)
