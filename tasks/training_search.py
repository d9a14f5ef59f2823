"""Model search for tabular data, without Prefect: schema, preprocessing, candidates, metrics.

Only families every export format can carry are searched: a linear model, RandomForest and
HistGradientBoosting on one-hot encoded categoricals (native categorical support would convert to
ONNX silently wrong, docs/architecture.md). Cheap candidates go first and each candidate stops at the
search deadline, so `time_budget_s` holds.
"""
from __future__ import annotations

import contextlib
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import ConvergenceWarning
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.ensemble import (ExtraTreesClassifier, ExtraTreesRegressor, RandomForestClassifier,
                              RandomForestRegressor)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import (accuracy_score, f1_score, log_loss, mean_absolute_error,
                             r2_score, roc_auc_score, root_mean_squared_error, balanced_accuracy_score)
from sklearn.model_selection import RepeatedKFold, RepeatedStratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from threadpoolctl import threadpool_limits

from tasks.errors import ConfigurationError, DataError

FAMILIES = ("linear", "random_forest", "extra_trees", "hist_gradient_boosting")
MAX_VOCABULARY = 200  # categories kept per column in the stored schema
IMPORTANCE_BATCH_CELLS = 2_000_000  # cells of permuted copies predicted in one call (importances)


# --------------------------------------------------------------------------- schema
@dataclass
class Schema:
    """The model's input contract: column order, kinds, category vocabularies, target."""

    target: str
    task: str
    numeric: list[str]
    categorical: list[str]
    categories: dict[str, list[str]] = field(default_factory=dict)
    classes: list[Any] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        return self.numeric + self.categorical

    @property
    def encoded_columns(self) -> int:
        """Columns the models see: numeric ones, plus one per known category (one-hot)."""
        return len(self.numeric) + sum(len(v) for v in self.categories.values())

    def to_dict(self) -> dict:
        return {"target": self.target, "task": self.task, "numeric": self.numeric,
                "categorical": self.categorical, "categories": self.categories,
                "classes": [c.item() if hasattr(c, "item") else c for c in self.classes]}

    @classmethod
    def from_dict(cls, d: dict) -> "Schema":
        return cls(**{k: d[k] for k in ("target", "task", "numeric", "categorical", "categories",
                                         "classes")})


def infer_schema(frame: pd.DataFrame, target: str, task: str) -> Schema:
    features = frame.drop(columns=[target])
    numeric = [c for c in features.columns
               if pd.api.types.is_numeric_dtype(features[c]) and not pd.api.types.is_bool_dtype(features[c])]
    categorical = [c for c in features.columns if c not in numeric]
    categories = {c: sorted(map(str, features[c].dropna().unique()))[:MAX_VOCABULARY] for c in categorical}
    classes = sorted(frame[target].unique().tolist()) if task != "regression" else []
    return Schema(target=target, task=task, numeric=[str(c) for c in numeric],
                  categorical=[str(c) for c in categorical], categories=categories, classes=classes)


def prepare_features(frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """The model's raw input: numeric as float64, categoricals as object strings (NaN kept)."""
    missing = [c for c in schema.columns if c not in frame.columns]
    if missing:
        raise DataError(f"the data lacks columns the model needs: {', '.join(missing)}")
    X = pd.DataFrame(index=frame.index)
    for c in schema.numeric:
        try:
            X[c] = pd.to_numeric(frame[c]).astype("float64")
        except (ValueError, TypeError) as exc:
            raise DataError(f"column {c!r} must be numeric (it was at training); got "
                            f"{frame[c].dtype}: {exc}") from exc
    for c in schema.categorical:
        col = frame[c].astype(object)
        X[c] = col.where(col.isna(), col.astype(str)).astype(object)
    return X


def row_hashes(frame: pd.DataFrame, schema: Schema) -> np.ndarray:
    """One 64-bit hash per labelled row, in frame order (features as the model reads them, then
    the label)."""
    X = prepare_features(frame, schema)
    X["__label__"] = frame[schema.target].astype(str).to_numpy()
    return pd.util.hash_pandas_object(X, index=False).to_numpy(dtype=np.uint64)


def row_fingerprints(frame: pd.DataFrame, schema: Schema) -> np.ndarray:
    """The row hashes sorted and unique: stored with a version, they tell later which rows the
    version has seen, whatever their order or file (retraining counts new rows and keeps the gate
    slice unseen with them)."""
    return np.unique(row_hashes(frame, schema))


# --------------------------------------------------------------------------- pipelines
def build_pipeline(schema: Schema, family: str, params: dict, random_state: int) -> Pipeline:
    """The pipeline one search trial fits: shared preprocessing, then the family's estimator with
    the trial's parameters (search names, see `suggest_candidate`, mapped to scikit-learn's)."""
    numeric_steps: list = [("impute", SimpleImputer(strategy="median"))]
    if family == "linear":  # trees do not need scaling; linear models do
        numeric_steps.append(("scale", StandardScaler()))
    pre = ColumnTransformer(
        [("num", Pipeline(numeric_steps), schema.numeric),
         ("cat", Pipeline([("impute", SimpleImputer(strategy="constant", fill_value="missing")),
                           ("onehot", OneHotEncoder(handle_unknown="ignore", sparse_output=False))]),
          schema.categorical)],
        remainder="drop", verbose_feature_names_out=False,
    )
    return Pipeline([("preprocess", pre), ("model", build_estimator(schema, family, params,
                                                                   random_state))])


def build_estimator(schema: Schema, family: str, params: dict, random_state: int):
    classification = schema.task != "regression"
    params = dict(params)
    if family == "linear":
        if not classification:
            return Ridge(**params)
        l1 = params.pop("penalty", "l2") == "l1"
        # liblinear is the fast L1 solver for two classes; saga handles L1 on several
        solver = ("liblinear" if len(schema.classes) <= 2 else "saga") if l1 else "lbfgs"
        return LogisticRegression(max_iter=2000, l1_ratio=1.0 if l1 else 0.0, solver=solver,
                                  random_state=random_state, **params)
    if family in ("random_forest", "extra_trees"):
        kind = {("random_forest", True): RandomForestClassifier,
                ("random_forest", False): RandomForestRegressor,
                ("extra_trees", True): ExtraTreesClassifier,
                ("extra_trees", False): ExtraTreesRegressor}[(family, classification)]
        return kind(random_state=random_state, n_jobs=1, **params)
    if family == "hist_gradient_boosting":
        kind = HistGradientBoostingClassifier if classification else HistGradientBoostingRegressor
        settings = {"early_stopping": True, "validation_fraction": 0.15, "n_iter_no_change": 15,
                    "max_iter": 500, **params}
        return kind(random_state=random_state, categorical_features=None, **settings)
    raise ConfigurationError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


# liblinear (the binary L1 solver) draws from the C library's rand(), one state for the whole
# process: two fits side by side on threads shuffle each other's coordinate order, and the same
# configuration scored 0.83394 next to another L1 trial and 0.83397 alone. Its fits take turns.
_LIBLINEAR = threading.Lock()


def fit_reproducibly(model: Pipeline, X: pd.DataFrame, y: pd.Series) -> Pipeline:
    """`model.fit(X, y)`, with the same result whatever runs beside it in this process."""
    estimator = model.steps[-1][1]
    shared_rand = getattr(estimator, "solver", None) == "liblinear"
    with _LIBLINEAR if shared_rand else contextlib.nullcontext():
        return model.fit(X, y)


BOOSTING_CHUNK = 16  # boosting iterations of the first chunk of a fit with a time limit


def fit_until(model: Pipeline, X: pd.DataFrame, y: pd.Series, until: float | None) -> bool:
    """Fit `model` like `fit_reproducibly`, but stop a boosting model's iterations once
    time.monotonic() passes `until`; True when it was cut there (the model then predicts with
    the iterations it reached). Other families fit whole: their cost is bounded by the
    parameters the search draws (trees, depth), boosting's is not (a low learning rate runs up
    to max_iter: on ames, one fold of one configuration took 34 s of a 42 s search).

    Boosting grows in chunks with warm_start, each sized by the time per iteration so far to
    end near `until`. Early stopping sees the same validation rows and scores as in one fit,
    and its rule is applied again at the end of each chunk (scikit-learn checks it after each
    iteration, but a fit that reached max_iter ends without stopping), so a fit that is not cut
    predicts exactly as `model.fit` would."""
    estimator = model.steps[-1][1]
    if until is None or not isinstance(estimator, (HistGradientBoostingClassifier,
                                                   HistGradientBoostingRegressor)):
        fit_reproducibly(model, X, y)
        return False
    Xt = model[:-1].fit_transform(X, y)
    started, full = time.monotonic(), estimator.max_iter
    estimator.set_params(warm_start=True, max_iter=min(BOOSTING_CHUNK, full))
    while True:
        estimator.fit(Xt, y)
        if (estimator.n_iter_ < estimator.max_iter or estimator.max_iter >= full
                or early_stopped(estimator)):
            return False  # early stopping ended it, or it ran every iteration
        now = time.monotonic()
        if now >= until:
            return True
        per_iteration = (now - started) / estimator.n_iter_
        more = int(np.clip((until - now) / per_iteration, BOOSTING_CHUNK, estimator.n_iter_))
        estimator.set_params(max_iter=min(full, estimator.n_iter_ + more))


def early_stopped(estimator) -> bool:
    """Whether a fitted HistGradientBoosting model's early stopping stops it after its last
    iteration: scikit-learn's rule (no score of the last n_iter_no_change beat the one before
    them by more than tol) on the scores it recorded."""
    if not estimator.do_early_stopping_:
        return False
    scores = (estimator.validation_score_ if len(estimator.validation_score_)
              else estimator.train_score_)
    window = estimator.n_iter_no_change + 1
    if len(scores) < window:
        return False
    return not any(score > scores[-window] + estimator.tol for score in scores[-window + 1:])


# A forest's trees only average away each other's variance: more of them cost no accuracy on
# average, only time. The search compares configurations at the trees each drew (cheap ones
# first); the model train_model measures, chooses among the families (`holdout_score`) and
# registers has at least FINAL_TREES. On the HMDA data of bench/training.py, 60 -> 150 trees
# raised the holdout AUC of two forest configurations by 0.0035 and 0.0066 (medians over five
# random states) and narrowed their spread over random states; 300 trees added under 0.001 more.
FINAL_TREES = 150


def final_params(family: str, params: dict) -> dict:
    """The chosen configuration's parameters for the fits of the registered model: forests get
    at least FINAL_TREES trees; other families are fit as searched."""
    if family in ("random_forest", "extra_trees"):
        return {**params, "n_estimators": max(int(params.get("n_estimators", 100)), FINAL_TREES)}
    return dict(params)


def refit_params(family: str, params: dict, fitted: Pipeline) -> dict:
    """The parameters of the final refit on every row, given the same configuration `fitted` on
    the search's rows. Boosting keeps the iterations early stopping chose there and turns early
    stopping off, so the refit learns from all its rows instead of holding out a validation
    fraction of them (on a few thousand rows that fraction is worth keeping)."""
    if family != "hist_gradient_boosting":
        return dict(params)
    return {**params, "early_stopping": False, "max_iter": int(fitted.named_steps["model"].n_iter_)}


@dataclass(frozen=True)
class Candidate:
    family: str
    params: dict

    @property
    def label(self) -> str:
        inner = ",".join(f"{k}={_short(v)}" for k, v in sorted(self.params.items()))
        return f"{self.family}({inner})"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def check_families(families: list[str] | None) -> list[str]:
    """The families to search, in FAMILIES order; refuses unknown names and an empty list."""
    if families is not None and len(families) == 0:
        return list(FAMILIES)
    chosen = list(families or FAMILIES)
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown:
        raise ConfigurationError(f"unknown candidate families {unknown}; choose from "
                                 f"{list(FAMILIES)} (or leave candidates empty for all)")
    return [f for f in FAMILIES if f in chosen]


# --------------------------------------------------------------------------- search space
# Each family's parameters carry the family's prefix in the study (`hgb.learning_rate`), so TPE
# models them separately; `suggest_candidate` strips it. Ranges: wide enough to matter, bounded
# so that every winner still exports (forests of at most 300 trees, depth at most 24; boosting
# with at most 128 leaves; tests/test_export_units.py exports those extremes).
PREFIX = {"linear": "lin", "random_forest": "rf", "extra_trees": "et",
          "hist_gradient_boosting": "hgb"}
MAX_TREES, MAX_DEPTH, MAX_LEAF_NODES = 300, 24, 128


def suggest_candidate(trial, task: str, families: list[str]) -> Candidate:
    """Ask an Optuna trial for a family and its parameters (the search space)."""
    family = trial.suggest_categorical("family", families) if len(families) > 1 else families[0]
    p = PREFIX[family] + "."
    classification = task != "regression"
    class_weights = [None, "balanced"]
    if family == "linear":
        if not classification:
            return Candidate(family, {"alpha": trial.suggest_float(p + "alpha", 1e-3, 1e3, log=True)})
        return Candidate(family, {
            "C": trial.suggest_float(p + "C", 1e-3, 1e2, log=True),
            "penalty": trial.suggest_categorical(p + "penalty", ["l2", "l1"]),
            "class_weight": trial.suggest_categorical(p + "class_weight", class_weights)})
    if family in ("random_forest", "extra_trees"):
        params = {
            "n_estimators": trial.suggest_int(p + "n_estimators", 30, MAX_TREES, log=True),
            "max_features": trial.suggest_float(p + "max_features", 0.1, 1.0),
            "min_samples_leaf": trial.suggest_int(p + "min_samples_leaf", 1, 32, log=True),
            "max_depth": trial.suggest_int(p + "max_depth", 3, MAX_DEPTH, log=True)}
        if classification:
            params["class_weight"] = trial.suggest_categorical(
                p + "class_weight", [None, "balanced", "balanced_subsample"])
        return Candidate(family, params)
    params = {
        "learning_rate": trial.suggest_float(p + "learning_rate", 0.01, 0.3, log=True),
        "max_leaf_nodes": trial.suggest_int(p + "max_leaf_nodes", 4, MAX_LEAF_NODES, log=True),
        "min_samples_leaf": trial.suggest_int(p + "min_samples_leaf", 2, 100, log=True),
        "l2_regularization": trial.suggest_float(p + "l2_regularization", 1e-6, 10.0, log=True),
        "max_features": trial.suggest_float(p + "max_features", 0.3, 1.0),
        "validation_fraction": trial.suggest_float(p + "validation_fraction", 0.1, 0.25)}
    if classification:
        params["class_weight"] = trial.suggest_categorical(p + "class_weight", class_weights)
    return Candidate(family, params)


def forest_start_features(task: str, encoded_columns: int | None) -> tuple[float, float]:
    """The share of columns each split of the first random forest and extra-trees trials
    considers. Classification: Breiman's sqrt(p) of the p encoded columns (scikit-learn's own
    default), because decorrelated trees are what make a forest better than its trees. On the
    HMDA mortgage data of bench/training.py (20 encoded columns), 60 s searches (run without
    Prefect, seeds 0-2) starting there (0.22) registered models of holdout AUC 0.856-0.864,
    against 0.848-0.854 starting at 0.5: a search of a few dozen trials rarely gets there.
    Regression, or columns unknown: half of them for random forests, 0.7 for extra trees."""
    if task == "regression" or not encoded_columns:
        return 0.5, 0.7
    share = round(float(np.clip(encoded_columns ** -0.5, 0.1, 1.0)), 3)
    return share, share


def forest_start_leaf(task: str) -> int:
    """The fewest rows in a leaf of the first random forest and extra-trees trials.
    Classification: 4, because a leaf's class shares are the forest's probabilities, and shares
    of one or two rows are mostly 0 or 1, which ranks rows worse. Random forests (150 trees, depth
    16, features as `forest_start_features`) fit on bench/training.py's training halves, medians
    over six random states and row orders, leaf 2 -> 4: holdout AUC hmda 0.8589 -> 0.8640, churn
    0.8435 -> 0.8489, titanic 0.8108 -> 0.8292; accuracy chile 0.6564 -> 0.6623, penguins 0.9913
    -> 0.9855 (one row of 172). Regression: 2 (RMSE ames 30,308 -> 30,555 and diamonds 714 ->
    761 at 4: a leaf's mean of fewer rows follows the target closer)."""
    return 2 if task == "regression" else 4


def starting_points(task: str, families: list[str],
                    encoded_columns: int | None = None) -> list[dict]:
    """Cheap, sensible first trials (one per family, in the study's parameter names), so a short
    budget scores every family before TPE explores."""
    classification = task != "regression"
    rf_features, et_features = forest_start_features(task, encoded_columns)
    leaf = forest_start_leaf(task)
    points = {
        "linear": ({"lin.C": 1.0, "lin.penalty": "l2", "lin.class_weight": None}
                   if classification else {"lin.alpha": 1.0}),
        "hist_gradient_boosting": {"hgb.learning_rate": 0.1, "hgb.max_leaf_nodes": 31,
                                   "hgb.min_samples_leaf": 20, "hgb.l2_regularization": 1e-6,
                                   "hgb.max_features": 1.0, "hgb.validation_fraction": 0.15,
                                   **({"hgb.class_weight": None} if classification else {})},
        "random_forest": {"rf.max_depth": 16, "rf.n_estimators": 60,
                          "rf.max_features": rf_features, "rf.min_samples_leaf": leaf,
                          **({"rf.class_weight": None} if classification else {})},
        "extra_trees": {"et.max_depth": 16, "et.n_estimators": 60,
                        "et.max_features": et_features, "et.min_samples_leaf": leaf,
                        **({"et.class_weight": None} if classification else {})},
    }
    order = ["linear", "hist_gradient_boosting", "random_forest", "extra_trees"]
    out = []
    for family in order:
        if family in families:
            out.append({**({"family": family} if len(families) > 1 else {}), **points[family]})
    return out


def starting_candidates(task: str, families: list[str] | None = None) -> list[Candidate]:
    """The starting point of each family as a Candidate (what the export benches fit)."""
    import optuna

    chosen = check_families(families)
    return [suggest_candidate(optuna.trial.FixedTrial(point), task, chosen)
            for point in starting_points(task, chosen)]


# --------------------------------------------------------------------------- metrics
# name -> (greater is better, needs probabilities, tasks)
METRICS: dict[str, tuple[bool, bool, tuple[str, ...]]] = {
    "roc_auc": (True, True, ("binary", "multiclass")),
    "accuracy": (True, False, ("binary", "multiclass")),
    "balanced_accuracy": (True, False, ("binary", "multiclass")),
    "f1_macro": (True, False, ("binary", "multiclass")),
    "log_loss": (False, True, ("binary", "multiclass")),
    "rmse": (False, False, ("regression",)),
    "mae": (False, False, ("regression",)),
    "r2": (True, False, ("regression",)),
}
DEFAULT_METRIC = {"binary": "roc_auc", "multiclass": "balanced_accuracy", "regression": "rmse"}


def resolve_metric(metric: str | None, task: str) -> str:
    name = metric or DEFAULT_METRIC[task]
    if name not in METRICS or task not in METRICS[name][2]:
        valid = [m for m, spec in METRICS.items() if task in spec[2]]
        raise ConfigurationError(f"metric {name!r} does not apply to a {task} task; choose from {valid}")
    return name


def greater_is_better(metric: str) -> bool:
    return METRICS[metric][0]


def compute_metric(metric: str, y_true, pred, proba, classes) -> float:
    if metric == "roc_auc":
        if len(classes) == 2:
            return float(roc_auc_score(y_true, proba[:, 1]))
        return float(roc_auc_score(y_true, proba, multi_class="ovr", labels=classes))
    if metric == "log_loss":
        return float(log_loss(y_true, proba, labels=classes))
    fn = {"accuracy": accuracy_score, "balanced_accuracy": balanced_accuracy_score,
          "f1_macro": lambda a, b: f1_score(a, b, average="macro"),
          "rmse": root_mean_squared_error, "mae": mean_absolute_error, "r2": r2_score}[metric]
    return float(fn(y_true, pred))


def evaluate_metrics(model, X: pd.DataFrame, y: pd.Series, task: str) -> dict[str, float]:
    """Every metric that applies to the task, on one labelled table."""
    pred = model.predict(X)
    proba = model.predict_proba(X) if task != "regression" else None
    classes = list(model.classes_) if task != "regression" else []
    out = {}
    for name, (_, needs_proba, tasks) in METRICS.items():
        if task not in tasks:
            continue
        if name in ("roc_auc", "log_loss") and y.nunique() < 2:
            continue  # undefined on one class
        out[name] = compute_metric(name, y, pred, proba, classes)
    return out


# --------------------------------------------------------------------------- search
TRIAL_STATUSES = ("complete", "pruned", "deadline", "error")


@dataclass
class TrialResult:
    """One configuration's cross-validation: what the leaderboard and the trial history show."""

    number: int  # the study's trial number (the order trials were asked in)
    candidate: Candidate
    metric: str
    scores: list[float]  # one per completed fold, in the metric's natural units
    seconds: float = 0.0
    status: str = "complete"  # complete | pruned (on early folds) | deadline | error
    error: str | None = None
    finished_s: float = 0.0  # seconds since the search started, when this trial was told
    worker: str | None = None  # where it ran: a Dask worker's address, else host and process

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.scores)) if self.scores else None

    def running_means(self) -> list[float]:
        """The mean after each fold: what the pruner compares, fold by fold."""
        return [float(np.mean(self.scores[:i + 1])) for i in range(len(self.scores))]


# A trial's score rests on at least this many held-out predictions: on small data one k-fold
# pass is too noisy to rank configurations (the search then picks the one whose folds were
# lucky), so it is repeated with other shuffles, at most MAX_CV_REPEATS times. Only where fits
# are cheap: above MAX_REPEATED_CELLS (rows x encoded columns) a pass costs more trials than
# the steadier score is worth (ames, 1,172 x 312: 12 trials instead of 24 in the same time).
MIN_VALIDATION_ROWS, MAX_CV_REPEATS, MAX_REPEATED_CELLS = 3000, 3, 50_000


def cv_repeats(n_rows: int, encoded_columns: int) -> int:
    """How many times k-fold cross-validation runs over a table (each time shuffled anew)."""
    if n_rows * encoded_columns > MAX_REPEATED_CELLS:
        return 1
    return int(min(MAX_CV_REPEATS, max(1, -(-MIN_VALIDATION_ROWS // max(n_rows, 1)))))


def folds(task: str, n_folds: int, random_state: int, repeats: int = 1):
    kind = RepeatedKFold if task == "regression" else RepeatedStratifiedKFold
    return kind(n_splits=n_folds, n_repeats=repeats, random_state=random_state)


def cross_validate(number: int, candidate: Candidate, X: pd.DataFrame, y: pd.Series,
                   schema: Schema, metric: str, n_folds: int, random_state: int,
                   deadline: float | None, should_prune=None, repeats: int = 1,
                   time_cap_s: float | None = None) -> TrialResult:
    """k-fold scores of one configuration (`repeats` passes, see `cv_repeats`). After each fold
    but the last, `should_prune(fold, running means so far)` may stop a bad trial (status
    pruned). Past `deadline` (a time.monotonic() value of this process) it stops between folds,
    after the first (status deadline). With `time_cap_s`, the trial also stops once it has run
    that long, and then, as at the deadline, within a boosting fit too (`fit_until`), whose fold
    is scored with the iterations it reached: the first fold always yields a score, and without
    a cap (a family's starting point) a whole one."""
    started = time.monotonic()
    stop_at = min((t for t in (deadline, None if time_cap_s is None else started + time_cap_s)
                   if t is not None), default=None)
    # trials run side by side, one per core: one OpenMP thread each (HistGradientBoosting's
    # default of all cores per trial oversubscribes the machine; the limit is per thread)
    with threadpool_limits(limits=1, user_api="openmp"):
        return _cross_validate(number, candidate, X, y, schema, metric, n_folds, random_state,
                               stop_at, None if time_cap_s is None else stop_at, should_prune,
                               repeats)


def score_model(model, X: pd.DataFrame, y: pd.Series, metric: str, classes) -> float:
    """A fitted model's score on rows it did not see, in `metric` (probabilities where the metric
    needs them); ValueError where the metric is undefined on these rows (one class only)."""
    if METRICS[metric][1]:
        return compute_metric(metric, y, None, model.predict_proba(X), classes)
    return compute_metric(metric, y, model.predict(X), None, classes)


def _cross_validate(number, candidate, X, y, schema, metric, n_folds, random_state, stop_at,
                    cut_fits_at, should_prune, repeats) -> TrialResult:
    result = TrialResult(number, candidate, metric, [])
    started = time.monotonic()
    splitter = folds(schema.task, n_folds, random_state, repeats)
    last = splitter.get_n_splits() - 1
    for step, (train_idx, test_idx) in enumerate(splitter.split(X, y)):
        if step > 0 and stop_at is not None and time.monotonic() > stop_at:
            result.status = "deadline"  # (the first fold always runs: every trial has a score)
            break
        model = build_pipeline(schema, candidate.family, candidate.params, random_state)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                cut = fit_until(model, X.iloc[train_idx], y.iloc[train_idx], cut_fits_at)
            result.scores.append(score_model(model, X.iloc[test_idx], y.iloc[test_idx], metric,
                                             schema.classes))
        except Exception as exc:  # a configuration that cannot fit loses; the search goes on
            result.status, result.error = "error", f"{type(exc).__name__}: {exc}"
            break
        if cut:
            result.status = "deadline"
            break
        if step < last and should_prune is not None and should_prune(step, result.running_means()):
            result.status = "pruned"
            break
    result.seconds = time.monotonic() - started
    return result


# metric -> the best value it can take (a search that reaches it has nothing left to find)
OPTIMUM = {"roc_auc": 1.0, "accuracy": 1.0, "balanced_accuracy": 1.0, "f1_macro": 1.0,
           "r2": 1.0, "log_loss": 0.0, "rmse": 0.0, "mae": 0.0}


PRUNER_STARTUP_TRIALS = 4  # completed trials before any trial is pruned

# A budget-only search gives each trial TPE proposes at most this share of the time it has
# (from its start to its deadline), so that one slow configuration cannot hold a core for most
# of the search: on ames (60 s budget, 2 cores) one boosting trial at learning rate 0.02 ran
# 34 s of the 42 s and the search completed 8 trials. A trial cut there ranks below every
# completed one, and TPE is told it as pruned, so it proposes fewer like it. The families'
# starting points are not capped: they are what every family's score rests on (on ames the
# boosting one takes 10 s, and boosting wins there).
TRIAL_TIME_SHARE = 1 / 3


@dataclass(frozen=True)
class MedianRule:
    """Optuna's MedianPruner (n_startup_trials=PRUNER_STARTUP_TRIALS, no warm-up) within one
    family, decided from a snapshot of the study taken when the batch was asked: a trial is pruned
    after a fold when the best of its running means is worse than the median of the running means
    of its family's completed trials at that fold.

    Within the family, because across families the cheap ones crowd out the others: linear
    trials take milliseconds, TPE soon fills the study with good ones, and a forest's first
    exploratory trials, compared with their median, were all pruned on one noisy fold, so TPE
    never learned where good forests are (on 950 rows, 1 forest of 8 completed).

    A plain value, so a trial can carry it to another process (a Dask worker) where the study is
    not; the decisions are those the study would make, since the pruner only ever sees trials
    told before the batch."""

    maximize: bool
    medians: dict[int, float]  # fold -> median running mean of the family's completed trials
    active: bool  # the family has at least PRUNER_STARTUP_TRIALS completed trials

    @classmethod
    def snapshot(cls, study, family: str) -> "MedianRule":
        from optuna.study import StudyDirection
        from optuna.trial import TrialState

        completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if t.user_attrs.get("family") == family]
        steps = sorted({s for t in completed for s in t.intermediate_values})
        medians = {s: float(np.nanpercentile(
            np.array([t.intermediate_values[s] for t in completed if s in t.intermediate_values],
                     dtype=float), 50)) for s in steps}
        return cls(maximize=study.direction == StudyDirection.MAXIMIZE, medians=medians,
                   active=len(completed) >= max(PRUNER_STARTUP_TRIALS, 1))

    def __call__(self, step: int, running_means: list[float]) -> bool:
        if not self.active:
            return False
        values = np.asarray(running_means, dtype=float)
        best = np.nanmax(values) if self.maximize else np.nanmin(values)
        if np.isnan(best):
            return True
        median = self.medians.get(step)
        if median is None or np.isnan(median):
            return False
        return bool(best < median) if self.maximize else bool(best > median)


@dataclass
class PlannedTrial:
    number: int
    candidate: Candidate
    should_prune: MedianRule  # (fold, running means) -> bool
    time_cap_s: float | None = None  # seconds the trial may run (budget-only searches)


class Search:
    """Optuna's ask/tell loop, without Prefect: TPE over the families' spaces, the families'
    cheap starting points first, a median rule within each family on early folds (MedianRule).

    With `max_trials`, trials are asked in fixed-size batches and told in trial order once the
    whole batch is back, and the pruner only compares with trials told before the batch, so a
    fixed `max_trials` and `random_state` give the same trials whatever order parallel trials
    finish in. Budget-only runs ask one trial whenever one is told (tasks/trial_runner.py), so
    no worker waits for the slowest trial of a batch. The search
    stops at `max_trials`, at `deadline` (budget-only runs; never before the first batch), or once
    it has converged: the best score reached the metric's optimum, or did not improve for
    `patience` trials."""

    def __init__(self, task: str, metric: str, families: list[str], random_state: int,
                 batch_size: int, max_trials: int | None, deadline: float | None,
                 patience: int = 40, min_improvement: float = 1e-4,
                 encoded_columns: int | None = None):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.task, self.metric, self.families = task, metric, families
        self.batch_size, self.max_trials, self.deadline = batch_size, max_trials, deadline
        self.patience, self.min_improvement = patience, min_improvement
        with warnings_ignored():
            sampler = optuna.samplers.TPESampler(seed=random_state, multivariate=True, group=True,
                                                 n_startup_trials=8)
        self.study = optuna.create_study(
            direction="maximize" if greater_is_better(metric) else "minimize", sampler=sampler,
            pruner=optuna.pruners.NopPruner())  # pruning is MedianRule's, in the trial
        points = starting_points(task, families, encoded_columns)
        for point in points:
            self.study.enqueue_trial(point)
        self._starting_points = len(points)  # the study's first trials
        self.results: list[TrialResult] = []
        self.stop_reason: str | None = None
        self.started = time.monotonic()
        self.trial_cap_s = (None if deadline is None
                            else round(TRIAL_TIME_SHARE * max(deadline - self.started, 0.0), 3))
        self._pending: dict[int, Any] = {}
        self._best: float | None = None
        self._since_best = 0

    def ask(self, n: int | None = None) -> list[PlannedTrial]:
        """The next batch of `n` trials (default: batch_size); empty once the search is
        finished."""
        if self.finished():
            return []
        n = self.batch_size if n is None else n
        if self.max_trials is not None:
            n = min(n, self.max_trials - len(self.results) - len(self._pending))
        planned = []
        rules = {f: MedianRule.snapshot(self.study, f) for f in self.families}
        with warnings_ignored():
            for _ in range(n):
                trial = self.study.ask()
                self._pending[trial.number] = trial
                candidate = suggest_candidate(trial, self.task, self.families)
                trial.set_user_attr("family", candidate.family)
                starting_point = trial.number < self._starting_points
                planned.append(PlannedTrial(trial.number, candidate, rules[candidate.family],
                                            None if starting_point else self.trial_cap_s))
        return planned

    def tell(self, results: list[TrialResult]) -> None:
        """Record a batch's results in trial order, whatever order they finished in."""
        from optuna.trial import TrialState

        for r in sorted(results, key=lambda r: r.number):
            trial = self._pending.pop(r.number)
            for step, value in enumerate(r.running_means()):  # what later pruning compares with
                trial.report(value, step)
            if r.status == "complete":
                self.study.tell(trial, r.mean)
            elif r.status in ("pruned", "deadline"):  # TPE counts both among the bad regions
                self.study.tell(trial, state=TrialState.PRUNED)
            else:
                self.study.tell(trial, state=TrialState.FAIL)
            r.finished_s = round(time.monotonic() - self.started, 3)
            self.results.append(r)
            self._track(r)

    def _track(self, r: TrialResult) -> None:
        if r.status != "complete":
            self._since_best += 1
            return
        better = greater_is_better(self.metric)
        if self._best is None:
            self._best, self._since_best = r.mean, 0
            return
        gain = (r.mean - self._best) if better else (self._best - r.mean)
        if gain > self.min_improvement * max(abs(self._best), 1e-12):
            self._best, self._since_best = r.mean, 0
        else:
            self._since_best += 1
            if gain > 0:
                self._best = r.mean

    def finished(self) -> bool:
        if self.stop_reason is None:
            self.stop_reason = self._why_stop()
        return self.stop_reason is not None

    def _why_stop(self) -> str | None:
        if self.max_trials is not None and len(self.results) >= self.max_trials:
            return "max_trials"
        if self._best is not None and self._best == OPTIMUM[self.metric]:
            return "converged"
        if self._best is not None and self._since_best >= self.patience:
            return "converged"
        # the budget stops a search only once a batch has run: flow start-up, loading and
        # preparing the data can outlast a short budget on a busy machine, and a search with
        # no trial would leave the run without a model (each trial's first fold always runs)
        if self.deadline is not None and self.results and time.monotonic() >= self.deadline:
            return "budget"
        return None

    @property
    def seconds(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def ranked(self) -> list[TrialResult]:
        """Completed trials best first; then, best first, trials the deadline cut after at least
        one fold (a budget too short for any full trial still yields a model); then pruned and
        failed ones, in trial order."""
        sign = -1.0 if greater_is_better(self.metric) else 1.0

        def best_first(status: str) -> list[TrialResult]:
            return sorted((r for r in self.results if r.status == status and r.scores),
                          key=lambda r: (sign * r.mean, r.number))

        first = best_first("complete") + best_first("deadline")
        return first + [r for r in self.results if r not in first]


# --------------------------------------------------------------------------- choosing the family
def family_finalists(ranked: list[TrialResult]) -> list[TrialResult]:
    """The best configuration of each family, best first (`Search.ranked` order): among completed
    trials, or among deadline-cut ones when no trial completed."""
    scored = [r for r in ranked if r.status == "complete" and r.scores] or [
        r for r in ranked if r.status == "deadline" and r.scores]
    out: dict[str, TrialResult] = {}
    for r in scored:
        out.setdefault(r.candidate.family, r)
    return list(out.values())


def pooled_score(cv_mean: float, cv_rows: int, holdout: float | None, holdout_rows: int) -> float:
    """A configuration's score over every training row, each row scored by a model that did not
    see it: the cross-validation mean on the search's rows and the holdout score, weighted by
    their rows (the holdout is one more, larger fold)."""
    if holdout is None or holdout_rows == 0:
        return cv_mean
    return (cv_mean * cv_rows + holdout * holdout_rows) / (cv_rows + holdout_rows)


def choose_finalist(finalists: list[TrialResult], holdout_scores: dict[int, float | None],
                    cv_rows: int, holdout_rows: int) -> TrialResult:
    """The family finalist with the best pooled score (ties: the better cross-validation).

    The search ranks configurations on the search's rows only, and on a thousand rows a few
    extreme ones decide which family looks best: on ames, ridge regression led every tree
    ensemble in cross-validation when the search's rows held no outlier, then missed the
    outliers of the held-out rows by twice the trees' error (RMSE 32,300 against 29,000).
    Choosing the family on every row the search did not fit as well as on its folds takes the
    holdout rows into account too. A forest's holdout score is that of its registered form
    (`final_params`: more trees than it was cross-validated with), which tilts the choice
    slightly towards forests, as the registered model would."""
    if not finalists:
        raise ValueError("no scored configuration to choose from")
    sign = -1.0 if greater_is_better(finalists[0].metric) else 1.0
    return min(finalists, key=lambda r: (
        sign * pooled_score(r.mean, cv_rows, holdout_scores.get(r.number), holdout_rows),
        finalists.index(r)))


@contextlib.contextmanager
def warnings_ignored():
    """Optuna flags multivariate TPE as experimental; the warning tells a user nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def permutation_importance_by_column(model, X: pd.DataFrame, y: pd.Series, task: str,
                                     random_state: int, n_repeats: int = 2,
                                     batch_cells: int = IMPORTANCE_BATCH_CELLS) -> dict[str, float]:
    """Importance of each raw input column (drop in the score when it is shuffled), normalised to
    sum to 1, so drift can weight features the model relies on.

    The same shuffles and scores as scikit-learn's `permutation_importance` (accuracy, or negative
    RMSE for regression) with this `random_state`, but the permuted copies of X are stacked and
    predicted in a few calls instead of one call per column and repeat: on the few hundred rows
    used here a pipeline's fixed cost per `predict` call was most of the time (0.8 of a small
    training's 3.6 CPU-seconds). A call takes as many copies as fit in `batch_cells` cells (at
    least one), so memory stays bounded on wide tables."""
    n = len(X)
    truth = np.asarray(y)

    def score(pred: np.ndarray) -> float:
        if task == "regression":
            return -float(np.sqrt(np.mean((truth - pred) ** 2)))
        return float(np.mean(pred == truth))

    # scikit-learn shuffles every column with the same seed (drawn once from random_state), and
    # each repeat shuffles its index array again and applies it to the already shuffled column
    seed = np.random.RandomState(random_state).randint(np.iinfo(np.int32).max + 1)
    shuffler, shuffling, order, orders = np.random.RandomState(seed), np.arange(n), np.arange(n), []
    for _ in range(n_repeats):
        shuffler.shuffle(shuffling)
        order = order[shuffling]
        orders.append(order)

    baseline = score(np.asarray(model.predict(X)))
    blocks = [(col, r) for col in range(X.shape[1]) for r in range(n_repeats)]
    per_call = max(1, batch_cells // max(n * X.shape[1], 1))
    drops = np.zeros((X.shape[1], n_repeats))
    identity = np.arange(n)
    for first in range(0, len(blocks), per_call):
        batch = blocks[first:first + per_call]
        # one frame of len(batch) copies of X, copy j with column batch[j][0] in order batch[j][1]
        stacked = pd.DataFrame({
            name: X[name].take(np.concatenate([orders[r] if col == i else identity
                                               for col, r in batch])).reset_index(drop=True)
            for i, name in enumerate(X.columns)})
        pred = np.asarray(model.predict(stacked))
        for j, (col, r) in enumerate(batch):
            drops[col, r] = baseline - score(pred[j * n:(j + 1) * n])
    raw = np.clip(drops.mean(axis=1), 0, None)
    total = raw.sum()
    weights = raw / total if total > 0 else np.full(len(raw), 1 / len(raw))
    return {str(c): float(w) for c, w in zip(X.columns, weights)}
