"""Export settings as a Prefect block: where exports are uploaded besides MLflow, and how much
the parity gate and the latency measurement read.

Resolution: a saved `ExportSettings` document named `default` (an error when it does not
validate), else the embedded defaults (no S3
upload, holdout parity on up to 5,000 rows, 200 single-row latency calls).
"""
from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from blocks.documents import load_saved

DEFAULT_DOCUMENT = "default"


class ExportSettings(Block):
    """Settings of export_model (flows/export.py)."""

    _block_type_name = "Export Settings"
    _block_type_slug = "mlops-export-settings"
    _description = "Where mlops-flows uploads exported models (S3) and how it verifies them."

    s3_bucket_block: str | None = Field(
        default=None,
        description="Name of a saved S3Bucket block (prefect-aws); when set, every published "
                    "export (files, manifest, edge bundle) is uploaded there too.")
    s3_folder: str = Field(
        default="exports",
        description="Key prefix under the block's bucket folder: <folder>/<model>/v<version>/...")
    parity_max_rows: int = Field(
        default=5000, ge=1,
        description="Most rows the parity gate evaluates (a larger sample is subsampled, seed 0).")
    latency_rows: int = Field(
        default=200, ge=20, description="Single-row calls timed per runtime (after warm-up).")
    pmml_failure_reports: bool = Field(
        default=False,
        description="Let sklearn2pmml's Java converter post incident reports of failed "
                    "conversions to telemetry.jpmml.org (off: its HTTP goes to a closed "
                    "loopback proxy).")


def resolve_export_settings() -> ExportSettings:
    """The saved `default` document when one exists (ConfigurationError when it does not
    validate), else the embedded defaults."""
    return load_saved(ExportSettings, DEFAULT_DOCUMENT) or ExportSettings()
