"""Logging of the service: with MLOPS_LOG_FORMAT=json, Prefect's logging configuration with a
JSON console handler (deployments/logging-json.yml) for the service, uvicorn and in-process
flow runs; otherwise Prefect's own configuration, untouched."""
from __future__ import annotations

import logging
import logging.config
import os
from pathlib import Path

JSON_CONFIG = Path(__file__).resolve().parent.parent / "deployments" / "logging-json.yml"


def json_logging_requested() -> bool:
    return os.environ.get("MLOPS_LOG_FORMAT", "").strip().lower() == "json"


def configure_logging() -> None:
    """Apply the JSON configuration when MLOPS_LOG_FORMAT=json (idempotent); either way the
    service's own lines and uvicorn's start-up lines at MLOPS_LOG_LEVEL (default INFO)."""
    level = os.environ.get("MLOPS_LOG_LEVEL", "INFO").upper()
    if not json_logging_requested():
        _set_levels(level)
        return
    from prefect.logging.configuration import load_logging_config

    os.environ.setdefault("PREFECT_LOGGING_SETTINGS_PATH", str(JSON_CONFIG))
    config = load_logging_config(JSON_CONFIG)
    config["incremental"] = False
    logging.config.dictConfig(config)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "mlflow", "alembic"):
        # these libraries install text handlers of their own; the JSON handler takes over
        log = logging.getLogger(name)
        log.handlers = [h for h in logging.getLogger().handlers]
        log.propagate = False
    _set_levels(level)


def _set_levels(level: str) -> None:
    # Prefect's configuration puts these at PREFECT_(SERVER_)LOGGING_LEVEL (WARNING by default)
    for name in ("api", "uvicorn", "uvicorn.error"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)  # api.access has the request id


def uvicorn_log_config() -> dict | None:
    """`log_config` for uvicorn.run: None (keep ours) in JSON mode, uvicorn's default otherwise."""
    if json_logging_requested():
        return None
    from uvicorn.config import LOGGING_CONFIG

    return LOGGING_CONFIG
