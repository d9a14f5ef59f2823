"""export_model: load a version → validate formats and sample → per format: capability check,
convert, parity gate, latency → publish with the version (MLflow, S3, manifest, edge bundle) →
table artifact and event. It takes the place of `export_best_model(format=..., sample_data=X)`.

Formats: onnx (skl2onnx → onnxruntime), pmml (sklearn2pmml → JPMML-Evaluator; needs Java, AGPL),
tflite (ai-edge-litert) and coreml (spec evaluated on Linux), or "edge": every device
format available, quantized where that keeps parity, as one zip bundle with its manifest.
"""
from __future__ import annotations

import socket
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from blocks.export_settings import resolve_export_settings
from flows.parameters import DataRef, data_flow
from tasks.events import emit_model_event
from tasks.export.base import plan_formats
from tasks.export.report import (ExportReport, ExportResult, summary_line, table_rows,
                                 where_to_fetch)
from tasks.export.steps import (download_located, export_one, load_subject, locate_export,
                                one_export_at_a_time, parity_sample, publish, reference_outputs)
from tasks.registry import model_slug, validate_model_name

FormatName = Literal["onnx", "pmml", "tflite", "coreml", "edge"]


@data_flow(name="export-model", log_prints=True, persist_result=True)
def export_model(
    model_name: str,
    version: int | str = "champion",
    formats: list[FormatName] | FormatName = ("onnx",),  # type: ignore[assignment]
    quantize: bool = False,
    sample_data: DataRef | None = None,
) -> ExportReport:
    """Export a registered version to deployable formats, each checked against scikit-learn;
    a file that fails its parity gate is not published.

    Args:
        model_name: Registered model to export.
        version: A version number or an alias (champion, challenger, Production, Staging).
        formats: Any of onnx, pmml, tflite, coreml, or "edge" (every device format, quantized
            where parity holds, zipped with its manifest).
        quantize: Also try a quantized variant where it applies (ONNX MatMul/Gemm weights);
            reported "not applicable" elsewhere, refused when it breaks parity.
        sample_data: Rows with the model's columns for the parity gate: a csv/parquet path or
            s3:// URI (a DataFrame from Python); empty: the version's stored holdout.
    """
    logger = get_run_logger()
    validate_model_name(model_name)
    plan = plan_formats(formats, quantize)
    settings = resolve_export_settings()

    subject = load_subject(model_name, version)
    sample = parity_sample(subject, sample_data, settings.parity_max_rows)
    reference = reference_outputs(subject, sample, settings.latency_rows)
    options = {"latency_rows": settings.latency_rows,
               "pmml_failure_reports": settings.pmml_failure_reports}
    with one_export_at_a_time(subject.model_name, subject.version):
        outcomes = [export_one(fmt, subject, sample, reference, fmt in plan.quantize, options)
                    for fmt in plan.formats]
        published = publish(subject, outcomes, plan, sample, settings)

    results: list[ExportResult] = [o.result for o in outcomes]
    key = f"export-{model_slug(model_name)}-v{subject.version}"
    create_table_artifact(key=key, table=table_rows(results),
                          description=f"{model_name} v{subject.version}: export to "
                                      f"{', '.join(plan.formats)}; parity on {sample.info['rows']} "
                                      f"{sample.info['source']} rows")
    emit_model_event(model_name, "mlops.model.exported", {
        "version": subject.version, "formats": {r.format: r.status for r in results},
        "bundle": str(published.bundle_path) if published.bundle_path else None})
    for r in results:
        logger.info("export %s", summary_line(r))
    return ExportReport(
        model_name=model_name, version=subject.version, formats=results,
        bundle_path=str(published.bundle_path) if published.bundle_path else None,
        run_id=subject.run_id, manifest_path=str(published.manifest_path),
        manifest_uri=published.manifest_uri, bundle_uri=published.bundle_uri,
        bundle_s3_uri=published.bundle_s3_uri, sample_source=sample.info["source"],
        sample_rows=sample.info["rows"], artifact_key=key)


@flow(name="download-export")
def download_export(model_name: str, version: int | str = "champion",
                    format: FormatName = "onnx", dst_dir: str | None = None) -> str:
    """Local path of a published export of a version, verified against the manifest's sha256.

    Args:
        model_name: Registered model.
        version: A version number or an alias (champion, challenger, Production, Staging).
        format: onnx, pmml, tflite, coreml, or edge (the zip bundle).
        dst_dir: Folder to copy the file into; empty: the export store's own copy.

    The path is on the machine that ran the flow (a worker's disk when run by a deployment): the
    markdown artifact `download-<model>-v<version>-<format>` names where any machine gets the
    same file (MLflow, S3 when published there, the REST API).
    """
    import mlflow

    validate_model_name(model_name)
    where = locate_export(model_name, version, format)
    path = download_located(where, dst_dir)
    create_markdown_artifact(
        key=f"download-{model_slug(model_name)}-v{where.version}-{where.format}",
        markdown=where_to_fetch(model_name, where.version, where.format, where.files[0]["sha256"],
                                str(path), socket.gethostname(), where.mlflow_uri,
                                mlflow.get_tracking_uri(), where.s3_uri),
        description=f"{model_name} v{where.version} {where.format}: where to fetch it")
    return str(path)


def lifecycle_step(story) -> None:
    """The main job's export step: the champion to ONNX, PMML and the edge bundle, in a table."""
    report = export_model(story.model_name, "champion", formats=["onnx", "pmml", "edge"])
    story.say(f"export    v{report.version} (champion) checked against scikit-learn on "
              f"{report.sample_rows} {report.sample_source} rows; edge bundle {report.bundle_path}")
    for r in report.formats:
        story.say(f"export    {summary_line(r)}")
