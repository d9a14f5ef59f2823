"""What the /metrics gauges show, read from MLflow (the source of truth): plain functions.

A gauge set inside a flow process never reaches the REST service, so the service reads what the
flows recorded:

* drift score of a model's champion -- the ``drift_score`` metric of the newest ``check_drift``
  run of that version (tags ``mlops.kind=drift-check``, ``mlops.model_name``,
  ``mlops.model_version``; tasks/drift.py ``record_drift_check``);
* its production quality -- the newest ``evaluate_production`` run of that version
  (``mlops.kind=production-evaluation``; metrics ``production_<metric>``, tasks/drift.py
  ``record_evaluation``): ``production_accuracy`` for classifiers, for regressors the version's
  primary metric (its ``mlops.metric`` tag, else rmse);
* retraining decisions -- every retraining run (``mlops.kind=retraining``, tag
  ``mlops.decision``; tasks/retraining.py ``record_retraining``), what ``retraining_history``
  lists, counted per model and decision.

A/B outcomes are not used as an accuracy: they measure the business outcome of a test
(conversion or a continuous value per entity), not whether the model's predictions were right, so
a model without an ``evaluate_production`` run simply has no accuracy sample.

:func:`read_monitoring_snapshot` costs one listing of the registered models (with their aliases),
one search over all models' newest drift checks and one over their evaluations (plus a search of
its own for a champion not among the newest runs, and a version lookup per regressor), and one
search for all retraining runs (the api/ collector caches it; bench/monitoring.py measures it).
"""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

DRIFT_KIND = "drift-check"                # tasks/drift.py record_drift_check
EVALUATION_KIND = "production-evaluation"  # tasks/drift.py record_evaluation
RETRAINING_KIND = "retraining"            # tasks/retraining.py HISTORY_KIND
REGRESSION_DEFAULT_METRIC = "rmse"        # tasks/training_search.py DEFAULT_METRIC["regression"]


@dataclass
class ModelFigures:
    """The newest recorded figures of one model's champion."""

    model_name: str
    version: int
    drift_score: float | None = None
    drift_run_id: str | None = None
    drift_at: datetime | None = None
    accuracy: float | None = None  # classifiers
    score_metric: str | None = None  # regressors: the primary metric ...
    score: float | None = None       # ... and its production value
    evaluation_run_id: str | None = None
    evaluated_at: datetime | None = None


@dataclass
class MonitoringSnapshot:
    models: list[ModelFigures] = field(default_factory=list)
    retraining_runs: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, decision)
    read_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    duration_s: float = 0.0


def _when(run) -> datetime:
    return datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc)


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _newest(client: MlflowClient, experiment_ids: list[str], kind: str, model_name: str,
            version: int):
    runs = client.search_runs(
        experiment_ids,
        f"tags.`mlops.kind` = '{kind}' AND tags.`mlops.model_name` = '{_quote(model_name)}' "
        f"AND tags.`mlops.model_version` = '{version}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def all_experiment_ids(client: MlflowClient) -> list[str]:
    ids, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        ids += [e.experiment_id for e in page]
        token = page.token
        if not token:
            return ids


def champions(client: MlflowClient) -> list[tuple[str, int]]:
    """(model, champion version) of every registered model with a champion. The listing carries
    the aliases on the SQL stores; a model listed without any alias is asked directly."""
    found, token = [], None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        for model in page:
            aliases = dict(model.aliases or {})
            if "champion" in aliases:
                found.append((model.name, int(aliases["champion"])))
            elif not aliases:
                try:
                    found.append((model.name,
                                  int(client.get_model_version_by_alias(model.name,
                                                                         "champion").version)))
                except MlflowException as exc:
                    if exc.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
                        raise  # anything but "no such alias / model" is an MLflow problem
        token = page.token
        if not token:
            return found


def newest_runs(client: MlflowClient, experiment_ids: list[str], kind: str,
                champions_: dict[str, int], page_size: int, max_pages: int = 3,
                workers: int = 4) -> dict[str, object]:
    """model -> the newest run of `kind` recorded for its champion version.

    One search over every model's runs of that kind, newest first, up to `max_pages` pages of
    `page_size`: with checks made regularly, every champion's newest run is on the first page.
    Champions not found there (never checked lately) get a search of their own (`workers` at a
    time); when the search runs out of runs first, the missing champions have none."""
    found: dict[str, object] = {}
    token, exhausted = None, False
    for _ in range(max_pages):
        page = client.search_runs(experiment_ids, f"tags.`mlops.kind` = '{kind}'",
                                  order_by=["attributes.start_time DESC"],
                                  max_results=page_size, page_token=token)
        for run in page:
            name = run.data.tags.get("mlops.model_name")
            if (name in champions_ and name not in found
                    and run.data.tags.get("mlops.model_version") == str(champions_[name])):
                found[name] = run
        token = page.token
        if not token:
            exhausted = True
            break
        if len(found) == len(champions_):
            break
    missing = [n for n in champions_ if n not in found]
    if missing and not exhausted:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            runs = pool.map(lambda n: _newest(client, experiment_ids, kind, n, champions_[n]),
                            missing)
            found.update({n: r for n, r in zip(missing, runs) if r is not None})
    return found


def champion_figures(client: MlflowClient, model_name: str, version: int, drift, evaluation
                     ) -> ModelFigures:
    """Shape the newest drift check and production evaluation of one champion version."""
    figures = ModelFigures(model_name=model_name, version=version)
    if drift is not None and "drift_score" in drift.data.metrics:
        figures.drift_score = float(drift.data.metrics["drift_score"])
        figures.drift_run_id, figures.drift_at = drift.info.run_id, _when(drift)
    if evaluation is not None:
        metrics = evaluation.data.metrics
        figures.evaluation_run_id, figures.evaluated_at = evaluation.info.run_id, _when(evaluation)
        if "production_accuracy" in metrics:
            figures.accuracy = float(metrics["production_accuracy"])
        else:  # a regressor: its primary metric, named by the version's tag
            tags = client.get_model_version(model_name, str(version)).tags or {}
            metric = tags.get("mlops.metric") or REGRESSION_DEFAULT_METRIC
            if f"production_{metric}" in metrics:
                figures.score_metric, figures.score = metric, float(metrics[f"production_{metric}"])
    return figures


def retraining_counts(client: MlflowClient, experiment_ids: list[str]
                      ) -> dict[tuple[str, str], int]:
    """Retraining runs per (model, decision), over the whole history in MLflow."""
    counts: Counter = Counter()
    token = None
    while True:
        page = client.search_runs(experiment_ids, f"tags.`mlops.kind` = '{RETRAINING_KIND}'",
                                  max_results=1000, page_token=token)
        for run in page:
            tags = run.data.tags
            model, decision = tags.get("mlops.model_name"), tags.get("mlops.decision")
            if model and decision:
                counts[(model, decision)] += 1
        token = page.token
        if not token:
            return dict(counts)


def read_monitoring_snapshot(client: MlflowClient | None = None, workers: int = 4,
                             page_size: int | None = None) -> MonitoringSnapshot:
    """Every champion's newest drift score and production quality, and the retraining counts,
    read from MLflow. `page_size` (default: twice the number of champions, at least 50) is the
    page of the searches over all models' runs; `workers` searches run at a time for the
    champions not found there. MLflow errors propagate."""
    if client is None:
        from tasks.registry import mlflow_client

        client = mlflow_client()
    started = time.monotonic()
    experiments = all_experiment_ids(client)
    if not experiments:
        return MonitoringSnapshot(duration_s=time.monotonic() - started)
    holders = dict(champions(client))
    size = page_size or max(50, 2 * len(holders))
    drift, evaluations = ({}, {}) if not holders else (
        newest_runs(client, experiments, DRIFT_KIND, holders, size, workers=workers),
        newest_runs(client, experiments, EVALUATION_KIND, holders, size, workers=workers))
    models = [champion_figures(client, name, version, drift.get(name), evaluations.get(name))
              for name, version in sorted(holders.items())]
    counts = retraining_counts(client, experiments)
    return MonitoringSnapshot(models=models, retraining_runs=counts,
                              duration_s=time.monotonic() - started)
