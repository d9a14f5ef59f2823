"""Results of export_model. They are a public contract (Python callers, the HTTP API): add
fields, never rename them."""
from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field

Status = Literal["ok", "unsupported", "failed"]


class ExportedFile(BaseModel):
    name: str
    path: str = Field(description="relative path under exports/ (MLflow), the S3 prefix and the bundle")
    sha256: str
    size_bytes: int


class ExportResult(BaseModel):
    format: str
    status: Status
    reason: str = ""
    path: str | None = Field(default=None, description="local path of the published model file")
    uri: str | None = Field(default=None, description="MLflow artifact URI of the model file")
    size_bytes: int | None = None
    sha256: str | None = None
    max_abs_diff: float | None = None
    changed_labels: int | None = None
    latency_p50_us: float | None = None
    latency_p99_us: float | None = None
    sklearn_p50_us: float | None = None
    # additions (contract fields above)
    title: str = ""
    files: list[ExportedFile] = Field(default_factory=list)
    precision: str | None = None
    quantization: str = "not requested"
    parity_rows: int | None = None
    parity_bound: str | None = None
    max_rel_diff: float | None = None
    sklearn_p99_us: float | None = None
    rows_per_s: float | None = None
    sklearn_rows_per_s: float | None = None
    speedup_p50: float | None = Field(default=None, description="sklearn p50 / this format's p50")
    runtime: str | None = None
    latency_note: str = ""
    s3_uri: str | None = None
    rejected_path: str | None = Field(default=None, description="local file that failed its gate")
    notes: list[str] = Field(default_factory=list)
    duration_s: float | None = None


class ExportReport(BaseModel):
    model_name: str
    version: int
    formats: list[ExportResult]
    bundle_path: str | None = Field(default=None, description="local edge zip (formats included 'edge')")
    # additions
    run_id: str | None = None
    manifest_path: str | None = None
    manifest_uri: str | None = None
    bundle_uri: str | None = None
    bundle_s3_uri: str | None = None
    sample_source: str | None = None
    sample_rows: int | None = None
    artifact_key: str | None = None

    def result(self, fmt: str) -> ExportResult:
        for r in self.formats:
            if r.format == fmt:
                return r
        raise KeyError(f"{fmt!r} was not exported; formats: {[r.format for r in self.formats]}")


def table_rows(results: list[ExportResult]) -> list[dict]:
    """One row per format for the Prefect table artifact and the lifecycle summary."""
    rows = []
    for r in results:
        rows.append({
            "format": r.format, "status": r.status,
            "size": _size(r.size_bytes), "max |diff|": _g(r.max_abs_diff),
            "changed labels": "" if r.changed_labels is None else r.changed_labels,
            "p50 us": _f(r.latency_p50_us), "p99 us": _f(r.latency_p99_us),
            "sklearn p50 us": _f(r.sklearn_p50_us),
            "speedup": "" if r.speedup_p50 is None else f"{r.speedup_p50:.0f}x",
            "rows/s": _f(r.rows_per_s), "quantization": r.quantization,
            "reason": r.reason,
        })
    return rows


def summary_line(r: ExportResult) -> str:
    if r.status != "ok":
        return f"{r.format:<7}{r.status:<12}{r.reason}"
    speed = ""
    if r.latency_p50_us is not None:
        speed = f"  p50 {r.latency_p50_us:,.0f} us"
        if r.sklearn_p50_us:
            speed += f" (sklearn {r.sklearn_p50_us:,.0f} us, {r.speedup_p50:.0f}x)"
    labels = "" if r.changed_labels is None else f", {r.changed_labels} labels changed"
    return (f"{r.format:<7}{r.status:<12}{_size(r.size_bytes):>9}  max |diff| "
            f"{_g(r.max_abs_diff)}{labels} on {r.parity_rows} rows{speed}")


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _g(x: float | None) -> str:
    return "" if x is None else f"{x:.2g}"


def _f(x: float | None) -> str:
    return "" if x is None else f"{x:,.0f}"


def where_to_fetch(model_name: str, version: int, fmt: str, sha256: str, local_path: str,
                   host: str, mlflow_uri: str, tracking_uri: str, s3_uri: str | None) -> str:
    """Markdown for a download's Prefect artifact: the copy this run made is on the disk of the
    machine that ran it, so the artifact names the places any machine can fetch it from."""
    lines = [f"**{model_name} v{version}: {fmt}** (sha256 `{sha256}`)", "",
             f"This run's copy: `{local_path}` on `{host}` (the machine that ran the flow).", "",
             "From any machine:",
             f"- MLflow: `MLFLOW_TRACKING_URI={_without_credentials(tracking_uri)} mlflow "
             f"artifacts download "
             f"-u {mlflow_uri}`"]
    if s3_uri:
        lines.append(f"- S3: `{s3_uri}`")
    lines.append(f"- REST API: `GET /api/v1/mlops/models/export/{model_name}/{version}/download"
                 f"?format={fmt}`")
    return "\n".join(lines)


def _without_credentials(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))
