"""Retraining end to end on the real stack (tests/e2e/conftest.py): a champion trained through
`train-model/default`, its RetrainingPolicy block saved on the stack's Prefect API, a drifted
batch checked through `check-drift/default` -- and then nobody runs anything: the deployment
trigger of `retraining-check/default` (prefect.yaml, on `mlops.model.drift-detected`) must start
the check by itself, the worker runs it, and the retraining lands in the MLflow server's history
with the aliases the decision implies. Also the manual way in (held by the cooldown), the history
deployment, and a scheduled check of a model without labelled data (nothing to do: Completed).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from tasks.retraining_rules import RetrainResult
from tests.e2e.conftest import ROOT, Stack
from tests.e2e.test_stack import TRIALS, aliases, api, assert_completed, request

pytestmark = pytest.mark.e2e

MODEL = "e2e_retrain"                    # its RetrainingPolicy document: "e2e-retrain"
DOCUMENT = "e2e-retrain"
UNLABELLED_MODEL = "e2e_retrain_unlabelled"  # no document of its own, and no "default" either
UNLABELLED_DOCUMENT = "e2e-retrain-unlabelled"
BUDGET_S = 4                             # training budget of the champion and of each challenger
TRIGGER_WAIT_S = 240                     # drift event -> triggered check in a terminal state
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
POLICY_TYPE = "mlops-retraining-policy"


# --------------------------------------------------------------------------- helpers
def save_policy(stack: Stack, document: str, **fields) -> None:
    """`RetrainingPolicy(**fields).save(document)` as a user's script on the stack's API."""
    code = ("import json, sys\n"
            "from blocks import RetrainingPolicy\n"
            "RetrainingPolicy(**json.loads(sys.argv[1])).save(sys.argv[2], overwrite=True)\n")
    env = stack.env | {"PREFECT_API_URL": stack.prefect_api, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(fields), document], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"saving RetrainingPolicy {document!r} failed:\n{proc.stderr}"
    saved = request(stack, "GET",
                    f"/block_types/slug/{POLICY_TYPE}/block_documents/name/{document}")
    assert saved.status_code == 200, saved.text
    assert saved.json()["data"]["training_data"] == fields["training_data"]


def policy_document(stack: Stack, document: str) -> int:
    """HTTP status of the RetrainingPolicy document `document` on the stack's API."""
    return request(stack, "GET",
                   f"/block_types/slug/{POLICY_TYPE}/block_documents/name/{document}").status_code


def history(stack: Stack, model_name: str) -> list[RetrainResult]:
    """The retraining history as the MLflow server holds it (what retraining_history reads)."""
    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments, f"tags.`mlops.kind` = 'retraining' AND tags.`mlops.model_name` = "
                     f"'{model_name}'", order_by=["attributes.start_time DESC"])
    return [RetrainResult.model_validate_json(r.data.tags["mlops.retrain_result"]) for r in runs]


def check_runs(stack: Stack, model_name: str, trigger: str, since: datetime) -> list[dict]:
    """retraining-check flow runs of the deployment for MODEL with TRIGGER, created after SINCE."""
    runs = api(stack, "/flow_runs/filter", {
        "flows": {"name": {"any_": ["retraining-check"]}},
        "sort": "EXPECTED_START_TIME_DESC", "limit": 50})
    return [r for r in runs
            if r["parameters"].get("model_name") == model_name
            and r["parameters"].get("trigger") == trigger
            and datetime.fromisoformat(r["created"]) >= since]


def flow_run(stack: Stack, run_id: str) -> dict:
    response = request(stack, "GET", f"/flow_runs/{run_id}")
    response.raise_for_status()
    return response.json()


def run_logs(stack: Stack, run_id: str) -> str:
    logs = api(stack, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}},
                                       "sort": "TIMESTAMP_ASC", "limit": 200})
    return "\n".join(entry["message"] for entry in logs)


def artifact(stack: Stack, key: str) -> dict | None:
    found = api(stack, "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}},
                                             "sort": "CREATED_DESC", "limit": 1})
    return found[0] if found else None


def assert_aliases_match(stack: Stack, result: RetrainResult, champion_before: int) -> None:
    held = aliases(stack, MODEL)
    if result.decision == "promoted":
        assert result.promoted and result.champion_after == result.challenger_version, result
        assert held.get("champion") == result.challenger_version, (held, result)
        assert "challenger" not in held, (held, result)  # the winner is no longer a challenger
    else:
        assert not result.promoted and result.champion_after == champion_before, result
        assert held == {"champion": champion_before, "challenger": result.challenger_version}, (
            held, result)


# --------------------------------------------------------------------------- data and champion
@pytest.fixture(scope="module")
def churn_files(tmp_path_factory) -> dict[str, Path]:
    """Distinct churn customers: `old` (the champion's 300), `drifted` (a later batch after a
    month-to-month promotion, resampled from 500 unseen customers, labels included), `labelled`
    (old + the drifted batch's distinct rows: what the policy points at first), `grown` (labelled
    + 200 further unseen customers)."""
    from flows.drift import drifted_batch
    from tasks.demo_data import churn_frame

    folder = tmp_path_factory.mktemp("e2e-retrain-data")
    frame = churn_frame().drop_duplicates().sample(frac=1.0, random_state=5).reset_index(drop=True)
    old, unseen, later = frame.iloc[:300], frame.iloc[300:800], frame.iloc[800:1000]
    drifted = drifted_batch(unseen.reset_index(drop=True), seed=11)
    labelled = pd.concat([old, drifted.drop_duplicates()], ignore_index=True)
    grown = pd.concat([labelled, later], ignore_index=True)
    paths = {}
    parts = {"old": old, "drifted": drifted, "labelled": labelled, "grown": grown}
    for name, part in parts.items():
        paths[name] = folder / f"{name}.csv"
        part.to_csv(paths[name], index=False)
    return paths


@pytest.fixture(scope="module")
def champion(stack, churn_files) -> int:
    """MODEL v1, champion, trained on the old rows through the deployment."""
    assert api(stack, "/block_types/filter", {"block_types": {"slug": {"any_": [POLICY_TYPE]}}}), (
        "up.sh did not register the RetrainingPolicy block type (prefect block register -m blocks)")
    proc = stack.run_deployment("train-model/default", {
        "data": str(churn_files["old"]), "target": "churn", "model_name": MODEL,
        "time_budget_s": BUDGET_S, "max_trials": TRIALS})
    assert_completed(stack, proc)
    assert aliases(stack, MODEL) == {"champion": 1}
    return 1


# --------------------------------------------------------------------------- tests
def test_drift_event_triggers_a_retraining(stack, churn_files, champion):
    save_policy(stack, DOCUMENT, training_data=str(churn_files["labelled"]), target="churn",
                cooldown_hours=0, min_new_rows=50, time_budget_s=BUDGET_S, max_trials=TRIALS)
    since = datetime.now(timezone.utc)

    proc = stack.run_deployment("check-drift/default", {"model_name": MODEL,
                                                        "data": str(churn_files["drifted"])})
    assert_completed(stack, proc)

    # check_drift found drift and said so on the model's resource (the event persists shortly)
    deadline = time.monotonic() + 30
    while True:
        events = api(stack, "/events/filter", {"filter": {
            "occurred": {"since": since.isoformat()},
            "event": {"name": ["mlops.model.drift-detected"]},
            "resource": {"id": [f"mlops.model.{MODEL}"]}}, "limit": 10})["events"]
        if events or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(events) == 1, f"no mlops.model.drift-detected for {MODEL}: {events}\n" + \
        stack.log_tail()
    assert events[0]["payload"]["model_name"] == MODEL
    assert events[0]["payload"]["score"] > events[0]["payload"]["threshold"]

    # Nobody starts anything now: the deployment trigger must.
    deadline = time.monotonic() + TRIGGER_WAIT_S
    runs: list[dict] = []
    while time.monotonic() < deadline:
        runs = check_runs(stack, MODEL, "event", since)
        if runs and runs[0]["state_type"] in TERMINAL:
            break
        time.sleep(2)
    automations = stack.prefect("automation", "ls")
    assert runs, (f"no retraining-check run with trigger=event for {MODEL} within "
                  f"{TRIGGER_WAIT_S}s of the drift event\n--- prefect automation ls\n"
                  f"{automations.stdout}{automations.stderr}\n--- worker.log\n{stack.log_tail()}"
                  f"\n--- prefect-server.log\n{stack.log_tail('prefect-server', 40)}")
    run = runs[0]
    assert run["state_type"] in TERMINAL, (
        f"triggered run {run['id']} still {run['state_name']} after {TRIGGER_WAIT_S}s\n"
        f"{stack.log_tail()}")
    assert run["state_type"] == "COMPLETED", (
        f"triggered run {run['id']} ended {run['state_name']}: {run['state']['message']}\n"
        f"--- its logs\n{run_logs(stack, run['id'])[-4000:]}\n--- worker.log\n{stack.log_tail()}")
    assert len(runs) == 1, f"one drift event started {len(runs)} checks: {[r['id'] for r in runs]}"
    deployments = api(stack, "/deployments/filter", {
        "flows": {"name": {"any_": ["retraining-check"]}},
        "deployments": {"name": {"any_": ["default"]}}})
    assert run["deployment_id"] == deployments[0]["id"]
    occurred = datetime.fromisoformat(events[0]["occurred"])
    assert datetime.fromisoformat(run["created"]) >= occurred, (run["created"], occurred)

    found = history(stack, MODEL)
    assert found, f"the triggered check completed but recorded no retraining of {MODEL}"
    newest = found[0]
    assert newest.trigger == "event", newest
    assert newest.model_name == MODEL and newest.champion_version == champion, newest
    assert newest.challenger_version == 2, newest
    assert "drift score" in newest.reason, newest.reason
    assert newest.champion_score is not None and newest.challenger_score is not None, newest
    assert newest.decision in ("promoted", "not_promoted"), newest
    assert newest.gate_rows and newest.gate_rows >= 20, newest
    assert newest.started_at >= since, (newest.started_at, since)
    assert_aliases_match(stack, newest, champion)


def test_manual_check_respects_the_cooldown_and_history_deployment_reads_it(stack, churn_files,
                                                                           champion):
    # 200 customers no version has seen and a champion that counts as old after a few seconds:
    # the age trigger fires -- but the drift-triggered retraining of the test above happened
    # minutes ago, inside cooldown_hours, so the check must not retrain.
    before = history(stack, MODEL)
    assert before, "runs after test_drift_event_triggers_a_retraining (needs its retraining)"
    save_policy(stack, DOCUMENT, training_data=str(churn_files["grown"]), target="churn",
                cooldown_hours=6, min_new_rows=50, max_model_age_days=1e-6,
                time_budget_s=BUDGET_S, max_trials=TRIALS)
    held = aliases(stack, MODEL)

    proc = stack.run_deployment("retraining-check/default",
                                {"model_name": MODEL, "trigger": "manual"})
    assert_completed(stack, proc)

    assert history(stack, MODEL) == before  # nothing retrained, nothing recorded
    assert aliases(stack, MODEL) == held
    decision = artifact(stack, f"retraining-check-{DOCUMENT}")
    assert decision and decision["description"] == "should_retrain: False", decision
    assert "champion age" in decision["data"], decision["data"]
    assert "blocked: last retraining" in decision["data"] and "cooldown_hours 6" in \
        decision["data"], decision["data"]

    # retraining-history/default reads the same history, newest first
    assert_completed(stack, stack.run_deployment("retraining-history/default",
                                                 {"model_name": MODEL}))
    table = artifact(stack, f"retraining-history-{DOCUMENT}")
    assert table, "retraining-history published no table artifact"
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert [r["trigger"] for r in rows] == [r.trigger for r in before], rows
    assert rows[0]["challenger"] == f"v{before[0].challenger_version}", rows[0]
    assert rows[0]["decision"] == before[0].decision, rows[0]
    result = artifact(stack, f"retraining-{DOCUMENT}")
    assert result and result["description"] == f"{MODEL}: {before[0].decision}", result


def test_scheduled_check_without_labelled_data_completes_and_says_what_to_configure(
        stack, churn_files):
    # Holds only while no "default" RetrainingPolicy exists on this stack: none may be created.
    assert policy_document(stack, "default") == 404, "a 'default' RetrainingPolicy exists"
    assert policy_document(stack, UNLABELLED_DOCUMENT) == 404
    # a champion, and nothing configured to retrain it on (a fresh stack's nightly check)
    assert_completed(stack, stack.run_deployment("train-model/default", {
        "data": str(churn_files["old"]), "target": "churn", "model_name": UNLABELLED_MODEL,
        "time_budget_s": BUDGET_S, "max_trials": TRIALS}))

    proc = stack.run_deployment("retraining-check/default",
                                {"model_name": UNLABELLED_MODEL, "trigger": "schedule"})
    assert_completed(stack, proc)
    assert stack.runs and stack.runs[-1] in proc.stdout, stack.explain(proc)
    run = flow_run(stack, stack.runs[-1])
    assert run["parameters"]["model_name"] == UNLABELLED_MODEL
    hint = (f"no labelled data configured for model {UNLABELLED_MODEL!r}: the RetrainingPolicy "
            "lacks training_data and target")
    logs = run_logs(stack, run["id"])
    assert hint in logs, logs[-3000:]
    decision = artifact(stack, f"retraining-check-{UNLABELLED_DOCUMENT}")
    assert decision and decision["description"] == "should_retrain: False", decision
    assert hint in decision["data"], decision["data"]
    assert f".save({UNLABELLED_DOCUMENT!r}, overwrite=True)" in decision["data"], decision["data"]
    assert history(stack, UNLABELLED_MODEL) == []
