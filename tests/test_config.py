"""Configuration blocks against a real Prefect API and real MLflow stores.

What falls back to the embedded defaults (no saved document) and what is an error (a saved
document that does not validate); how often a flow run reads the MLflow configuration; where the
MLflow credentials go (to the configured server) and where they do not (child processes).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import BlockDocumentUpdate
from prefect.events import emit_event
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

from blocks import (ABPolicy, ExportSettings, MLflowConfig, MonitoringPolicy, RetrainingPolicy,
                    TrainingSettings, resolve_ab_policy, resolve_export_settings,
                    resolve_mlflow_config, resolve_monitoring_policy, resolve_retraining_policy,
                    resolve_training_settings)
from blocks.mlflow_config import DEFAULT_DOCUMENT
from flows.export import export_model
from flows.registry import list_versions
from flows.training import train_model
from tasks.demo_data import churn_frame
from tasks.errors import ConfigurationError, ModelNotFoundError
from tasks.export.pmml import find_java
from tasks.registry import mlflow_client
from tests.budgets import ONE_LINEAR_TRIAL

SECRET = "s3cr3t-pw-81723"


@pytest.fixture
def saved():
    """Save block documents for one test; every one is deleted afterwards."""
    made: list[tuple[type, str]] = []

    def save(block, name: str = DEFAULT_DOCUMENT):
        block.save(name, overwrite=True)
        made.append((type(block), name))
        return block

    yield save
    for cls, name in made:
        try:
            cls.delete(name)
        except ValueError:  # already gone
            pass


def corrupt(cls, name: str, data: dict) -> None:
    """Replace a saved document's data as an edit through the API (or an older version of the
    block) could leave it: Prefect stores it without checking it against the block's fields."""
    with get_client(sync_client=True) as client:
        doc = client.read_block_document_by_name(name=name, block_type_slug=cls.get_block_type_slug())
        client.update_block_document(doc.id, BlockDocumentUpdate(data=data, merge_existing_data=False))


# (block, a valid instance, document name, resolver, data that does not validate, bad field)
CASES = {
    "mlflow-config": (MLflowConfig, lambda: MLflowConfig(tracking_uri="sqlite:///unused.db"),
                      DEFAULT_DOCUMENT, resolve_mlflow_config,
                      {"experiment_name": "x", "password": 987654321}, "tracking_uri"),
    "ab-policy": (ABPolicy, ABPolicy, DEFAULT_DOCUMENT, resolve_ab_policy,
                  {"min_samples_per_arm": "a thousand"}, "min_samples_per_arm"),
    "export-settings": (ExportSettings, ExportSettings, DEFAULT_DOCUMENT, resolve_export_settings,
                        {"latency_rows": 5}, "latency_rows"),
    "monitoring-policy": (MonitoringPolicy, MonitoringPolicy, DEFAULT_DOCUMENT,
                          resolve_monitoring_policy, {"drift_threshold": "high"}, "drift_threshold"),
    "training-settings": (TrainingSettings, TrainingSettings, DEFAULT_DOCUMENT,
                          resolve_training_settings, {"dask_connect_timeout_s": -1},
                          "dask_connect_timeout_s"),
    "retraining-policy": (RetrainingPolicy, RetrainingPolicy, "customer-churn",
                          lambda: resolve_retraining_policy("customer_churn"),
                          {"min_new_rows": 0}, "min_new_rows"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_saved_document_that_does_not_validate_is_an_error_naming_block_and_fix(
        case, saved, state_dir):
    cls, make, name, resolve, bad, field = CASES[case]
    saved(make(), name)
    corrupt(cls, name, bad)
    with pytest.raises(ConfigurationError) as caught:
        resolve()
    message = str(caught.value)
    slug = cls.get_block_type_slug()
    assert f"saved {cls.__name__} block document {name!r}" in message
    assert field in message  # what is wrong
    assert f".save({name!r}, overwrite=True)" in message  # how to fix it
    assert f"prefect block delete {slug}/{name}" in message  # or how to stop using it
    assert "987654321" not in message  # values (possibly secrets) are not echoed


@pytest.mark.parametrize("case", list(CASES))
def test_without_a_saved_document_the_embedded_defaults_apply(case, state_dir):
    cls, _make, name, resolve, _bad, _field = CASES[case]
    try:
        cls.delete(name)
    except ValueError:
        pass
    expected = MLflowConfig.embedded() if cls is MLflowConfig else cls()
    assert resolve() == expected


def test_a_flow_with_an_invalid_mlflow_config_fails_instead_of_using_a_throwaway_store(
        saved, state_dir):
    saved(MLflowConfig(tracking_uri=f"sqlite:///{state_dir / 'mlflow.db'}"))
    corrupt(MLflowConfig, DEFAULT_DOCUMENT, {"tracking_uri": 5000})
    with pytest.raises(ConfigurationError, match="MLflowConfig block document 'default'.*tracking_uri"):
        train_model(churn_frame().iloc[:600], "churn", "not_here", **ONE_LINEAR_TRIAL)
    embedded = MlflowClient(tracking_uri=f"sqlite:///{state_dir / 'mlflow.db'}")
    assert embedded.search_registered_models() == []


# --------------------------------------------------------------------------- once per flow run
def block_loads(flow_run_id) -> int:
    """`prefect.block.mlops-mlflow-config.loaded` events Prefect recorded for one flow run (Prefect
    emits one per successful Block.load)."""
    related = f"prefect.flow-run.{flow_run_id}"
    sentinel = f"mlops.test.sentinel-{uuid.uuid4().hex}"
    emit_event(sentinel, resource={"prefect.resource.id": "mlops.test"},
               related=[{"prefect.resource.id": related, "prefect.resource.role": "flow-run"}])
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # events emitted before the sentinel are in first
            page = client.read_events(filter=EventFilter(
                event=EventNameFilter(name=[sentinel])), limit=1)
            if page.total:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the Prefect API never recorded the sentinel event")
        page = client.read_events(filter=EventFilter(
            event=EventNameFilter(name=["prefect.block.mlops-mlflow-config.loaded"]),
            related=EventRelatedFilter(id=[related])), limit=50)
        return page.total


def test_a_flow_run_reads_the_mlflow_config_from_the_prefect_api_once(saved, state_dir):
    saved(MLflowConfig.embedded())
    state = train_model(churn_frame().iloc[:1500], "churn", "once", return_state=True,
                        **ONE_LINEAR_TRIAL)
    assert state.is_completed()
    assert block_loads(state.state_details.flow_run_id) == 1  # 4 before: one per mlflow_client()


@task
def tracking_uri_in_force() -> str:
    mlflow_client()
    return resolve_mlflow_config().tracking_uri


def test_a_flow_run_keeps_one_config_and_the_next_run_sees_a_change(saved, state_dir, tmp_path):
    first, second = (f"sqlite:///{state_dir / 'mlflow.db'}", f"sqlite:///{tmp_path / 'b.db'}")
    shutil.copyfile(state_dir / "mlflow.db", tmp_path / "b.db")

    @flow
    def edited_mid_run() -> tuple[str, str]:
        before = tracking_uri_in_force.submit().result()
        saved(MLflowConfig(tracking_uri=second))  # someone edits the block during the run
        return before, tracking_uri_in_force.submit().result()

    saved(MLflowConfig(tracking_uri=first))
    MlflowClient(tracking_uri=first).create_registered_model("only_in_first")
    assert edited_mid_run() == (first, first)  # one run, one configuration
    with pytest.raises(ModelNotFoundError):  # the next run uses the edited block
        list_versions("only_in_first")
    saved(MLflowConfig(tracking_uri=first))
    assert list_versions("only_in_first") == []


# --------------------------------------------------------------------------- credentials
class Recorder(BaseHTTPRequestHandler):
    """A loopback stand-in for an MLflow server: answers `{}` and records Authorization headers."""
    seen: list[str | None] = []

    def do_GET(self):
        Recorder.seen.append(self.headers.get("Authorization"))
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@task
def child_environment() -> dict:
    out = subprocess.run([sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
                         capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def test_credentials_reach_the_mlflow_server_but_not_child_processes(saved, state_dir):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Recorder.seen = []
    try:
        saved(MLflowConfig(tracking_uri=f"http://127.0.0.1:{server.server_port}",
                           username="alice", password=SECRET))

        @flow
        def search_then_spawn() -> dict:
            mlflow_client().search_registered_models()
            return child_environment()

        child = search_then_spawn()
    finally:
        server.shutdown()
    expected = "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()
    assert Recorder.seen and set(Recorder.seen) == {expected}
    assert "MLFLOW_TRACKING_PASSWORD" not in child and "MLFLOW_TRACKING_USERNAME" not in child
    assert not any(SECRET in value for value in child.values())
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ


def test_the_pmml_exporters_java_processes_do_not_see_the_mlflow_password(
        saved, state_dir, tmp_path, monkeypatch):
    java = find_java()
    if java is None:
        pytest.skip("no Java here: the PMML exporter starts no Java process")
    # A Java installation whose `java` records its environment, then runs the real one.
    dumps = tmp_path / "env-dumps"
    dumps.mkdir()
    fake_home = tmp_path / "java-home"
    (fake_home / "bin").mkdir(parents=True)
    wrapper = fake_home / "bin" / "java"
    wrapper.write_text(f'#!/bin/sh\nenv > "{dumps}/java-$$.env"\nexec "{Path(java).resolve()}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(fake_home))

    config = MLflowConfig.embedded()
    config.username, config.password = "alice", SECRET
    saved(config)
    train_model(churn_frame().iloc[:1500], "churn", "pmml_env", **ONE_LINEAR_TRIAL)
    report = export_model("pmml_env", formats=["pmml"])
    assert report.result("pmml").status == "ok", report.result("pmml").reason

    seen = [p.read_text() for p in dumps.glob("*.env")]
    assert len(seen) >= 2  # the converter and the evaluator's JVM (and `java -version`)
    for environment in seen:
        assert "MLFLOW_TRACKING_PASSWORD" not in environment
        assert SECRET not in environment
