"""REST API: health, keys and scopes, the error shape, registry routes and long work (runs),
through an in-process HTTP client against the real app, Prefect API and embedded MLflow."""
from __future__ import annotations

import time

import mlflow
import pytest
from sklearn.linear_model import LogisticRegression

from api.keys import main as keys_cli
from tasks.demo_data import churn_frame
from tests.api_support import BASE, assert_error, api_world, use_experiment
from tests.budgets import ONE_LINEAR_TRIAL

MODEL = "churn_api"


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_template_db):
    with api_world(tmp_path_factory, mlflow_template_db, "api-registry") as world:
        churn = churn_frame().sample(900, random_state=3).reset_index(drop=True)
        world.data = world.home / "churn.csv"
        churn.to_csv(world.data, index=False)
        yield world


@pytest.fixture(scope="module")
def trained(world):
    """v1 of MODEL, trained through POST models/register with data (202, then runs/{id})."""
    accepted = world.post("/models/register", {"model_name": MODEL, "data": str(world.data),
                                               "target": "churn", **ONE_LINEAR_TRIAL})
    assert accepted.json()["deployment"] is None  # embedded: no deployment on this Prefect API
    status = world.wait(accepted)
    assert status["state_type"] == "COMPLETED", status
    assert status["flow_name"] == "train-model"
    return status["result"]


def user_logged_run(model_name: str, accuracy: float = 0.9) -> str:
    """A model logged by a user's own code (mlflow.sklearn.log_model), not registered."""
    model = LogisticRegression().fit([[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1])
    use_experiment("user-experiments")
    with mlflow.start_run() as run:
        mlflow.log_metric("accuracy", accuracy)
        mlflow.sklearn.log_model(model, name=model_name, pip_requirements=["scikit-learn"])
    return run.info.run_id


# --------------------------------------------------------------------------- health, auth
def test_health_needs_no_key_and_every_answer_has_a_request_id(world):
    r = world.client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert len(r.headers["x-request-id"]) >= 16
    r = world.client.get("/health", headers={"X-Request-ID": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    r = world.client.get("/health", headers={"X-Request-ID": "bad id\twith tabs"})
    assert r.headers["x-request-id"] != "bad id\twith tabs"


def test_no_key_and_a_wrong_key_are_401(world):
    r = world.client.get(f"{BASE}/models/{MODEL}/versions")
    assert_error(r, 401, "Unauthorized", contains="Authorization: Bearer")
    assert r.headers["www-authenticate"] == "Bearer"
    r = world.client.get(f"{BASE}/models/{MODEL}/versions",
                         headers={"Authorization": "Bearer mlops_wrong"})
    assert_error(r, 401, "Unauthorized", contains="wrong or was revoked")
    r = world.client.get(f"{BASE}/models/{MODEL}/versions",
                         headers={"Authorization": f"Basic {world.keys['read']}"})
    assert_error(r, 401)


def test_a_read_key_on_a_write_route_is_403_and_admin_includes_write(world):
    r = world.post("/models/promote", {"model_name": MODEL, "version": 1}, scope="read")
    assert_error(r, 403, "Forbidden", contains="needs 'write'")
    r = world.post("/retraining/schedule", {"model_name": MODEL}, scope="write")
    assert_error(r, 403, contains="needs 'admin'")


def test_a_revoked_key_stops_working_within_5_seconds(world, capsys):
    path = str(world.keys_file.path)
    assert keys_cli(["--file", path, "create", "short-lived", "--scope", "read"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("mlops_") and key not in world.keys_file.path.read_text()
    headers = {"Authorization": f"Bearer {key}"}
    created_at = time.monotonic()  # a new key works once the service's copy is refreshed too
    while world.client.get("/api/v1/mlops/ab-tests/active", headers=headers).status_code != 200:
        assert time.monotonic() - created_at < 5, "new key not accepted after 5 s"
        time.sleep(0.1)
    assert keys_cli(["--file", path, "revoke", "short-lived"]) == 0
    revoked_at = time.monotonic()
    while world.client.get("/api/v1/mlops/ab-tests/active", headers=headers).status_code == 200:
        assert time.monotonic() - revoked_at < 5, "revoked key still accepted after 5 s"
        time.sleep(0.1)
    assert_error(world.client.get("/api/v1/mlops/ab-tests/active", headers=headers), 401)
    assert keys_cli(["--file", path, "list"]) == 0
    listing = capsys.readouterr().out
    assert "short-lived" in listing and "revoked" in listing and key not in listing
    assert oct(world.keys_file.path.stat().st_mode & 0o777) == "0o600"


# --------------------------------------------------------------------------- register
def test_register_with_data_trains_through_a_flow_run(world, trained):
    assert trained["model_name"] == MODEL and trained["version"] == 1
    assert trained["aliases"] == ["champion"] and trained["family"] == "linear"


def test_register_with_nothing_registers_the_users_newest_logged_model(world, trained):
    nothing = world.post("/models/register", {"model_name": MODEL})
    assert_error(nothing, 422, "ConfigurationError", contains="pass run_id or model_uri")
    run_id = user_logged_run(MODEL)
    # the guide's first curl, as written
    r = world.post("/models/register", {"model_name": MODEL, "description": "XGBoost model v2",
                                        "metrics": {"accuracy": 0.92, "f1": 0.89}})
    assert r.status_code == 200, r.text
    v2 = r.json()
    assert (v2["version"], v2["run_id"], v2["description"]) == (2, run_id, "XGBoost model v2")
    assert v2["metrics"]["f1"] == 0.89 and v2["semver"]
    listed = world.get(f"/models/{MODEL}/versions")
    assert [v["version"] for v in listed.json()] == [2, 1]
    again = world.post("/models/register", {"model_name": MODEL})
    assert_error(again, 422, contains="nothing to register")


def test_register_from_a_run_id_and_its_bad_inputs(world, trained):
    run_id = user_logged_run("model")
    r = world.post("/models/register", {"model_name": "other_api", "run_id": run_id,
                                        "model_uri": None, "tags": {"team": "growth"}})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1 and r.json()["tags"]["team"] == "growth"
    no_model_there = user_logged_run("named-otherwise")
    assert_error(world.post("/models/register", {"model_name": "other_api",
                                                 "run_id": no_model_there}), 422,
                 "RegistryError", contains="logged no model named 'model'")
    assert_error(world.post("/models/register", {"model_name": "bad name!", "run_id": run_id}),
                 422, "InvalidModelNameError", field="model_name")
    assert_error(world.post("/models/register", {"description": "no name"}), 422,
                 "ValidationError", field="model_name")
    assert_error(world.post("/models/register", {"model_name": MODEL, "run_id": run_id,
                                                 "data": "x.csv", "target": "y"}),
                 422, field="data")
    assert_error(world.post("/models/register", {"model_name": MODEL, "data": "x.csv"}),
                 422, field="target")
    assert_error(world.post("/models/register", {"model_name": MODEL, "metrics": {"a": "x"}}),
                 422, field="metrics.a")
    r = world.client.post(f"{BASE}/models/register", content=b"{not json",
                          headers={**world.auth(), "Content-Type": "application/json"})
    assert_error(r, 422, "ValidationError")


def test_training_on_bad_data_fails_its_run_with_the_flows_message(world):
    accepted = world.post("/models/register", {"model_name": MODEL, "data": str(world.data),
                                               "target": "no_such_column", **ONE_LINEAR_TRIAL})
    status = world.wait(accepted)
    assert status["state_type"] == "FAILED" and status["result"] is None
    assert status["error"]["type"] == "DataError"
    assert "no_such_column" in status["error"]["message"]


# --------------------------------------------------------------------------- promote, versions
def test_promote_and_its_errors(world, trained):
    r = world.post("/models/promote", {"model_name": MODEL, "version": 2, "stage": "Staging",
                                       "reason": "try it"})
    assert r.status_code == 200, r.text
    assert r.json()["aliases"] == ["challenger"]
    assert_error(world.post("/models/promote", {"model_name": MODEL, "version": 99}), 404,
                 "VersionNotFoundError", contains="no version 99")
    assert_error(world.post("/models/promote", {"model_name": "nope", "version": 1}), 404,
                 "ModelNotFoundError", contains="no registered model named 'nope'")
    assert_error(world.post("/models/promote", {"model_name": MODEL, "version": 1,
                                                "stage": "Archived"}), 422, field="stage")


def test_versions_and_compare(world, trained):
    assert_error(world.get("/models/nope/versions"), 404, "ModelNotFoundError")
    assert_error(world.get("/models/bad%20name/versions"), 422, "InvalidModelNameError")
    r = world.get(f"/models/{MODEL}/compare", params={"version_a": "1", "version_b": "champion"})
    assert r.status_code == 200, r.text
    assert r.json()["version_a"] == 1 and r.json()["scores_on_data"] is None
    assert_error(world.get(f"/models/{MODEL}/compare", params={"version_a": "1",
                                                               "version_b": "7"}), 404)
    assert_error(world.get(f"/models/{MODEL}/compare", params={"version_a": "1"}), 422,
                 field="version_b")


def test_compare_with_data_is_long_work(world, trained):
    other = world.post("/models/register", {"model_name": "twin_api",
                                            "run_id": trained["run_id"]})
    assert other.status_code == 200, other.text
    accepted = world.get(f"/models/{MODEL}/compare",
                         params={"version_a": "1", "version_b": "1", "data": str(world.data)})
    status = world.wait(accepted)
    assert status["state_type"] == "COMPLETED", status
    assert status["flow_name"] == "compare-versions"
    assert status["result"]["n_rows"] == 900 and "1" in status["result"]["scores_on_data"]


def test_rollback(world, trained):
    assert world.post("/models/promote", {"model_name": MODEL, "version": 2}).status_code == 200
    r = world.post(f"/models/{MODEL}/rollback", {"reason": "v2 misbehaves"})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1 and "champion" in r.json()["aliases"]
    assert_error(world.post(f"/models/{MODEL}/rollback", {}), 422, "RegistryError",
                 contains="no earlier champion")
    assert_error(world.post(f"/models/{MODEL}/rollback", {"version": 42}), 404)
    assert world.post(f"/models/{MODEL}/rollback", None).status_code == 422


# --------------------------------------------------------------------------- runs, limits
def test_unknown_runs_are_404(world):
    assert_error(world.get("/runs/0b0d5a4e-7a7e-4f0e-9d1a-3d8c1c1f0b0b"), 404, "FlowRunNotFound")
    assert_error(world.get("/runs/not-a-uuid"), 404, "FlowRunNotFound")


def test_too_large_bodies_are_413_and_unknown_paths_404(world):
    big = {"model_name": MODEL, "description": "x" * 2_000_000}
    assert_error(world.post("/models/register", big), 413, "RequestTooLarge")
    assert_error(world.get("/no/such/route"), 404, "NotFound")
