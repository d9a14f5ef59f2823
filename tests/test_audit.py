"""audit_registry: what MLflow holds for a model agrees with what mlops-flows recorded.

Each broken state is made for real on the embedded store: an alias moved with MLflow's own client
behind mlops-flows' back, stored files deleted from the artifact folder, a model source registered
twice through MLflow directly."""
from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
import yaml

from flows.registry import alias_history, audit_registry, promote_model, register_model
from flows.training import train_model
from tasks.demo_data import churn_frame
from tasks.errors import InvalidModelNameError, ModelNotFoundError
from tasks.registry import mlflow_client
from tests.budgets import ONE_LINEAR_TRIAL
from tests.conftest import ROOT
from tests.test_registry import log_tiny_model


def local(uri: str) -> Path:
    return Path(urlparse(uri).path if uri.startswith("file:") else uri)


def checks(report) -> list[tuple]:
    return sorted((f.check, f.version, f.alias) for f in report.findings)


@pytest.fixture
def trained(state_dir):
    """Two versions trained by train_model (v2 champion, v1 previous champion)."""
    frame = churn_frame().sample(600, random_state=1).reset_index(drop=True)
    train_model(frame, "churn", "audited", **ONE_LINEAR_TRIAL)
    train_model(frame.iloc[:500], "churn", "audited", promote="always", **ONE_LINEAR_TRIAL)
    return "audited"


def test_a_model_trained_and_promoted_by_the_flows_audits_clean(trained):
    report = audit_registry(trained)
    assert report.ok and report.findings == []
    assert report.versions == [2, 1] and report.aliases == {"champion": 2}
    assert report.moves_replayed >= 2


def test_an_alias_moved_behind_the_flows_back_is_found_and_fixed_by_promoting(trained):
    mlflow_client().set_registered_model_alias(trained, "champion", "1")
    report = audit_registry(trained)
    assert not report.ok
    assert checks(report) == [("alias-history", 1, "champion")]
    assert "recorded moves leave it on version 2" in report.findings[0].message

    assert "audit_registry(..., repair=True)" in report.findings[0].message
    repaired = audit_registry(trained, repair=True)
    assert repaired.ok and audit_registry(trained).ok
    assert alias_history(trained)[-1].model_dump(include={"alias", "from_version", "to_version",
                                                          "kind"}) == {
        "alias": "champion", "from_version": 2, "to_version": 1, "kind": "audit-repair"}

    mlflow_client().delete_registered_model_alias(trained, "champion")
    assert checks(audit_registry(trained)) == [("alias-history", None, "champion")]
    promote_model(trained, 2, reason="the flows set it again")
    assert audit_registry(trained).ok


def test_deleted_stored_files_are_named_per_version(trained):
    client = mlflow_client()
    run = client.get_run(client.get_model_version(trained, "1").run_id)
    folder = local(run.info.artifact_uri) / "mlops"
    (folder / "profile.json").unlink()
    (folder / "seen_rows.npy").unlink()
    model_files = local(client.get_model_version_download_uri(trained, "2"))
    shutil.rmtree(model_files)

    report = audit_registry(trained)
    assert checks(report) == [("model-files", 2, None), ("version-files", 1, None),
                              ("version-files", 1, None)]
    messages = " ".join(f.message for f in report.findings)
    assert "drift profile" in messages and "profile_model" in messages
    assert "row fingerprints" in messages and "no MLmodel file" in messages


def test_a_source_registered_twice_is_a_duplicate(state_dir):
    run_id = log_tiny_model()
    register_model("twice", run_id=run_id)
    # a retry that went around the flow's idempotence check: MLflow registers the same model again
    mlflow.register_model(mlflow_client().get_model_version("twice", "1").source, "twice",
                          tags={"mlops.source": mlflow_client().get_model_version(
                              "twice", "1").tags["mlops.source"]})
    report = audit_registry("twice")
    assert checks(report) == [("duplicate-version", 2, None)]
    assert "[1, 2]" in report.findings[0].message


def test_unknown_or_invalid_model_names_are_refused(state_dir):
    with pytest.raises(ModelNotFoundError):
        audit_registry("no_such_model")
    with pytest.raises(InvalidModelNameError):
        audit_registry("bad name!")


def test_the_audit_has_a_deployment_on_the_retraining_queue():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [deployment] = [d for d in config["deployments"]
                    if d["entrypoint"] == "flows/registry.py:audit_registry"]
    assert deployment["name"] == "default"
    assert (deployment["work_pool"]["name"], deployment["work_pool"]["work_queue_name"]) == (
        "mlops", "ml-retraining-queue")
    assert "Registered model name" in audit_registry.parameters.model_dump()["properties"][
        "model_name"]["description"]
