"""The MLflow connection as a Prefect block, and the configuration in force.

Resolution order: a saved `MLflowConfig` document named `default` (what `make up` saves, pointing
at the stack's MLflow server) > the embedded default: MLflow on SQLite under the state folder
(`$MLOPS_HOME`, else `./.mlops`). Only the absence of that document falls back; a saved document
that does not validate is a ConfigurationError (blocks/documents.py).

Inside a flow run the configuration is resolved once per flow run (a subflow is a flow run of its
own) and reused by every task of the run, from any thread: a change to the saved document takes
effect at the next flow run. Outside any run (plain Python calls) each call resolves again.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from blocks.documents import load_saved
from blocks.mlflow_auth import use_credentials

DEFAULT_DOCUMENT = "default"
DEFAULT_EXPERIMENT = "mlops-flows"
MAX_CACHED_RUNS = 64  # a long-lived worker or API process keeps the newest runs' configurations


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
        """Point this process's MLflow client at this configuration.

        The URIs are set only when they differ from the ones in force (MLflow copies them into
        environment variables). Credentials never go into the environment: they are held in
        memory and sent to this configuration's server only (blocks/mlflow_auth.py), so child
        processes -- the PMML exporter's Java converters among them -- do not inherit them.
        """
        import mlflow

        registry = self.registry_uri or self.tracking_uri
        password = self.password.get_secret_value() if self.password else None
        use_credentials([self.tracking_uri, registry], self.username, password)
        with _apply_lock:
            if mlflow.get_tracking_uri() != self.tracking_uri:
                mlflow.set_tracking_uri(self.tracking_uri)
            if mlflow.get_registry_uri() != registry:
                mlflow.set_registry_uri(registry)

    def location_for(self, experiment_name: str) -> str | None:
        """The artifact location of a new experiment: under `artifact_location` when one is set,
        else None (the server's default; on a local store, ./mlruns of the working folder)."""
        if not self.artifact_location:
            return None
        return f"{self.artifact_location.rstrip('/')}/{experiment_name}"

    def ensure_experiment(self) -> str:
        """The experiment's id, created (with this config's artifact location) if absent."""
        import mlflow

        self.apply()
        found = mlflow.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        try:
            return mlflow.create_experiment(
                self.experiment_name, artifact_location=self.location_for(self.experiment_name))
        except mlflow.exceptions.MlflowException:
            # created meanwhile by a concurrent run
            return mlflow.get_experiment_by_name(self.experiment_name).experiment_id


def load_mlflow_config() -> MLflowConfig:
    """Read the configuration from the Prefect API now: the saved `default` document when one
    exists (ConfigurationError when it does not validate), else the embedded default."""
    return load_saved(MLflowConfig, DEFAULT_DOCUMENT) or MLflowConfig.embedded()


_apply_lock = threading.Lock()
_runs_lock = threading.Lock()
_by_run: OrderedDict[str, MLflowConfig] = OrderedDict()


def current_run_key() -> str | None:
    """The flow run this code runs in (from a task too), else a standalone task run, else None."""
    from prefect.runtime import flow_run, task_run

    run_id = flow_run.id
    if run_id:
        return f"flow-run/{run_id}"
    run_id = task_run.id
    return f"task-run/{run_id}" if run_id else None


def resolve_mlflow_config() -> MLflowConfig:
    """The configuration in force: resolved once per flow run and shared by its tasks (a
    standalone task run counts as a run); read again at each call outside any run."""
    key = current_run_key()
    if key is None:
        return load_mlflow_config()
    with _runs_lock:  # held while loading: concurrent tasks of one run wait for one read
        config = _by_run.get(key)
        if config is None:
            config = _by_run[key] = load_mlflow_config()
            while len(_by_run) > MAX_CACHED_RUNS:
                _by_run.popitem(last=False)
        else:
            _by_run.move_to_end(key)
        return config
