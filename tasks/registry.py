"""The MLflow model registry: names, versions, aliases with a durable history, retention.

Seed stages map onto aliases (DESIGN.md §2): Production = `champion`, Staging = `challenger`.
Every alias move is appended to the registered model's tag `mlops.alias_history` (alias, from, to,
when, reason, kind), so a rollback after a restart still knows the previous champion.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task
from pydantic import BaseModel, Field

from blocks.mlflow_config import MLflowConfig, resolve_mlflow_config
from tasks.errors import (InvalidModelNameError, ModelNotFoundError, RegistryError,
                          VersionNotFoundError)

KEEP_VERSIONS = 10
HISTORY_TAG = "mlops.alias_history"
HISTORY_MAX_CHARS = 4000  # stays well inside every backend's tag column
ALIASES = {"champion": "champion", "challenger": "challenger",
           "production": "champion", "staging": "challenger"}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


class VersionInfo(BaseModel):
    model_name: str
    version: int
    aliases: list[str] = Field(default_factory=list)
    semver: str | None = None
    created_at: datetime | None = None
    description: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    run_id: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)


# --------------------------------------------------------------------------- plain helpers
def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidModelNameError(
            f"invalid model name {name!r}: use 1-100 letters, digits, '_', '-' or '.', starting "
            "with a letter or digit (e.g. customer_churn)")
    return name


def model_slug(name: str) -> str:
    """A Prefect artifact key part: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"


def mlflow_client(config: MLflowConfig | None = None) -> MlflowClient:
    """A client on ``config``, else on the configuration in force (saved block, else embedded
    SQLite; resolving it reads a block document from the Prefect API)."""
    config = config or resolve_mlflow_config()
    config.apply()
    return MlflowClient(tracking_uri=config.tracking_uri,
                        registry_uri=config.registry_uri or config.tracking_uri)


def get_registered_model(client: MlflowClient, name: str):
    validate_model_name(name)
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code):
            raise
        known = [m.name for m in client.search_registered_models(max_results=20)]
        raise ModelNotFoundError(
            f"no registered model named {name!r}; known models: {', '.join(known) or 'none'} "
            "(train one with train_model or register one with register_model)") from None


def alias_map(client: MlflowClient, name: str) -> dict[str, int]:
    """alias -> version, read from the registered model (search results may omit aliases)."""
    return {a: int(v) for a, v in (get_registered_model(client, name).aliases or {}).items()}


def _existing_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: -int(v.version))


def resolve_version(client: MlflowClient, name: str, version: int | str) -> ModelVersion:
    """A version number, a digit string, an alias (champion, challenger, Production, Staging or
    any alias set on the model), or `models:/<name>/<version>`."""
    get_registered_model(client, name)
    ref = version
    if isinstance(ref, str) and ref.startswith("models:/"):
        other, _, ref = ref[len("models:/"):].partition("/")
        if other != name:
            raise RegistryError(f"{version!r} is a version of model {other!r}, not of {name!r}; "
                                f"pass a version of {name!r}")
    if isinstance(ref, str) and ref.strip().isdigit():
        ref = int(ref)
    if isinstance(ref, bool) or not isinstance(ref, (int, str)):
        raise VersionNotFoundError(f"version must be a number or an alias, not {version!r}")
    if isinstance(ref, int):
        try:
            return client.get_model_version(name, str(ref))
        except MlflowException:
            have = [int(v.version) for v in _existing_versions(client, name)]
            raise VersionNotFoundError(
                f"model {name!r} has no version {ref}; existing versions: {have or 'none'}") from None
    alias = ALIASES.get(ref.lower(), ref)
    aliases = alias_map(client, name)
    if alias not in aliases:
        raise VersionNotFoundError(
            f"model {name!r} has no version with alias {alias!r}; aliases set: "
            f"{aliases or 'none'} (promote a version first)")
    return client.get_model_version(name, str(aliases[alias]))


def version_info(client: MlflowClient, mv: ModelVersion) -> VersionInfo:
    by_version: dict[int, list[str]] = {}
    for alias, v in alias_map(client, mv.name).items():
        by_version.setdefault(v, []).append(alias)
    tags = dict(mv.tags or {})
    metrics = {k[len("metric."):]: float(v) for k, v in tags.items() if k.startswith("metric.")}
    if mv.run_id:
        try:
            metrics = {**client.get_run(mv.run_id).data.metrics, **metrics}
        except MlflowException:
            pass  # the run was deleted; the version's own tags still describe it
    return VersionInfo(
        model_name=mv.name, version=int(mv.version), aliases=sorted(by_version.get(int(mv.version), [])),
        semver=tags.get("semver"),
        created_at=datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc),
        description=mv.description or "", metrics=metrics, run_id=mv.run_id or None, tags=tags)


def read_alias_history(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    raw = (get_registered_model(client, name).tags or {}).get(HISTORY_TAG)
    return json.loads(raw) if raw else []


def _write_alias_history(client: MlflowClient, name: str, history: list[dict]) -> None:
    while len(json.dumps(history)) > HISTORY_MAX_CHARS and len(history) > 1:
        history = history[1:]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def move_alias(client: MlflowClient, name: str, alias: str, version: int | None, reason: str,
               kind: str) -> dict[str, Any] | None:
    """Point `alias` at `version` (None removes it) and append the move to the history."""
    current = alias_map(client, name).get(alias)
    if current == version:
        return None
    if version is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, str(version))
    entry = {"alias": alias, "from": current, "to": version, "kind": kind, "reason": reason,
             "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_alias_history(client, name, read_alias_history(client, name) + [entry])
    return entry


def champion_stack(history: list[dict[str, Any]]) -> list[int]:
    """Replay champion moves: a promotion pushes, a rollback without a target pops."""
    stack: list[int] = []
    for e in history:
        if e["alias"] != "champion" or e["to"] is None:
            continue
        if e["kind"] == "rollback" and len(stack) >= 2 and stack[-2] == e["to"]:
            stack.pop()
        else:
            stack.append(e["to"])
    return stack


def previous_champion(client: MlflowClient, name: str) -> int | None:
    existing = {int(v.version) for v in _existing_versions(client, name)}
    current = alias_map(client, name).get("champion")
    stack = champion_stack(read_alias_history(client, name))
    while stack and stack[-1] == current:
        stack.pop()
    for v in reversed(stack):
        if v in existing and v != current:
            return v
    return None


def promote(client: MlflowClient, name: str, version: int, stage: str, reason: str,
            kind: str = "promote") -> None:
    alias = ALIASES.get(stage.lower()) if isinstance(stage, str) else None
    if alias is None:
        raise RegistryError(f"unknown stage {stage!r}; use champion, challenger, Production or Staging")
    aliases = alias_map(client, name)
    move_alias(client, name, alias, version, reason, kind)
    if alias == "champion" and aliases.get("challenger") == version:
        # the challenger won: it is no longer a challenger
        move_alias(client, name, "challenger", None, f"promoted to champion: {reason}", kind)


def next_semver(client: MlflowClient, name: str, schema_json: str | None) -> str:
    """1.0.0 first; a new major when the input schema changes, else a new minor."""
    versions = [v for v in _existing_versions(client, name) if (v.tags or {}).get("semver")]
    if not versions:
        return "1.0.0"
    latest = versions[0]
    major, minor, _ = (int(x) for x in latest.tags["semver"].split("."))
    if schema_json is not None and latest.tags.get("mlops.schema_sha") not in (None, _sha(schema_json)):
        return f"{major + 1}.0.0"
    return f"{major}.{minor + 1}.0"


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def register(client: MlflowClient, name: str, model_uri: str, run_id: str | None, description: str,
             tags: dict[str, str], metrics: dict[str, float], schema_json: str | None = None,
             keep: int = KEEP_VERSIONS) -> ModelVersion:
    """Create a version, or return the one a retry of the same registration already created."""
    import mlflow

    validate_model_name(name)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=description or None)
    for mv in _existing_versions(client, name):
        if (mv.tags or {}).get("mlops.source") == model_uri:
            return mv  # idempotent: a Prefect retry must not create a duplicate version
    all_tags = {**{k: str(v) for k, v in (tags or {}).items()},
                **{f"metric.{k}": str(float(v)) for k, v in (metrics or {}).items()},
                "mlops.source": model_uri,
                "semver": next_semver(client, name, schema_json)}
    if schema_json is not None:
        all_tags["mlops.schema_sha"] = _sha(schema_json)
    mv = mlflow.register_model(model_uri, name, tags=all_tags)
    if description:
        client.update_model_version(name, mv.version, description=description)
    apply_retention(client, name, keep)
    return client.get_model_version(name, mv.version)


def apply_retention(client: MlflowClient, name: str, keep: int = KEEP_VERSIONS) -> list[int]:
    """Delete versions beyond the `keep` newest, never one that holds an alias."""
    held = set(alias_map(client, name).values())
    deleted = []
    for mv in _existing_versions(client, name)[keep:]:
        if int(mv.version) not in held:
            client.delete_model_version(name, mv.version)
            deleted.append(int(mv.version))
    return deleted


# --------------------------------------------------------------------------- tasks
@task(name="register-version", retries=2, retry_delay_seconds=2)
def register_version(model_name: str, model_uri: str, run_id: str | None, description: str = "",
                     tags: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
                     schema_json: str | None = None) -> VersionInfo:
    client = mlflow_client()
    mv = register(client, model_name, model_uri, run_id, description, tags or {}, metrics or {},
                  schema_json)
    return version_info(client, mv)


@task(name="promote-alias")
def promote_alias(model_name: str, version: int | str, stage: str = "champion", reason: str = "",
                  kind: str = "promote") -> VersionInfo:
    client = mlflow_client()
    mv = resolve_version(client, model_name, version)
    promote(client, model_name, int(mv.version), stage, reason, kind)
    return version_info(client, client.get_model_version(model_name, mv.version))


@task(name="resolve-version")
def find_version(model_name: str, version: int | str) -> VersionInfo:
    client = mlflow_client()
    return version_info(client, resolve_version(client, model_name, version))


@task(name="previous-champion")
def find_previous_champion(model_name: str) -> int:
    client = mlflow_client()
    current = alias_map(client, model_name).get("champion")
    previous = previous_champion(client, model_name)
    if previous is None:
        raise RegistryError(
            f"model {model_name!r} has no earlier champion to roll back to (current champion: "
            f"{current}); pass version=<n> to roll back to a named version")
    return previous


@task(name="list-model-versions")
def read_versions(model_name: str) -> list[VersionInfo]:
    client = mlflow_client()
    get_registered_model(client, model_name)
    return [version_info(client, mv) for mv in _existing_versions(client, model_name)]


@task(name="check-model-source")
def check_model_source(model_uri: str | None, run_id: str | None) -> str:
    """The model URI to register, verified to exist before anything is written."""
    if not model_uri and not run_id:
        raise RegistryError("pass model_uri (e.g. runs:/<run_id>/model or models:/m-<id>) or run_id")
    client = mlflow_client()
    uri = model_uri or f"runs:/{run_id}/model"
    try:
        if run_id:
            client.get_run(run_id)
        if uri.startswith("runs:/"):
            client.get_run(uri[len("runs:/"):].split("/")[0])
        elif uri.startswith("models:/m-"):
            client.get_logged_model(uri[len("models:/"):].split("/")[0])
    except MlflowException as exc:
        raise RegistryError(f"model source {uri!r} does not exist in MLflow "
                            f"({exc.error_code}); log the model first") from None
    return uri
