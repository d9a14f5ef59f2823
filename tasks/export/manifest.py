"""manifest.json and the edge bundle (pure: files in, files out).

The manifest says everything a consumer needs without the training code: the source version and
run, the input contract (columns, kinds, category vocabularies, how missing and unseen values are
given), the outputs, every file's sha256, library versions, and each format's parity and latency
figures. It lives at `exports/manifest.json` in the version's MLflow run (formats exported
earlier are kept, formats exported again are replaced), beside the files, and inside the edge
bundle (there listing exactly the bundle's files).
"""
from __future__ import annotations

import json
import math
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.export.base import ExportSubject
from tasks.export.capability import walk

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


def input_schema(subject: ExportSubject) -> dict[str, Any]:
    schema = subject.schema
    handle = {s.obj.handle_unknown for s in walk(subject.pipeline) if s.kind == "OneHotEncoder"}
    unseen = ("encoded as all-zero one-hot, as scikit-learn does (handle_unknown='ignore')"
              if handle == {"ignore"} else
              "rejected, as scikit-learn does (handle_unknown='error')" if handle == {"error"}
              else "no one-hot encoding")
    columns = [{"name": c, "kind": "numeric", "dtype": "float", "missing": "NaN / null"}
               for c in schema.numeric]
    columns += [{"name": c, "kind": "categorical", "dtype": "string",
                 "vocabulary": list(schema.categories.get(c, [])),
                 "missing": "NaN / null (ONNX: empty string)"} for c in schema.categorical]
    order = [str(c) for c in getattr(_preprocessor(subject.pipeline), "feature_names_in_",
                                     schema.columns)]
    return {"columns": sorted(columns, key=lambda col: order.index(col["name"])
                              if col["name"] in order else len(order)),
            "unseen_categories": unseen}


def _preprocessor(pipeline):
    steps = getattr(pipeline, "steps", [])
    return steps[0][1] if len(steps) > 1 else None


def outputs(subject: ExportSubject) -> dict[str, Any]:
    if subject.is_classifier:
        return {"task": subject.task, "classes": [_plain(c) for c in subject.classes],
                "probabilities": "one column per class, in `classes` order"}
    return {"task": "regression", "prediction": f"predicted {subject.schema.target}"}


def format_entry(outcome) -> dict[str, Any]:
    """A format's section of the manifest, from a core.FormatOutcome."""
    r = outcome.result
    entry: dict[str, Any] = {
        "title": r.title, "status": r.status, "reason": r.reason,
        "files": [f.model_dump() for f in r.files],
        "precision": r.precision, "quantization": r.quantization,
        "parity": outcome.parity.to_dict() if outcome.parity else None,
        "latency": None, "runtime": r.runtime,
        "library_versions": outcome.library_versions,
        "exported_at": now(),
    }
    if outcome.conversion is not None:
        entry["inputs"] = outcome.conversion.inputs
        entry["outputs"] = outcome.conversion.outputs
        entry["details"] = outcome.conversion.details
    if r.latency_p50_us is not None:
        entry["latency"] = {"single_row_p50_us": r.latency_p50_us, "single_row_p99_us": r.latency_p99_us,
                            "batch_rows_per_s": r.rows_per_s, "sklearn_p50_us": r.sklearn_p50_us,
                            "sklearn_p99_us": r.sklearn_p99_us,
                            "sklearn_rows_per_s": r.sklearn_rows_per_s,
                            "speedup_p50": r.speedup_p50, "note": r.latency_note,
                            "single_rows": outcome.latency.single_rows if outcome.latency else None,
                            "batch_rows": outcome.latency.batch_rows if outcome.latency else None}
    if r.s3_uri:
        entry["s3_uri"] = r.s3_uri
    return entry


def build_manifest(subject: ExportSubject, outcomes: list, sample: dict[str, Any],
                   library_versions: dict[str, Any], previous: dict | None = None) -> dict[str, Any]:
    formats = dict((previous or {}).get("formats", {})) if _same_version(previous, subject) else {}
    for outcome in outcomes:
        formats[outcome.result.format] = format_entry(outcome)
    return {
        "manifest_version": MANIFEST_VERSION,
        "model_name": subject.model_name,
        "version": subject.version,
        "run_id": subject.run_id,
        "model_uri": subject.model_uri,
        "family": subject.family,
        "estimator": f"{type(subject.estimator).__module__}.{type(subject.estimator).__name__}",
        "target": subject.schema.target,
        "input_schema": input_schema(subject),
        "outputs": outputs(subject),
        "parity_sample": sample,
        "library_versions": library_versions,
        "formats": formats,
        "updated_at": now(),
    }


def _same_version(previous: dict | None, subject: ExportSubject) -> bool:
    return bool(previous) and previous.get("model_name") == subject.model_name and \
        previous.get("version") == subject.version


def listed_files(manifest: dict, formats: list[str] | None = None) -> list[dict]:
    """Every published file the manifest lists (optionally for some formats only)."""
    return [f for name, entry in manifest.get("formats", {}).items()
            if (formats is None or name in formats) and entry.get("status") == "ok"
            for f in entry.get("files", [])]


def write_manifest(manifest: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(manifest))
    return path


def edge_manifest(manifest: dict, formats: list[str]) -> dict:
    """The manifest restricted to the bundle's formats (so it lists exactly the bundle's files)."""
    return {**manifest, "bundle": "edge",
            "formats": {k: v for k, v in manifest["formats"].items() if k in formats}}


def write_bundle(manifest: dict, root: Path, formats: list[str], path: Path) -> Path:
    """A zip of the formats' published files (paths as in the manifest) and its manifest.json."""
    bundle_manifest = edge_manifest(manifest, formats)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST_NAME, dumps(bundle_manifest))
        for entry in listed_files(bundle_manifest):
            zf.write(root / entry["path"], arcname=entry["path"])
    return path


def dumps(manifest: dict) -> str:
    """Strict JSON: non-finite numbers become null."""
    return json.dumps(_finite(manifest), indent=1, default=str, allow_nan=False)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _plain(value):
    return value.item() if hasattr(value, "item") else value
