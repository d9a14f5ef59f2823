"""export_model / download_export on real registered models (every family train_model produces,
binary, multiclass and a regressor, numeric and categorical inputs), against a real Prefect API,
the embedded MLflow store and, for the upload, a real S3 API (moto server on loopback).

Models are trained once for the module (one state folder), so each test exports what it checks.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from blocks.mlflow_config import resolve_mlflow_config
from flows.export import download_export, export_model, lifecycle_step
from flows.training import train_model
from tasks.demo_data import churn_frame
from tasks.errors import DataError, ModelNotFoundError, VersionNotFoundError
from tasks.export.base import ExportError
from tasks.export.steps import read_manifest

from tests.servers import free_port

FAST = dict(time_budget_s=5, max_trials=1)


@dataclass
class Trained:
    name: str
    version: int
    family: str
    task: str
    run_id: str
    frame: pd.DataFrame  # rows it was trained on (target included)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One embedded state folder (MLflow store, exports) for the module's models."""
    patch = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("export-state")
    patch.setenv("MLOPS_HOME", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="module")
def models(home) -> dict[str, Trained]:
    churn = churn_frame().sample(frac=1.0, random_state=3).reset_index(drop=True)
    specs = {  # name: (rows, target, family, task)
        "churn_linear": (churn.iloc[:6000], "churn", "linear", "auto"),  # 1,200 holdout rows
        "churn_forest": (churn.iloc[:1500], "churn", "random_forest", "auto"),  # small PMML
        "contract_hgb": (churn.iloc[:3000], "contract", "hist_gradient_boosting", "multiclass"),
        "charges_hgb": (churn.iloc[:3000], "monthly_charges", "hist_gradient_boosting", "regression"),
    }
    trained = {}
    for name, (rows, target, family, task) in specs.items():
        result = train_model(rows, target, name, task=task, candidates=[family], **FAST)
        assert result.family == family and result.aliases == ["champion"]
        trained[name] = Trained(name, result.version, family, result.task, result.run_id, rows)
    return trained


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- every family
@pytest.mark.parametrize("name", ["churn_linear", "churn_forest", "contract_hgb", "charges_hgb"])
def test_every_family_exports_to_onnx_and_pmml_through_the_parity_gate(models, name):
    m = models[name]
    report = export_model(name, "champion", formats=["onnx", "pmml"], quantize=True)

    assert (report.model_name, report.version, report.run_id) == (name, m.version, m.run_id)
    assert report.sample_source == "holdout" and report.bundle_path is None
    if name == "churn_linear":
        assert report.sample_rows >= 1000  # the holdout has them: the gate uses them
    manifest = json.loads(Path(report.manifest_path).read_text())
    stored = json.loads(Path(mlflow.artifacts.download_artifacts(report.manifest_uri)).read_text())
    assert stored == manifest  # the manifest is stored with the version

    for r in report.formats:
        assert r.status == "ok", f"{r.format}: {r.reason}"
        local = Path(r.path)
        assert local.is_file() and local.stat().st_size == r.size_bytes and sha256(local) == r.sha256
        assert r.uri.endswith(f"/artifacts/exports/{r.format}/{local.name}") and m.run_id in r.uri
        # parity: float32 ONNX and double PMML both within 1e-5 of scikit-learn, no label moved
        entry = manifest["formats"][r.format]
        assert entry["parity"]["passed"] and r.parity_rows == report.sample_rows
        if m.task == "regression":
            assert r.changed_labels is None and r.max_abs_diff <= entry["parity"]["tolerance"] <= 1e-5 * 200
        else:
            assert r.changed_labels == 0 and r.max_abs_diff <= 1e-5
        # latency beside scikit-learn's, same rows, same run
        assert r.latency_p50_us > 0 and r.latency_p99_us >= r.latency_p50_us and r.rows_per_s > 0
        assert r.sklearn_p50_us > 0 and r.speedup_p50 > 0
        # quantization asked for: reported, never a silent no-op (trees and linear have no MatMul)
        assert r.quantization.startswith("not applicable")
        # manifest: files and their hashes
        assert entry["files"] == [f.model_dump() for f in r.files] and entry["files"][0]["sha256"] == r.sha256
        assert entry["inputs"] and entry["outputs"] and entry["library_versions"]
        # download returns the same bytes
        downloaded = download_export(name, m.version, r.format)
        assert Path(downloaded).read_bytes() == local.read_bytes()

    assert manifest["model_name"] == name and manifest["version"] == m.version
    assert manifest["run_id"] == m.run_id and manifest["family"] == m.family
    assert manifest["parity_sample"]["rows"] == report.sample_rows
    columns = {c["name"]: c for c in manifest["input_schema"]["columns"]}
    assert set(columns) == set(m.frame.columns) - {manifest["target"]}
    for col, spec in columns.items():
        if spec["kind"] == "categorical":
            assert spec["vocabulary"] == sorted(m.frame[col].dropna().astype(str).unique())
    assert "all-zero one-hot" in manifest["input_schema"]["unseen_categories"]
    if m.task != "regression":
        assert manifest["outputs"]["classes"] == sorted(m.frame[manifest["target"]].unique())
    versions = manifest["library_versions"]
    assert versions["training"]["scikit-learn"] == versions["export"]["scikit-learn"]
    assert {"skl2onnx", "onnxruntime", "sklearn2pmml", "jpmml_evaluator", "java"} <= set(versions["export"])


# --------------------------------------------------------------------------- categories
def test_unseen_and_missing_categories_behave_as_in_scikit_learn(models, tmp_path):
    m = models["contract_hgb"]
    rows = churn_frame().sample(600, random_state=9).reset_index(drop=True).drop(columns=["contract"])
    rows.loc[:99, "payment_method"] = "Bitcoin"  # never seen in training
    rows.loc[100:149, "internet_service"] = np.nan
    rows.loc[150:199, "total_charges"] = np.nan
    rows.loc[200:249, "multiple_lines"] = "Maybe"
    path = tmp_path / "unseen.parquet"
    rows.to_parquet(path, index=False)

    report = export_model(m.name, m.version, formats=["onnx", "pmml"], sample_data=str(path))
    assert report.sample_source == str(path) and report.sample_rows == 600
    for r in report.formats:
        assert r.status == "ok", r.reason
        assert r.max_abs_diff <= 1e-5 and r.changed_labels == 0


# --------------------------------------------------------------------------- edge, UI, main job
class Story:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)


def test_lifecycle_step_exports_the_champion_with_an_edge_bundle_and_a_table(models):
    m = models["churn_linear"]
    story = Story(m.name)
    lifecycle_step(story)

    text = "\n".join(story.lines)
    assert f"v{m.version} (champion)" in text and "edge bundle" in text
    assert any(line.split()[1:3] == ["onnx", "ok"] for line in story.lines)
    assert any(line.split()[1:3] == ["pmml", "ok"] for line in story.lines)

    manifest = read_manifest(m.run_id)
    bundle = Path(download_export(m.name, "champion", "edge"))
    assert sha256(bundle) == manifest["bundle"]["sha256"]
    with zipfile.ZipFile(bundle) as zf:
        inner = json.loads(zf.read("manifest.json"))
        listed = {f["path"]: f["sha256"] for e in inner["formats"].values()
                  if e["status"] == "ok" for f in e["files"]}
        assert set(zf.namelist()) == {"manifest.json", *listed}  # exactly what it lists
        for path, digest in listed.items():
            assert hashlib.sha256(zf.read(path)).hexdigest() == digest
    assert set(inner["formats"]) == {"onnx", "tflite", "coreml"}  # device formats only
    for fmt in ("onnx", "tflite", "coreml"):  # each carries the linear churn model
        assert inner["formats"][fmt]["status"] == "ok", inner["formats"][fmt]["reason"]
    assert set(listed) == {"onnx/churn-linear-v1.onnx", "tflite/churn-linear-v1.tflite",
                           "coreml/churn-linear-v1.mlmodel"}

    artifact = latest_artifact(f"export-churn-linear-v{m.version}")
    assert artifact.type == "table"
    table = artifact.data if isinstance(artifact.data, list) else json.loads(artifact.data)
    assert {row["format"] for row in table} == {"onnx", "pmml", "tflite", "coreml"}

    # a later export of one format keeps the others and the bundle in the manifest
    export_model(m.name, m.version, formats=["onnx"])
    again = read_manifest(m.run_id)
    assert set(again["formats"]) == {"onnx", "pmml", "tflite", "coreml"}
    assert again["bundle"] == manifest["bundle"]
    assert Path(download_export(m.name, m.version, "edge")).read_bytes() == bundle.read_bytes()


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, error, message", [
    (lambda: export_model("nope"), ModelNotFoundError, "no registered model named 'nope'"),
    (lambda: export_model("churn_forest", 99), VersionNotFoundError, r"no version 99; existing versions: \[1\]"),
    (lambda: export_model("churn_forest", "challenger"), VersionNotFoundError,
     "no version with alias 'challenger'"),
    (lambda: export_model("churn_forest", formats=["onnx", "savedmodel"]), Exception,
     "Input should be 'onnx', 'pmml', 'tflite', 'coreml' or 'edge'"),
    (lambda: export_model("bad name!"), Exception, "invalid model name"),
    (lambda: download_export("churn_forest", 1, "coreml"), ExportError,
     r"never exported to coreml|has no exports"),
    (lambda: download_export("churn_forest", 1, "savedmodel"), Exception, "Input should be 'onnx'"),
])
def test_bad_input_is_refused_with_the_cause_and_the_fix(models, call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_sample_data_without_the_models_columns_is_refused_before_anything_is_written(models):
    m = models["churn_forest"]
    before = read_manifest(m.run_id)
    sample = churn_frame().head(50).drop(columns=["contract", "tenure"])
    with pytest.raises(DataError, match="lacks columns the model needs: tenure, contract"):
        export_model(m.name, formats=["onnx"], sample_data=sample)
    with pytest.raises(DataError, match="sample_data is empty"):
        export_model(m.name, formats=["onnx"], sample_data=churn_frame().head(0))
    assert read_manifest(m.run_id) == before


def test_without_java_pmml_fails_with_the_fix_and_onnx_goes_on(models, tmp_path, monkeypatch):
    m = models["churn_linear"]
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{Path(sys.executable).parent}")  # no java
    monkeypatch.delenv("JAVA_HOME", raising=False)
    report = export_model(m.name, formats=["pmml", "onnx"])
    pmml, onnx = report.result("pmml"), report.result("onnx")
    assert onnx.status == "ok" and pmml.status == "failed" and pmml.path is None
    assert "Java not found" in pmml.reason and "install Java 11 or newer" in pmml.reason
    with pytest.raises(ExportError, match="pmml export of churn_linear v1 is failed: Java not found"):
        download_export(m.name, m.version, "pmml")


def test_a_model_onnx_cannot_carry_is_unsupported_with_the_reason(models, home):
    """HistGradientBoosting with native categoricals: skl2onnx converts it without an error and
    the file predicts wrongly, so ONNX refuses it; TensorFlow Lite takes one-hot inputs only."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OrdinalEncoder

    import skops.io

    from flows.registry import register_model
    from tasks.training_search import infer_schema, prepare_features

    frame = models["churn_forest"].frame
    schema = infer_schema(frame, "churn", "binary")
    X = prepare_features(frame, schema)
    pre = ColumnTransformer([("cat", OrdinalEncoder(), schema.categorical),
                             ("num", "passthrough", schema.numeric)], verbose_feature_names_out=False)
    model = Pipeline([("preprocess", pre), ("model", HistGradientBoostingClassifier(
        max_iter=20, categorical_features=list(range(len(schema.categorical)))))]).fit(X, frame["churn"])
    # the project's experiment: MLflow's Default one keeps artifacts in the working folder
    with mlflow.start_run(experiment_id=resolve_mlflow_config().ensure_experiment()) as run:
        mlflow.log_dict(schema.to_dict(), "mlops/schema.json")
        trusted = skops.io.get_untrusted_types(data=skops.io.dumps(model))  # reviewed: this test's
        mlflow.sklearn.log_model(model, name="model", skops_trusted_types=trusted,
                                 pip_requirements=["scikit-learn"])
    register_model("native_cats", run_id=run.info.run_id)

    report = export_model("native_cats", 1, formats=["onnx", "tflite"], sample_data=frame.head(200))
    onnx = report.result("onnx")
    assert onnx.status == "unsupported" and onnx.path is None and onnx.sha256 is None
    assert "native categorical features" in onnx.reason and "categorical_features=None" in onnx.reason
    tflite = report.result("tflite")
    assert tflite.status == "unsupported" and "native categorical features" in tflite.reason
    assert read_manifest(run.info.run_id)["formats"]["onnx"]["status"] == "unsupported"
    with pytest.raises(ExportError, match="is unsupported: .*native categorical"):
        download_export("native_cats", 1, "onnx")


# --------------------------------------------------------------------------- S3
MOTO_BIN = Path(sys.executable).parent / "moto_server"
ACCESS_KEY, SECRET_KEY, REGION = "mlops-test", "mlops-test-secret", "us-east-1"


@pytest.fixture
def s3_settings(models):
    """moto_server on loopback, a saved S3Bucket block and ExportSettings pointing at it."""
    import boto3
    from prefect_aws import AwsClientParameters, MinIOCredentials
    from prefect_aws.s3 import S3Bucket

    from blocks.export_settings import ExportSettings

    port = free_port()
    process = subprocess.Popen([str(MOTO_BIN), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        bucket = f"mlops-exports-{uuid.uuid4().hex[:8]}"
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name=REGION)
        s3.create_bucket(Bucket=bucket)
        S3Bucket(bucket_name=bucket, credentials=MinIOCredentials(
            minio_root_user=ACCESS_KEY, minio_root_password=SECRET_KEY, region_name=REGION,
            aws_client_parameters=AwsClientParameters(endpoint_url=endpoint)),
        ).save("mlops-export-test", overwrite=True)
        ExportSettings(s3_bucket_block="mlops-export-test").save("default", overwrite=True)
        yield s3, bucket
    finally:
        for block_type, name in (("ExportSettings", "default"), ("S3Bucket", "mlops-export-test")):
            try:
                (ExportSettings if block_type == "ExportSettings" else S3Bucket).delete(name)
            except Exception:
                pass
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)


def test_exports_are_uploaded_through_the_configured_s3_bucket_block(models, s3_settings):
    s3, bucket = s3_settings
    m = models["churn_linear"]
    report = export_model(m.name, formats=["onnx"])
    onnx = report.result("onnx")
    key = f"exports/churn_linear/v{m.version}/onnx/churn-linear-v{m.version}.onnx"
    assert onnx.s3_uri == f"s3://{bucket}/{key}"
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == onnx.sha256
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"exports/churn_linear/v{m.version}/"
                                                            "manifest.json")["Body"].read())
    assert manifest["formats"]["onnx"]["s3_uri"] == onnx.s3_uri

    # a download made by a deployment lands on the worker's disk: its artifact names where any
    # machine gets the same bytes, and each of those places answers with them
    local = Path(download_export(m.name, m.version, "onnx"))
    markdown = latest_artifact(f"download-churn-linear-v{m.version}-onnx").data
    assert str(local) in markdown and onnx.s3_uri in markdown and onnx.sha256 in markdown
    assert f"/api/v1/mlops/models/export/{m.name}/{m.version}/download?format=onnx" in markdown
    mlflow_uri = f"runs:/{m.run_id}/exports/onnx/{local.name}"
    assert mlflow_uri in markdown
    again = Path(mlflow.artifacts.download_artifacts(mlflow_uri, dst_path=str(local.parent / "x")))
    assert again.read_bytes() == local.read_bytes() == body


def latest_artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1)
    assert found, f"no artifact {key}"
    return found[0]
