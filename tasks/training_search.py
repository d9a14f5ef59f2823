"""Model search for tabular data, without Prefect: schema, preprocessing, candidates, metrics.

Only families every export format can carry are searched: a linear model, RandomForest and
HistGradientBoosting on one-hot encoded categoricals (native categorical support would convert to
ONNX silently wrong, docs/architecture.md). Cheap candidates go first and each candidate stops at the
search deadline, so `time_budget_s` holds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import (accuracy_score, f1_score, log_loss, mean_absolute_error,
                             r2_score, roc_auc_score, root_mean_squared_error, balanced_accuracy_score)
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from tasks.errors import ConfigurationError, DataError

FAMILIES = ("linear", "random_forest", "hist_gradient_boosting")
MAX_VOCABULARY = 200  # categories kept per column in the stored schema


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
    classification = schema.task != "regression"
    if family == "linear":
        est = (LogisticRegression(max_iter=2000, **params) if classification
               else Ridge(**params))
    elif family == "random_forest":
        cls = RandomForestClassifier if classification else RandomForestRegressor
        est = cls(random_state=random_state, n_jobs=1, **params)
    elif family == "hist_gradient_boosting":
        cls = HistGradientBoostingClassifier if classification else HistGradientBoostingRegressor
        est = cls(random_state=random_state, early_stopping=True, validation_fraction=0.15,
                  n_iter_no_change=15, max_iter=400, categorical_features=None, **params)
    else:
        raise ConfigurationError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    return Pipeline([("preprocess", pre), ("model", est)])


@dataclass(frozen=True)
class Candidate:
    family: str
    params: dict

    @property
    def label(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.family}({inner})"


def candidate_grid(task: str, families: list[str] | None = None) -> list[Candidate]:
    """Candidates cheapest first, so a short budget still evaluates every family."""
    chosen = list(families or FAMILIES)
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown:
        raise ConfigurationError(f"unknown candidate families {unknown}; choose from {list(FAMILIES)}")
    linear = ([{"C": 1.0}, {"C": 0.1}] if task != "regression" else [{"alpha": 1.0}, {"alpha": 10.0}])
    grid = {
        "linear": linear,
        "random_forest": [{"n_estimators": 100, "min_samples_leaf": 3, "max_depth": 12},
                          {"n_estimators": 200, "min_samples_leaf": 1, "max_depth": None}],
        "hist_gradient_boosting": [{"learning_rate": 0.1, "max_leaf_nodes": 15},
                                   {"learning_rate": 0.05, "max_leaf_nodes": 31}],
    }
    first = [Candidate(f, grid[f][0]) for f in FAMILIES if f in chosen]
    rest = [Candidate(f, p) for f in FAMILIES if f in chosen for p in grid[f][1:]]
    return first + rest


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
@dataclass
class CandidateScore:
    candidate: Candidate
    metric: str
    scores: list[float]  # one per completed fold, in the metric's natural units
    fit_seconds: float
    stopped_early: bool = False
    error: str | None = None

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.scores)) if self.scores else None


def folds(task: str, n_folds: int, random_state: int):
    if task == "regression":
        return KFold(n_splits=n_folds, shuffle=True, random_state=random_state)
    return StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=random_state)


def cross_validate(candidate: Candidate, X: pd.DataFrame, y: pd.Series, schema: Schema,
                   metric: str, n_folds: int, random_state: int, deadline: float) -> CandidateScore:
    """k-fold scores of one candidate; stops between folds once the deadline has passed."""
    result = CandidateScore(candidate, metric, [], 0.0)
    started = time.monotonic()
    classes = schema.classes
    for train_idx, test_idx in folds(schema.task, n_folds, random_state).split(X, y):
        if time.monotonic() > deadline:
            result.stopped_early = True
            break
        model = build_pipeline(schema, candidate.family, candidate.params, random_state)
        try:
            model.fit(X.iloc[train_idx], y.iloc[train_idx])
            Xt, yt = X.iloc[test_idx], y.iloc[test_idx]
            proba = model.predict_proba(Xt) if METRICS[metric][1] else None
            pred = None if METRICS[metric][1] else model.predict(Xt)
            result.scores.append(compute_metric(metric, yt, pred, proba, classes))
        except Exception as exc:  # a candidate that cannot fit loses; the search goes on
            result.error = f"{type(exc).__name__}: {exc}"
            break
    result.fit_seconds = time.monotonic() - started
    return result


def rank(results: list[CandidateScore]) -> list[CandidateScore]:
    """Best first; candidates with no completed fold last."""
    scored = [r for r in results if r.mean is not None]
    if not scored:
        return []
    sign = -1.0 if greater_is_better(scored[0].metric) else 1.0
    return sorted(scored, key=lambda r: sign * r.mean)


def permutation_importance_by_column(model, X: pd.DataFrame, y: pd.Series, task: str,
                                     random_state: int, n_repeats: int = 2) -> dict[str, float]:
    """Importance of each raw input column (drop in the score when it is shuffled), normalised to
    sum to 1, so drift can weight features the model relies on."""
    from sklearn.inspection import permutation_importance

    scoring = "neg_root_mean_squared_error" if task == "regression" else "accuracy"
    res = permutation_importance(model, X, y, scoring=scoring, n_repeats=n_repeats,
                                 random_state=random_state, n_jobs=1)
    raw = np.clip(res.importances_mean, 0, None)
    total = raw.sum()
    weights = raw / total if total > 0 else np.full(len(raw), 1 / len(raw))
    return {str(c): float(w) for c, w in zip(X.columns, weights)}


def merge_rounds(first: list[CandidateScore], second: list[CandidateScore]) -> list[CandidateScore]:
    """Successive halving's ranking: finalists (scored on all rows) ahead of the rest."""
    finalists = rank(second)
    done = {r.candidate.label for r in finalists}
    return finalists + [r for r in rank(first) if r.candidate.label not in done]
