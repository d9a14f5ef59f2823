"""The A/B-testing policy as a Prefect block, and the policy in force.

Resolution order (as for `MLflowConfig`): a saved `ABPolicy` document named `default` (an error
when it does not validate) > the embedded defaults: the SQL store on SQLite in the state folder (`<state>/ab.db`), at least 1,000
outcomes per arm and 7 days before a verdict, alpha 0.05, power 0.8, SRM threshold 0.001.

`create_ab_test` copies the policy's values into the test when it is created, so changing the
policy later never changes the rules of a running test; only `database_url` is read every time.
"""
from __future__ import annotations

from pathlib import Path

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator

from blocks.documents import load_saved
from blocks.mlflow_config import DEFAULT_DOCUMENT, state_dir

DEFAULT_MIN_SAMPLES_PER_ARM = 1000
DEFAULT_MIN_DURATION_DAYS = 7.0
DEFAULT_ALPHA = 0.05
DEFAULT_POWER = 0.8
DEFAULT_SRM_THRESHOLD = 0.001
#: N* of the always-valid test: the total sample size at which its boundary is tightest
#: (tasks/ab_stats.py DEFAULT_TUNING; set it to the planned size of a typical test).
DEFAULT_SEQUENTIAL_TUNING = 10_000
STORE_FILE = "ab.db"


def normalise_database_url(url: str) -> str:
    """SQLAlchemy URL with an installed driver.

    SQLAlchemy 2.1 maps a bare `postgresql://` (and Heroku-style `postgres://`) to psycopg 3,
    which is not installed: name psycopg2 (pinned as psycopg2-binary) instead. Other URLs are
    returned unchanged.
    """
    text = url.strip()
    for prefix in ("postgresql://", "postgres://"):
        if text.startswith(prefix):
            return "postgresql+psycopg2://" + text[len(prefix):]
    return text


def default_database_url() -> str:
    return f"sqlite:///{Path(state_dir()) / STORE_FILE}"


class ABPolicy(Block):
    """Where A/B tests are stored and the rules they are judged by."""

    _block_type_name = "AB Test Policy"
    _block_type_slug = "mlops-ab-policy"
    _description = ("A/B tests of model versions: the SQL store (SQLite or PostgreSQL) and the "
                    "defaults new tests get (minimum samples and duration, alpha, power, SRM).")

    database_url: SecretStr | None = Field(
        default=None,
        description="SQLAlchemy URL of the A/B store, e.g. postgresql+psycopg2://user:pw@host/db "
                    "(a bare postgresql:// is accepted); empty: SQLite in the state folder.")
    scores_location: str | None = Field(
        default=None,
        description="Where score-batch writes a batch's predictions when no output is given: "
                    "an s3://bucket/prefix (a saved S3Bucket block for the bucket) or a folder; "
                    "empty: ab/scores in the state folder.")
    min_samples_per_arm: int = Field(
        default=DEFAULT_MIN_SAMPLES_PER_ARM, ge=1,
        description="Outcomes each arm needs before any verdict or conclusion.")
    min_duration_days: float = Field(
        default=DEFAULT_MIN_DURATION_DAYS, ge=0,
        description="Days a test runs before it may conclude (covers weekly cycles).")
    alpha: float = Field(default=DEFAULT_ALPHA, gt=0, lt=1,
                         description="Significance level of the tests and intervals.")
    power: float = Field(default=DEFAULT_POWER, gt=0, lt=1,
                         description="Power used for 'samples still needed'.")
    srm_threshold: float = Field(
        default=DEFAULT_SRM_THRESHOLD, gt=0, lt=1,
        description="A sample-ratio-mismatch chi-square p-value below this invalidates a test.")
    sequential_tuning: float = Field(
        default=DEFAULT_SEQUENTIAL_TUNING, gt=0,
        description="N* of the always-valid test: total outcomes at which it is most sensitive.")
    prediction_log_retention_days: float | None = Field(
        default=90.0, gt=0,
        description="prune_prediction_log deletes logged predictions of concluded tests older "
                    "than this (a running test's rows are never deleted); empty: no age limit.")
    prediction_log_max_rows: int | None = Field(
        default=None, ge=0,
        description="prune_prediction_log keeps at most this many logged predictions of "
                    "concluded tests (the newest); empty: no row limit.")

    @field_validator("database_url", mode="before")
    @classmethod
    def _normalise(cls, value):
        if value is None:
            return None
        raw = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        return normalise_database_url(raw) if raw.strip() else None

    def store_url(self) -> str:
        """The SQLAlchemy URL in force (the state folder's SQLite file when none is set)."""
        if self.database_url is None:
            return default_database_url()
        return normalise_database_url(self.database_url.get_secret_value())


def resolve_ab_policy() -> ABPolicy:
    """The saved `default` document when one exists (ConfigurationError when it does not
    validate), else the embedded defaults."""
    return load_saved(ABPolicy, DEFAULT_DOCUMENT) or ABPolicy()
