"""train_model: load → validate → search (one task per trial) → choose the family → refit and
log → register → set aliases: the MLOps deployment guide's `orchestrator.fit(X, y,
register_best_model=True, model_name=…)`."""
from __future__ import annotations

import time
from typing import Literal

from mlflow.exceptions import MlflowException
from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from blocks.mlflow_config import resolve_mlflow_config
from blocks.training_settings import resolve_training_settings
from flows.parameters import DataRef, data_flow
from tasks.errors import ConfigurationError, DataError
from tasks.registry import (alias_map, complete_registration, mlflow_client, model_slug,
                            promote_alias, register_version, registration_failed,
                            validate_model_name)
from tasks.training import (TrainResult, choose_family, cpu_workers, load_data,
                            prepare_training_data, refit_and_log, start_search, summarize_search,
                            trial_row)
from tasks.training_search import check_families
from tasks.trial_runner import trial_runner

SEARCH_SHARE = 0.7  # of time_budget_s; the rest is for the refit, the holdout and the logging


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
    max_trials: int | None = None,
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
        time_budget_s: Seconds for the search: it stops at 70% of it (or earlier once it has
            converged); the winner's two fits (search rows, then every row), the holdout
            scoring and the logging come after and are not cut. Ignored when max_trials is set.
        candidates: Families to search (linear, random_forest, extra_trees,
            hist_gradient_boosting); empty: all.
        random_state: Seed of the search, the splits and the models.
        promote: auto (the first version becomes champion, later ones challenger), always
            (champion), never (no alias).
        max_trials: Stop the search after this many trials (or earlier once it has converged),
            whatever time they take: the same data, random_state and trial width (the machine's
            cores, or the Dask cluster's worker threads) then give the same model. Empty: the
            time budget decides (more trials on an idle machine).
    """
    started = time.monotonic()
    logger = get_run_logger()
    validate_model_name(model_name)
    if not time_budget_s or time_budget_s <= 0:
        raise ConfigurationError(f"time_budget_s must be positive, got {time_budget_s}")

    if max_trials is not None and (isinstance(max_trials, bool) or max_trials < 1):
        raise ConfigurationError(f"max_trials must be a positive number of trials, got {max_trials}; "
                                 "leave it empty to let time_budget_s decide")
    check_families(candidates)

    loaded = load_data(data)
    prepared = prepare_training_data(loaded, target, task, metric, random_state)

    # The search: trials as Prefect tasks, on threads or on the Dask cluster the
    # TrainingSettings block names (tasks/trial_runner.py).
    budget_s = None if max_trials else time_budget_s * SEARCH_SHARE
    deadline = None if budget_s is None else started + budget_s
    with trial_runner(resolve_training_settings(), prepared.for_trials()) as trials:
        search = start_search(prepared, candidates, random_state, max_trials, deadline, trials.width)
        trials.run(search, random_state, deadline)
    summary = summarize_search(search, budget_s)
    ranked = search.ranked()
    if not ranked or ranked[0].mean is None or ranked[0].status not in ("complete", "deadline"):
        errors = "; ".join(f"{r.candidate.label}: {r.error or r.status}" for r in search.results)
        raise DataError(f"no configuration could be cross-validated ({errors}); raise "
                        "time_budget_s or check the data")
    # each family's best configuration, judged on the holdout rows as well as on its folds
    choice = choose_family(prepared, ranked, random_state)
    best = choice.chosen
    leaderboard = [trial_row(r, choice) for r in ranked]
    logger.info("search (%s): %s; chose %s: cv %s = %.4f; %s", trials.where, summary.describe(),
                best.candidate.label, prepared.metric, best.mean, choice.describe())

    logged = refit_and_log(prepared, best, model_name, random_state, leaderboard, summary)
    # Registration: the version (pending until its alias is moved), then the alias. MLflow going
    # away in between leaves no alias moved and a pending version the next registration deletes.
    try:
        version = register_version(
            model_name, logged.model_uri, logged.run_id,
            description=(f"{logged.family} for {prepared.schema.task} on "
                         f"{prepared.ref or 'a DataFrame'}; holdout {prepared.metric} "
                         f"{logged.holdout_metrics[prepared.metric]:.4f}"),
            tags={"mlops.family": logged.family, "mlops.target": target,
                  "mlops.task": prepared.schema.task, "mlops.metric": prepared.metric},
            schema_json=logged.input_schema, complete=False)
        alias = initial_alias(promote, "champion" in alias_map(mlflow_client(), model_name))
        if alias is not None:
            version = promote_alias(model_name, version.version, alias,
                                    reason=f"train_model promote={promote}")
        complete_registration(model_name, version.version)
    except MlflowException as exc:
        raise registration_failed(model_name, resolve_mlflow_config().tracking_uri, exc) from exc

    create_table_artifact(key=f"train-{model_slug(model_name)}", table=leaderboard,
                          description=f"Search for {model_name} v{version.version}: "
                                      f"{summary.describe()}")
    return TrainResult(
        model_name=model_name, version=version.version, run_id=logged.run_id, family=logged.family,
        metric=prepared.metric, score=logged.holdout_metrics[prepared.metric],
        aliases=version.aliases, semver=version.semver, model_uri=logged.model_uri,
        task=prepared.schema.task, cv_score=best.mean, holdout_metrics=logged.holdout_metrics,
        leaderboard=leaderboard, data_ref=prepared.ref, duration_s=round(time.monotonic() - started, 2),
        search=summary)
