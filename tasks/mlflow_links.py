"""Links a person can open from a Prefect artifact to what a flow recorded in MLflow."""
from __future__ import annotations

from urllib.parse import urlencode

from blocks.mlflow_config import MLflowConfig, resolve_mlflow_config
from tasks.registry import mlflow_client


def artifact_link(run_id: str, path: str, config: MLflowConfig | None = None,
                  artifact_uri: str | None = None) -> str:
    """The MLflow server's artifact endpoint when there is a server (an image the Prefect UI can
    show inline), else the artifact's location (a file URI for the embedded store).
    ``artifact_uri``: the run's artifact location when the caller has it (else the run is
    looked up)."""
    config = config or resolve_mlflow_config()
    if config.tracking_uri.startswith(("http://", "https://")):
        return (f"{config.tracking_uri.rstrip('/')}/get-artifact?"
                f"{urlencode({'path': path, 'run_uuid': run_id})}")
    if artifact_uri is None:
        artifact_uri = mlflow_client(config).get_run(run_id).info.artifact_uri
    return f"{artifact_uri.rstrip('/')}/{path}"


def run_link(run_id: str, experiment_id: str, config: MLflowConfig | None = None) -> str | None:
    """The run's page in the MLflow UI; None for the embedded store (no server to open)."""
    config = config or resolve_mlflow_config()
    if config.tracking_uri.startswith(("http://", "https://")):
        return f"{config.tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return None


def inline_image(url: str | None, alt: str) -> list[str]:
    """Markdown lines showing an image in the Prefect UI, where it can load it (http only)."""
    if url and url.startswith(("http://", "https://")):
        return ["", f"![{alt}]({url})"]
    return []
