"""Training from s3:// URIs through a saved prefect-aws S3Bucket block, against a REAL S3 API.

The S3-compatible server is moto in server mode, a subprocess on loopback for the whole session;
the block uses MinIOCredentials with an endpoint URL, exactly as a MinIO deployment would. MLflow is
the embedded default (a fresh state folder per test).
"""
from __future__ import annotations

import io
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pandas as pd
import pytest

from prefect_aws import AwsClientParameters, MinIOCredentials
from prefect_aws.s3 import S3Bucket

from flows.training import train_model
from tasks.data import frame_sha256, load_table
from tasks.demo_data import churn_frame
from tasks.errors import DataError
from tasks.registry import mlflow_client
from tests.budgets import ONE_LINEAR_TRIAL
from tests.servers import free_port, stop_process_group, wait_until_answers

SERVER_START_TIMEOUT_S = 60
MOTO_BIN = Path(sys.executable).parent / "moto_server"
ACCESS_KEY, SECRET_KEY, REGION = "mlops-test", "mlops-test-secret", "us-east-1"
BLOCK_NAME = "mlops-test-data"


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    frame: pd.DataFrame  # what churn.csv and churn.parquet hold


def start_moto(workdir: Path) -> tuple[subprocess.Popen, str]:
    """moto_server on a free loopback port in its own process group, once it answers:
    (process, endpoint URL). The caller stops it (stop_process_group)."""
    port = free_port()
    log_path = workdir / "moto.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(MOTO_BIN), "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                   start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2) as r:
            return r.status == 200

    wait_until_answers(process, answers, SERVER_START_TIMEOUT_S, log_path, "moto_server",
                       every_s=0.2)
    return process, endpoint


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto_server on a free loopback port, with one bucket holding churn.csv and churn.parquet."""
    process, endpoint = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        bucket = f"mlops-data-{uuid.uuid4().hex[:8]}"
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name=REGION)
        s3.create_bucket(Bucket=bucket)
        frame = churn_frame().sample(800, random_state=5).reset_index(drop=True)
        s3.put_object(Bucket=bucket, Key="churn.csv", Body=frame.to_csv(index=False).encode())
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        s3.put_object(Bucket=bucket, Key="tables/churn.parquet", Body=buffer.getvalue())
        yield S3Server(endpoint_url=endpoint, bucket=bucket, frame=frame)
    finally:
        stop_process_group(process)


@pytest.fixture
def s3_block(s3_server, state_dir):
    """A saved S3Bucket block for the bucket (what a user saves once), deleted afterwards."""
    S3Bucket(
        bucket_name=s3_server.bucket,
        credentials=MinIOCredentials(
            minio_root_user=ACCESS_KEY, minio_root_password=SECRET_KEY, region_name=REGION,
            aws_client_parameters=AwsClientParameters(endpoint_url=s3_server.endpoint_url)),
    ).save(BLOCK_NAME, overwrite=True)
    try:
        yield s3_server
    finally:
        S3Bucket.delete(BLOCK_NAME)


def test_training_from_an_s3_csv_records_the_uri(s3_block):
    uri = f"s3://{s3_block.bucket}/churn.csv"
    result = train_model(uri, "churn", "churn_from_s3", **ONE_LINEAR_TRIAL)

    assert result.version == 1 and result.aliases == ["champion"] and result.data_ref == uri
    client = mlflow_client()
    assert client.get_model_version("churn_from_s3", "1").run_id == result.run_id
    tags = client.get_run(result.run_id).data.tags
    assert tags["mlops.data_ref"] == uri
    assert 0.6 < result.score <= 1.0


def test_training_from_an_s3_parquet_records_the_uri_and_the_data_hash(s3_block):
    uri = f"s3://{s3_block.bucket}/tables/churn.parquet"
    result = train_model(uri, "churn", "churn_from_parquet", **ONE_LINEAR_TRIAL)

    tags = mlflow_client().get_run(result.run_id).data.tags
    assert tags["mlops.data_ref"] == uri
    # the recorded hash identifies exactly the table that was uploaded
    assert tags["mlops.data_sha256"] == frame_sha256(s3_block.frame)
    assert result.task == "binary" and result.version == 1


def test_a_bucket_without_a_saved_block_fails_before_anything_is_registered(s3_block):
    uri = "s3://no-such-bucket-configured/churn.csv"
    with pytest.raises(DataError) as raised:
        train_model(uri, "churn", "churn_unconfigured", **ONE_LINEAR_TRIAL)

    message = str(raised.value)
    assert "no-such-bucket-configured" in message and "S3Bucket" in message
    assert "save" in message  # says how to fix it
    client = mlflow_client()
    assert client.search_registered_models() == []
    assert all(client.search_runs([e.experiment_id]) == [] for e in client.search_experiments())


def test_a_missing_key_names_the_uri_and_registers_nothing(s3_block):
    uri = f"s3://{s3_block.bucket}/no/such/table.csv"
    with pytest.raises(DataError, match="no/such/table.csv"):
        train_model(uri, "churn", "churn_missing_key", **ONE_LINEAR_TRIAL)
    assert mlflow_client().search_registered_models() == []


def test_an_s3_uri_reads_the_key_it_names_whatever_the_blocks_bucket_folder(s3_server, state_dir):
    # a user who keeps a folder on the block (for other flows) still means s3://bucket/churn.csv
    S3Bucket(bucket_name=s3_server.bucket, bucket_folder="tables",
             credentials=MinIOCredentials(
                 minio_root_user=ACCESS_KEY, minio_root_password=SECRET_KEY, region_name=REGION,
                 aws_client_parameters=AwsClientParameters(endpoint_url=s3_server.endpoint_url)),
             ).save(BLOCK_NAME, overwrite=True)
    try:
        loaded = load_table(f"s3://{s3_server.bucket}/churn.csv")
    finally:
        S3Bucket.delete(BLOCK_NAME)
    assert len(loaded.frame) == len(s3_server.frame)
    assert list(loaded.frame.columns) == list(s3_server.frame.columns)
