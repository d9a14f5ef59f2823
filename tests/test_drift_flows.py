"""check_drift, evaluate_production and profile_model against a real Prefect API and the embedded
MLflow store: one tiny churn model for the module (the training file is deleted before any check,
so the checks can only use the stored profile)."""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.models import infer_signature
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from sklearn.linear_model import LogisticRegression

from blocks.monitoring import MonitoringPolicy, resolve_monitoring_policy
from flows.drift import (check_drift, drifted_batch, evaluate_production, lifecycle_step,
                         profile_model)
from flows.registry import register_model
from flows.training import train_model
from tasks.demo_data import churn_frame
from tasks.drift import PROFILE_RUN_TAG, ProfileNotFoundError, resolve_batch
from tasks.drift_metrics import DriftInputError
from tasks.errors import ConfigurationError, DataError, ModelNotFoundError, VersionNotFoundError
from tasks.registry import mlflow_client

from tests.budgets import ONE_LINEAR_TRIAL
from tests.servers import free_port

MODEL = "churn_drift"


@dataclass
class Churn:
    home: Path
    train: Path  # deleted once the model is trained
    evaluation: Path
    drifted: Path
    frame: pd.DataFrame  # evaluation rows
    version: int


@pytest.fixture(scope="module")
def churn(tmp_path_factory):
    """One embedded state folder for the module and one champion trained on 500 churn rows."""
    home = tmp_path_factory.mktemp("drift")
    patch = pytest.MonkeyPatch()
    patch.setenv("MLOPS_HOME", str(home / "state"))
    try:
        rows = churn_frame().sample(900, random_state=1).reset_index(drop=True)
        data = home / "data"
        data.mkdir()
        train = data / "train.csv"
        rows.iloc[:500].to_csv(train, index=False)
        evaluation = rows.iloc[500:].reset_index(drop=True)
        eval_path, drifted_path = data / "evaluation.csv", data / "drifted.csv"
        evaluation.to_csv(eval_path, index=False)
        drifted_batch(evaluation).to_csv(drifted_path, index=False)
        result = train_model(str(train), "churn", MODEL, **ONE_LINEAR_TRIAL)
        train.unlink()  # a drift check must never need the training data
        yield Churn(home, train, eval_path, drifted_path, evaluation, result.version)
    finally:
        patch.undo()


def drift_runs(kind: str | None = "drift-check") -> list:
    """Runs of that kind (None: every run) that a user sees in MLflow (deleted ones are not)."""
    client = mlflow_client()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string=f"tags.`mlops.kind` = '{kind}'" if kind else "")


def read_events(name: str, model_name: str, timeout_s: float = 20.0) -> list:
    """Events from the Prefect API (they are persisted asynchronously: poll)."""
    deadline = time.monotonic() + timeout_s
    event_filter = EventFilter(event=EventNameFilter(name=[name]),
                               resource=EventResourceFilter(id=[f"mlops.model.{model_name}"]))
    with get_client(sync_client=True) as client:
        while True:
            # limit: the server caps it at 50 (the client's default of 100 is refused)
            events = client.read_events(filter=event_filter, limit=50).events
            if events or time.monotonic() > deadline:
                return events
            time.sleep(0.25)


def read_artifacts(key: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


# --------------------------------------------------------------------------- the check
def test_a_drifted_batch_is_flagged_recorded_published_and_announced(churn):
    report = check_drift(MODEL, str(churn.drifted))
    assert report.model_name == MODEL and report.version == churn.version
    assert report.drifted and report.score > report.threshold == 0.3
    assert {"contract", "tenure"} <= set(report.drifted_features)
    assert report.n_current == 400 and report.n_reference == 400  # 80 % of 500 trained on
    assert report.weighting == "importance"
    assert sum(f.importance for f in report.features) == pytest.approx(1.0)
    contract = next(f for f in report.features if f.name == "contract")
    assert (contract.kind, contract.method, contract.drifted) == ("categorical", "chi2", True)
    assert contract.p_value < 1e-6 and contract.effect == contract.js > 0.1
    tenure = next(f for f in report.features if f.name == "tenure")
    assert (tenure.kind, tenure.method) == ("numeric", "ks") and tenure.effect > 0.3
    assert tenure.ks_error_bound is not None and tenure.psi > tenure.psi_threshold
    assert report.features[0].drifted  # drifted first
    assert report.data_ref == str(churn.drifted)

    # MLflow: a finished run in the model's experiment with metrics, the report and the plot
    run = mlflow_client().get_run(report.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlops.model_name"] == MODEL
    assert run.data.tags["mlops.model_version"] == str(churn.version)
    assert run.data.tags["mlops.drifted"] == "true"
    assert run.data.metrics["drift_score"] == pytest.approx(report.score)
    assert run.data.metrics["psi.contract"] == pytest.approx(contract.psi)
    files = {f.path for f in mlflow_client().list_artifacts(report.run_id, "drift")}
    assert files == {"drift/report.json", "drift/most_drifted_features.png"}
    png = Path(mlflow.artifacts.download_artifacts(run_id=report.run_id,
                                                   artifact_path="drift/most_drifted_features.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with Image.open(png) as image:  # the four most drifted features, two panels a row
        image.load()
        assert image.format == "PNG" and image.width > image.height > 400
    assert report.plot_uri.endswith("drift/most_drifted_features.png")
    # the report in MLflow holds what the plot draws: the batch over the profile's cells
    recorded = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=report.run_id, artifact_path="drift/report.json")).read_text())
    recorded = {f["name"]: f for f in recorded["features"]}
    assert recorded["contract"]["current_counts"] == contract.current_counts
    for f in (contract, tenure):
        assert sum(f.current_counts) == f.n_current == report.n_current

    # Prefect UI: markdown summary linking the plot, structured table
    markdown = read_artifacts("drift-churn-drift")
    assert markdown and markdown[0].type == "markdown"
    assert "DRIFTED" in markdown[0].data and report.plot_uri in markdown[0].data
    table = read_artifacts("drift-churn-drift-features")
    assert table and table[0].type == "table"

    # the event, read back from the Prefect API
    events = read_events("mlops.model.drift-detected", MODEL)
    assert events, "no mlops.model.drift-detected event reached the API"
    payload = events[0].payload
    assert payload["model_name"] == MODEL and payload["version"] == churn.version
    assert payload["score"] == pytest.approx(report.score)
    assert payload["drifted_features"] == report.drifted_features
    assert payload["data_ref"] == str(churn.drifted)
    assert events[0].resource.id == f"mlops.model.{MODEL}"

    # the default policy alerts to the log only, above 0.5
    assert report.alerted == (report.score > 0.5) and report.alerts_sent == ["log"]


def test_an_undrifted_batch_is_not_drifted(churn):
    frame = churn.frame.copy()
    report = check_drift(MODEL, frame, version=churn.version)  # a DataFrame works too
    assert not report.drifted and report.score < 0.1
    pd.testing.assert_frame_equal(frame, churn.frame)  # the caller's frame is left as it was
    assert report.data_ref is None and not report.alerted
    assert mlflow_client().get_run(report.run_id).data.tags["mlops.drifted"] == "false"


def test_a_large_dataframe_stays_out_of_the_prefect_database(churn):
    """Prefect would store a DataFrame parameter value by value and refuse it above 512 KiB."""
    big = churn.frame.sample(30_000, replace=True, random_state=3).reset_index(drop=True)
    state = check_drift(MODEL, big, return_state=True)
    assert state.result().n_current == 30_000
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.parameters["data"] == "<DataFrame 30000 rows x 20 columns>"


def test_a_folder_means_its_newest_batch(churn, tmp_path):
    older, newer = tmp_path / "2026-01.csv", tmp_path / "2026-02.parquet"
    churn.frame.to_csv(older, index=False)
    drifted_batch(churn.frame).to_parquet(newer, index=False)
    os.utime(older, (time.time() - 60, time.time() - 60))
    assert resolve_batch(str(tmp_path)) == str(newer)
    report = check_drift(MODEL, str(tmp_path))
    assert report.data_ref == str(newer) and report.drifted
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no csv or parquet file in folder"):
        check_drift(MODEL, str(empty))


def test_an_s3_prefix_means_its_newest_object(churn):
    """Against a real S3 API (moto's threaded server on loopback) through a saved S3Bucket block."""
    import boto3
    from moto.server import ThreadedMotoServer
    from prefect_aws import AwsClientParameters, MinIOCredentials
    from prefect_aws.s3 import S3Bucket

    from tasks.drift import latest_in_prefix

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    bucket, block = f"batches-{uuid.uuid4().hex[:8]}", f"drift-test-{uuid.uuid4().hex[:8]}"
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k",
                          aws_secret_access_key="s", region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="churn/2026-01.csv", Body=churn.frame.to_csv(index=False))
        s3.put_object(Bucket=bucket, Key="churn/notes.txt", Body=b"not a batch")
        s3.put_object(Bucket=bucket, Key="churn/2026-02.csv",
                      Body=drifted_batch(churn.frame).to_csv(index=False))
        S3Bucket(bucket_name=bucket, credentials=MinIOCredentials(
            minio_root_user="k", minio_root_password="s", region_name="us-east-1",
            aws_client_parameters=AwsClientParameters(endpoint_url=endpoint))).save(block)
        try:
            assert latest_in_prefix(f"s3://{bucket}/churn/") == f"s3://{bucket}/churn/2026-02.csv"
            report = check_drift(MODEL, f"s3://{bucket}/churn/")
            assert report.data_ref == f"s3://{bucket}/churn/2026-02.csv" and report.drifted
            with pytest.raises(DataError, match="no csv or parquet object under"):
                check_drift(MODEL, f"s3://{bucket}/nothing-here/")
        finally:
            S3Bucket.delete(block)
    finally:
        server.stop()


def _break(frame: pd.DataFrame, how: str):
    f = frame.copy()
    if how == "missing columns":
        return f.drop(columns=["tenure", "contract"])
    if how == "wrong dtype":
        f["monthly_charges"] = "cheap"
        return f
    if how == "empty":
        return f.iloc[:0]
    if how == "all missing":
        f["tenure"] = np.nan
        return f
    raise AssertionError(how)


@pytest.mark.parametrize("how, error, message", [
    ("missing columns", DriftInputError, r"lacks 2 profiled column\(s\): \['tenure', 'contract'\]"),
    ("wrong dtype", DriftInputError, "'monthly_charges' is numeric in the profile but arrived as dtype"),
    ("empty", DriftInputError, "has no rows"),
    ("all missing", DriftInputError, "'tenure' is entirely missing"),
])
def test_bad_batches_are_refused_and_nothing_is_recorded(churn, how, error, message):
    before, every_run = len(drift_runs()), {r.info.run_id for r in drift_runs(None)}
    with pytest.raises(error, match=message):
        check_drift(MODEL, _break(churn.frame, how))
    assert len(drift_runs()) == before
    # the run opened while the comparison ran is gone too: no empty run is left in MLflow
    assert {r.info.run_id for r in drift_runs(None)} == every_run


@pytest.mark.parametrize("call, error, message", [
    (lambda c: check_drift("nope", c.frame), ModelNotFoundError, "no registered model named 'nope'"),
    (lambda c: check_drift(MODEL, c.frame, version="challenger"), VersionNotFoundError,
     "no version with alias 'challenger'"),
    (lambda c: check_drift(MODEL, c.frame, version=99), VersionNotFoundError, "has no version 99"),
    (lambda c: check_drift(MODEL, str(c.train)), DataError, "data file not found"),
    (lambda c: check_drift("bad name!", c.frame), Exception, "invalid model name"),
    (lambda c: check_drift(MODEL, c.frame, policy="no-such-policy"), ConfigurationError,
     "no saved MonitoringPolicy document named 'no-such-policy'"),
])
def test_bad_references_are_refused_and_nothing_is_recorded(churn, call, error, message):
    before = len(drift_runs())
    with pytest.raises(error, match=message):
        call(churn)
    assert len(drift_runs()) == before


def test_a_policy_channel_without_its_settings_is_refused_before_the_check(churn):
    MonitoringPolicy(channels=["log", "slack", "email"]).save("drift-test-incomplete", overwrite=True)
    try:
        before = len(drift_runs())
        with pytest.raises(ConfigurationError, match="'slack' needs slack_webhook_url.*'email' needs"):
            check_drift(MODEL, str(churn.drifted), policy="drift-test-incomplete")
        assert len(drift_runs()) == before
    finally:
        MonitoringPolicy.delete("drift-test-incomplete")
    with pytest.raises(ValueError, match="drift_alert_threshold"):
        MonitoringPolicy(drift_threshold=0.6, drift_alert_threshold=0.5)
    assert resolve_monitoring_policy().drift_threshold == 0.3  # nothing saved: built-in defaults


# --------------------------------------------------------------------------- profile_model
def test_a_version_without_a_profile_says_how_to_create_one(churn, tmp_path):
    legacy = "legacy_churn"
    rows = churn.frame.dropna()
    X = rows[["tenure", "monthly_charges"]].astype("float64")
    model = LogisticRegression().fit(X, rows["churn"])
    client = mlflow_client()
    # trained outside mlops-flows, in the user's own experiment (not MLflow's Default, whose
    # artifacts would land in the working folder)
    own = client.create_experiment("legacy-team", artifact_location=(tmp_path / "legacy").as_uri())
    with mlflow.start_run(experiment_id=own) as run:
        mlflow.sklearn.log_model(model, name="model", signature=infer_signature(X, model.predict(X)),
                                 pip_requirements=["scikit-learn"])
    version = register_model(legacy, run_id=run.info.run_id).version

    before = len(drift_runs())
    with pytest.raises(ProfileNotFoundError,
                       match=rf"version {version} has no drift profile.*profile_model\('{legacy}', {version}"):
        check_drift(legacy, str(churn.drifted), version=version)
    assert len(drift_runs()) == before

    info = profile_model(legacy, version, rows)
    assert info.features == {"tenure": "numeric", "monthly_charges": "numeric"}  # the signature's
    assert info.n_rows == len(rows) and not info.replaced and not info.importances
    tags = client.get_model_version(legacy, str(version)).tags
    assert tags[PROFILE_RUN_TAG] == info.run_id
    # the profile is kept beside the model, in the version's own experiment
    profile_run = client.get_run(info.run_id)
    assert profile_run.info.experiment_id == own
    assert profile_run.info.artifact_uri.startswith((tmp_path / "legacy").as_uri())
    report = check_drift(legacy, str(churn.drifted), version=version)
    assert report.drifted and report.weighting == "equal" and report.n_reference == len(rows)
    assert [f.name for f in report.features if f.drifted][0] == "tenure"

    with pytest.raises(DataError, match="already has a drift profile; pass overwrite=True"):
        profile_model(legacy, version, rows)
    assert profile_model(legacy, version, rows.iloc[:200], overwrite=True).replaced
    assert check_drift(legacy, rows, version=version).n_reference == 200


def test_importances_are_computed_for_a_version_stored_without_them(churn):
    from tasks.drift import _importances, _model_features, model_input_kinds, read_reference

    reference = read_reference(MODEL, churn.version)
    assert reference.importances and reference.schema  # what train_model stores
    kinds = model_input_kinds(reference, churn.frame)
    assert set(kinds) == set(reference.profile["features"])
    reference.importances = None
    computed = _importances(reference, churn.frame, _model_features(churn.frame, kinds))
    assert set(computed) == set(kinds) and sum(computed.values()) == pytest.approx(1.0)


# --------------------------------------------------------------------------- evaluate_production
def test_evaluate_production_compares_with_the_holdout(churn):
    MonitoringPolicy(accuracy_alert_threshold=0.5, max_relative_degradation=0.5).save(
        "drift-test-lenient", overwrite=True)
    try:
        healthy = evaluate_production(MODEL, str(churn.evaluation), "churn", policy="drift-test-lenient")
    finally:
        MonitoringPolicy.delete("drift-test-lenient")
    assert healthy.version == churn.version and not healthy.degraded and not healthy.reasons
    assert set(healthy.metrics) >= {"accuracy", "roc_auc"} and healthy.metric == "roc_auc"
    assert set(healthy.baseline_metrics) >= {"accuracy", "roc_auc"}
    assert healthy.metric_diff["accuracy"] == pytest.approx(
        healthy.metrics["accuracy"] - healthy.baseline_metrics["accuracy"])
    assert healthy.n_rows == 400 and not healthy.alerted

    flipped = churn.frame.copy()
    flipped["churn"] = flipped["churn"].map({"Yes": "No", "No": "Yes"})
    bad = evaluate_production(MODEL, flipped, "churn", version="champion")
    assert bad.degraded and bad.alerted and bad.alerts_sent == ["log"]
    assert bad.metrics["accuracy"] < 0.5
    assert any("below accuracy_alert_threshold 0.80" in r for r in bad.reasons)
    assert any(r.startswith("roc_auc") and "worse than the holdout" in r for r in bad.reasons)
    run = mlflow_client().get_run(bad.run_id)
    assert run.data.tags["mlops.kind"] == "production-evaluation"
    assert run.data.metrics["production_accuracy"] == pytest.approx(bad.metrics["accuracy"])
    assert read_artifacts("performance-churn-drift")
    events = read_events("mlops.model.performance-degraded", MODEL)
    assert events and events[0].payload["version"] == churn.version


@pytest.mark.parametrize("change, message", [
    (lambda f: f.drop(columns=["churn"]), "lacks the target column 'churn'"),
    (lambda f: f.drop(columns=["tenure"]), r"lacks 1 column\(s\) the model needs: \['tenure'\]"),
    (lambda f: f.iloc[:0], "is empty"),
    (lambda f: f.assign(churn=f["churn"].map({"Yes": 1, "No": 0})), "labels the model was not trained on"),
    (lambda f: f.assign(churn=None), "entirely missing"),
])
def test_bad_labelled_data_is_refused_and_nothing_is_recorded(churn, change, message):
    before = len(drift_runs("production-evaluation"))
    with pytest.raises(DataError, match=message):
        evaluate_production(MODEL, change(churn.frame), "churn")
    assert len(drift_runs("production-evaluation")) == before


# --------------------------------------------------------------------------- the main job's step
def test_lifecycle_step_shows_a_drifted_batch_and_a_calm_one(churn):
    lines: list[str] = []

    @dataclass
    class Story:
        model_name: str
        data: dict
        versions: dict

        def say(self, line: str) -> None:
            lines.append(line)

    story = Story(MODEL, {"evaluation": churn.evaluation}, {"v1": churn.version})
    lifecycle_step(story)
    assert story.data["drifted"].exists()
    assert len(lines) == 2
    assert "DRIFTED" in lines[0] and "contract" in lines[0] and "tenure" in lines[0]
    assert "not drifted" in lines[1]
