"""REST API: JSON log lines (MLOPS_LOG_FORMAT=json) of the service and its in-process flow runs,
no key in any log, the audit trail of writes (flow runs tagged with the key's name), and reads
that leave no trace (no flow run, task run or artifact)."""
from __future__ import annotations

import io
import json
import logging

import mlflow
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from sklearn.linear_model import LogisticRegression

from api.logs import configure_logging
from tests.api_support import BASE, assert_error, api_world, use_experiment

MODEL = "logged_api"
FIELDS = {"timestamp", "level", "message", "module", "model_name", "version", "request_id",
          "flow_run_id"}


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_template_db):
    # access lines are off by default (APISettings.access_log): this file checks them too
    with api_world(tmp_path_factory, mlflow_template_db, "api-logs", access_log=True) as world:
        yield world


@pytest.fixture
def json_log(monkeypatch, world):
    """The service's JSON logging configuration, its console stream captured."""
    from prefect.logging.configuration import setup_logging

    monkeypatch.setenv("MLOPS_LOG_FORMAT", "json")
    monkeypatch.setenv("PREFECT_LOGGING_SETTINGS_PATH", "/nonexistent")  # restored afterwards
    monkeypatch.delenv("PREFECT_LOGGING_SETTINGS_PATH")
    configure_logging()
    stream = io.StringIO()
    console = logging.getLogger().handlers[0]
    console.setStream(stream)
    levels = {n: logging.getLogger(n).level for n in ("prefect", "api")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        yield stream
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        monkeypatch.undo()
        setup_logging(incremental=False)


def log_a_model() -> str:
    model = LogisticRegression().fit([[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1])
    use_experiment(MODEL)
    with mlflow.start_run() as run:
        mlflow.sklearn.log_model(model, name="model", pip_requirements=["scikit-learn"])
    return run.info.run_id


def test_json_lines_carry_the_fields_and_never_a_key(world, json_log):
    key = world.keys["write"]
    run_id = log_a_model()
    r = world.client.post(f"{BASE}/models/register", json={"model_name": MODEL, "run_id": run_id},
                          headers={"Authorization": f"Bearer {key}", "X-Request-ID": "req-json-1"})
    assert r.status_code == 200, r.text
    r = world.client.post(f"{BASE}/models/promote", json={"model_name": MODEL, "version": 1},
                          headers={"Authorization": f"Bearer {key}", "X-Request-ID": "req-json-2"})
    assert r.status_code == 200, r.text
    assert_error(world.client.get(f"{BASE}/ab-tests/active",
                                  headers={"Authorization": f"Bearer {key}x"}), 401)
    logging.getLogger("api").warning("a careless line: Authorization: Bearer %s", key)

    text = json_log.getvalue()
    assert key not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines and all(FIELDS <= set(line) for line in lines)
    access = [line for line in lines if line["request_id"] == "req-json-2"
              and line["module"] == "errors"]
    assert access and "POST /api/v1/mlops/models/promote 200" in access[0]["message"]
    flow_lines = [line for line in lines if line["flow_run_id"] and line["model_name"] == MODEL]
    assert flow_lines, lines[-5:]
    careless = [line for line in lines if "careless" in line["message"]]
    assert careless and "Bearer ***" in careless[0]["message"]
    assert {line["level"] for line in lines} <= {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def test_writes_are_flow_runs_tagged_with_the_keys_name(world):
    run_id = log_a_model()
    r = world.post("/models/register", {"model_name": MODEL, "run_id": run_id})
    assert r.status_code == 200, r.text
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=["api-key:test-write"])))
    assert runs, "no flow run tagged with the key's name"
    assert "api" in runs[0].tags


def test_reads_leave_no_trace_in_prefect(world):
    run_id = log_a_model()
    registered = world.post("/models/register", {"model_name": MODEL, "run_id": run_id})
    assert registered.status_code == 200, registered.text
    newest = str(registered.json()["version"])
    with get_client(sync_client=True) as client:
        before = (client.count_flow_runs(), len(client.read_task_runs()),
                  len(client.read_artifacts()))
    for path, params in ((f"/models/{MODEL}/versions", None),
                         (f"/models/{MODEL}/compare", {"version_a": "1", "version_b": newest}),
                         ("/ab-tests/active", {"model_name": MODEL}),
                         ("/retraining/history", {"model_name": MODEL})):
        r = world.get(path, params=params)
        assert r.status_code == 200, (path, r.text)
    with get_client(sync_client=True) as client:
        after = (client.count_flow_runs(), len(client.read_task_runs()),
                 len(client.read_artifacts()))
    assert after == before
