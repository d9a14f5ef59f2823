"""Prefect blocks of mlops-flows. `prefect block register -m blocks` registers every type here."""
from blocks.mlflow_config import MLflowConfig, resolve_mlflow_config, state_dir
from blocks.monitoring import MonitoringPolicy, resolve_monitoring_policy

__all__ = ["MLflowConfig", "MonitoringPolicy", "resolve_mlflow_config",
           "resolve_monitoring_policy", "state_dir"]
