"""Fault: the S3 endpoint stops answering in the middle of export_model's upload.

moto in server mode (the S3 API the other tests use) behind a watching TCP proxy
(tests/servers.py): when the proxy sees the upload of manifest.json -- after the model file
reached S3 -- it pauses the server with SIGSTOP by PID (a restart would empty its in-memory
buckets), then the test resumes it with SIGCONT. The S3Bucket block bounds botocore's waits
through AwsClientParameters.config, as a production block should."""
from __future__ import annotations

import json
import os
import signal
import time
import uuid

import boto3
import pytest

from blocks.export_settings import DEFAULT_DOCUMENT, ExportSettings
from flows.export import export_model
from flows.registry import audit_registry
from flows.training import train_model
from tasks.demo_data import churn_frame
from tasks.export.base import ExportError
from tasks.export.steps import export_dir
from tasks.registry import mlflow_client
from tests.budgets import ONE_LINEAR_TRIAL
from tests.servers import WatchingProxy, stop_process_group
from tests.test_s3 import ACCESS_KEY, REGION, SECRET_KEY, start_moto

BLOCK = "mlops-s3-fault"
READ_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    process, direct = start_moto(tmp_path_factory.mktemp("moto-fault"))
    proxy = WatchingProxy(int(direct.rsplit(":", 1)[1]))
    try:
        yield process, proxy, direct
    finally:
        proxy.close()
        os.killpg(process.pid, signal.SIGCONT)  # never leave it paused
        stop_process_group(process)


@pytest.fixture
def s3_export(moto, state_dir):
    """Exports uploaded through a saved S3Bucket block whose endpoint is the proxy."""
    from prefect_aws import AwsClientParameters, MinIOCredentials
    from prefect_aws.s3 import S3Bucket

    process, proxy, direct = moto
    bucket = f"mlops-exports-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=direct, aws_access_key_id=ACCESS_KEY,
                      aws_secret_access_key=SECRET_KEY, region_name=REGION)
    s3.create_bucket(Bucket=bucket)
    S3Bucket(bucket_name=bucket, credentials=MinIOCredentials(
        minio_root_user=ACCESS_KEY, minio_root_password=SECRET_KEY, region_name=REGION,
        aws_client_parameters=AwsClientParameters(
            endpoint_url=proxy.url,
            config={"connect_timeout": 2, "read_timeout": READ_TIMEOUT_S,
                    "retries": {"max_attempts": 1, "mode": "standard"}})),
    ).save(BLOCK, overwrite=True)
    ExportSettings(s3_bucket_block=BLOCK).save(DEFAULT_DOCUMENT, overwrite=True)
    try:
        yield process, proxy, s3, bucket
    finally:
        proxy.on_request = lambda line: None
        ExportSettings.delete(DEFAULT_DOCUMENT)
        S3Bucket.delete(BLOCK)


def keys(s3, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


def mlflow_exports(run_id: str) -> list[str]:
    client = mlflow_client()

    def walk(path):
        for f in client.list_artifacts(run_id, path):
            yield from (walk(f.path) if f.is_dir else [f.path])

    return sorted(walk("exports"))


@pytest.mark.parametrize("pause_at", ["model-file", "manifest"])
def test_s3_paused_mid_upload_fails_the_export_with_the_fix_and_a_retry_publishes_once(
        s3_export, pause_at):
    """model-file: S3 stops answering at the first upload; manifest: at the last, after the
    ONNX file reached S3."""
    process, proxy, s3, bucket = s3_export
    name = f"s3_fault_{pause_at.replace('-', '_')}"
    trained = train_model(churn_frame().iloc[:600], "churn", name, **ONE_LINEAR_TRIAL)
    paused = []

    def pause(line: str) -> None:
        target = "manifest.json" if pause_at == "manifest" else ".onnx"
        if not paused and line.startswith("PUT ") and target in line.split("?")[0]:
            os.killpg(process.pid, signal.SIGSTOP)
            paused.append(time.monotonic())

    proxy.on_request = pause
    try:
        with pytest.raises(ExportError) as caught:
            export_model(name, formats=["onnx"])
        waited = time.monotonic() - paused[0]
    finally:
        os.killpg(process.pid, signal.SIGCONT)
        proxy.on_request = lambda line: None

    message = str(caught.value)
    assert f"uploading the exports of {name} v1 to S3 failed (S3Bucket block {BLOCK!r}" in message
    reached = 1 if pause_at == "manifest" else 0
    assert f"endpoint {proxy.url}" in message
    assert f"{reached} file(s) reached S3, {2 - reached} did not" in message
    assert "run export_model again: it uploads to the same keys" in message
    assert waited < 4 * READ_TIMEOUT_S, waited  # bounded by the block's botocore config

    # the export is intact where it does not depend on S3: files and manifest, here and in MLflow
    local = export_dir(name, 1)
    manifest = json.loads((local / "manifest.json").read_text())
    onnx = manifest["formats"]["onnx"]
    assert onnx["status"] == "ok" and (local / onnx["files"][0]["path"]).is_file()
    if pause_at == "manifest":  # the ONNX file did reach S3, and the manifest says so
        assert onnx["s3_uri"].startswith(f"s3://{bucket}/exports/{name}/v1/onnx/")
    else:  # nothing reached S3: the manifest names no S3 copy
        assert onnx.get("s3_uri") is None
    stored = mlflow_exports(trained.run_id)
    assert "exports/manifest.json" in stored and any(p.endswith(".onnx") for p in stored)

    report = export_model(name, formats=["onnx"])  # the retry, S3 answering again
    assert report.result("onnx").status == "ok"
    prefix = f"exports/{name}/v1"
    assert keys(s3, bucket) == sorted([f"{prefix}/manifest.json",
                                       f"{prefix}/{onnx['files'][0]['path']}"])  # no duplicate
    in_s3 = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())
    assert in_s3 == json.loads((local / "manifest.json").read_text())  # the retry's manifest
    assert mlflow_exports(trained.run_id) == stored  # MLflow: the same files, none added
    assert audit_registry(name).ok
