"""Capability checks shared by exporters: walk a fitted pipeline and name what a format cannot
carry, before anything is converted (plain functions, no converter imports)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from tasks.export.base import Capability, ExportSubject

# Preprocessing every format of ours understands (what train_model builds, plus close kin).
COMMON_TRANSFORMERS = {"ColumnTransformer", "Pipeline", "SimpleImputer", "StandardScaler",
                       "OneHotEncoder", "OrdinalEncoder", "MinMaxScaler"}
PASS_THROUGH = {"drop", "passthrough"}
# final estimators both converter libraries (skl2onnx, sklearn2pmml) carry for our pipelines
CONVERTER_ESTIMATORS = {
    "LogisticRegression", "LinearRegression", "Ridge", "Lasso", "ElasticNet",
    "RandomForestClassifier", "RandomForestRegressor", "ExtraTreesClassifier",
    "ExtraTreesRegressor", "GradientBoostingClassifier", "GradientBoostingRegressor",
    "HistGradientBoostingClassifier", "HistGradientBoostingRegressor",
    "DecisionTreeClassifier", "DecisionTreeRegressor", "MLPClassifier", "MLPRegressor",
}


@dataclass
class Step:
    path: str  # e.g. preprocess/cat/onehot
    obj: Any

    @property
    def kind(self) -> str:
        return self.obj if isinstance(self.obj, str) else type(self.obj).__name__


def walk(obj: Any, path: str = "") -> Iterable[Step]:
    """Every transformer and estimator of a (nested) pipeline, depth first."""
    name = type(obj).__name__
    if isinstance(obj, str):
        yield Step(path, obj)
        return
    yield Step(path or name, obj)
    if name == "Pipeline":
        for step_name, step in obj.steps:
            yield from walk(step, f"{path}/{step_name}".strip("/"))
    elif name == "ColumnTransformer":
        for step_name, step, _cols in getattr(obj, "transformers_", obj.transformers):
            yield from walk(step, f"{path}/{step_name}".strip("/"))


def selects_no_column(columns: Any) -> bool:
    """True for a ColumnTransformer branch's column selection that is empty (an empty list or
    array, or a boolean mask with no True)."""
    if isinstance(columns, (list, tuple)) or hasattr(columns, "__array__"):
        values = np.asarray(columns)
        return values.size == 0 or (values.dtype == bool and not values.any())
    return False


def without_empty_branches(pipeline: Any) -> Any:
    """A copy of a fitted pipeline whose ColumnTransformer drops the branches that select no
    column; it predicts exactly as the original.

    train_model always builds a numeric and a categorical branch. On a table with only numeric
    (or only string) columns the other branch selects nothing, and scikit-learn leaves its steps
    unfitted; a converter that reads every branch (sklearn2pmml) refuses such a step ("OneHotEncoder
    is not fitted"). As "drop" the branch is skipped by scikit-learn and by the converters alike.
    """
    twin = copy.deepcopy(pipeline)
    steps = getattr(twin, "steps", None) or []
    pre = steps[0][1] if len(steps) > 1 else None
    if type(pre).__name__ == "ColumnTransformer" and hasattr(pre, "transformers_"):
        pre.transformers_ = [(name, "drop" if selects_no_column(cols) else trans, cols)
                             for name, trans, cols in pre.transformers_]
    return twin


def final_estimator(pipeline: Any) -> Any:
    steps = getattr(pipeline, "steps", None)
    return steps[-1][1] if steps else pipeline


def native_categoricals(estimator: Any) -> list[int]:
    """Indices of features a HistGradientBoosting model splits on natively as categories."""
    mask = getattr(estimator, "is_categorical_", None)
    if mask is None:
        return []
    return [int(i) for i in np.flatnonzero(np.asarray(mask, dtype=bool))]


def check_pipeline(subject: ExportSubject, title: str, estimators: set[str],
                   transformers: set[str] = COMMON_TRANSFORMERS,
                   native_categoricals_why: str | None = None) -> Capability:
    """The checks every format shares: a fitted scikit-learn Pipeline on the schema's raw
    columns, known preprocessing, a known final estimator, a task the format carries.
    `native_categoricals_why`: a format that cannot carry HistGradientBoosting's native
    categorical splits says why, and such a model is refused first."""
    pipeline = subject.pipeline
    natives = native_categoricals(final_estimator(pipeline))
    if natives and native_categoricals_why:
        return Capability.no(
            f"{type(final_estimator(pipeline)).__name__} with native categorical features "
            f"(feature indices {natives}) {native_categoricals_why}; retrain with one-hot encoded "
            "categoricals (categorical_features=None), as train_model does")
    if type(pipeline).__name__ != "Pipeline" or not getattr(pipeline, "steps", None):
        return Capability.no(f"{title} export needs a scikit-learn Pipeline (preprocessing + "
                             f"estimator) on the raw columns; got {type(pipeline).__name__}")
    estimator = final_estimator(pipeline)
    est_name = type(estimator).__name__
    if est_name not in estimators:
        return Capability.no(f"{title} export does not support the estimator {est_name}; "
                             f"supported: {', '.join(sorted(estimators))}")
    for step in walk(pipeline):
        if step.obj is estimator or step.kind in PASS_THROUGH:
            continue
        if step.kind not in transformers:
            return Capability.no(f"{title} export does not support the preprocessing step "
                                 f"{step.path!r} ({step.kind}); supported: "
                                 f"{', '.join(sorted(transformers))}")
        if step.kind == "OneHotEncoder":
            enc = step.obj
            if getattr(enc, "max_categories", None) or getattr(enc, "min_frequency", None):
                return Capability.no(f"{title} export does not carry OneHotEncoder infrequent "
                                     f"categories (step {step.path!r}: max_categories/min_frequency)")
            if enc.handle_unknown not in ("ignore", "error"):
                return Capability.no(f"{title} export supports OneHotEncoder handle_unknown "
                                     f"'ignore' or 'error', not {enc.handle_unknown!r} "
                                     f"(step {step.path!r})")
    pre = pipeline.steps[0][1] if len(pipeline.steps) > 1 else None
    seen = list(getattr(pre, "feature_names_in_", []) if pre is not None else [])
    if seen and sorted(map(str, seen)) != sorted(subject.schema.columns):
        return Capability.no(f"the pipeline was fitted on columns {seen} but the stored schema "
                             f"lists {subject.schema.columns}; re-register the version with a "
                             "matching schema")
    if subject.is_classifier and not hasattr(pipeline, "predict_proba"):
        return Capability.no(f"{title} parity needs class probabilities; {est_name} has no "
                             "predict_proba")
    return Capability.yes()


def categorical_imputers(pipeline: Any, categorical: list[str]) -> list[Any]:
    """SimpleImputers that see only categorical (string) columns."""
    found = []
    pre = pipeline.steps[0][1] if len(getattr(pipeline, "steps", [])) > 1 else None
    if type(pre).__name__ != "ColumnTransformer":
        return found
    for _name, trans, cols in pre.transformers_:
        names = [c for c in (cols if isinstance(cols, (list, tuple, np.ndarray)) else [])]
        if not names or not all(str(c) in categorical for c in names):
            continue
        for step in walk(trans):
            if step.kind == "SimpleImputer":
                found.append(step.obj)
    return found
