"""The MLflow connection as a Prefect block, and the configuration in force.

Resolution order: a saved `MLflowConfig` document named `default` (what `make up` saves, pointing
at the stack's MLflow server) > the embedded default: MLflow on SQLite under the state folder
(`$MLOPS_HOME`, else `./.mlops`).
"""
from __future__ import annotations

import os
from pathlib import Path

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

DEFAULT_DOCUMENT = "default"
DEFAULT_EXPERIMENT = "mlops-flows"


def state_dir() -> Path:
    """The embedded state folder: `$MLOPS_HOME`, else `.mlops` in the working directory."""
    path = Path(os.environ.get("MLOPS_HOME") or Path.cwd() / ".mlops").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


class MLflowConfig(Block):
    """Where MLflow's tracking server and model registry live."""

    _block_type_name = "MLflow Config"
    _block_type_slug = "mlops-mlflow-config"
    _description = "MLflow tracking/registry connection used by every mlops-flows flow."

    tracking_uri: str = Field(
        description="MLflow tracking URI, e.g. http://127.0.0.1:5000 or sqlite:///path/mlflow.db",
    )
    registry_uri: str | None = Field(
        default=None, description="Model registry URI; the tracking URI when empty."
    )
    experiment_name: str = Field(
        default=DEFAULT_EXPERIMENT, description="Experiment that training runs are logged to."
    )
    artifact_location: str | None = Field(
        default=None,
        description="Where new experiments store artifacts; the server's default when empty.",
    )
    username: str | None = Field(default=None, description="HTTP basic-auth user, if any.")
    password: SecretStr | None = Field(default=None, description="HTTP basic-auth password.")
    keep_versions: int = Field(
        default=10, ge=1,
        description="Versions of a model kept at each registration: the newest keep_versions, "
                    "plus any older one still in use (alias, active A/B test arm, pending "
                    "approval, newest champion export).",
    )

    @classmethod
    def embedded(cls) -> "MLflowConfig":
        """MLflow on SQLite under the state folder, artifacts beside it."""
        root = state_dir()
        db = root / "mlflow.db"
        return cls(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}",
                   artifact_location=(root / "mlartifacts").as_uri())

    def apply(self) -> None:
        """Point this process's MLflow client at this configuration."""
        import mlflow

        if self.username:
            os.environ["MLFLOW_TRACKING_USERNAME"] = self.username
        if self.password:
            os.environ["MLFLOW_TRACKING_PASSWORD"] = self.password.get_secret_value()
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri or self.tracking_uri)

    def ensure_experiment(self) -> str:
        """The experiment's id, created (with this config's artifact location) if absent."""
        import mlflow

        self.apply()
        found = mlflow.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.artifact_location:
            location = f"{self.artifact_location.rstrip('/')}/{self.experiment_name}"
        try:
            return mlflow.create_experiment(self.experiment_name, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            # created meanwhile by a concurrent run
            return mlflow.get_experiment_by_name(self.experiment_name).experiment_id


def resolve_mlflow_config() -> MLflowConfig:
    """The saved `default` document when one exists, else the embedded default."""
    try:
        return MLflowConfig.load(DEFAULT_DOCUMENT, validate=True)
    except ValueError:
        # Block.load raises ValueError when no such document (or block type) is saved.
        return MLflowConfig.embedded()
