"""train_model: load → validate → search (one task per candidate) → refit and log → register →
set aliases: the MLOps deployment guide's `orchestrator.fit(X, y, register_best_model=True,
model_name=…)`."""
from __future__ import annotations

import time
from typing import Literal

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.parameters import DataRef, data_flow
from tasks.errors import ConfigurationError, DataError
from tasks.registry import (alias_map, mlflow_client, model_slug, promote_alias, register_version,
                            validate_model_name)
from tasks.training import (FIRST_ROUND_ROWS, N_FOLDS, TrainResult, cpu_workers, evaluate_candidate,
                            load_data, prepare_training_data, refit_and_log)
from tasks.training_search import candidate_grid, merge_rounds, rank

SEARCH_SHARE = 0.7  # of time_budget_s; the rest is the refit, the holdout and the logging


def initial_alias(promote: str, has_champion: bool) -> str | None:
    """auto: the first version becomes champion, later ones challenger."""
    if promote == "always":
        return "champion"
    if promote == "never":
        return None
    return "challenger" if has_champion else "champion"


@data_flow(name="train-model", task_runner=ThreadPoolTaskRunner(max_workers=cpu_workers()),
           log_prints=True, persist_result=True)
def train_model(
    data: DataRef,
    target: str,
    model_name: str,
    task: Literal["auto", "binary", "multiclass", "regression"] = "auto",
    metric: str | None = None,
    time_budget_s: float = 60,
    candidates: list[str] | None = None,
    random_state: int = 0,
    promote: Literal["auto", "always", "never"] = "auto",
) -> TrainResult:
    """Train the best of several exportable model families and register it in MLflow.

    Args:
        data: Labelled rows: a csv/parquet path or an s3://bucket/key URI (read through a saved
            S3Bucket block); a DataFrame from Python.
        target: Column to predict.
        model_name: Registered model the new version belongs to (created if new).
        task: binary, multiclass or regression; auto: inferred from the target.
        metric: Metric to select by (roc_auc, accuracy, balanced_accuracy, f1_macro, log_loss,
            rmse, mae, r2); empty: the task's default.
        time_budget_s: Seconds for the whole call; the search gets 70% of it.
        candidates: Families to search (linear, random_forest, hist_gradient_boosting); empty:
            all.
        random_state: Seed of the splits and the models.
        promote: auto (the first version becomes champion, later ones challenger), always
            (champion), never (no alias).
    """
    started = time.monotonic()
    logger = get_run_logger()
    validate_model_name(model_name)
    if not time_budget_s or time_budget_s <= 0:
        raise ConfigurationError(f"time_budget_s must be positive, got {time_budget_s}")

    loaded = load_data(data)
    prepared = prepare_training_data(loaded, target, task, metric, random_state)
    grid = candidate_grid(prepared.schema.task, candidates)
    search_deadline = started + time_budget_s * SEARCH_SHARE

    # Successive halving: every candidate on a subsample first, the better half on all rows.
    n_all = len(prepared.X)
    n_first = min(n_all, FIRST_ROUND_ROWS)
    round_one = [evaluate_candidate.submit(c, prepared, n_first, 3 if n_first < n_all else N_FOLDS,
                                           random_state, search_deadline) for c in grid]
    results = [f.result() for f in round_one]
    ranked = rank(results)
    if n_first < n_all and ranked and time.monotonic() < search_deadline:
        finalists = [r.candidate for r in ranked[: max(1, (len(ranked) + 1) // 2)]]
        round_two = [evaluate_candidate.submit(c, prepared, n_all, N_FOLDS, random_state,
                                               search_deadline) for c in finalists]
        ranked = merge_rounds(ranked, [f.result() for f in round_two])
    if not ranked:
        errors = "; ".join(f"{r.candidate.label}: {r.error or 'out of time'}" for r in results)
        raise DataError(f"no candidate could be evaluated ({errors}); raise time_budget_s or "
                        "check the data")
    best = ranked[0]
    leaderboard = [{"candidate": r.candidate.label, "family": r.candidate.family,
                    prepared.metric: r.mean, "folds": len(r.scores), "seconds": round(r.fit_seconds, 2)}
                   for r in ranked]
    logger.info("best candidate %s: cv %s = %.4f", best.candidate.label, prepared.metric, best.mean)

    logged = refit_and_log(prepared, best, model_name, random_state,
                           leaderboard)
    version = register_version(
        model_name, logged.model_uri, logged.run_id,
        description=(f"{logged.family} for {prepared.schema.task} on {prepared.ref or 'a DataFrame'};"
                     f" holdout {prepared.metric} {logged.holdout_metrics[prepared.metric]:.4f}"),
        tags={"mlops.family": logged.family, "mlops.target": target, "mlops.task": prepared.schema.task,
              "mlops.metric": prepared.metric},
        schema_json=logged.input_schema)

    alias = initial_alias(promote, "champion" in alias_map(mlflow_client(), model_name))
    if alias is not None:
        version = promote_alias(model_name, version.version, alias, reason=f"train_model promote={promote}")

    create_table_artifact(key=f"train-{model_slug(model_name)}", table=leaderboard,
                          description=f"Candidates searched for {model_name} v{version.version}")
    return TrainResult(
        model_name=model_name, version=version.version, run_id=logged.run_id, family=logged.family,
        metric=prepared.metric, score=logged.holdout_metrics[prepared.metric],
        aliases=version.aliases, semver=version.semver, model_uri=logged.model_uri,
        task=prepared.schema.task, cv_score=best.mean, holdout_metrics=logged.holdout_metrics,
        leaderboard=leaderboard, data_ref=prepared.ref, duration_s=round(time.monotonic() - started, 2))
