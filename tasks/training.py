"""Training tasks: prepare the data, cross-validate one search trial, refit and log the best."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from blocks.mlflow_config import resolve_mlflow_config
from tasks.data import LoadedData, load_table, validate_training_frame
from tasks.errors import DataError
from tasks.training_search import (PlannedTrial, Schema, Search, TrialResult, build_pipeline,
                                   check_families, choose_finalist, cross_validate, cv_repeats,
                                   evaluate_metrics, family_finalists, final_params,
                                   fit_reproducibly, greater_is_better, infer_schema,
                                   permutation_importance_by_column, prepare_features,
                                   refit_params, resolve_metric, row_fingerprints, score_model)

N_FOLDS = 5
HOLDOUT_SHARE = 0.2
HOLDOUT_MAX_ROWS = 5000  # rows of the holdout stored with the version (labels included)
IMPORTANCE_ROWS = 600  # holdout rows used for permutation importances
SEEN_ROWS_NAME = "seen_rows.npy"  # fingerprints of the labelled rows a version was given
# skops refuses unknown types at load; these are the ones our three families are made of.
REVIEWED_TYPE_PREFIXES = ("sklearn.", "numpy.", "builtins.", "collections.")


class SearchSummary(BaseModel):
    """How the search went: what the leaderboard's heading says."""

    trials: int
    completed: int
    pruned: int
    cut: int = Field(0, description="trials stopped by the search's deadline or their time cap, "
                                    "ranked on the folds they finished")
    failed: int = Field(0, description="trials whose configuration could not be fit")
    stop_reason: str = Field(description="max_trials, converged or budget")
    seconds: float
    budget_s: float | None = Field(None, description="the search's share of time_budget_s; "
                                                      "None when max_trials decides")
    max_trials: int | None = None

    def describe(self) -> str:
        if self.stop_reason == "max_trials":
            why = f"stopped after max_trials={self.max_trials}"
        elif self.stop_reason == "budget":
            why = f"stopped at its budget of {self.budget_s:.1f} s"
        else:
            why = "stopped early: converged"
        counts = [f"{self.completed} complete", f"{self.pruned} pruned"]
        counts += [f"{n} {what}" for n, what in ((self.cut, "cut at the time limit"),
                                                 (self.failed, "failed")) if n]
        return f"{self.trials} trials ({', '.join(counts)}) in {self.seconds:.1f} s; {why}"


class TrainResult(BaseModel):
    model_name: str
    version: int
    run_id: str
    family: str
    metric: str
    score: float = Field(description="holdout score in `metric` of the chosen configuration "
                                     "fit without the holdout (the registered model is then "
                                     "refit on every row); the holdout also helped choose among "
                                     "the families' best configurations")
    aliases: list[str] = Field(default_factory=list)
    semver: str | None = None
    model_uri: str | None = None
    task: str | None = None
    cv_score: float | None = None
    holdout_metrics: dict[str, float] = Field(default_factory=dict)
    leaderboard: list[dict] = Field(default_factory=list)
    data_ref: str | None = None
    duration_s: float | None = None
    search: SearchSummary | None = None


@dataclass
class TrainingData:
    """What the search and the refit work on (kept in the flow's process, never persisted)."""

    X: pd.DataFrame
    y: pd.Series
    X_holdout: pd.DataFrame
    y_holdout: pd.Series
    schema: Schema
    metric: str
    ref: str | None
    sha256: str
    n_rows: int = 0  # rows of the data received (training split + holdout)
    seen_rows: np.ndarray | None = None  # row_fingerprints of every row received

    def for_trials(self) -> "TrialData":
        return TrialData(self.X, self.y, self.schema, self.metric)


@dataclass
class TrialData:
    """What a search trial needs and no more: it is copied to every process that runs trials."""

    X: pd.DataFrame
    y: pd.Series
    schema: Schema
    metric: str

    @property
    def cv_repeats(self) -> int:
        return cv_repeats(len(self.X), self.schema.encoded_columns)


@task(name="load-data", cache_policy=NO_CACHE)
def load_data(data) -> LoadedData:
    return load_table(data)


@task(name="prepare-training-data", cache_policy=NO_CACHE)
def prepare_training_data(loaded: LoadedData, target: str, task_kind: str, metric: str | None,
                          random_state: int) -> TrainingData:
    frame = loaded.frame
    resolved = validate_training_frame(frame, target, task_kind, N_FOLDS)
    metric_name = resolve_metric(metric, resolved)
    schema = infer_schema(frame, target, resolved)
    X = prepare_features(frame, schema)
    y = frame[target]
    if X.empty or all(X[c].isna().all() for c in X.columns):
        raise DataError("every feature column is empty; nothing to learn from")
    stratify = y if resolved != "regression" else None
    try:
        X_tr, X_ho, y_tr, y_ho = train_test_split(X, y, test_size=HOLDOUT_SHARE,
                                                  random_state=random_state, stratify=stratify)
    except ValueError as exc:
        raise DataError(f"cannot split off a holdout: {exc}; collect more rows per class") from exc
    validate_training_frame(pd.concat([X_tr, y_tr], axis=1), target, resolved, N_FOLDS)
    return TrainingData(X_tr, y_tr, X_ho, y_ho, schema, metric_name, loaded.ref, loaded.sha256,
                        n_rows=len(frame), seen_rows=row_fingerprints(frame, schema))


def start_search(data: TrainingData, families: list[str] | None, random_state: int,
                 max_trials: int | None, deadline: float | None, batch_size: int) -> Search:
    """The Optuna study of one train_model call (batches as wide as the trial runner)."""
    return Search(data.schema.task, data.metric, check_families(families), random_state,
                  batch_size=batch_size, max_trials=max_trials, deadline=deadline,
                  encoded_columns=data.schema.encoded_columns)


@task(name="cross-validate-trial", cache_policy=NO_CACHE,
      task_run_name="trial-{planned.number}-{planned.candidate.family}")
def evaluate_trial(planned: PlannedTrial, data: TrialData, random_state: int,
                   deadline_epoch: float | None) -> TrialResult:
    """k-fold cross-validation of one configuration, pruned on early folds when it is bad.
    The deadline is wall-clock time (time.time()): the trial may run in another process or on
    another machine, where the flow's monotonic clock means nothing."""
    deadline = None if deadline_epoch is None else time.monotonic() + (deadline_epoch - time.time())
    result = cross_validate(planned.number, planned.candidate, data.X, data.y, data.schema,
                            data.metric, N_FOLDS, random_state, deadline, planned.should_prune,
                            data.cv_repeats, planned.time_cap_s)
    result.worker = where_running()
    return result


def where_running() -> str:
    """The Dask worker's address inside a Dask worker, else this host and process."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"{platform.node()} pid {os.getpid()}"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def library_versions() -> dict[str, str]:
    import mlflow
    import numpy
    import prefect
    import sklearn

    return {"python": platform.python_version(), "scikit-learn": sklearn.__version__,
            "pandas": pd.__version__, "numpy": numpy.__version__, "mlflow": mlflow.__version__,
            "prefect": prefect.__version__}


def model_requirements() -> list[str]:
    """What a scikit-learn pipeline of ours needs to load elsewhere, pinned to what trained it."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in
            ("scikit-learn", "numpy", "scipy", "pandas", "skops", "mlflow")]


def trusted_types(model) -> list[str]:
    import skops.io

    found = skops.io.get_untrusted_types(data=skops.io.dumps(model))
    unexpected = [t for t in found if not t.startswith(REVIEWED_TYPE_PREFIXES)]
    if unexpected:
        raise RuntimeError(f"refusing to save a model with unreviewed types {unexpected}")
    return found


@dataclass
class FamilyChoice:
    """The configuration train_model registers, and each family finalist's holdout score."""

    chosen: TrialResult
    holdout_scores: dict[int, float | None]  # trial number -> score on the holdout rows

    def describe(self) -> str:
        if not self.holdout_scores:
            return "one family: no choice to make"
        scores = ", ".join(f"trial {n}: {'-' if v is None else f'{v:.4f}'}"
                           for n, v in self.holdout_scores.items())
        return f"family finalists on the holdout rows: {scores}"


@task(name="choose-family", cache_policy=NO_CACHE)
def choose_family(data: TrainingData, ranked: list[TrialResult], random_state: int) -> FamilyChoice:
    """Fit each family's best configuration on the search's rows, score it on the holdout rows,
    and choose by the score over both (`choose_finalist`). One finalist: nothing to fit. The
    fits run side by side, one per core, like the search's trials."""
    finalists = family_finalists(ranked)  # not empty: the flow refuses a search without a score
    scores: dict[int, float | None] = {}
    if len(finalists) > 1:
        with ThreadPoolExecutor(max_workers=cpu_workers()) as pool:
            found = pool.map(lambda r: holdout_score(data, r, random_state), finalists)
            scores = {r.number: score for r, score in zip(finalists, found)}
    chosen = choose_finalist(finalists, scores, len(data.X), len(data.X_holdout))
    return FamilyChoice(chosen, scores)


def holdout_score(data: TrainingData, trial: TrialResult, random_state: int) -> float | None:
    """The trial's configuration as it would be registered (`final_params`) fit on the search's
    rows, scored on the holdout rows in the search's metric; None where the metric is undefined
    there (one class only)."""
    family = trial.candidate.family
    model = build_pipeline(data.schema, family, final_params(family, trial.candidate.params),
                           random_state)
    with threadpool_limits(limits=1, user_api="openmp"):  # one core each (choose_family)
        fit_reproducibly(model, data.X, data.y)
    try:
        return score_model(model, data.X_holdout, data.y_holdout, data.metric,
                           data.schema.classes)
    except ValueError:  # e.g. ROC AUC on a holdout of one class: the CV mean decides alone
        return None


def summarize_search(search: Search, budget_s: float | None) -> SearchSummary:
    statuses = [r.status for r in search.results]
    return SearchSummary(
        trials=len(statuses), completed=statuses.count("complete"),
        pruned=statuses.count("pruned"), cut=statuses.count("deadline"),
        failed=statuses.count("error"), stop_reason=search.stop_reason, seconds=search.seconds,
        budget_s=budget_s, max_trials=search.max_trials)


def trial_row(r: TrialResult, choice: FamilyChoice) -> dict:
    """One trial as the leaderboard, the Prefect table and MLflow's trial table show it: its
    cross-validated score and searched params, and for a family's finalist its holdout score
    (`choose_family`; a forest's with at least FINAL_TREES trees, `final_params`)."""
    holdout = choice.holdout_scores.get(r.number)
    return {"trial": r.number, "candidate": r.candidate.label, "family": r.candidate.family,
            r.metric: None if r.mean is None else round(r.mean, 6), "folds": len(r.scores),
            "seconds": round(r.seconds, 2), "status": r.status, "at_s": r.finished_s,
            "holdout": None if holdout is None else round(holdout, 6),
            "chosen": r.number == choice.chosen.number,
            "params": json.dumps(r.candidate.params, sort_keys=True, default=str),
            "worker": r.worker}


def progress_figure(rows: list[dict], metric: str, greater_is_better: bool, title: str):
    """Best cross-validated score against search time, every completed trial as a dot.
    Matplotlib is imported here, not at module import (docs/architecture.md, "Fast imports")."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    done = sorted((r for r in rows if r["status"] == "complete"), key=lambda r: r["trial"])
    fig, ax = plt.subplots(figsize=(7, 4))
    if done:
        at = [r["at_s"] for r in done]
        scores = [r[metric] for r in done]
        best = (np.maximum if greater_is_better else np.minimum).accumulate(scores)
        ax.plot(at, scores, "o", ms=3, alpha=0.4, color="tab:gray", label="trial")
        ax.step(at, best, where="post", color="tab:blue", label="best so far")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("search time (s)")
    ax.set_ylabel(f"cross-validated {metric}")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


class LoggedModel(BaseModel):
    run_id: str
    model_uri: str
    family: str
    holdout_metrics: dict[str, float]
    input_schema: str


@task(name="refit-and-log-model", cache_policy=NO_CACHE)
def refit_and_log(data: TrainingData, best: TrialResult, model_name: str,
                  random_state: int, leaderboard: list[dict], search: SearchSummary) -> LoggedModel:
    """Fit the chosen configuration on the search's rows and measure it on the holdout (the
    estimate the version reports; see `choose_family`), then refit it on every row received,
    holdout included, for the registered model; log it with what later steps need and the
    search's trial history (a table and a plot).

    The last refit gives the model a quarter more rows than the search saw (FLAML and the like
    retrain on all rows too): on a few thousand rows that is worth more than further search
    (bench/training.py). The holdout rows stay among the version's seen rows, so the retraining
    gate never scores it on them."""
    import mlflow
    from mlflow.models import infer_signature

    measured_params = final_params(best.candidate.family, best.candidate.params)
    measured = build_pipeline(data.schema, best.candidate.family, measured_params, random_state)
    fit_reproducibly(measured, data.X, data.y)
    holdout = evaluate_metrics(measured, data.X_holdout, data.y_holdout, data.schema.task)
    importance_rows = min(len(data.X_holdout), IMPORTANCE_ROWS)
    importances = permutation_importance_by_column(
        measured, data.X_holdout.iloc[:importance_rows], data.y_holdout.iloc[:importance_rows],
        data.schema.task, random_state)
    all_X, all_y = pd.concat([data.X, data.X_holdout]), pd.concat([data.y, data.y_holdout])
    params = refit_params(best.candidate.family, measured_params, measured)
    model = build_pipeline(data.schema, best.candidate.family, params, random_state)
    fit_reproducibly(model, all_X, all_y)
    schema_json = json.dumps(data.schema.to_dict(), sort_keys=True, default=str)
    experiment_id = resolve_mlflow_config().ensure_experiment()
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{model_name}-{best.candidate.family}") as run:
        mlflow.log_params({"family": best.candidate.family, **params,
                           "random_state": random_state, "n_train_rows": len(all_X)})
        mlflow.log_metrics({f"holdout_{k}": v for k, v in holdout.items()})
        mlflow.log_metrics({f"cv_{data.metric}": best.mean, "search_trials": search.trials,
                            "search_pruned": search.pruned, "search_cut": search.cut,
                            "search_seconds": search.seconds})
        mlflow.set_tags({
            "mlops.model_name": model_name, "mlops.target": data.schema.target,
            "mlops.task": data.schema.task, "mlops.metric": data.metric,
            "mlops.data_ref": data.ref or "(DataFrame)", "mlops.data_sha256": data.sha256,
            "mlops.data_rows": str(data.n_rows),
            "mlops.git_commit": _git_commit(), "mlops.family": best.candidate.family,
            "mlops.search": search.describe(), "mlops.search_stop": search.stop_reason,
            **{f"lib.{k}": v for k, v in library_versions().items()},
        })
        with tempfile.TemporaryDirectory() as tmp:
            tmpdir = Path(tmp)
            (tmpdir / "schema.json").write_text(schema_json)
            (tmpdir / "feature_importances.json").write_text(json.dumps(importances, indent=1))
            (tmpdir / "leaderboard.json").write_text(json.dumps(leaderboard, indent=1))
            (tmpdir / "profile.json").write_text(json.dumps(reference_profile(data)))
            (tmpdir / "library_versions.json").write_text(json.dumps(library_versions(), indent=1))
            sample = data.X_holdout.iloc[:HOLDOUT_MAX_ROWS].copy()
            sample[data.schema.target] = data.y_holdout.iloc[:HOLDOUT_MAX_ROWS].to_numpy()
            sample.to_parquet(tmpdir / "holdout.parquet", index=False)
            if data.seen_rows is not None:
                np.save(tmpdir / SEEN_ROWS_NAME, data.seen_rows)
            mlflow.log_artifacts(str(tmpdir), artifact_path="mlops")
        history = sorted(leaderboard, key=lambda r: r["trial"])
        mlflow.log_table(pd.DataFrame(history), artifact_file="mlops/trials.json")
        figure = progress_figure(history, data.metric, greater_is_better(data.metric),
                                 f"{model_name}: {search.describe()}")
        mlflow.log_figure(figure, "mlops/search_progress.png")
        import matplotlib.pyplot as plt

        plt.close(figure)
        signature = infer_signature(data.X.iloc[:50], model.predict(data.X.iloc[:50]))
        # explicit requirements: MLflow's inference of them costs ~13 s a model here
        info = mlflow.sklearn.log_model(model, name="model", signature=signature,
                                        skops_trusted_types=trusted_types(model),
                                        pip_requirements=model_requirements())
    return LoggedModel(run_id=run.info.run_id, model_uri=info.model_uri,
                       family=best.candidate.family, holdout_metrics=holdout,
                       input_schema=schema_json)


def reference_profile(data: TrainingData) -> dict:
    """The drift reference of a version: a compact profile of the rows it was trained on."""
    from tasks.drift_metrics import build_profile

    kinds = {**{c: "numeric" for c in data.schema.numeric},
             **{c: "categorical" for c in data.schema.categorical}}
    return build_profile(data.X, feature_types=kinds)


def load_artifact_json(run_id: str, name: str):
    """One of the JSON documents stored with a version's run (schema, importances, …)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"mlops/{name}",
                                                   dst_path=tmp)
        return json.loads(Path(path).read_text())


def deadline_from(started: float, budget_s: float, share: float) -> float:
    return started + max(budget_s, 0.0) * share


def cpu_workers() -> int:
    return max(2, os.cpu_count() or 2)


def now() -> float:
    return time.monotonic()
