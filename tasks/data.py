"""Loading datasets by reference and checking them before anything is trained or registered.

Plain functions (no Prefect import at module level): a dataset is a csv/parquet path, an
`s3://bucket/key` URI read through a saved prefect-aws `S3Bucket` block for that bucket, a
`served:<model>:<window>` reference to the rows the REST service answered in the last window
(`served:churn:24h`; tasks/served_traffic.py), or a DataFrame handed over by a Python caller.
"""
from __future__ import annotations

import hashlib
import io
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import xxhash
from pydantic.json_schema import SkipJsonSchema

from tasks.errors import DataError

Task = Literal["binary", "multiclass", "regression"]
# A flow parameter naming a dataset: the Prefect UI and `--param` see a string (path, URI or
# served:<model>:<window>); Python callers may also pass a DataFrame.
DataRef = str | SkipJsonSchema[pd.DataFrame]
READABLE = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
# Below this many rows per fold (or per class and fold) cross-validation is meaningless.
MIN_ROWS_PER_FOLD = 5
MAX_CLASSES = 50


# Hashing a million rows costs half as much as comparing them with a drift profile: loads start
# it here, and the caller's own work on the frame runs meanwhile (the hash's numpy loops release
# the GIL); reading `LoadedData.sha256` waits for it.
_HASHER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="frame-sha256")


class LoadedData:
    """A loaded table, the path or URI it came from (None for a DataFrame) and its content hash.

    A plain class, not a dataclass: Prefect walks dataclass task arguments field by field.
    """

    def __init__(self, frame: pd.DataFrame, ref: str | None, sha256: str | None = None) -> None:
        self.frame = frame
        self.ref = ref
        self._sha256: str | Future[str] = sha256 or _HASHER.submit(frame_sha256, frame)

    @property
    def sha256(self) -> str:
        """`frame_sha256` of the frame (waits for the background hash on first read)."""
        if isinstance(self._sha256, Future):
            self._sha256 = self._sha256.result()
        return self._sha256

    def __repr__(self) -> str:
        return f"LoadedData({self.ref or 'DataFrame'!r}, {len(self.frame)} rows)"


def frame_sha256(frame: pd.DataFrame) -> str:
    """A content hash of a DataFrame (column names, dtypes, values and index), stable across
    processes: SHA-256 over one 128-bit xxHash3 digest per column.

    Numeric, boolean and datetime columns are hashed as their raw bytes (xxHash3 reads about
    7 GB/s here, SHA-256 under 1 GB/s, pandas' per-row hash about 0.6 GB/s); other columns
    (strings, categories, objects) through pandas' per-row hash of their values.
    """
    h = hashlib.sha256()
    for name, values in [("\x00index", frame.index), *frame.items()]:
        h.update(f"{name}\x1f".encode())
        h.update(_column_digest(values))
    return h.hexdigest()


def _column_digest(values: pd.Series | pd.Index) -> bytes:
    """The column's bytes with their dtype, or the per-row hash of its values (the same for the
    same strings held as `object` or as `str`, as a csv or parquet round trip may turn them)."""
    array = values.to_numpy() if values.dtype.kind in "biufcmM" else None
    if array is not None and array.dtype != object:
        kind = f"raw {array.dtype.str}\x1f".encode()
    else:
        kind, array = b"values\x1f", pd.util.hash_pandas_object(values, index=False).to_numpy()
    return kind + xxhash.xxh3_128_digest(np.ascontiguousarray(array).view(np.uint8))



def _parse(raw: bytes | Path, suffix: str, ref: str) -> pd.DataFrame:
    kind = READABLE.get(suffix.lower())
    if kind is None:
        raise DataError(
            f"cannot read {ref!r}: unsupported format {suffix or '(no extension)'!r}; "
            f"expected one of {sorted(READABLE)} (save the table as csv or parquet)"
        )
    source = io.BytesIO(raw) if isinstance(raw, bytes) else raw
    try:
        return pd.read_csv(source) if kind == "csv" else pd.read_parquet(source)
    except Exception as exc:  # the parsers raise many types; say which file and why
        raise DataError(f"cannot read {ref!r} as {kind}: {exc}") from exc


def s3_bucket_for(bucket: str, uri: str, purpose: str = "read"):
    """The saved prefect-aws S3Bucket block for `bucket` (the first by name), reading keys as the
    URI names them in full (the block's own `bucket_folder` is not prefixed)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect_aws.s3 import S3Bucket

    try:
        with get_client(sync_client=True) as client:
            documents = client.read_block_documents_by_type("s3-bucket")
    except ObjectNotFound:  # the S3Bucket block type is not registered on this server
        documents = []
    names = sorted(d.name for d in documents if (d.data or {}).get("bucket_name") == bucket)
    if not names:
        raise DataError(
            f"no saved S3Bucket block for bucket {bucket!r} (needed to {purpose} {uri!r}); save one, "
            "e.g. S3Bucket(bucket_name=..., credentials=MinIOCredentials(...)).save('name')"
        )
    return S3Bucket.load(names[0]).model_copy(update={"bucket_folder": ""})


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key); both must be present."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key:
        raise DataError(f"{uri!r} is not an object URI; expected s3://<bucket>/<key>")
    return bucket, key


def _read_s3(uri: str) -> bytes:
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(uri)
    block = s3_bucket_for(bucket, uri)
    try:
        return block.read_path(key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            raise DataError(f"no object {key!r} in bucket {bucket!r} (S3Bucket block "
                            f"{block._block_document_name!r}); check the key: the URI must name "
                            "the full key, folders included") from exc
        raise DataError(f"cannot read {uri!r} through S3Bucket block "
                        f"{block._block_document_name!r}: {exc}") from exc


def load_table(data: str | Path | pd.DataFrame) -> LoadedData:
    """Read a dataset reference into a DataFrame."""
    if isinstance(data, pd.DataFrame):
        # pandas >= 3 copies on write: a shallow copy shares the caller's buffers until either
        # side changes them, so later edits on either side stay invisible to the other without
        # copying every row up front
        frame, ref = data.copy(deep=False), None
    elif isinstance(data, (str, Path)):
        ref = str(data)
        if ref.startswith("served:"):  # rows the REST service answered (tasks/served_traffic.py)
            from tasks.served_traffic import load_served_ref

            frame = load_served_ref(ref)
        elif ref.startswith("s3://"):
            frame = _parse(_read_s3(ref), Path(ref).suffix, ref)
        else:
            path = Path(ref).expanduser()
            if not path.is_file():
                raise DataError(f"data file not found: {ref!r} (cwd {Path.cwd()}); pass an existing "
                                "csv/parquet path, an s3:// URI, or a DataFrame")
            frame = _parse(path, path.suffix, ref)
    else:
        raise DataError(f"data must be a path, an s3:// URI, a served:<model>:<window> reference or "
                        f"a DataFrame, not {type(data).__name__}")
    return LoadedData(frame=frame, ref=ref)


def load_labelled_table(data: str | Path | pd.DataFrame) -> LoadedData:
    """A labelled table that grows: a file or object, or every csv/parquet file of a folder or
    object of an ``s3://bucket/prefix/`` (name order) concatenated. Files with other columns than
    the first are refused, naming the difference."""
    if isinstance(data, (str, Path)) and str(data).startswith("s3://") and str(data).endswith("/"):
        bucket, _, prefix = str(data)[len("s3://"):].partition("/")
        block = s3_bucket_for(bucket, str(data), purpose="list")
        keys = sorted(o["Key"] for o in block.list_objects(folder=prefix)
                      if Path(o["Key"]).suffix.lower() in READABLE)
        parts = [(f"s3://{bucket}/{k}", _parse(block.read_path(k), Path(k).suffix, k)) for k in keys]
    elif isinstance(data, (str, Path)) and Path(data).expanduser().is_dir():
        folder = Path(data).expanduser()
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in READABLE)
        parts = [(str(p), _parse(p, p.suffix, str(p))) for p in files]
    else:
        return load_table(data)
    if not parts:
        raise DataError(f"no csv or parquet file under {str(data)!r}; put the labelled batches "
                        "there or name one file")
    columns = list(parts[0][1].columns)
    for ref, part in parts[1:]:
        if list(part.columns) != columns:
            missing = [c for c in columns if c not in part.columns]
            extra = [c for c in part.columns if c not in columns]
            raise DataError(f"{ref!r} does not have the columns of {parts[0][0]!r}: missing "
                            f"{missing or 'none'}, extra {extra or 'none'}")
    frame = pd.concat([p for _, p in parts], ignore_index=True)
    return LoadedData(frame=frame, ref=str(data))


def infer_task(y: pd.Series) -> Task:
    """binary / multiclass for labels (strings, booleans, few integers), regression for numbers."""
    n_unique = y.nunique(dropna=True)
    if pd.api.types.is_float_dtype(y) and not np.all(np.mod(y.dropna(), 1) == 0):
        return "regression"
    if pd.api.types.is_numeric_dtype(y) and not pd.api.types.is_bool_dtype(y) and n_unique > 20:
        return "regression"
    return "binary" if n_unique <= 2 else "multiclass"


def validate_training_frame(frame: pd.DataFrame, target: str, task: str, n_folds: int) -> Task:
    """Check a training table; return the task it supports. Raises DataError with the fix."""
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise DataError("the data is empty (0 rows); pass a table with rows to train on")
    if target not in frame.columns:
        raise DataError(f"target column {target!r} is not in the data; columns are: "
                        f"{', '.join(map(str, frame.columns))}")
    if frame.shape[1] < 2:
        raise DataError(f"the data has only the target column {target!r}; add feature columns")
    y = frame[target]
    if y.isna().any():
        raise DataError(f"target {target!r} has {int(y.isna().sum())} missing values; "
                        "drop or fill those rows first")
    resolved: Task = infer_task(y) if task == "auto" else task  # type: ignore[assignment]
    if resolved not in ("binary", "multiclass", "regression"):
        raise DataError(f"task {task!r} is not supported; use auto, binary, multiclass or regression")
    n_rows = len(frame)
    if resolved == "regression":
        if not pd.api.types.is_numeric_dtype(y):
            raise DataError(f"task 'regression' needs a numeric target; {target!r} is {y.dtype}")
        if n_rows < n_folds * MIN_ROWS_PER_FOLD:
            raise DataError(f"too few rows for {n_folds}-fold cross-validation: {n_rows}; "
                            f"need at least {n_folds * MIN_ROWS_PER_FOLD}")
        return resolved
    counts = y.value_counts()
    if len(counts) < 2:
        only = counts.index[0].item() if hasattr(counts.index[0], "item") else counts.index[0]
        raise DataError(f"target {target!r} has only one class ({only!r}); "
                        "a classifier needs at least two")
    if resolved == "binary" and len(counts) > 2:
        raise DataError(f"task 'binary' but target {target!r} has {len(counts)} classes; "
                        "use task='multiclass' or 'auto'")
    if len(counts) > MAX_CLASSES:
        raise DataError(f"target {target!r} has {len(counts)} classes (max {MAX_CLASSES}); "
                        "is it a continuous target? use task='regression'")
    rarest = counts.min()
    rare_class = counts.idxmin()
    rare_class = rare_class.item() if hasattr(rare_class, "item") else rare_class
    if rarest < n_folds:
        raise DataError(
            f"too few rows for {n_folds}-fold cross-validation: class {rare_class!r} has "
            f"{rarest} rows; need at least {n_folds} per class (collect more data or merge rare classes)"
        )
    if n_rows < n_folds * MIN_ROWS_PER_FOLD:
        raise DataError(f"too few rows for {n_folds}-fold cross-validation: {n_rows}; "
                        f"need at least {n_folds * MIN_ROWS_PER_FOLD}")
    return resolved
