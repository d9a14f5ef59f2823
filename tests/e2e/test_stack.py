"""End to end on the real stack (tests/e2e/conftest.py): deployments applied by `make up` from
prefect.yaml, run with `prefect deployment run` as a user would, executed by the process worker,
models and aliases checked in the MLflow server."""
from __future__ import annotations

import subprocess
import time

import httpx
import pytest
from mlflow import MlflowClient

from tests.e2e.conftest import ROOT, Stack, _script
from tests.e2e.test_api_stack import admin_key

pytestmark = pytest.mark.e2e

DEPLOYMENTS = {
    "train-model/default", "register-model/default", "promote-model/default",
    "rollback-model/default", "list-versions/default", "compare-versions/default",
    "mlops-lifecycle/default",
}
BUDGET_S = 4  # training time budget per run: the flow's own overhead dominates anyway
TRIALS = 2    # max_trials of the trainings whose subject is not the search (a budget's worth of
              # trials would cost CPU the whole suite shares)


def request(stack: Stack, method: str, path: str, body: dict | list | None = None) -> httpx.Response:
    """One call to the stack's Prefect API. 429/502/503 (the server's "retry me": a busy SQLite
    database under the worker's load) are retried with backoff, as Prefect's own client does."""
    for attempt in range(6):
        response = httpx.request(method, f"{stack.prefect_api}{path}", json=body, timeout=30)
        if response.status_code not in (429, 502, 503):
            break
        time.sleep(min(0.25 * 2 ** attempt, 4))
    return response


def api(stack: Stack, path: str, body: dict | None = None):
    response = request(stack, "POST", path, body or {})
    response.raise_for_status()
    return response.json()


def aliases(stack: Stack, model_name: str) -> dict[str, int]:
    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    return {alias: int(v) for alias, v in client.get_registered_model(model_name).aliases.items()}


def assert_completed(stack: Stack, proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0 and "finished successfully in 'Completed'" in proc.stdout, (
        stack.explain(proc))


def test_up_applies_prefect_yaml_and_is_idempotent(stack):
    deployments = api(stack, "/deployments/filter")
    by_name = {}
    flows = {f["id"]: f["name"] for f in api(stack, "/flows/filter")}
    for d in deployments:
        by_name[f"{flows[d['flow_id']]}/{d['name']}"] = d
    assert DEPLOYMENTS <= set(by_name), sorted(by_name)
    for name in DEPLOYMENTS:
        d = by_name[name]
        assert (d["work_pool_name"], d["work_queue_name"]) == ("mlops", "ml-retraining-queue"), name
        # prefect deploy recorded this checkout's path (prefect.yaml's build step), wherever it is
        assert d["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}], name
        assert d["enforce_parameter_schema"], name
    # A fresh stack schedules nothing that fails for want of a model or a policy: the drift and
    # retraining schedules ship inactive (README "Schedules" says how to turn them on).
    for name in ("check-drift/default", "retraining-check/default"):
        schedules = by_name[name]["schedules"]
        assert schedules and not any(s["active"] for s in schedules), (name, schedules)
    train_schema = by_name["train-model/default"]["parameter_openapi_schema"]
    assert set(train_schema["required"]) == {"data", "target", "model_name"}
    assert train_schema["properties"]["time_budget_s"]["type"] == "number"

    workers = api(stack, "/work_pools/mlops/workers/filter")
    assert [w["status"] for w in workers if w["name"] == "mlops-worker"] == ["ONLINE"]

    # What a user sets outside prefect.yaml before the re-up: a model's retraining schedule
    # through the REST API, one added in the UI (no slug: then `prefect deploy` replaces every
    # schedule of the deployment with prefect.yaml's), and the hourly A/B analysis turned off in
    # the UI (the calls the UI makes; the toggle as `prefect deployment schedule pause` sends it).
    added = httpx.post(f"{stack.api_url}/api/v1/mlops/retraining/schedule",
                       headers={"Authorization": f"Bearer {admin_key(stack)}"}, timeout=60,
                       json={"model_name": "e2e_kept", "cron": "0 4 * * *", "active": False})
    assert added.status_code == 200, added.text
    checks = schedule_of(stack, "retraining-check/default", "retraining-check-nightly")
    in_ui = {"schedule": {"cron": "30 5 * * 1", "timezone": "UTC"}, "active": False,
             "parameters": {"model_name": "e2e_ui"}}
    assert request(stack, "POST", f"/deployments/{checks['deployment_id']}/schedules",
                   [in_ui]).is_success
    hourly = schedule_of(stack, "ab-test-analysis/default", "ab-test-analysis-hourly")
    toggle = f"/deployments/{hourly['deployment_id']}/schedules/{hourly['id']}"
    assert hourly["active"] and request(stack, "PATCH", toggle, {"active": False}).is_success
    try:
        # Again, on the running stack: keeps the services, re-applies the configuration, and
        # keeps both settings (prefect deploy alone would have replaced them with prefect.yaml's).
        again = _script("up.sh", stack.env, 300)
        assert again.returncode == 0, f"{again.stdout}\n{again.stderr}"
        for service in ("prefect-server", "mlflow-server", "worker"):
            assert f"{service} already running" in again.stdout, again.stdout
        assert len(api(stack, "/deployments/filter")) == len(deployments)
        assert "schedules kept: 2 added outside prefect.yaml (" in again.stdout, again.stdout
        assert ("1 edited in the UI (ab-test-analysis/default ab-test-analysis-hourly)"
                in again.stdout), again.stdout
        kept = schedule_of(stack, "retraining-check/default", "retraining-check-e2e-kept")
        assert (kept["schedule"]["cron"], kept["active"], kept["parameters"]) == (
            "0 4 * * *", False, {"model_name": "e2e_kept"})
        unnamed = schedule_of(stack, "retraining-check/default", None)
        assert (unnamed["schedule"]["cron"], unnamed["active"], unnamed["parameters"]) == (
            "30 5 * * 1", False, {"model_name": "e2e_ui"})
        assert not schedule_of(stack, "ab-test-analysis/default", "ab-test-analysis-hourly")["active"]
        assert not schedule_of(stack, "retraining-check/default", "retraining-check-nightly")["active"]
    finally:
        request(stack, "PATCH", toggle, {"active": True})


def schedule_of(stack: Stack, deployment: str, slug: str | None) -> dict:
    """The schedule SLUG of DEPLOYMENT (flow/deployment) on the stack's Prefect API (None: the
    one schedule without a slug)."""
    found = request(stack, "GET", f"/deployments/name/{deployment}")
    found.raise_for_status()
    schedules = {s["slug"]: s for s in found.json()["schedules"]}
    assert slug in schedules, (deployment, list(schedules))
    return schedules[slug]


def test_bad_parameter_is_rejected_before_a_run_exists(stack, churn_csv):
    before = api(stack, "/flow_runs/count")
    proc = stack.prefect("deployment", "run", "train-model/default",
                         "--param", f"data={churn_csv}", "--param", "target=churn",
                         "--param", "model_name=e2e_rejected", "--param", "time_budget_s=abc")
    out = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    assert proc.returncode != 0, out
    assert "Validation failed for field 'time_budget_s'" in out, out
    assert "'abc' is not of type 'number'" in out, out
    assert api(stack, "/flow_runs/count") == before


def test_train_promote_rollback_through_deployments(stack, churn_csv):
    model = "e2e_churn"
    train = {"data": str(churn_csv), "target": "churn", "model_name": model,
             "time_budget_s": BUDGET_S, "max_trials": TRIALS}

    assert_completed(stack, stack.run_deployment("train-model/default", train))
    assert aliases(stack, model) == {"champion": 1}
    # The MLflow server stores the artifacts under the stack folder (proxied, mlflow-artifacts:/).
    assert any((stack.stack_dir / "mlflow" / "artifacts").rglob("*")), "no artifacts stored"

    # promote=auto: a second version becomes challenger, the champion stays.
    assert_completed(stack, stack.run_deployment("train-model/default", train))
    assert aliases(stack, model) == {"champion": 1, "challenger": 2}

    proc = stack.run_deployment("promote-model/default",
                                {"model_name": model, "version": 2, "reason": "e2e: better"})
    assert_completed(stack, proc)
    assert aliases(stack, model)["champion"] == 2

    proc = stack.run_deployment("rollback-model/default",
                                {"model_name": model, "reason": "e2e: regression"})
    assert_completed(stack, proc)
    assert aliases(stack, model)["champion"] == 1
