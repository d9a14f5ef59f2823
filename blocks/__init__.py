"""Prefect blocks of mlops-flows. `prefect block register -m blocks` registers every type here."""
from blocks.ab_policy import ABPolicy, resolve_ab_policy
from blocks.api_settings import APISettings, resolve_api_settings
from blocks.export_settings import ExportSettings, resolve_export_settings
from blocks.mlflow_config import MLflowConfig, resolve_mlflow_config, state_dir
from blocks.monitoring import MonitoringPolicy, resolve_monitoring_policy
from blocks.retraining_policy import RetrainingPolicy, resolve_retraining_policy
from blocks.training_settings import TrainingSettings, resolve_training_settings

__all__ = ["ABPolicy", "APISettings", "ExportSettings", "MLflowConfig", "MonitoringPolicy",
           "RetrainingPolicy", "TrainingSettings", "resolve_ab_policy", "resolve_api_settings",
           "resolve_export_settings", "resolve_mlflow_config", "resolve_monitoring_policy",
           "resolve_retraining_policy", "resolve_training_settings", "state_dir"]
