"""The PostgreSQL-backed stack (tests/e2e/conftest.py `pg_stack`): both servers keep their state in
PostgreSQL. Its own file: it starts its own stack, so it can run beside the SQLite stack's tests."""
from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from tests.e2e.test_stack import BUDGET_S, aliases, assert_completed

pytestmark = pytest.mark.e2e


@pytest.mark.postgres
def test_train_on_the_postgresql_stack(pg_stack, churn_csv):
    model = "e2e_churn_pg"
    proc = pg_stack.run_deployment("train-model/default", {
        "data": str(churn_csv), "target": "churn", "model_name": model, "time_budget_s": BUDGET_S})
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


@pytest.mark.postgres
def test_a_worker_in_another_folder_and_home_runs_the_deployed_commit(pg_stack, churn_csv,
                                                                       tmp_path):
    """MLOPS_CODE_SOURCE=git (deployments/up.sh): runs clone the repository at the deployed
    commit, so a worker started anywhere -- here another folder and another HOME, with nothing
    of the project on its path -- runs them, and what it records is what every machine sees."""
    import os
    import subprocess
    import sys

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
    # one deployment of its own name and pool, so the session's other tests keep theirs
    config["deployments"] = [dict(d, name="remote") for d in config["deployments"]
                             if d["entrypoint"] == "flows/training.py:train_model"]
    prefect_file.write_text(yaml.safe_dump(config, sort_keys=False))
    assert pg_stack.prefect("work-pool", "create", "mlops-remote", "--type", "process").returncode == 0
    deployed = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                               "--prefect-file", str(prefect_file)], cwd=ROOT, env=pg_stack.env,
                              capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    # The other machine: its own folder and HOME, the API address and nothing else.
    elsewhere, home = tmp_path / "elsewhere", tmp_path / "home"
    elsewhere.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "MLOPS_", "PYTHON"))}
    env.update(HOME=str(home), PREFECT_HOME=str(home / ".prefect"),
               PREFECT_API_URL=pg_stack.prefect_api, PREFECT_WORKER_QUERY_SECONDS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = tmp_path / "remote-worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "mlops-remote",
             "--work-queue", "ml-retraining-queue", "--type", "process", "--name", "remote"],
            cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        model = "e2e_churn_remote"
        proc = pg_stack.run_deployment("train-model/remote", {
            "data": str(churn_csv), "target": "churn", "model_name": model,
            "time_budget_s": BUDGET_S})
        assert proc.returncode == 0 and "finished successfully in 'Completed'" in proc.stdout, (
            f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}\n--- remote worker\n"
            f"{log.read_text()[-4000:]}")
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=30)
    flow_run_id = pg_stack.runs[-1]
    assert flow_run_id in log.read_text(), "the run was not executed by the remote worker"

    # What it recorded is in the shared stores: the local worker's runs see the version and the
    # alias move; nothing stayed on the remote machine (the run's clone went with its temp folder).
    assert aliases(pg_stack, model) == {"champion": 1}
    history = pg_stack.run_deployment("alias-history/default", {"model_name": model})
    assert_completed(pg_stack, history)
    client = MlflowClient(tracking_uri=pg_stack.mlflow_uri, registry_uri=pg_stack.mlflow_uri)
    history_runs = client.search_runs(
        [client.get_experiment_by_name("mlops-alias-history").experiment_id],
        filter_string=f"tags.`mlops.model_name` = '{model}'")
    moves = [json.loads(v) for r in history_runs for k, v in r.data.tags.items()
             if k.startswith("mlops.alias_move.")]
    assert [(m["alias"], m["to"]) for m in moves] == [("champion", 1)], moves
    assert list(elsewhere.iterdir()) == []
    assert not list(home.rglob(".mlops")) and not list(home.rglob("mlops-flows"))
