"""The flows against a REAL `mlflow server` (what `make up` runs), not the embedded SQLite store.

Two servers on loopback for this file: one on SQLite, one on PostgreSQL (a new database, so both
servers run all their migrations). Both proxy artifacts (`--serve-artifacts`), so the flows upload
and download every artifact over HTTP. A saved `MLflowConfig` document named "default" points the flows at a server;
it is deleted after each test so other tests get the embedded default again.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlflow
import pandas as pd
import pytest

from mlflow.tracking import MlflowClient

from blocks.mlflow_config import DEFAULT_DOCUMENT, MLflowConfig
from flows.ab_testing import ab_test_results, create_ab_test, record_outcomes, score_batch
from flows.registry import compare_versions, list_versions, promote_model, rollback_model
from flows.training import train_model
from tasks.demo_data import churn_frame

from tests.budgets import ONE_LINEAR_TRIAL
from tests.conftest import require_postgres
from tests.servers import free_port, stop_process_group, wait_until_answers

SERVER_START_TIMEOUT_S = 180  # cold start is ~15 s idle here, much more on a loaded 2-CPU box
MLFLOW_BIN = Path(sys.executable).parent / "mlflow"


@dataclass
class MlflowServer:
    url: str
    backend: str
    artifacts_dir: Path
    log_path: Path
    process: subprocess.Popen


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_mlflow_server(backend_uri: str, backend: str, workdir: Path,
                        port: int | None = None, also_allowed: tuple[str, ...] = ()) -> MlflowServer:
    """`also_allowed`: more Host headers to accept (a proxy's address in front of it)."""
    port = port or free_port()
    artifacts = workdir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "mlflow-server.log"
    cmd = [str(MLFLOW_BIN), "server",
           "--backend-store-uri", backend_uri,
           "--serve-artifacts", "--artifacts-destination", str(artifacts),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           # 3.17 rejects Host headers outside its allow list (docs/architecture.md); say which we use
           "--allowed-hosts", ",".join((f"127.0.0.1:{port}", f"localhost:{port}", *also_allowed))]
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    # The huey job runner doubles the start time and is not used by these flows.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=workdir, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        # /health is exempt from the Host check; the API is not, so ask it too
        return (_get(f"{url}/health")[0] == 200 and
                _get(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")[0] == 200)

    wait_until_answers(process, answers, SERVER_START_TIMEOUT_S, log_path,
                       f"mlflow server ({backend})")
    return MlflowServer(url=url, backend=backend, artifacts_dir=artifacts, log_path=log_path,
                        process=process)


@pytest.fixture(scope="module")
def mlflow_server_sqlite(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mlflow-sqlite")
    server = start_mlflow_server(f"sqlite:///{workdir / 'mlflow.db'}", "sqlite", workdir)
    yield server
    stop_process_group(server.process)


@pytest.fixture(scope="module")
def mlflow_server_postgres(tmp_path_factory):
    require_postgres()
    import psycopg2
    from psycopg2 import sql

    db_name = f"mlops_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db_name)))
        workdir = tmp_path_factory.mktemp("mlflow-postgres")
        server = None
        try:
            # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed:
            # name the driver we pin (psycopg2-binary)
            server = start_mlflow_server(
                f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db_name}", "postgres", workdir)
            yield server
        finally:
            if server is not None:
                stop_process_group(server.process)
            with admin.cursor() as cur:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                            .format(sql.Identifier(db_name)))
    finally:
        admin.close()


@contextmanager
def flows_pointed_at(server: MlflowServer) -> Iterator[MlflowServer]:
    """The flows pointed at a server through a saved `default` MLflowConfig, for one test."""
    MLflowConfig(tracking_uri=server.url).save(DEFAULT_DOCUMENT, overwrite=True)
    try:
        yield server
    finally:
        MLflowConfig.delete(DEFAULT_DOCUMENT)
        # apply() set the process-wide URIs (and MLFLOW_TRACKING_URI): do not leak the server
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)


@pytest.fixture(params=["sqlite", "postgres"])
def mlflow_server(request, state_dir):
    """The flows pointed at one of the servers."""
    with flows_pointed_at(request.getfixturevalue(f"mlflow_server_{request.param}")) as server:
        yield server


@pytest.fixture(scope="module")
def churn_files(tmp_path_factory):
    """Three disjoint sets of churn customers: two training batches and an evaluation batch."""
    frame = churn_frame().sample(frac=1.0, random_state=3).reset_index(drop=True)
    folder = tmp_path_factory.mktemp("churn")
    paths = {}
    for name, part in {"first": frame.iloc[:800], "second": frame.iloc[800:1600],
                       "evaluation": frame.iloc[1600:2100]}.items():
        paths[name] = folder / f"churn_{name}.csv"
        part.to_csv(paths[name], index=False)
    return paths


def client_for(server: MlflowServer) -> MlflowClient:
    return MlflowClient(tracking_uri=server.url, registry_uri=server.url)


def unique_name(server: MlflowServer) -> str:
    # the servers live for the whole session: each test registers its own model
    return f"churn_{server.backend}_{uuid.uuid4().hex[:8]}"


def test_training_registers_a_champion_with_its_artifacts_on_the_server(
        mlflow_server, churn_files, state_dir, tmp_path):
    name = unique_name(mlflow_server)
    result = train_model(str(churn_files["first"]), "churn", name, **ONE_LINEAR_TRIAL)

    assert result.version == 1 and result.aliases == ["champion"]
    client = client_for(mlflow_server)
    assert client.get_registered_model(name).aliases == {"champion": "1"}
    mv = client.get_model_version(name, "1")
    assert mv.run_id == result.run_id and mv.tags["semver"] == "1.0.0"
    tags = client.get_run(result.run_id).data.tags
    assert tags["mlops.data_ref"] == str(churn_files["first"])
    assert tags["mlops.target"] == "churn" and tags["mlops.task"] == "binary"
    assert len(tags["mlops.data_sha256"]) == 64 and tags["mlops.git_commit"]

    # artifacts live behind the server's proxy, not on a path only this machine can read
    run = client.get_run(result.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    schema_path = client.download_artifacts(result.run_id, "mlops/schema.json", str(tmp_path))
    schema = json.loads(Path(schema_path).read_text())
    assert schema["target"] == "churn" and schema["classes"] == ["No", "Yes"]
    assert "contract" in schema["categorical"] and "tenure" in schema["numeric"]
    holdout = pd.read_parquet(
        client.download_artifacts(result.run_id, "mlops/holdout.parquet", str(tmp_path)))
    assert len(holdout) == 160  # 20 % of 800 rows, labels included
    assert set(holdout.columns) == set(schema["numeric"] + schema["categorical"] + ["churn"])
    stored = list(mlflow_server.artifacts_dir.rglob("holdout.parquet"))
    assert any(result.run_id in str(p) for p in stored), "holdout not in the server's store"
    # nothing went to the embedded store
    local = f"sqlite:///{state_dir / 'mlflow.db'}"
    embedded = MlflowClient(tracking_uri=local, registry_uri=local)
    assert embedded.search_registered_models() == []
    assert not (state_dir / "mlartifacts").exists()


def test_promote_rollback_and_compare_on_the_server(mlflow_server, churn_files):
    name = unique_name(mlflow_server)
    first = train_model(str(churn_files["first"]), "churn", name, **ONE_LINEAR_TRIAL)
    second = train_model(str(churn_files["second"]), "churn", name, **ONE_LINEAR_TRIAL)
    client = client_for(mlflow_server)
    assert (first.version, first.aliases) == (1, ["champion"])
    assert (second.version, second.aliases) == (2, ["challenger"])
    assert client.get_registered_model(name).aliases == {"champion": "1", "challenger": "2"}

    promoted = promote_model(name, 2, "Production", reason="better on recent customers")
    assert promoted.version == 2 and promoted.aliases == ["champion"]
    assert client.get_registered_model(name).aliases == {"champion": "2"}

    rolled = rollback_model(name, reason="complaints")
    assert rolled.version == 1 and rolled.aliases == ["champion"]
    assert client.get_registered_model(name).aliases == {"champion": "1"}
    versions = list_versions(name)
    assert [(v.version, v.aliases) for v in versions] == [(2, []), (1, ["champion"])]

    # both versions loaded from the server and scored on the same unseen customers
    comparison = compare_versions(name, 1, 2, data=str(churn_files["evaluation"]))
    assert comparison.n_rows == 500
    assert set(comparison.scores_on_data) == {"1", "2"}
    for scores in comparison.scores_on_data.values():
        assert 0.6 < scores["roc_auc"] <= 1.0 and 0.5 < scores["accuracy"] <= 1.0
    assert comparison.scores_on_data["1"] != comparison.scores_on_data["2"]


def test_the_ab_artifact_shows_the_lift_plot_inline(mlflow_server_sqlite, state_dir, churn_files):
    """Like the drift check's plot: with an MLflow server the Prefect UI shows the image."""
    from prefect.artifacts import Artifact

    with flows_pointed_at(mlflow_server_sqlite) as server:
        name = unique_name(server)
        train_model(str(churn_files["first"]), "churn", name, **ONE_LINEAR_TRIAL)
        train_model(str(churn_files["second"]), "churn", name, **ONE_LINEAR_TRIAL)
        test_id = create_ab_test(name, traffic_split=0.5)
        rows = pd.read_csv(churn_files["evaluation"]).drop(columns=["churn"])
        rows.insert(0, "customer_id", [f"c{i}" for i in range(len(rows))])
        score_batch(name, rows, "customer_id")
        record_outcomes(test_id, pd.DataFrame({"customer_id": rows.customer_id,
                                               "converted": [i % 3 == 0 for i in range(len(rows))]}),
                        "customer_id", "converted")
        results = ab_test_results(test_id)
        markdown = Artifact.get(f"ab-{test_id}").data
        image = f"![lift and confidence sequence over time]({results.plot_uri})"
        assert results.plot_uri.startswith(f"{server.url}/get-artifact?") and image in markdown
        status, body = _get(results.plot_uri, timeout=30)
        assert status == 200 and body.startswith(b"\x89PNG")
