"""Training settings as a Prefect block: where train_model's search trials run.

Resolution: a saved `TrainingSettings` document named `default` (an error when it does not
validate), else the embedded defaults (trials on threads of the flow's own process).
"""
from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, field_validator

from blocks.documents import load_saved

DEFAULT_DOCUMENT = "default"


class TrainingSettings(Block):
    """Settings of train_model's search (flows/training.py)."""

    _block_type_name = "Training Settings"
    _block_type_slug = "mlops-training-settings"
    _description = ("Where mlops-flows runs the trials of a training search: threads of the flow "
                    "run's process, or the workers of a Dask cluster.")

    dask_scheduler_address: str | None = Field(
        default=None,
        description="Address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786: every trial "
                    "of train_model's search then runs on its workers (which need this project's "
                    "code and packages, and reach the Prefect API). Empty: trials run on threads "
                    "of the flow run's process.")
    dask_connect_timeout_s: float = Field(
        default=10.0, gt=0,
        description="Seconds to wait for the scheduler to answer and for one of its workers to "
                    "join before the training fails (it does not fall back to threads).")

    @field_validator("dask_scheduler_address")
    @classmethod
    def _address_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("dask_scheduler_address must be a scheduler address "
                             "(tcp://host:8786) or empty, not blank")
        return value.strip() if value else value


def resolve_training_settings() -> TrainingSettings:
    """The saved `default` document when one exists (ConfigurationError when it does not
    validate), else the embedded defaults."""
    return load_saved(TrainingSettings, DEFAULT_DOCUMENT) or TrainingSettings()
