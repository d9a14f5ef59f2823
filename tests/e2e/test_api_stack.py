"""The REST API on `make up`'s stack (tests/e2e/conftest.py): the guide's three curls with the
admin key up.sh wrote, long work as deployment runs executed by the worker (results read from
Prefect's result storage), JSON logs without the key."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import time

import httpx
import mlflow
import pytest
from mlflow import MlflowClient
from sklearn.linear_model import LogisticRegression

from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e
MODEL = "customer_churn"


def admin_key(stack: Stack) -> str:
    path = stack.stack_dir / "api-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return path.read_text().strip()


def curl(stack: Stack, command: str) -> tuple[int, dict]:
    """A README curl as written, on the stack's port, with the key header added."""
    args = command.replace("http://localhost:8000", stack.api_url)
    proc = subprocess.run(["bash", "-c", f'{args} -s -w "\\n%{{http_code}}" '
                                         f'-H "Authorization: Bearer $MLOPS_API_KEY"'],
                          env={**os.environ, "MLOPS_API_KEY": admin_key(stack)},
                          capture_output=True, text=True, timeout=120)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code), json.loads(body) if body else {}


def wait_run(stack: Stack, accepted: dict, timeout: float = 300) -> dict:
    headers = {"Authorization": f"Bearer {admin_key(stack)}"}
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(stack.api_url + accepted["status_url"], headers=headers, timeout=30)
        assert status.status_code == 200, status.text
        body = status.json()
        if body["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return body
        assert time.monotonic() < deadline, (body, stack.log_tail())
        time.sleep(1)


def log_user_model(stack: Stack) -> str:
    """What a user's own training code does: mlflow.sklearn.log_model in an experiment named
    after the model."""
    mlflow.set_tracking_uri(stack.mlflow_uri)
    try:
        mlflow.set_experiment(MODEL)
        model = LogisticRegression().fit([[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1])
        with mlflow.start_run() as run:
            mlflow.sklearn.log_model(model, name="model", pip_requirements=["scikit-learn"])
        return run.info.run_id
    finally:
        mlflow.set_tracking_uri(None)


CURL_1 = ('curl -X POST http://localhost:8000/api/v1/mlops/models/register -H "Content-Type: '
          'application/json" -d \'{"model_name": "customer_churn", "description": "XGBoost model '
          'v2", "metrics": {"accuracy": 0.92, "f1": 0.89}}\'')
CURL_2 = ('curl -X POST http://localhost:8000/api/v1/mlops/ab-tests/create -H "Content-Type: '
          'application/json" -d \'{"model_name": "customer_churn", "champion_version": 1, '
          '"challenger_version": 2, "traffic_split": 0.1}\'')
CURL_3 = ('curl -X POST http://localhost:8000/api/v1/mlops/models/export -H "Content-Type: '
          'application/json" -d \'{"model_name": "customer_churn", "version": 2, "format": '
          '"onnx", "quantize": true}\'')


def test_the_guides_three_curls_on_the_stack(stack, churn_csv):
    assert "REST API" in stack.up_output
    code, body = curl(stack, CURL_1)
    assert code == 422 and "nothing to register" in body["error"]["message"], body

    run_id = log_user_model(stack)
    code, v1 = curl(stack, CURL_1)
    assert code == 200, v1
    assert (v1["version"], v1["run_id"], v1["metrics"]["f1"]) == (1, run_id, 0.89)
    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    assert client.get_model_version(MODEL, "1").description == "XGBoost model v2"
    headers = {"Authorization": f"Bearer {admin_key(stack)}"}
    versions = httpx.get(f"{stack.api_url}/api/v1/mlops/models/{MODEL}/versions",
                         headers=headers, timeout=30).json()
    assert [v["version"] for v in versions] == [1]

    # v2: trained by the worker (a run of train-model/default), its result read back
    accepted = httpx.post(f"{stack.api_url}/api/v1/mlops/models/register", headers=headers,
                          json={"model_name": MODEL, "data": str(churn_csv), "target": "churn",
                                "time_budget_s": 4, "candidates": ["linear"], "max_trials": 1}, timeout=60)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["deployment"] == "train-model/default"
    status = wait_run(stack, accepted.json())
    assert status["state_type"] == "COMPLETED", (status, stack.log_tail())
    assert status["result"]["version"] == 2

    code, test = curl(stack, CURL_2)
    assert code == 201 and test["champion_version"] == 1 and test["challenger_version"] == 2, test

    code, export = curl(stack, CURL_3)
    assert code == 202 and export["deployment"] == "export-model/default", export
    status = wait_run(stack, export)
    assert status["state_type"] == "COMPLETED", (status, stack.log_tail())
    assert status["result"]["formats"][0]["status"] == "ok"


def test_the_api_logs_json_lines_and_never_the_key(stack):
    key = admin_key(stack)
    lines = (stack.stack_dir / "logs" / "api.log").read_text().splitlines()
    parsed = [json.loads(line) for line in lines if line.startswith("{")]
    assert parsed and all({"timestamp", "level", "message", "module", "model_name", "version",
                           "request_id", "flow_run_id"} <= set(p) for p in parsed)
    for log in (stack.stack_dir / "logs").glob("*.log"):
        assert key not in log.read_text(errors="replace"), log
    # the worker and the flow runs it started log JSON lines too, flow lines with their run id
    worker = [json.loads(line) for line in
              (stack.stack_dir / "logs" / "worker.log").read_text().splitlines()
              if line.startswith("{")]
    assert any(line["flow_run_id"] for line in worker), worker[-5:]
