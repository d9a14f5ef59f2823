"""The MLflow model registry: names, versions, aliases with a durable history, retention.

Stage names map onto aliases: Production = `champion`, Staging = `challenger`.

Alias history: every alias move is one tag of its own, `mlops.alias_move.<time_ns>-<random>` =
JSON (alias, from, to, at, reason, kind), on the model's history run (experiment
`mlops-alias-history`, one finished run per registered model, named by the model's tag
`mlops.alias_history_run`). A move only ever adds its own tag, so two moves at once cannot
overwrite each other and nothing is ever cut; the keys sort in time order. The moves live on a run
rather than on the registered model because MLflow loads every tag of a registered model with it:
hundreds of history tags there would slow every registry call and crowd the model's page in the
MLflow UI. Stores written before this layout keep their moves in the registered model's JSON tag
`mlops.alias_history`; it is still read (as the oldest part of the history), never written again.

Retention (at each registration): the `keep_versions` newest versions stay (MLflowConfig block,
default 10), and so does every older version still in use: one holding an alias, an arm of an
active A/B test of the model, a challenger waiting for a person's approval, and the version of
the newest export made while it was champion (what devices most likely run).
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from datetime import datetime, timezone
from typing import Any

from mlflow.entities import ViewType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from blocks.mlflow_config import MLflowConfig, resolve_mlflow_config
from tasks.errors import (ConfigurationError, InvalidModelNameError, ModelNotFoundError,
                          RegistryError, VersionNotFoundError)

KEEP_VERSIONS = 10  # the MLflowConfig block's keep_versions default
HISTORY_TAG = "mlops.alias_history"  # legacy: the whole history as one JSON list (read only)
MOVE_TAG_PREFIX = "mlops.alias_move."  # one tag per alias move, on the model's history run
HISTORY_EXPERIMENT = "mlops-alias-history"  # the experiment holding one history run per model
HISTORY_RUN_TAG = "mlops.alias_history_run"  # model tag: the id of its history run
HISTORY_KIND = "alias-history"  # the history runs' mlops.kind tag
REASON_MAX_CHARS = 2000  # a move's tag stays well inside every backend's tag column
PENDING_APPROVAL_TAG = "mlops.pending_approval"  # version tag: waiting for approval until <ISO>
EXPORTED_AT_TAG = "mlops.exported_at"  # version tag: time of its newest export
CHAMPION_EXPORTED_AT_TAG = "mlops.champion_exported_at"  # ... of its newest export as champion
EXPORTS_INDEXED_TAG = "mlops.exports_indexed"  # model tag: exports before the tags were indexed
EXPORTS_FOLDER = "exports"  # where export_model stores files and manifest.json in a version's run
# version tags: "pending" from the version's creation (set in the same request) until the flow
# that registers it has finished (train_model: once its alias is moved); the flow run that
# created it. A pending version whose flow run has ended is abandoned (tasks/audit.py reports it,
# the model's next registration deletes it when it holds no alias).
REGISTRATION_TAG = "mlops.registration"
REGISTERED_BY_TAG = "mlops.flow_run_id"
# kinds as the alias history names them (older records used the short names on the left)
KIND_NAMES = {"retrain": "retraining", "ab-test": "ab-conclude"}
logger = logging.getLogger(__name__)
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


class AliasMove(BaseModel):
    """One move of an alias: `to_version` None = the alias was removed, `from_version` None = it
    was not set before."""

    alias: str
    from_version: int | None = None
    to_version: int | None = None
    at: datetime
    reason: str = ""
    kind: str = Field(description="promote, rollback, retraining, ab-conclude, ...")


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


MAX_CLIENTS = 16
_clients: dict[tuple[str, str], MlflowClient] = {}  # (tracking URI, registry URI) -> client
_clients_lock = threading.Lock()


def mlflow_client(config: MLflowConfig | None = None) -> MlflowClient:
    """A client on `config`, else on the configuration in force (saved block, else embedded
    SQLite).

    The configuration is read from the Prefect API once per flow run (see
    `resolve_mlflow_config`), the process's MLflow URIs change only when the configuration does,
    and one client per (tracking, registry) URI pair is shared by every thread.
    """
    config = config or resolve_mlflow_config()
    config.apply()
    uris = (config.tracking_uri, config.registry_uri or config.tracking_uri)
    with _clients_lock:
        client = _clients.get(uris)
        if client is None:
            client = _clients[uris] = MlflowClient(tracking_uri=uris[0], registry_uri=uris[1])
            while len(_clients) > MAX_CLIENTS:
                _clients.pop(next(iter(_clients)))
        return client


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
    any alias set on the model), or `models:/<name>/<version>`.

    One registry read on the way to the answer (each costs a round trip to MLflow): a number reads
    the version, an alias the registered model; the failure paths read what their message needs.
    """
    validate_model_name(name)
    ref = version
    if isinstance(ref, str) and ref.startswith("models:/"):
        other, _, ref = ref[len("models:/"):].partition("/")
        if other != name:
            raise RegistryError(f"{version!r} is a version of model {other!r}, not of {name!r}; "
                                f"pass a version of {name!r}")
    if isinstance(ref, str) and ref.strip().isdigit():
        ref = int(ref)
    if isinstance(ref, bool) or not isinstance(ref, (int, str)):
        get_registered_model(client, name)  # an unknown model is the first thing to say
        raise VersionNotFoundError(f"version must be a number or an alias, not {version!r}")
    if isinstance(ref, int):
        try:
            return client.get_model_version(name, str(ref))
        except MlflowException:
            get_registered_model(client, name)  # raises ModelNotFoundError for an unknown model
            have = [int(v.version) for v in _existing_versions(client, name)]
            raise VersionNotFoundError(
                f"model {name!r} has no version {ref}; existing versions: {have or 'none'}") from None
    alias = ALIASES.get(ref.lower(), ref)
    aliases = {a: int(v) for a, v in (get_registered_model(client, name).aliases or {}).items()}
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
    """Every alias move of the model, oldest first: dicts with alias, from, to, at, reason, kind.

    The legacy JSON tag (stores written before one tag per move) comes first; then one tag per
    move from the model's history run(s), in key order (time of the move, nanoseconds)."""
    model = get_registered_model(client, name)
    raw = (model.tags or {}).get(HISTORY_TAG)
    history = json.loads(raw) if raw else []
    moves: dict[str, str] = {}
    for run in _history_runs(client, model):
        moves.update((k, v) for k, v in run.data.tags.items() if k.startswith(MOVE_TAG_PREFIX))
    for key in sorted(moves):
        try:
            history.append(json.loads(moves[key]))
        except ValueError:
            logger.warning("model %s: alias history tag %s is not JSON; skipped", name, key)
    return history


def _history_runs(client: MlflowClient, model, include_deleted: bool = True) -> list:
    """The runs holding this registered model's moves: normally one; first moves racing on a
    model registered before history runs existed may leave several, and all are read (so is a
    run deleted by hand, until `mlflow gc` purges it). Runs of an earlier, deleted model of the
    same name are not (they carry another creation time)."""
    experiment = client.get_experiment_by_name(HISTORY_EXPERIMENT)
    if experiment is None:
        return []
    query = (f"tags.`mlops.kind` = '{HISTORY_KIND}' AND tags.`mlops.model_name` = '{model.name}' "
             f"AND tags.`mlops.model_created` = '{model.creation_timestamp}'")
    view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY
    runs, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], query, run_view_type=view,
                                  max_results=1000, order_by=["attributes.start_time ASC"],
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _location_for(client: MlflowClient, experiment_name: str) -> str | None:
    """Where a new experiment of CLIENT's store keeps its artifacts: under the configuration's
    artifact_location when CLIENT is on the configuration in force, like the training experiment
    (else the store's default, which on a local store is ./mlruns of the working folder)."""
    config = resolve_mlflow_config()
    if client.tracking_uri != config.tracking_uri:
        return None
    return config.location_for(experiment_name)


def _history_run_id(client: MlflowClient, model, fresh: bool = False) -> str:
    """The id of the model's history run: created with the registered model (by register), or
    by the first move of a model registered before history runs existed."""
    run_id = None if fresh else (model.tags or {}).get(HISTORY_RUN_TAG)
    if run_id:
        return run_id
    existing = _history_runs(client, model, include_deleted=False)
    if existing:
        run_id = existing[0].info.run_id
    else:
        experiment = client.get_experiment_by_name(HISTORY_EXPERIMENT)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(
                    HISTORY_EXPERIMENT, tags={"mlops.kind": HISTORY_KIND},
                    artifact_location=_location_for(client, HISTORY_EXPERIMENT))
            except MlflowException:  # created meanwhile by a concurrent move
                experiment_id = client.get_experiment_by_name(HISTORY_EXPERIMENT).experiment_id
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=f"alias-history-{model.name}", tags={
            "mlops.kind": HISTORY_KIND, "mlops.model_name": model.name,
            "mlops.model_created": str(model.creation_timestamp)})
        client.set_terminated(run.info.run_id)
        run_id = run.info.run_id
    try:
        client.set_registered_model_tag(model.name, HISTORY_RUN_TAG, run_id)
    except MlflowException:  # a concurrent first move set it: the pointer is only a shortcut
        logger.info("model %s: another history run was named meanwhile; both are read", model.name)
    return run_id


def record_move(client: MlflowClient, model, entry: dict[str, Any], at_ns: int) -> str:
    """Store one move as a tag of its own (key: time in ns + random suffix); returns the key."""
    key = f"{MOVE_TAG_PREFIX}{at_ns:020d}-{secrets.token_hex(4)}"
    value = json.dumps(entry)
    try:
        client.set_tag(_history_run_id(client, model), key, value)
    except MlflowException as exc:
        if exc.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            raise
        # the history run was deleted by hand: the model's next moves go to a new one
        client.set_tag(_history_run_id(client, model, fresh=True), key, value)
    return key


def move_alias(client: MlflowClient, name: str, alias: str, version: int | None, reason: str,
               kind: str, model=None) -> dict[str, Any] | None:
    """Point `alias` at `version` (None removes it) and record the move in the history.
    `model`: the registered model as just read, if the caller has it (saves a read)."""
    model = model or get_registered_model(client, name)
    current = {a: int(v) for a, v in (model.aliases or {}).items()}.get(alias)
    if current == version:
        return None
    if version is None:
        client.delete_registered_model_alias(name, alias)
    else:
        _set_alias(client, name, alias, version)
    return record_alias_move(client, model, alias, current, version, reason, kind)


def record_alias_move(client: MlflowClient, model, alias: str, from_version: int | None,
                      to_version: int | None, reason: str, kind: str) -> dict[str, Any]:
    """Record a move in the model's history (the alias itself is not touched)."""
    at_ns = time.time_ns()
    entry = {"alias": alias, "from": from_version, "to": to_version, "kind": kind,
             "reason": (reason or "")[:REASON_MAX_CHARS],
             "at": datetime.fromtimestamp(at_ns / 1e9, tz=timezone.utc).isoformat(
                 timespec="microseconds")}
    record_move(client, model, entry, at_ns)
    return entry


def _set_alias(client: MlflowClient, name: str, alias: str, version: int, attempts: int = 3) -> None:
    """MLflow inserts an alias after checking it is absent, so two first settings of one alias at
    once collide on the database's unique key (BAD_REQUEST); set it again, now as an update."""
    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, str(version))
            return
        except MlflowException as exc:
            if exc.error_code != "BAD_REQUEST" or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def as_alias_move(entry: dict[str, Any]) -> AliasMove:
    kind = str(entry.get("kind") or "")
    return AliasMove(alias=entry["alias"], from_version=entry.get("from"),
                     to_version=entry.get("to"), at=entry["at"], reason=entry.get("reason") or "",
                     kind=KIND_NAMES.get(kind, kind))


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
    model = get_registered_model(client, name)
    move_alias(client, name, alias, version, reason, kind, model)
    if alias == "champion" and int((model.aliases or {}).get("challenger", 0)) == version:
        # the challenger won: it is no longer a challenger
        move_alias(client, name, "challenger", None, f"promoted to champion: {reason}", kind, model)


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
             keep: int = KEEP_VERSIONS, complete: bool = True) -> ModelVersion:
    """Create a version, or return the one a retry of the same registration already created.

    The version is created tagged `mlops.registration=pending` (with the flow run creating it);
    `complete=True` clears the tag once the version has its description, else the caller does
    (complete_registration) when what belongs to the registration -- an alias -- is done too.
    Versions earlier registrations abandoned are deleted first (abandoned_versions)."""
    import mlflow

    validate_model_name(name)
    try:
        client.get_registered_model(name)
    except MlflowException:
        model = client.create_registered_model(name, description=description or None)
        _history_run_id(client, model)  # now, by the one creator, rather than by a first move
    creator = _current_flow_run_id()
    for mv in _existing_versions(client, name):
        if (mv.tags or {}).get("mlops.source") == model_uri:
            # idempotent: a Prefect retry must not create a duplicate version; it finishes what
            # the interrupted attempt left undone
            if (mv.tags or {}).get(REGISTRATION_TAG) == "pending":
                if creator:
                    client.set_model_version_tag(name, mv.version, REGISTERED_BY_TAG, creator)
                if description and mv.description != description:
                    client.update_model_version(name, mv.version, description=description)
                if complete:
                    complete_registration_of(client, name, int(mv.version))
                return client.get_model_version(name, mv.version)
            return mv
    for mv in abandoned_versions(client, name, exclude_flow_run=creator):
        # only a version whose flow run is known to have ended: one registered outside a flow
        # run may still be finishing (the audit reports it)
        if ((mv.tags or {}).get(REGISTERED_BY_TAG)
                and int(mv.version) not in set(alias_map(client, name).values())):
            logger.warning("model %s: deleting version %s, abandoned by flow run %s before its "
                           "registration finished", name, mv.version,
                           (mv.tags or {}).get(REGISTERED_BY_TAG, "(unknown)"))
            client.delete_model_version(name, mv.version)
    all_tags = {**{k: str(v) for k, v in (tags or {}).items()},
                **{f"metric.{k}": str(float(v)) for k, v in (metrics or {}).items()},
                "mlops.source": model_uri,
                "semver": next_semver(client, name, schema_json),
                REGISTRATION_TAG: "pending",
                **({REGISTERED_BY_TAG: creator} if creator else {})}
    if schema_json is not None:
        all_tags["mlops.schema_sha"] = _sha(schema_json)
    mv = mlflow.register_model(model_uri, name, tags=all_tags)
    if description:
        client.update_model_version(name, mv.version, description=description)
    apply_retention(client, name, keep)
    if complete:
        complete_registration_of(client, name, int(mv.version))
    return client.get_model_version(name, mv.version)


def complete_registration_of(client: MlflowClient, name: str, version: int) -> None:
    client.delete_model_version_tag(name, str(version), REGISTRATION_TAG)


def _current_flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id or None


def abandoned_versions(client: MlflowClient, name: str,
                       exclude_flow_run: str | None = None) -> list[ModelVersion]:
    """Versions still tagged `mlops.registration=pending` whose creating flow run has ended (or
    that Prefect does not know): their registration will never finish. A pending version without
    a recorded flow run (registered outside one) counts too."""
    pending = [mv for mv in _existing_versions(client, name)
               if (mv.tags or {}).get(REGISTRATION_TAG) == "pending"
               and (mv.tags or {}).get(REGISTERED_BY_TAG) != exclude_flow_run]
    return [mv for mv in pending if not _flow_run_alive((mv.tags or {}).get(REGISTERED_BY_TAG))]


def _flow_run_alive(flow_run_id: str | None) -> bool:
    if not flow_run_id:
        return False
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as prefect:
            state = prefect.read_flow_run(flow_run_id).state
    except ObjectNotFound:
        return False
    return state is not None and not state.is_final()


def apply_retention(client: MlflowClient, name: str, keep: int = KEEP_VERSIONS) -> list[int]:
    """Delete the versions beyond the `keep` newest that nothing uses any more; returns them.

    Spared whatever their age: a version holding an alias, an arm of an active A/B test of the
    model, a challenger waiting for approval, the version of the newest export made while it was
    champion. When the A/B store cannot be read nothing is deleted (a warning says why): a
    deleted version cannot be brought back."""
    if keep < 1:
        raise RegistryError(f"keep must be at least 1, not {keep}: the newest version is never "
                            "deleted (MLflowConfig.keep_versions)")
    versions = _existing_versions(client, name)
    held = set(alias_map(client, name).values())
    candidates = [mv for mv in versions[keep:] if int(mv.version) not in held
                  and not _pending_approval(mv)]
    if not candidates:
        return []
    try:
        arms = ab_test_arms(name)
    except Exception as exc:  # any backend failure: keeping versions is the safe side
        logger.warning("model %s: retention skipped, the A/B store cannot be read (%s: %s); "
                       "versions beyond %d are kept until the next registration", name,
                       type(exc).__name__, exc, keep)
        return []
    exported = champion_export(client, name, versions)
    deleted = []
    for mv in candidates:
        if int(mv.version) not in arms and int(mv.version) != exported:
            client.delete_model_version(name, mv.version)
            deleted.append(int(mv.version))
    return deleted


def ab_test_arms(name: str) -> set[int]:
    """Champion and challenger versions of the model's active A/B tests."""
    from blocks.ab_policy import resolve_ab_policy

    url = resolve_ab_policy().store_url()
    if url.startswith("sqlite:///") and not os.path.exists(url[len("sqlite:///"):]):
        return set()  # no store yet: no test was ever created here
    from tasks.ab import open_store

    return {int(v) for t in open_store(url).list_tests(name, "active")
            for v in (t.champion_version, t.challenger_version)}


def _pending_approval(mv: ModelVersion) -> bool:
    until = (mv.tags or {}).get(PENDING_APPROVAL_TAG)
    if until is None:
        return False
    try:
        return datetime.fromisoformat(until) > datetime.now(timezone.utc)
    except ValueError:
        return True  # unreadable: treat as pending rather than delete


def mark_pending_approval(model_name: str, version: int, timeout_s: float) -> None:
    """Tag a version waiting for a person's approval (until the wait's deadline): retention
    spares it even when its alias moves meanwhile."""
    until = datetime.now(timezone.utc).timestamp() + timeout_s
    mlflow_client().set_model_version_tag(
        model_name, str(version), PENDING_APPROVAL_TAG,
        datetime.fromtimestamp(until, tz=timezone.utc).isoformat(timespec="seconds"))


def clear_pending_approval(model_name: str, version: int) -> None:
    try:
        mlflow_client().delete_model_version_tag(model_name, str(version), PENDING_APPROVAL_TAG)
    except MlflowException as exc:  # the version is gone: nothing left to clear
        logger.warning("could not clear %s on %s v%s: %s", PENDING_APPROVAL_TAG, model_name,
                       version, exc)


def record_export(client: MlflowClient, name: str, version: int) -> None:
    """Tag a version with the time of its export (and, when it is champion, of its export as
    champion): retention reads these tags with the versions, at no extra cost."""
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    client.set_model_version_tag(name, str(version), EXPORTED_AT_TAG, now)
    if alias_map(client, name).get("champion") == int(version):
        client.set_model_version_tag(name, str(version), CHAMPION_EXPORTED_AT_TAG, now)


def champion_export(client: MlflowClient, name: str,
                    versions: list[ModelVersion] | None = None) -> int | None:
    """The version of the newest export made while it was champion, else None."""
    versions = versions if versions is not None else _existing_versions(client, name)
    if (get_registered_model(client, name).tags or {}).get(EXPORTS_INDEXED_TAG) is None:
        _index_untagged_exports(client, name, versions)
        versions = _existing_versions(client, name)
    stamped = [(_parse_time(mv.tags[CHAMPION_EXPORTED_AT_TAG]), int(mv.version))
               for mv in versions if (mv.tags or {}).get(CHAMPION_EXPORTED_AT_TAG)]
    return max(stamped)[1] if stamped else None


def _index_untagged_exports(client: MlflowClient, name: str, versions: list[ModelVersion]) -> None:
    """Once per model: exports made before exports were tagged live only as manifest.json in the
    version's run. Tag the newest of them as a champion export (its alias then is unknown, and
    keeping one version too many is the safe side), then mark the model as indexed."""
    newest: tuple[datetime, int] | None = None
    for mv in versions:
        if not mv.run_id or (mv.tags or {}).get(EXPORTED_AT_TAG):
            continue
        stamp = _manifest_time(client, mv.run_id)
        if stamp is not None and (newest is None or (stamp, int(mv.version)) > newest):
            newest = (stamp, int(mv.version))
    if newest is not None:
        at = newest[0].isoformat(timespec="microseconds")
        for key in (EXPORTED_AT_TAG, CHAMPION_EXPORTED_AT_TAG):
            client.set_model_version_tag(name, str(newest[1]), key, at)
    client.set_registered_model_tag(name, EXPORTS_INDEXED_TAG, "1")


def _manifest_time(client: MlflowClient, run_id: str) -> datetime | None:
    try:
        listed = {a.path for a in client.list_artifacts(run_id, EXPORTS_FOLDER)}
        if f"{EXPORTS_FOLDER}/manifest.json" not in listed:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, f"{EXPORTS_FOLDER}/manifest.json", tmp)
            with open(local) as fh:
                manifest = json.load(fh)
    except MlflowException:
        return None  # the run is gone: its version has no readable export
    return _parse_time(manifest.get("updated_at") or "1970-01-01T00:00:00+00:00")


def _parse_time(text: str) -> datetime:
    stamp = datetime.fromisoformat(text)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def newest_unregistered_model(client: MlflowClient, name: str) -> tuple[str, str | None]:
    """(model URI, run id) of the newest model logged for `name` by a finished run and not yet
    a version of `name`: the case of a user who trained with their own code and
    `mlflow.sklearn.log_model`. A logged model belongs to `name` when it was logged with
    `name=<name>`, in an experiment called `<name>`, or by a run tagged `mlops.model_name`."""
    validate_model_name(name)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    registered: set[str] = set()
    try:
        for mv in client.search_model_versions(f"name='{name}'"):
            registered |= {x for x in (mv.run_id, mv.source, (mv.tags or {}).get("mlops.source"))
                           if x}
    except MlflowException:
        pass
    models = client.search_logged_models(
        list(experiments), max_results=500,
        order_by=[{"field_name": "creation_time", "ascending": False}]) if experiments else []
    for lm in models:
        if str(getattr(lm.status, "name", lm.status)).upper() not in ("READY", "LOGGED_MODEL_READY"):
            continue
        run = None
        if lm.source_run_id:
            try:
                run = client.get_run(lm.source_run_id)
            except MlflowException:
                continue
            if run.info.status != "FINISHED":
                continue
        belongs = (lm.name == name or experiments.get(lm.experiment_id) == name
                   or (run is not None and run.data.tags.get("mlops.model_name") == name))
        sources = {lm.model_uri, f"models:/{lm.model_id}", lm.source_run_id,
                   f"runs:/{lm.source_run_id}/{lm.name}"}
        if belongs and not (sources & registered):
            return f"models:/{lm.model_id}", lm.source_run_id
    raise ConfigurationError(
        f"nothing to register for {name!r}: no finished MLflow run logged a model for it that "
        f"is not a version of {name!r} yet (a model counts when logged with name={name!r}, in "
        f"an experiment named {name!r}, or by a run tagged mlops.model_name={name!r}); pass "
        "run_id or model_uri, or data and target to train one")


# --------------------------------------------------------------------------- tasks
# NO_CACHE on each: a second identical call in one flow run must read the registry again (a
# champion moved since) or move the alias again (docs/architecture.md, "No task caching").
@task(name="register-version", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def register_version(model_name: str, model_uri: str, run_id: str | None, description: str = "",
                     tags: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
                     schema_json: str | None = None, complete: bool = True) -> VersionInfo:
    config = resolve_mlflow_config()
    client = mlflow_client(config)
    mv = register(client, model_name, model_uri, run_id, description, tags or {}, metrics or {},
                  schema_json, keep=config.keep_versions, complete=complete)
    return version_info(client, mv)


def registration_failed(model_name: str, tracking_uri: str, exc: Exception) -> RegistryError:
    """An MLflow failure in the middle of a registration, said so that a user can act on it."""
    return RegistryError(
        f"MLflow at {tracking_uri} failed while registering a version of {model_name!r} "
        f"({type(exc).__name__}: {exc}). No alias was moved by this run; a version it created is "
        f"left tagged {REGISTRATION_TAG}=pending. Check that the MLflow server is running and "
        "reachable from here, then run the training again: the next registration of the model "
        "deletes the unfinished version (audit_registry lists it meanwhile)")


@task(name="complete-registration", cache_policy=NO_CACHE)
def complete_registration(model_name: str, version: int) -> None:
    """The version's registration is done: clear its `mlops.registration=pending` tag."""
    complete_registration_of(mlflow_client(), model_name, version)


@task(name="promote-alias", cache_policy=NO_CACHE)
def promote_alias(model_name: str, version: int | str, stage: str = "champion", reason: str = "",
                  kind: str = "promote") -> VersionInfo:
    client = mlflow_client()
    mv = resolve_version(client, model_name, version)
    promote(client, model_name, int(mv.version), stage, reason, kind)
    return version_info(client, client.get_model_version(model_name, mv.version))


@task(name="resolve-version", cache_policy=NO_CACHE)
def find_version(model_name: str, version: int | str) -> VersionInfo:
    client = mlflow_client()
    return version_info(client, resolve_version(client, model_name, version))


@task(name="previous-champion", cache_policy=NO_CACHE)
def find_previous_champion(model_name: str) -> int:
    client = mlflow_client()
    current = alias_map(client, model_name).get("champion")
    previous = previous_champion(client, model_name)
    if previous is None:
        raise RegistryError(
            f"model {model_name!r} has no earlier champion to roll back to (current champion: "
            f"{current}); pass version=<n> to roll back to a named version")
    return previous


@task(name="read-alias-history", cache_policy=NO_CACHE)
def read_alias_moves(model_name: str) -> list[AliasMove]:
    client = mlflow_client()
    return [as_alias_move(e) for e in read_alias_history(client, model_name)]


@task(name="find-unregistered-model", cache_policy=NO_CACHE)
def find_unregistered_model(model_name: str) -> tuple[str, str | None]:
    return newest_unregistered_model(mlflow_client(), model_name)


@task(name="list-model-versions", cache_policy=NO_CACHE)
def read_versions(model_name: str) -> list[VersionInfo]:
    client = mlflow_client()
    get_registered_model(client, model_name)
    return [version_info(client, mv) for mv in _existing_versions(client, model_name)]


def _check_run_has_model(client: MlflowClient, run, path: str, uri: str) -> None:
    """A run's model at `path`: an artifact folder, or (MLflow 3) a logged model of that name."""
    if client.list_artifacts(run.info.run_id, path):
        return
    logged = client.search_logged_models([run.info.experiment_id], max_results=100,
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    if any(lm.name == path for lm in logged):
        return
    names = sorted({lm.name for lm in logged})
    raise RegistryError(f"run {run.info.run_id} logged no model named {path!r} ({uri!r}); "
                        f"its logged models: {names or 'none'} (pass model_uri=runs:/"
                        f"{run.info.run_id}/<name>, or models:/<model id>)")


@task(name="check-model-source", cache_policy=NO_CACHE)
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
            source_run, _, path = uri[len("runs:/"):].partition("/")
            run = client.get_run(source_run)
            _check_run_has_model(client, run, path or "model", uri)
        elif uri.startswith("models:/m-"):
            client.get_logged_model(uri[len("models:/"):].split("/")[0])
    except MlflowException as exc:
        raise RegistryError(f"model source {uri!r} does not exist in MLflow "
                            f"({exc.error_code}); log the model first") from None
    return uri
