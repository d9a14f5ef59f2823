"""Prefect tasks of the export flow: load a version, pick the parity sample, export each format,
publish (MLflow artifacts under the version's run, S3 when configured, edge bundle), download."""
from __future__ import annotations

import json
import platform
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.export_settings import ExportSettings
from blocks.mlflow_config import state_dir
from tasks.data import frame_sha256, load_table
from tasks.errors import ConfigurationError, DataError
from tasks.export.base import EDGE, FORMATS, ExportError, ExportSubject, FormatPlan
from tasks.export.core import FormatOutcome, Reference, export_format, sha256_file, sklearn_reference
from tasks.export.manifest import (MANIFEST_NAME, build_manifest, write_bundle,
                                   write_manifest)
from tasks.registry import mlflow_client, model_slug, record_export, resolve_version
from tasks.training_search import Schema, prepare_features

EXPORTS = "exports"  # artifact folder in the version's run
MIN_PARITY_ROWS = 1000


def export_dir(model_name: str, version: int) -> Path:
    """Local home of a version's exports: <state>/exports/<model-slug>/v<version>/."""
    return state_dir() / EXPORTS / model_slug(model_name) / f"v{version}"


@contextmanager
def one_export_at_a_time(model_name: str, version: int) -> Iterator[None]:
    """Hold the version's export folder: a second export of the same version on this machine
    (an event trigger and a user's request at once) waits instead of rewriting files the first
    is hashing and publishing."""
    import fcntl

    folder = export_dir(model_name, version)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".v{version}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- load
@task(name="load-export-subject", cache_policy=NO_CACHE)
def load_subject(model_name: str, version: int | str) -> ExportSubject:
    """The registered version's pipeline and stored schema (errors name the model and version)."""
    import mlflow

    client = mlflow_client()
    mv = resolve_version(client, model_name, version)
    n = int(mv.version)
    if not mv.run_id:
        raise ExportError(f"{model_name} v{n} has no source run; exports are stored with the "
                          "version's run, so register versions from a run (train_model does)")
    names = {a.path for a in client.list_artifacts(mv.run_id, "mlops")}
    if "mlops/schema.json" not in names:
        raise ExportError(f"{model_name} v{n} has no stored input schema (mlops/schema.json in run "
                          f"{mv.run_id}); versions trained by train_model have one: retrain with it")
    schema = Schema.from_dict(_download_json(mv.run_id, "mlops/schema.json"))
    pipeline = mlflow.sklearn.load_model(f"models:/{model_name}/{n}")
    family = (mv.tags or {}).get("mlops.family")
    return ExportSubject(model_name=model_name, version=n, pipeline=pipeline, schema=schema,
                         run_id=mv.run_id, family=family, model_uri=f"models:/{model_name}/{n}")


@dataclass
class ParitySample:
    X: pd.DataFrame
    info: dict[str, Any]


@task(name="parity-sample", cache_policy=NO_CACHE)
def parity_sample(subject: ExportSubject, sample_data: Any, max_rows: int) -> ParitySample:
    """`sample_data` (path, s3:// URI or DataFrame) if given, else the version's stored holdout."""
    if sample_data is not None:
        loaded = load_table(sample_data)
        if loaded.frame.empty:
            raise DataError("sample_data is empty; pass rows with the model's columns "
                            f"({', '.join(subject.schema.columns)}) or leave it out to use the "
                            "version's stored holdout")
        X = prepare_features(loaded.frame, subject.schema)
        source = loaded.ref or "sample_data (DataFrame)"
    else:
        client = mlflow_client()
        names = {a.path for a in client.list_artifacts(subject.run_id, "mlops")}
        if "mlops/holdout.parquet" not in names:
            raise ExportError(f"{subject.model_name} v{subject.version} has no stored holdout "
                              "(mlops/holdout.parquet); pass sample_data=<rows with the model's "
                              "columns> for the parity gate")
        X = prepare_features(_download_parquet(subject.run_id, "mlops/holdout.parquet"), subject.schema)
        source = "holdout"
    total = len(X)
    if total > max_rows:
        X = X.sample(max_rows, random_state=0).sort_index()
    info = {"source": source, "rows": len(X), "rows_available": total, "sha256": frame_sha256(X)}
    if len(X) < MIN_PARITY_ROWS:
        info["note"] = f"only {len(X)} rows available (the gate prefers >= {MIN_PARITY_ROWS})"
    return ParitySample(X.reset_index(drop=True), info)


@task(name="sklearn-reference", cache_policy=NO_CACHE)
def reference_outputs(subject: ExportSubject, sample: ParitySample, latency_rows: int) -> Reference:
    return sklearn_reference(subject, sample.X, latency_rows)


# --------------------------------------------------------------------------- export
# log_prints off: converters print (sklearn2pmml's Java output and licensing banner); they are
# captured and summarised in the result instead of flooding the run's log.
@task(name="export-format", cache_policy=NO_CACHE, task_run_name="export-{fmt}", log_prints=False)
def export_one(fmt: str, subject: ExportSubject, sample: ParitySample, reference: Reference,
               quantize: bool, settings: dict[str, Any]) -> FormatOutcome:
    outcome = export_format(fmt, subject, sample.X, reference, export_dir(subject.model_name,
                            subject.version), quantize=quantize, settings=settings,
                            latency_rows=settings.get("latency_rows", 200))
    r = outcome.result
    get_run_logger().info("%s: %s %s", fmt, r.status, r.reason or
                          f"max |diff| {r.max_abs_diff}, p50 {r.latency_p50_us} us")
    return outcome


# --------------------------------------------------------------------------- publish
@dataclass
class Published:
    manifest_path: Path
    manifest_uri: str
    bundle_path: Path | None = None
    bundle_uri: str | None = None
    bundle_s3_uri: str | None = None


@task(name="publish-exports", cache_policy=NO_CACHE)
def publish(subject: ExportSubject, outcomes: list[FormatOutcome], plan: FormatPlan,
            sample: ParitySample, settings: ExportSettings) -> Published:
    """Store published files with the version (MLflow run artifacts `exports/...`), upload them
    through the S3Bucket block when configured, write manifest.json and the edge bundle.

    S3 failing (the endpoint does not answer, credentials refused) does not stop the rest: the
    files and manifest.json are still written locally and stored in MLflow, the manifest naming
    only the S3 copies that were made; then an ExportError says what failed and that a rerun
    uploads to the same keys."""
    client = mlflow_client()
    run_id = subject.run_id
    root = export_dir(subject.model_name, subject.version)
    artifact_root = client.get_run(run_id).info.artifact_uri.rstrip("/")
    s3 = S3Upload(_s3_bucket(settings), settings)
    prefix = f"{settings.s3_folder.strip('/')}/{subject.model_name}/v{subject.version}"

    for outcome in outcomes:
        r = outcome.result
        if r.status != "ok":
            continue
        client.log_artifacts(run_id, str(root / r.format), artifact_path=f"{EXPORTS}/{r.format}")
        r.uri = f"{artifact_root}/{EXPORTS}/{r.files[0].path}"
        uris = [s3.upload(root / f.path, f"{prefix}/{f.path}") for f in r.files]
        if uris and None not in uris:
            r.s3_uri = uris[0]

    previous = read_manifest(run_id)
    manifest = build_manifest(subject, outcomes, sample.info, library_versions(subject, outcomes),
                              previous=previous)
    if not plan.edge and previous and previous.get("version") == subject.version and \
            previous.get("bundle"):
        manifest["bundle"] = previous["bundle"]  # the stored bundle carries its own manifest
    manifest_path = root / MANIFEST_NAME
    published = Published(manifest_path, f"{artifact_root}/{EXPORTS}/{MANIFEST_NAME}")
    if plan.edge:
        edge = [f for f in plan.formats if FORMATS[f].device]
        bundle = write_bundle(manifest, root, edge, root / EDGE / f"{subject.basename}-edge.zip")
        manifest["bundle"] = {"path": f"{EDGE}/{bundle.name}", "sha256": sha256_file(bundle),
                              "size_bytes": bundle.stat().st_size,
                              "formats": [f for f in edge if manifest["formats"].get(f, {}).get("status") == "ok"]}
        client.log_artifact(run_id, str(bundle), artifact_path=f"{EXPORTS}/{EDGE}")
        published.bundle_path = bundle
        published.bundle_uri = f"{artifact_root}/{EXPORTS}/{EDGE}/{bundle.name}"
        published.bundle_s3_uri = s3.upload(bundle, f"{prefix}/{EDGE}/{bundle.name}")
        if published.bundle_s3_uri:
            manifest["bundle"]["s3_uri"] = published.bundle_s3_uri
    write_manifest(manifest, manifest_path)
    client.log_artifact(run_id, str(manifest_path), artifact_path=EXPORTS)
    s3.upload(manifest_path, f"{prefix}/{MANIFEST_NAME}")
    if any(o.result.status == "ok" for o in outcomes):
        # version tags: retention spares the newest champion export (devices may run it)
        record_export(client, subject.model_name, subject.version)
    s3.raise_if_failed(subject, published)
    return published


class S3Upload:
    """The S3 side of a publication: uploads until the first failure, then skips the rest (an
    endpoint that stopped answering would make every later file wait its timeouts again)."""

    def __init__(self, bucket, settings: ExportSettings):
        self.bucket, self.settings = bucket, settings
        self.done = 0
        self.skipped: list[str] = []
        self.error: Exception | None = None

    def upload(self, local: Path, key: str) -> str | None:
        if self.bucket is None:
            return None
        if self.error is not None:
            self.skipped.append(key)
            return None
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            uri = _upload(self.bucket, local, key)
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            self.error = exc
            self.skipped.append(key)
            return None
        self.done += 1
        return uri

    def raise_if_failed(self, subject: ExportSubject, published: Published) -> None:
        if self.error is None:
            return
        endpoint = _endpoint(self.bucket)
        raise ExportError(
            f"uploading the exports of {subject.model_name} v{subject.version} to S3 failed "
            f"(S3Bucket block {self.settings.s3_bucket_block!r}, bucket "
            f"{self.bucket.bucket_name!r}, endpoint {endpoint}): {type(self.error).__name__}: "
            f"{self.error}. {self.done} file(s) reached S3, {len(self.skipped)} did not (first: "
            f"{self.skipped[0]}). The export itself is complete: stored in MLflow "
            f"({published.manifest_uri}) and here ({published.manifest_path}), its manifest "
            "listing only the S3 copies made. Check that the endpoint answers and the block's "
            "credentials, then run export_model again: it uploads to the same keys (nothing is "
            "duplicated). Bound the wait with the block's AwsClientParameters config "
            "(connect_timeout, read_timeout, retries)")


def _endpoint(bucket) -> str:
    params = getattr(bucket.credentials, "aws_client_parameters", None)
    return (getattr(params, "endpoint_url", None) or "AWS default")


def library_versions(subject: ExportSubject, outcomes: list[FormatOutcome]) -> dict[str, Any]:
    import numpy
    import sklearn

    training: dict[str, str] = {}
    try:
        training = _download_json(subject.run_id, "mlops/library_versions.json")
    except Exception:  # versions logged before library_versions.json existed: tags carry them
        tags = mlflow_client().get_run(subject.run_id).data.tags
        training = {k[len("lib."):]: v for k, v in tags.items() if k.startswith("lib.")}
    export = {"python": platform.python_version(), "scikit-learn": sklearn.__version__,
              "numpy": numpy.__version__, "pandas": pd.__version__}
    for outcome in outcomes:
        export.update(outcome.library_versions)
    return {"training": training, "export": export}


def read_manifest(run_id: str) -> dict | None:
    client = mlflow_client()
    names = {a.path for a in client.list_artifacts(run_id, EXPORTS)}
    if f"{EXPORTS}/{MANIFEST_NAME}" not in names:
        return None
    return _download_json(run_id, f"{EXPORTS}/{MANIFEST_NAME}")


def _s3_bucket(settings: ExportSettings):
    if not settings.s3_bucket_block:
        return None
    from prefect_aws.s3 import S3Bucket

    try:
        return S3Bucket.load(settings.s3_bucket_block)
    except ValueError as exc:
        raise ConfigurationError(
            f"ExportSettings names S3Bucket block {settings.s3_bucket_block!r}, which is not saved; "
            "save it (S3Bucket(bucket_name=..., credentials=...).save(name)) or clear "
            "s3_bucket_block") from exc


def _upload(bucket, local: Path, key: str) -> str:
    written = bucket.upload_from_path(str(local), key)
    return f"s3://{bucket.bucket_name}/{written}"


# --------------------------------------------------------------------------- download
@dataclass
class ExportLocation:
    """Where a published export can be fetched from any machine: the version's MLflow run
    (through the tracking server) and, when it was uploaded, S3."""
    model_name: str
    version: int
    format: str
    run_id: str
    files: list[dict[str, Any]]  # manifest entries: path (under exports/), sha256
    s3_uri: str | None = None

    @property
    def mlflow_uri(self) -> str:
        return f"runs:/{self.run_id}/{EXPORTS}/{self.files[0]['path']}"


def locate_export(model_name: str, version: int | str, fmt: str) -> ExportLocation:
    """The published files of a version's export (`fmt` = a format or "edge" for the bundle),
    read from its manifest; an ExportError says how to make the export when there is none."""
    fmt = str(fmt).strip().lower()
    if fmt not in FORMATS and fmt != EDGE:
        raise ConfigurationError(f"unknown export format {fmt!r}; choose from "
                                 f"{', '.join([*FORMATS, EDGE])}")
    mv = resolve_version(mlflow_client(), model_name, version)
    n = int(mv.version)
    manifest = read_manifest(mv.run_id) if mv.run_id else None
    how = f"run export_model({model_name!r}, {n}, formats=[{fmt!r}]) first"
    if manifest is None:
        raise ExportError(f"{model_name} v{n} has no exports; {how}")
    if fmt == EDGE:
        entry = manifest.get("bundle")
        if not entry:
            raise ExportError(f"{model_name} v{n} has no edge bundle; {how}")
        files = [entry]
    else:
        entry = manifest.get("formats", {}).get(fmt)
        if entry is None:
            raise ExportError(f"{model_name} v{n} was never exported to {fmt}; {how}")
        if entry.get("status") != "ok":
            raise ExportError(f"the {fmt} export of {model_name} v{n} is {entry.get('status')}: "
                              f"{entry.get('reason')}; nothing was published")
        files = entry["files"]
    return ExportLocation(model_name, n, fmt, mv.run_id, files, entry.get("s3_uri"))


def fetch_export(model_name: str, version: int | str, fmt: str, dst_dir: str | Path | None = None) -> str:
    """Local path of a published export (`fmt` = a format or "edge" for the bundle), downloaded
    from the version's run and checked against the manifest's sha256."""
    return str(download_located(locate_export(model_name, version, fmt), dst_dir))


def download_located(where: ExportLocation, dst_dir: str | Path | None = None) -> Path:
    """Download `where`'s files into `dst_dir` (default: the state folder's downloads), each
    checked against its manifest sha256; the path of the first (the model file)."""
    import mlflow

    target = (Path(dst_dir) if dst_dir else
              state_dir() / "downloads" / model_slug(where.model_name) / f"v{where.version}")
    paths = []
    for f in where.files:
        local = Path(mlflow.artifacts.download_artifacts(
            run_id=where.run_id, artifact_path=f"{EXPORTS}/{f['path']}", dst_path=str(target)))
        digest = sha256_file(local)
        if digest != f["sha256"]:
            raise ExportError(f"{local} has sha256 {digest}, the manifest says {f['sha256']}: the "
                              "stored file was altered; export the version again")
        paths.append(local)
    return paths[0]


# --------------------------------------------------------------------------- helpers
def _download_json(run_id: str, path: str):
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
        return json.loads(Path(local).read_text())


def _download_parquet(run_id: str, path: str) -> pd.DataFrame:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
        return pd.read_parquet(local)
