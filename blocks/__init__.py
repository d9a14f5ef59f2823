"""Prefect blocks of mlops-flows. `prefect block register -m blocks` registers every type here."""
from blocks.mlflow_config import MLflowConfig, resolve_mlflow_config, state_dir

__all__ = ["MLflowConfig", "resolve_mlflow_config", "state_dir"]
