"""REST API: A/B tests, exports (with downloads), retraining and schedules, through an in-process
HTTP client against the real app, Prefect API and embedded MLflow."""
from __future__ import annotations

import hashlib

import pytest
from prefect.client.orchestration import get_client

from flows.registry import compare_versions
from flows.retraining import retraining_check
from flows.training import train_model
from tasks.retraining import retraining_slot
from tasks.demo_data import churn_frame
from tests.api_support import BASE, assert_error, api_world
from tests.budgets import ONE_LINEAR_TRIAL

MODEL = "churn_life"


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_template_db):
    with api_world(tmp_path_factory, mlflow_template_db, "api-lifecycle") as world:
        churn = churn_frame().sample(2400, random_state=8).reset_index(drop=True)
        train_model(churn.iloc[:600], "churn", MODEL, **ONE_LINEAR_TRIAL)
        train_model(churn.iloc[:1200], "churn", MODEL, **ONE_LINEAR_TRIAL)
        world.labelled = world.home / "labelled.csv"
        churn.to_csv(world.labelled, index=False)
        yield world


# --------------------------------------------------------------------------- A/B tests
@pytest.fixture(scope="module")
def ab_test(world):
    # the guide's second curl, as written
    r = world.post("/ab-tests/create", {"model_name": MODEL, "champion_version": 1,
                                        "challenger_version": 2, "traffic_split": 0.1})
    assert r.status_code == 201, r.text
    return r.json()


def test_create_answers_201_with_the_test(world, ab_test):
    assert ab_test["test_id"].startswith("churn-life")
    assert (ab_test["status"], ab_test["champion_version"], ab_test["challenger_version"],
            ab_test["traffic_split"]) == ("active", 1, 2, 0.1)


def test_create_errors(world, ab_test):
    again = {"model_name": MODEL, "champion_version": 1, "challenger_version": 2}
    assert_error(world.post("/ab-tests/create", again), 409, "ActiveTestExistsError",
                 contains=ab_test["test_id"])
    assert_error(world.post("/ab-tests/create", {**again, "model_name": "nope"}), 404,
                 "ModelNotFoundError")
    assert_error(world.post("/ab-tests/create", {**again, "traffic_split": 1.5}), 422,
                 field="traffic_split")
    assert_error(world.post("/ab-tests/create", {**again, "challenger_version": 9}), 404,
                 "VersionNotFoundError")
    assert_error(world.post("/ab-tests/create", {**again, "metric_type": "clicks"}), 422,
                 "ValidationError", field="metric_type")
    assert_error(world.post("/ab-tests/create", again, scope="read"), 403)


def test_active_results_and_outcomes(world, ab_test):
    test_id = ab_test["test_id"]
    active = world.get("/ab-tests/active")
    assert [t["test_id"] for t in active.json()] == [test_id]
    assert world.get("/ab-tests/active", params={"model_name": "other"}).json() == []
    assert_error(world.get("/ab-tests/active", params={"model_name": "bad name"}), 422,
                 "InvalidModelNameError", field="model_name")
    r = world.get(f"/ab-tests/{test_id}/results")
    assert r.status_code == 200, r.text
    assert r.json()["recommendation"] == "continue" and set(r.json()["arms"]) == {
        "champion", "challenger"}
    assert_error(world.get("/ab-tests/no-such-test/results"), 404, "ABTestNotFoundError")
    assert_error(world.get("/ab-tests/NOT_AN_ID/results"), 404, "ABTestNotFoundError")
    r = world.post(f"/ab-tests/{test_id}/outcomes",
                   {"outcomes": [{"id": "c1", "outcome": 1}, {"id": "c2", "outcome": 0}]})
    assert r.status_code == 200, r.text
    assert r.json()["unknown_keys"] == 2 and r.json()["recorded"] == 0
    assert_error(world.post(f"/ab-tests/{test_id}/outcomes", {"outcomes": []}), 422,
                 field="outcomes")


def test_conclude(world, ab_test):
    test_id = ab_test["test_id"]
    assert_error(world.post(f"/ab-tests/{test_id}/conclude", {}), 409, "ABTestNotReadyError",
                 contains="force=True")
    r = world.post(f"/ab-tests/{test_id}/conclude", {"force": True, "promote_winner": False})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "concluded" and r.json()["forced"] is True
    assert_error(world.post(f"/ab-tests/{test_id}/conclude", {"force": True}), 409,
                 "ABTestClosedError")
    assert world.get(f"/ab-tests/{test_id}/results").json()["status"] == "concluded"
    assert world.get("/ab-tests/active").json() == []


# --------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def exported(world):
    # the guide's third curl, as written
    accepted = world.post("/models/export", {"model_name": MODEL, "version": 2,
                                             "format": "onnx", "quantize": True})
    status = world.wait(accepted)
    assert status["state_type"] == "COMPLETED", status
    return status["result"]


def test_export_is_long_work_with_the_report_as_result(world, exported):
    assert exported["model_name"] == MODEL and exported["version"] == 2
    assert exported["formats"][0]["format"] == "onnx" and exported["formats"][0]["status"] == "ok"


def test_export_errors(world):
    assert_error(world.post("/models/export", {"model_name": MODEL, "version": 9}), 404,
                 "VersionNotFoundError")
    assert_error(world.post("/models/export", {"model_name": "nope"}), 404, "ModelNotFoundError")
    assert_error(world.post("/models/export", {"model_name": MODEL, "format": "xlsx"}), 422,
                 field="format")
    assert_error(world.post("/models/export", {"model_name": MODEL, "format": "onnx",
                                               "formats": ["pmml"]}), 422, field="formats")


def test_download_with_etag_and_name(world, exported):
    r = world.get(f"/models/export/{MODEL}/2/download")
    assert r.status_code == 200, r.text
    digest = hashlib.sha256(r.content).hexdigest()
    assert r.headers["etag"] == f'"{digest}"'
    assert digest == exported["formats"][0]["sha256"]
    assert r.headers["content-disposition"].startswith("attachment; filename=")
    assert r.headers["content-disposition"].endswith('.onnx"')
    again = world.get(f"/models/export/{MODEL}/2/download",
                      headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    alias = world.get(f"/models/export/{MODEL}/challenger/download")
    assert alias.status_code == 200 and alias.content == r.content


@pytest.mark.parametrize("path", [
    "/models/export/..%2F..%2F..%2Fetc/2/download",
    f"/models/export/{MODEL}/..%2F..%2Fpasswd/download",
    "/models/export/../../../etc/passwd/2/download",
    "/models/export/%2E%2E/2/download",
    f"/models/export/{MODEL}/2%2F..%2F..%2F1/download",
])
def test_a_path_traversal_attempt_is_404(world, exported, path):
    r = world.client.get(BASE + path, headers=world.auth("read"))
    assert_error(r, 404)


def test_download_errors(world, exported):
    assert_error(world.get(f"/models/export/{MODEL}/1/download"), 404, "ExportNotFound",
                 contains="has no exports")
    assert_error(world.get(f"/models/export/{MODEL}/2/download", params={"format": "pmml"}),
                 404, "ExportNotFound", contains="never exported to pmml")
    assert_error(world.get(f"/models/export/{MODEL}/9/download"), 404, "VersionNotFoundError")
    assert_error(world.get(f"/models/export/{MODEL}/2/download",
                           params={"format": "../../x"}), 422, field="format")


# --------------------------------------------------------------------------- retraining
def test_check(world):
    r = world.post("/retraining/check", {"model_name": MODEL})
    assert r.status_code == 200, r.text
    assert r.json()["should_retrain"] is False and r.json()["signals"]
    r = world.post("/retraining/check", {"model_name": MODEL, "data": str(world.labelled),
                                         "target": "churn"})
    assert r.status_code == 200, r.text
    assert_error(world.post("/retraining/check", {"model_name": "nope"}), 404)
    assert_error(world.post("/retraining/check", {"model_name": MODEL, "data": "x.csv"}), 422,
                 field="target")
    assert_error(world.post("/retraining/check", {"model_name": MODEL,
                                                  "data": str(world.home / "missing.csv"),
                                                  "target": "churn"}), 422, "DataError",
                 field="data")


def test_trigger_while_a_retraining_runs_is_409(world):
    body = {"data": str(world.labelled), "target": "churn"}
    with retraining_slot(MODEL):
        assert_error(world.post(f"/retraining/trigger/{MODEL}", body), 409,
                     "RetrainingInProgressError", contains="nothing was started")


def test_trigger_is_long_work_and_history_reads_it(world):
    assert_error(world.post(f"/retraining/trigger/{MODEL}", {}), 422, "ConfigurationError",
                 contains="no labelled data configured")
    accepted = world.post(f"/retraining/trigger/{MODEL}", {
        "data": str(world.labelled), "target": "churn", "reason": "api test", "time_budget_s": 5})
    status = world.wait(accepted)
    assert status["state_type"] == "COMPLETED", status
    assert status["result"]["reason"] == "api test"
    history = world.get("/retraining/history", params={"model_name": MODEL})
    assert history.status_code == 200, history.text
    assert history.json()[0]["challenger_version"] == status["result"]["challenger_version"]
    assert_error(world.get("/retraining/history", params={"model_name": "nope"}), 404)
    assert_error(world.get("/retraining/history", params={"model_name": MODEL, "limit": 0}),
                 422, field="limit")


def test_schedule_adds_then_updates_one_schedule_per_model(world):
    body = {"model_name": MODEL, "cron": "0 3 * * *", "timezone": "UTC", "active": True}
    assert_error(world.post("/retraining/schedule", body, scope="admin"), 404,
                 "DeploymentNotFoundError", contains="retraining-check/default")
    deployment_id = retraining_check.to_deployment(name="default").apply()
    try:
        first = world.post("/retraining/schedule", body, scope="admin")
        assert first.status_code == 200, first.text
        assert first.json()["deployment"] == "retraining-check/default"
        second = world.post("/retraining/schedule", {**body, "cron": "30 1 * * *",
                                                     "timezone": "Europe/Berlin",
                                                     "active": False}, scope="admin")
        assert second.status_code == 200, second.text
        assert second.json()["schedule_id"] == first.json()["schedule_id"]
        with get_client(sync_client=True) as client:
            schedules = client.read_deployment_schedules(deployment_id)
        mine = [s for s in schedules if s.parameters.get("model_name") == MODEL]
        assert len(mine) == 1 and mine[0].schedule.cron == "30 1 * * *" and not mine[0].active
        assert_error(world.post("/retraining/schedule", {**body, "cron": "every day"},
                                scope="admin"), 422, field="cron")
        assert_error(world.post("/retraining/schedule", {**body, "timezone": "Mars/Base"},
                                scope="admin"), 422, field="timezone")
    finally:
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)


def test_long_work_runs_the_deployment_when_the_prefect_api_has_it(world):
    deployment_id = compare_versions.to_deployment(name="default").apply()
    try:
        r = world.get(f"/models/{MODEL}/compare", params={"version_a": "1", "version_b": "2",
                                                          "data": str(world.labelled)})
        assert r.status_code == 202, r.text
        assert r.json()["deployment"] == "compare-versions/default"
        assert r.json()["state"] == "Scheduled"  # no worker here: it waits for one
        status = world.client.get(r.headers["location"], headers=world.auth("read")).json()
        assert status["state"] == "Scheduled" and status["deployment_id"] == str(deployment_id)
    finally:
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)
