"""Registry flows: register, promote, roll back, list and compare versions, alias history, audit."""
from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.parameters import DataRef, data_flow
from tasks.audit import AuditReport, publish_audit, run_audit
from tasks.comparison import Comparison, compare_recorded, score_version, scores_table
from tasks.events import emit_model_event
from tasks.registry import (AliasMove, VersionInfo, check_model_source, find_previous_champion,
                            find_version, model_slug, promote_alias, read_alias_moves, read_versions,
                            register_version, validate_model_name)
from tasks.training import load_data

Stage = Literal["champion", "challenger", "Production", "Staging"]


@flow(name="register-model")
def register_model(model_name: str, model_uri: str | None = None, run_id: str | None = None,
                   description: str = "", metrics: dict[str, float] | None = None,
                   tags: dict[str, str] | None = None) -> VersionInfo:
    """Register a logged model as a new version of a registered model (created if new).
    Registering the same source again returns the existing version.

    Args:
        model_name: Registered model the version belongs to, e.g. customer_churn.
        model_uri: The logged model, e.g. runs:/<run_id>/model or models:/m-<id>; empty: the
            model of run_id.
        run_id: MLflow run that logged the model (its `model` artifact).
        description: Shown with the version in MLflow.
        metrics: Numbers to record with the version, e.g. {"accuracy": 0.92}.
        tags: Version tags to set, e.g. {"team": "growth"}.
    """
    validate_model_name(model_name)
    uri = check_model_source(model_uri, run_id)
    return register_version(model_name, uri, run_id, description, tags or {}, metrics or {})


@flow(name="promote-model")
def promote_model(model_name: str, version: int | str, stage: Stage = "champion",
                  reason: str = "") -> VersionInfo:
    """Point `champion` (the guide's Production) or `challenger` (Staging) at a version; every
    move is recorded in the alias history.

    Args:
        model_name: Registered model.
        version: A version number or an alias (champion, challenger, Production, Staging).
        stage: champion or Production; challenger or Staging.
        reason: Why (recorded in the alias history and the event).
    """
    target = find_version(model_name, version)
    info = promote_alias(model_name, target.version, stage, reason)
    emit_model_event(model_name, "mlops.model.promoted",
                     {"version": info.version, "stage": stage, "reason": reason})
    _publish_aliases(model_name, f"v{info.version} promoted to {stage}: {reason or 'no reason given'}")
    return info


@flow(name="rollback-model")
def rollback_model(model_name: str, version: int | str | None = None, reason: str = "") -> VersionInfo:
    """Make the previous champion (or a named version) champion again.

    Args:
        model_name: Registered model.
        version: The version to make champion; empty: the champion before the current one.
        reason: Why (recorded in the alias history and the event).
    """
    validate_model_name(model_name)
    target = find_version(model_name, version if version is not None else find_previous_champion(model_name))
    info = promote_alias(model_name, target.version, "champion", reason or "rollback", kind="rollback")
    emit_model_event(model_name, "mlops.model.rolled-back", {"version": info.version, "reason": reason})
    _publish_aliases(model_name, f"rolled back to v{info.version}: {reason or 'no reason given'}")
    return info


@flow(name="list-versions")
def list_versions(model_name: str) -> list[VersionInfo]:
    """Every version of a model, newest first, with aliases, semver, metrics and tags.

    Args:
        model_name: Registered model.
    """
    return read_versions(model_name)


@flow(name="alias-history")
def alias_history(model_name: str) -> list[AliasMove]:
    """Every move of the model's aliases ever made, oldest first: which alias, from and to which
    version, when, why, and what moved it (promote, rollback, retraining, ab-conclude).

    Args:
        model_name: Registered model name, e.g. customer_churn.
    """
    validate_model_name(model_name)
    return read_alias_moves(model_name)


@flow(name="audit-registry")
def audit_registry(model_name: str, repair: bool = False) -> AuditReport:
    """Check that what MLflow holds for a model agrees with what mlops-flows recorded: aliases
    point at existing versions, replaying the alias history gives the current aliases, every
    version's model files and stored schema / profile / row fingerprints are there, and no model
    source was registered twice. Findings name the version and the fix; the run still completes
    (read `ok`). Markdown artifact `audit-<model>`.

    Args:
        model_name: Registered model name, e.g. customer_churn.
        repair: Record aliases moved outside mlops-flows where they are now (a history entry of
            kind audit-repair), so that alias_history and rollback agree with the registry.
            Nothing else is changed.
    """
    validate_model_name(model_name)
    report = run_audit(model_name, repair)
    publish_audit(report)
    return report


@data_flow(name="compare-versions", persist_result=True)
def compare_versions(model_name: str, version_a: int | str, version_b: int | str,
                     data: DataRef | None = None) -> Comparison:
    """Recorded metric and parameter differences (b − a); with data, both versions scored on
    the same rows against the target they were trained on.

    Args:
        model_name: Registered model.
        version_a: A version number or an alias.
        version_b: A version number or an alias.
        data: Labelled rows to score both on: a csv/parquet path or s3:// URI (a DataFrame from
            Python); empty: recorded metrics only.
    """
    comparison = compare_recorded(model_name, version_a, version_b)
    if data is not None:
        loaded = load_data(data)
        scores = {str(v): score_version(model_name, v, loaded)
                  for v in (comparison.version_a, comparison.version_b)}
        comparison.scores_on_data = scores
        comparison.n_rows = len(loaded.frame)
        create_table_artifact(key=f"compare-{model_slug(model_name)}", table=scores_table(scores),
                              description=f"{model_name}: v{comparison.version_a} vs "
                                          f"v{comparison.version_b} on {len(loaded.frame)} rows")
    return comparison


def _publish_aliases(model_name: str, headline: str) -> None:
    versions = read_versions.fn(model_name)
    rows = "\n".join(f"| v{v.version} | {', '.join(v.aliases) or '—'} | {v.semver or ''} | "
                     f"{v.description[:60]} |" for v in versions[:10])
    create_markdown_artifact(
        key=f"registry-{model_slug(model_name)}",
        markdown=f"## {model_name}\n\n{headline}\n\n| version | aliases | semver | description |\n"
                 f"|---|---|---|---|\n{rows}\n",
        description=headline)
