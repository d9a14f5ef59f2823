"""Settings of the REST service (api/) as a Prefect block, and the settings in force.

Resolution (as for the other blocks): a saved `APISettings` document named `default`, else the
embedded defaults: 127.0.0.1:8000, CORS off, `/metrics` open, keys in `<state>/api/keys.json`.
"""
from __future__ import annotations

from pathlib import Path

from prefect.blocks.core import Block
from pydantic import Field

from blocks.mlflow_config import DEFAULT_DOCUMENT, state_dir

KEYS_FILE = "keys.json"


class APISettings(Block):
    """Where the mlops-flows REST service listens and how it checks callers."""

    _block_type_name = "API Settings"
    _block_type_slug = "mlops-api-settings"
    _description = "Host, port, CORS and API-key settings of the mlops-flows REST service."

    host: str = Field(default="127.0.0.1", description="Interface the service binds to.")
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port of the service.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (CORS); empty: CORS off.")
    metrics_requires_key: bool = Field(
        default=False, description="Require an API key (read scope) on /metrics.")
    keys_file: str | None = Field(
        default=None,
        description="File holding the hashed API keys; empty: <state folder>/api/keys.json.")
    key_cache_seconds: float = Field(
        default=2.0, gt=0, le=5,
        description="How long the service trusts its in-memory copy of the keys file; a revoked "
                    "key stops working within this many seconds.")
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024,
        description="Largest request body accepted (413 above it).")

    max_predict_rows: int = Field(
        default=1000, ge=1, le=100_000,
        description="Most rows in one prediction request (413 above it; score files with "
                    "score_batch).")
    serving_poll_seconds: float = Field(
        default=1.0, gt=0, le=5,
        description="How often each worker re-reads the champion aliases and active A/B tests "
                    "of the models it serves (an alias move is served within this time plus "
                    "the load of the new version).")
    access_log: bool = Field(
        default=False,
        description="Log one line per request (method, path, status, milliseconds, request id) "
                    "on the `api.access` logger at INFO. Off by default: on the prediction path "
                    "the line costs more than the model call.")
    prediction_log_flush_seconds: float = Field(
        default=0.2, gt=0, le=60,
        description="How often answered rows of A/B tests are written to the A/B store (in "
                    "one transaction per test); the rest is written on graceful shutdown.")

    def keys_path(self) -> Path:
        if self.keys_file:
            return Path(self.keys_file).expanduser()
        return state_dir() / "api" / KEYS_FILE


def resolve_api_settings() -> APISettings:
    """The saved `default` document when one exists, else the embedded defaults."""
    try:
        return APISettings.load(DEFAULT_DOCUMENT, validate=True)
    except ValueError:
        return APISettings()
