"""Registry audit: is what MLflow holds for a model consistent with what mlops-flows recorded?

Run after anything went wrong (a killed worker, a store that went away mid-registration) and on a
schedule; the flow is `flows.registry.audit_registry`.

Checks, each finding naming the version or alias and what to do:

* ``alias-target``: every alias points at an existing version;
* ``alias-history``: replaying the recorded alias moves (one tag per move) gives the aliases the
  model has now -- an alias moved outside mlops-flows, or a move whose record was lost, breaks the
  rollback chain;
* ``model-files``: every version's model files can be listed and hold an ``MLmodel`` file;
* ``version-files``: files a version trained by ``train_model`` promises are stored: its input
  schema, drift profile and row fingerprints;
* ``duplicate-version``: two versions registered from the same model source (a registration that
  was retried after it had in fact succeeded);
* ``promotion-interrupted``: a retraining moved ``champion`` and died before verifying it (its
  intent is still recorded);
* ``registration-incomplete``: a version still tagged ``mlops.registration=pending`` whose flow
  run has ended (MLflow went away mid-registration, or the run was killed): its alias was never
  moved; the model's next registration deletes it.

The checks are plain functions on an MLflow client; `run_audit` / `publish_audit` are their tasks.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import PurePosixPath
from typing import Literal

from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.drift import PROFILE_NAME, PROFILE_RUN_TAG, SCHEMA_NAME
from tasks.registry import (REGISTERED_BY_TAG, abandoned_versions, alias_map,
                            get_registered_model, mlflow_client, model_slug, read_alias_history,
                            record_alias_move, validate_model_name)
from tasks.retraining import read_promotion_intent
from tasks.training import SEEN_ROWS_NAME

logger = logging.getLogger(__name__)

Check = Literal["alias-target", "alias-history", "model-files", "version-files",
                "duplicate-version", "promotion-interrupted", "registration-incomplete"]


class AuditFinding(BaseModel):
    check: Check
    version: int | None = None
    alias: str | None = None
    message: str


class AuditReport(BaseModel):
    model_name: str
    ok: bool
    versions: list[int] = Field(default_factory=list, description="versions audited, newest first")
    aliases: dict[str, int] = Field(default_factory=dict)
    moves_replayed: int = 0
    findings: list[AuditFinding] = Field(default_factory=list)
    audited_at: datetime


def replay_aliases(history: list[dict]) -> dict[str, int]:
    """alias -> version after applying every recorded move in order (a move to None removes)."""
    aliases: dict[str, int] = {}
    for move in history:
        if move.get("to") is None:
            aliases.pop(move["alias"], None)
        else:
            aliases[move["alias"]] = int(move["to"])
    return aliases


def alias_findings(current: dict[str, int], replayed: dict[str, int],
                   versions: set[int]) -> list[AuditFinding]:
    findings = [AuditFinding(check="alias-target", alias=alias, version=version,
                             message=f"alias {alias!r} points at version {version}, which does "
                                     f"not exist; move it with promote_model or rollback_model")
                for alias, version in sorted(current.items()) if version not in versions]
    for alias in sorted(set(current) | set(replayed)):
        now, recorded = current.get(alias), replayed.get(alias)
        if now == recorded or (now is None and recorded not in versions):
            continue  # a version deleted by retention takes its aliases with it
        if recorded is None:
            what = f"is on version {now} but no recorded move put it there"
        elif now is None:
            what = f"is not set, but the recorded moves leave it on version {recorded}"
        else:
            what = f"is on version {now}, but the recorded moves leave it on version {recorded}"
        findings.append(AuditFinding(
            check="alias-history", alias=alias, version=now,
            message=f"alias {alias!r} {what} (moved outside mlops-flows, or a move was not "
                    "recorded); promote the right version with promote_model, or keep the alias "
                    "where it is and record that with audit_registry(..., repair=True)"))
    return findings


def _listing(location: str) -> set[str] | None:
    """File names directly under an artifact location; None when it cannot be listed."""
    import mlflow

    try:
        return {PurePosixPath(f.path).name for f in
                mlflow.artifacts.list_artifacts(artifact_uri=location)}
    except (MlflowException, OSError) as exc:
        logger.info("cannot list %s: %s", location, exc)
        return None


def _model_files(client, mv) -> AuditFinding | None:
    version = int(mv.version)
    try:
        location = client.get_model_version_download_uri(mv.name, mv.version)
    except MlflowException as exc:
        return AuditFinding(check="model-files", version=version,
                            message=f"version {version}: MLflow cannot locate its model files "
                                    f"({exc}); register the model again")
    files = _listing(location)
    if not files or "MLmodel" not in files:
        return AuditFinding(check="model-files", version=version,
                            message=f"version {version}: no MLmodel file at {location} (files "
                                    f"deleted or the artifact store unreachable); register the "
                                    "model again from its training run")
    return None


def _run(client, run_id: str | None):
    try:
        return client.get_run(run_id) if run_id else None
    except MlflowException:
        return None


def _version_files(client, mv) -> list[AuditFinding]:
    """Files a version trained by train_model stores under its run's ``mlops/`` folder: the input
    schema and the drift profile (version tag ``mlops.schema_sha``; a profile made later by
    profile_model lives in the run the version's ``mlops.profile_run_id`` names) and the row
    fingerprints (run tag ``mlops.data_rows``)."""
    version, tags = int(mv.version), dict(mv.tags or {})
    if "mlops.schema_sha" not in tags and PROFILE_RUN_TAG not in tags:
        return []  # registered from outside train_model: nothing promised
    run = _run(client, mv.run_id)
    if run is None:
        return [AuditFinding(check="version-files", version=version,
                             message=f"version {version}: its run {mv.run_id} is gone, and with "
                                     "it the schema, profile and row fingerprints; retrain or "
                                     "delete the version")]
    expected = []  # (run, file, what it is, how to get it back)
    if "mlops.schema_sha" in tags:
        expected.append((run, SCHEMA_NAME, "input schema", "retrain to store it again"))
    if "mlops.data_rows" in run.data.tags:
        expected.append((run, SEEN_ROWS_NAME, "row fingerprints", "retrain to store them again"))
    profile_run = _run(client, tags.get(PROFILE_RUN_TAG)) if PROFILE_RUN_TAG in tags else run
    if profile_run is None:
        return [AuditFinding(check="version-files", version=version,
                             message=f"version {version}: the run {tags[PROFILE_RUN_TAG]} holding "
                                     "its drift profile is gone; create it again with "
                                     "profile_model(..., overwrite=True)")]
    expected.append((profile_run, PROFILE_NAME, "drift profile",
                     "create it with profile_model(..., overwrite=True)"))
    listed: dict[str, set[str]] = {}
    findings = []
    for holder, name, what, fix in expected:
        rid = holder.info.run_id
        if rid not in listed:
            listed[rid] = _listing(f"{holder.info.artifact_uri}/mlops") or set()
        if name not in listed[rid]:
            findings.append(AuditFinding(
                check="version-files", version=version,
                message=f"version {version}: its {what} (mlops/{name} of run {rid}) is missing; "
                        f"{fix}"))
    return findings


def duplicate_findings(sources: dict[int, str | None]) -> list[AuditFinding]:
    by_source: dict[str, list[int]] = {}
    for version, source in sources.items():
        if source:
            by_source.setdefault(source, []).append(version)
    return [AuditFinding(check="duplicate-version", version=max(vs),
                         message=f"versions {sorted(vs)} were registered from the same model "
                                 f"{source}; keep one (a retried registration made a copy)")
            for source, vs in sorted(by_source.items()) if len(vs) > 1]


def audit_model(client, model_name: str, repair: bool = False) -> AuditReport:
    """Every check above on one registered model (raises ModelNotFoundError for an unknown one).

    ``repair``: for each ``alias-history`` finding, record the alias as it is now (a move of kind
    ``audit-repair`` from the version the history had), so that history, rollback and registry
    agree again; the repaired findings are not reported. Nothing else is changed."""
    validate_model_name(model_name)
    model = get_registered_model(client, model_name)
    versions = sorted(client.search_model_versions(f"name='{model_name}'"),
                      key=lambda mv: -int(mv.version))
    numbers = [int(mv.version) for mv in versions]
    current = alias_map(client, model_name)
    history = read_alias_history(client, model_name)
    replayed = replay_aliases(history)
    findings = alias_findings(current, replayed, set(numbers))
    if repair:
        for f in [f for f in findings if f.check == "alias-history"]:
            record_alias_move(client, model, f.alias, replayed.get(f.alias),
                              current.get(f.alias), "audit_registry(repair=True): the registry "
                              "had it so", "audit-repair")
            findings.remove(f)
    for mv in versions:
        missing = _model_files(client, mv)
        findings += [missing] if missing else []
        findings += _version_files(client, mv)
    findings += duplicate_findings({int(mv.version): (mv.tags or {}).get("mlops.source")
                                    for mv in versions})
    for mv in abandoned_versions(client, model_name):
        findings.append(AuditFinding(
            check="registration-incomplete", version=int(mv.version),
            message=f"version {mv.version} was created by flow run "
                    f"{(mv.tags or {}).get(REGISTERED_BY_TAG, '(none recorded)')}, which ended "
                    "before its registration finished (no alias was moved for it); the model's "
                    "next train_model or register_model deletes it, or delete it yourself with "
                    f"MlflowClient().delete_model_version({model_name!r}, {mv.version!r})"))
    intent = read_promotion_intent(client, model_name)
    if intent is not None:
        findings.append(AuditFinding(
            check="promotion-interrupted", version=intent.get("to"), alias="champion",
            message=f"a retraining (flow run {intent.get('flow_run_id')}) moved champion from "
                    f"v{intent.get('from')} to v{intent.get('to')} at {intent.get('at')} and has "
                    "not verified it; unless that run is still going, it died: the model's next "
                    "retrain_model undoes it first, or roll back now with rollback_model"))
    return AuditReport(model_name=model_name, ok=not findings, versions=numbers, aliases=current,
                       moves_replayed=len(history), findings=findings,
                       audited_at=datetime.now(timezone.utc))


def audit_markdown(report: AuditReport) -> str:
    verdict = "clean" if report.ok else f"{len(report.findings)} finding(s)"
    aliases = ", ".join(f"{a} → v{v}" for a, v in sorted(report.aliases.items())) or "none"
    lines = [f"## Registry audit: {report.model_name} — {verdict}", "",
             f"- versions: {', '.join(f'v{v}' for v in report.versions) or 'none'}",
             f"- aliases: {aliases} ({report.moves_replayed} recorded moves replayed)"]
    if report.findings:
        lines += ["", "| check | version | alias | finding |", "|---|---|---|---|"]
        lines += [f"| {f.check} | {f.version if f.version is not None else ''} | {f.alias or ''} | "
                  f"{f.message} |" for f in report.findings]
    return "\n".join(lines) + "\n"


@task(name="audit-registry", cache_policy=NO_CACHE)
def run_audit(model_name: str, repair: bool = False) -> AuditReport:
    return audit_model(mlflow_client(), model_name, repair)


@task(name="publish-audit", cache_policy=NO_CACHE)
def publish_audit(report: AuditReport) -> str:
    from prefect.artifacts import create_markdown_artifact

    key = f"audit-{model_slug(report.model_name)}"
    create_markdown_artifact(key=key, markdown=audit_markdown(report),
                             description=f"{report.model_name}: registry audit "
                                         f"{'clean' if report.ok else 'found problems'}")
    return key
