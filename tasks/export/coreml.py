"""Core ML export: the fitted pipeline as one Core ML pipeline spec that takes the raw
columns, built with coremltools' spec builders and protobuf messages (coremltools 9.0 switches
its scikit-learn converter off above scikit-learn 1.5.1; it is not used), and verified on
Linux by evaluating the saved `.mlmodel` with `tasks.export.coreml_eval`: Core ML itself runs
only on Apple platforms, so the on-device check stays pending and no latency is reported.

What the file holds (Core ML specification version 1, iOS 11 / macOS 10.13 and later):

    inputs: one per raw column: numeric as Double (NaN = missing), categorical as String
            ("" = missing; a value never seen in training encodes as all zeros, as
            scikit-learn's handle_unknown="ignore")
    FeatureVectorizer(numeric doubles) → Imputer(medians) → [Scaler(-mean, 1/std): linear]
    per categorical column: Imputer("" → the training fill, "missing") → OneHotEncoder(sparse)
    FeatureVectorizer(numeric block + one-hot blocks, scikit-learn's column order) → "features"
    estimator: GLMClassifier / GLMRegressor / TreeEnsembleClassifier / TreeEnsembleRegressor
    outputs:   classifiers: <target> (label) and <target>Probability (class → probability);
               regressors: <target> (Double)

Estimators:
- LogisticRegression: GLMClassifier, Logit. Binary: one weight row (p = σ(w·x + b)).
  Multiclass (multinomial softmax): ReferenceClass encoding with rows w_k − w_0 and offsets
  b_k − b_0 — softmax is invariant to that shift, and Core ML's reference-class logit is
  exactly the softmax with class 0's score pinned at 0.
- Ridge / LinearRegression / Lasso / ElasticNet: GLMRegressor, NoTransform.
- RandomForest / ExtraTrees / DecisionTree: TreeEnsemble, one tree per estimator. Classifiers:
  one dimension per class (binary too), leaf value = the leaf's class fractions / n_trees,
  NoTransform — Core ML adds leaf values, so the sum is scikit-learn's average of
  probabilities. Regressors: leaf value / n_trees.
- GradientBoosting: leaf values × learning_rate, base = the init estimator's raw prediction;
  binary: one dimension + Regression_Logistic; multiclass: Classification_SoftMax.
- HistGradientBoosting (numeric splits only; native categorical splits are refused): base =
  `_baseline_prediction`, leaf values as stored (shrinkage included); binary: one dimension +
  Regression_Logistic (σ(raw) = predict_proba[:, 1]); multiclass: one dimension per class +
  Classification_SoftMax; regression (identity link only): NoTransform.

Tree thresholds, exactly. scikit-learn's DecisionTree family (RandomForest, ExtraTrees,
GradientBoosting) casts inputs to float32 and tests float32(x) <= t (t a double). The spec
holds m, the double halfway between T = the largest float32 <= t and the next float32, with
"<" when T's last significand bit is odd and "<=" when even: x < m (or <= m) holds exactly when
float32(x) <= T, i.e. when scikit-learn goes left — whether the device compares in double (m
is not a float32 number, so Core ML's tree compiler stays in double) or rounds inputs and
thresholds to float32 (round-half-even turns m into T or into T's successor with the matching
operator). HistGradientBoosting compares the float64 input with a float64 threshold: the spec
holds t with "<=", exact when the device compares in double, which Core ML's compiler does
unless every threshold is a float32 number; the export reports how many parity rows would
change if the device compared in float32 (`details.tree_precision`). Missing values: each
branch carries scikit-learn's `missing_go_to_left` as missingValueTracksTrueChild, but the
pipeline imputes every numeric column first, so no NaN reaches a tree.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.export.base import (Capability, Conversion, ExportError, Exporter, ExportSubject,
                               Prediction, Runner)
from tasks.export.capability import check_pipeline, native_categoricals

MISSING_CATEGORY = ""  # how a missing categorical value is spelled at a String input
SPEC_VERSION = 1  # every model type used here exists since Core ML 1 (iOS 11)
DEFAULT_AUTHOR = "mlops-flows export_model"
LINEAR_CLASSIFIERS = {"LogisticRegression"}
LINEAR_REGRESSORS = {"LinearRegression", "Ridge", "Lasso", "ElasticNet"}
FOREST_CLASSIFIERS = {"RandomForestClassifier", "ExtraTreesClassifier", "DecisionTreeClassifier"}
FOREST_REGRESSORS = {"RandomForestRegressor", "ExtraTreesRegressor", "DecisionTreeRegressor"}
BOOSTING = {"GradientBoostingClassifier", "GradientBoostingRegressor"}
HIST_BOOSTING = {"HistGradientBoostingClassifier", "HistGradientBoostingRegressor"}
ESTIMATORS = (LINEAR_CLASSIFIERS | LINEAR_REGRESSORS | FOREST_CLASSIFIERS | FOREST_REGRESSORS
              | BOOSTING | HIST_BOOSTING)
ON_DEVICE_PENDING = ("on-device check pending: Core ML runs only on Apple platforms, so parity was "
                     "verified by evaluating the saved spec with tasks.export.coreml_eval "
                     "(a NumPy walker of the protobuf), not by Core ML itself")
LATENCY_NOTE = ("not measured: Core ML has no runtime on Linux, and the spec walker's speed says "
                "nothing about on-device latency")
LTE, LT = "BranchOnValueLessThanEqual", "BranchOnValueLessThan"


class NotCarried(Exception):
    """The pipeline holds something this exporter cannot express as a Core ML spec."""


# --------------------------------------------------------------------------- the plan (pure)
@dataclass
class NumericBlock:
    name: str
    columns: list[str]
    ops: list[tuple]  # ("impute", fills, missing marker, strategy) | ("scale", shift, scale)

    @property
    def width(self) -> int:
        return len(self.columns)


@dataclass
class CategoricalColumn:
    column: str
    fill: str | None  # what the imputer fills for a missing value (None: no imputer)
    categories: list[str]
    handle_unknown: str

    @property
    def width(self) -> int:
        return len(self.categories)


@dataclass
class TreeNode:
    tree: int
    node: int
    feature: int = -1
    threshold: float = 0.0
    mode: str = LTE
    true_child: int = -1
    false_child: int = -1
    missing_true: bool = False
    values: dict[int, float] | None = None  # leaves
    hit_rate: float | None = None


@dataclass
class EstimatorPlan:
    kind: str  # glm_classifier | glm_regressor | tree_classifier | tree_regressor
    weights: np.ndarray | None = None
    offsets: np.ndarray | None = None
    encoding: str = "ReferenceClass"
    nodes: list[TreeNode] = field(default_factory=list)
    dims: int = 1
    base: list[float] = field(default_factory=list)
    transform: str = "NoTransform"
    n_trees: int = 0
    threshold_rule: str = ""  # how tree thresholds were written (float32-input or float64-input)
    summary: str = ""


@dataclass
class Plan:
    inputs: list[dict]  # name, column, kind ("double"/"string"), description
    blocks: list  # NumericBlock | list[CategoricalColumn], in scikit-learn's output order
    width: int
    estimator: EstimatorPlan
    classes: list
    label_name: str = ""
    proba_name: str = ""
    output_name: str = ""


def feature_name(column: str, taken: set[str]) -> str:
    """A Core ML feature name Xcode can turn into a Swift property: letters, digits, _."""
    name = re.sub(r"[^0-9A-Za-z_]+", "_", str(column)).strip("_") or "feature"
    if name[0].isdigit():
        name = f"f_{name}"
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


def plan_export(subject: ExportSubject) -> Plan:
    """Everything the spec needs, read from the fitted pipeline (raises NotCarried)."""
    pipeline = subject.pipeline
    steps = getattr(pipeline, "steps", [])
    if len(steps) != 2 or type(steps[0][1]).__name__ != "ColumnTransformer":
        raise NotCarried("Core ML export expects Pipeline([ColumnTransformer, estimator]) on the raw "
                         f"columns, as train_model builds; got steps {[n for n, _ in steps]}")
    pre, estimator = steps[0][1], steps[1][1]
    schema = subject.schema
    order = [str(c) for c in getattr(pre, "feature_names_in_", schema.columns)]
    numeric, categorical = set(schema.numeric), set(schema.categorical)
    taken: set[str] = set()
    names = {c: feature_name(c, taken) for c in order}
    blocks: list = []
    used: list[str] = []
    index_of = getattr(pre, "_transformer_to_input_indices", {})
    for tname, trans, cols in pre.transformers_:
        columns = ([order[i] for i in index_of[tname]] if tname in index_of
                   else [str(c) for c in (cols if isinstance(cols, (list, tuple, np.ndarray)) else [])])
        if isinstance(trans, str) and trans == "drop" or not columns:
            continue
        chain = [] if isinstance(trans, str) else (list(trans.steps) if type(trans).__name__ == "Pipeline"
                                                  else [(tname, trans)])
        if all(c in numeric for c in columns):
            blocks.append(_numeric_block(tname, columns, chain))
        elif all(c in categorical for c in columns):
            blocks.append(_categorical_block(tname, columns, chain))
        else:
            raise NotCarried(f"transformer {tname!r} mixes numeric and categorical columns {columns}")
        used.extend(columns)
    width = sum(b.width if isinstance(b, NumericBlock) else sum(c.width for c in b) for b in blocks)
    expected = getattr(estimator, "n_features_in_", width)
    if width != expected:
        raise NotCarried(f"the preprocessing yields {width} features but the estimator expects "
                         f"{expected}; the Core ML pipeline could not reproduce the column layout")
    inputs = []
    for c in order:
        if c not in used:
            continue  # dropped by the ColumnTransformer: the Core ML model does not ask for it
        inputs.append({"name": names[c], "column": c,
                       "kind": "double" if c in numeric else "string"})
    classes = list(subject.classes)
    plan = Plan(inputs=inputs, blocks=blocks, width=width,
                estimator=plan_estimator(estimator, subject), classes=classes)
    target = feature_name(schema.target, taken)
    if subject.is_classifier:
        plan.label_name = target
        plan.proba_name = feature_name(f"{schema.target}Probability", taken)
    else:
        plan.output_name = target
    _describe_inputs(plan)
    return plan


def _numeric_block(tname: str, columns: list[str], chain: list) -> NumericBlock:
    ops: list[tuple] = []
    for sname, step in chain:
        kind = type(step).__name__ if not isinstance(step, str) else step
        if step is None or kind == "passthrough":
            continue
        if kind == "SimpleImputer":
            if getattr(step, "add_indicator", False):
                raise NotCarried(f"{tname}/{sname}: SimpleImputer(add_indicator=True) is not carried")
            missing = step.missing_values
            if not (missing is None or (isinstance(missing, float) and math.isnan(missing))
                    or isinstance(missing, (int, float))):
                raise NotCarried(f"{tname}/{sname}: missing_values={missing!r} is not carried")
            fill = np.asarray(step.statistics_, dtype=np.float64)
            if fill.size != len(columns) or np.isnan(fill).any():
                raise NotCarried(f"{tname}/{sname}: a column had no value at training and "
                                 "SimpleImputer dropped it; retrain without empty columns")
            marker = math.nan if missing is None or (isinstance(missing, float) and math.isnan(missing)) \
                else float(missing)
            ops.append(("impute", fill.tolist(), marker, str(step.strategy)))
        elif kind == "StandardScaler":
            mean = np.asarray(step.mean_ if step.with_mean else np.zeros(len(columns)), dtype=np.float64)
            scale = np.asarray(step.scale_ if step.with_std else np.ones(len(columns)), dtype=np.float64)
            ops.append(("scale", (-mean).tolist(), (1.0 / scale).tolist()))
        else:
            raise NotCarried(f"{tname}/{sname}: {kind} on numeric columns is not carried by the Core "
                             "ML export (supported: SimpleImputer, StandardScaler)")
    return NumericBlock(tname, columns, ops)


def _categorical_block(tname: str, columns: list[str], chain: list) -> list[CategoricalColumn]:
    fills: list[str | None] = [None] * len(columns)
    encoder = None
    for sname, step in chain:
        kind = type(step).__name__ if not isinstance(step, str) else step
        if step is None or kind == "passthrough":
            continue
        if encoder is not None:
            raise NotCarried(f"{tname}/{sname}: steps after the OneHotEncoder are not carried")
        if kind == "SimpleImputer":
            missing = step.missing_values
            if not (missing is None or (isinstance(missing, float) and math.isnan(missing))):
                raise NotCarried(f"{tname}/{sname}: categorical missing_values={missing!r} is not "
                                 "carried (NaN / None only)")
            stats = list(np.asarray(step.statistics_, dtype=object))
            if not all(isinstance(s, str) for s in stats):
                raise NotCarried(f"{tname}/{sname}: the categorical imputer fills {stats!r}; strings "
                                 "only")
            fills = stats
        elif kind == "OneHotEncoder":
            if getattr(step, "drop_idx_", None) is not None:
                raise NotCarried(f"{tname}/{sname}: OneHotEncoder(drop=...) is not carried")
            if step.handle_unknown not in ("ignore", "error"):
                raise NotCarried(f"{tname}/{sname}: handle_unknown={step.handle_unknown!r} is not "
                                 "carried ('ignore' or 'error')")
            encoder = step
        else:
            raise NotCarried(f"{tname}/{sname}: {kind} on categorical columns is not carried by the "
                             "Core ML export (supported: SimpleImputer, OneHotEncoder)")
    if encoder is None:
        raise NotCarried(f"{tname}: categorical columns {columns} reach the estimator without a "
                         "OneHotEncoder")
    out = []
    for j, column in enumerate(columns):
        cats = list(encoder.categories_[j])
        if not all(isinstance(c, str) for c in cats):
            raise NotCarried(f"column {column!r}: categories {cats[:5]} are not all strings")
        if MISSING_CATEGORY in cats or fills[j] == MISSING_CATEGORY:
            raise NotCarried(f"column {column!r} has an empty-string category, which the Core ML "
                             "input contract uses for a missing value")
        out.append(CategoricalColumn(column, fills[j], cats, encoder.handle_unknown))
    return out


def _describe_inputs(plan: Plan) -> None:
    numeric_fill: dict[str, tuple[float, str] | None] = {}
    categorical: dict[str, CategoricalColumn] = {}
    for block in plan.blocks:
        if isinstance(block, NumericBlock):
            impute = next((op for op in block.ops if op[0] == "impute"), None)
            for i, c in enumerate(block.columns):
                numeric_fill[c] = (impute[1][i], impute[3]) if impute else None
        else:
            for col in block:
                categorical[col.column] = col
    words = {"median": "the training median", "mean": "the training mean",
             "most_frequent": "the most frequent training value", "constant": "the constant"}
    for item in plan.inputs:
        c = item["column"]
        if item["kind"] == "double":
            fill = numeric_fill.get(c)
            text = f"Numeric column '{c}' (Double). Missing: NaN"
            text += (f", replaced by {words.get(fill[1], 'the imputed value')} {fill[0]:g}."
                     if fill is not None else ".")
            item["missing"] = "NaN"
        else:
            col = categorical[c]
            shown = ", ".join(col.categories[:12]) + (" …" if len(col.categories) > 12 else "")
            text = (f"Categorical column '{c}' (String), one of: {shown}. Missing: empty string"
                    + (f", treated as '{col.fill}'" if col.fill is not None else "") + ". "
                    + ("Unseen values count as none of the categories." if col.handle_unknown == "ignore"
                       else "Unseen values are an error."))
            item["missing"] = MISSING_CATEGORY
            item["vocabulary"] = col.categories
        item["description"] = text


# --------------------------------------------------------------------------- estimators
def plan_estimator(est: Any, subject: ExportSubject) -> EstimatorPlan:
    name = type(est).__name__
    if name in LINEAR_CLASSIFIERS:
        return _logistic(est)
    if name in LINEAR_REGRESSORS:
        coef = np.asarray(est.coef_, dtype=np.float64)
        if coef.ndim == 2 and coef.shape[0] != 1:
            raise NotCarried(f"{name} with {coef.shape[0]} targets is not carried (one target only)")
        intercept = float(np.ravel(est.intercept_)[0]) if np.ndim(est.intercept_) else float(est.intercept_)
        return EstimatorPlan("glm_regressor", weights=coef.reshape(1, -1),
                             offsets=np.asarray([intercept]),
                             summary=f"{name} → GLMRegressor (NoTransform)")
    if name in FOREST_CLASSIFIERS | FOREST_REGRESSORS:
        return _forest(est, name)
    if name in BOOSTING:
        return _gradient_boosting(est, name)
    if name in HIST_BOOSTING:
        return _hist_gradient_boosting(est, name)
    raise NotCarried(f"Core ML export does not support the estimator {name}")


def _logistic(est) -> EstimatorPlan:
    coef = np.asarray(est.coef_, dtype=np.float64)
    intercept = np.asarray(est.intercept_, dtype=np.float64).reshape(-1)
    k = len(est.classes_)
    if getattr(est, "multi_class", "auto") == "ovr" and k > 2:
        raise NotCarried("one-vs-rest LogisticRegression is not carried: Core ML's OneVsRest "
                         "normalisation is undocumented; use the (default) multinomial model")
    if k == 2:
        return EstimatorPlan("glm_classifier", weights=coef[:1], offsets=intercept[:1],
                             encoding="ReferenceClass",
                             summary="LogisticRegression (binary) → GLMClassifier, Logit, one row")
    weights = coef[1:] - coef[0]
    offsets = intercept[1:] - intercept[0]
    return EstimatorPlan("glm_classifier", weights=weights, offsets=offsets, encoding="ReferenceClass",
                         summary=f"LogisticRegression (multinomial, {k} classes) → GLMClassifier, "
                                 "Logit, ReferenceClass rows w_k - w_0")


def float32_input_thresholds(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds and "<"/"<=" reproducing float32(x) <= t (scikit-learn's DecisionTree family)
    for a double x compared in double, and for x and the threshold rounded to float32."""
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        T = t.astype(np.float32)
        above = T.astype(np.float64) > t
        T[above] = np.nextafter(T[above], np.float32(-np.inf))
        nxt = np.nextafter(T, np.float32(np.inf))
        mid = (T.astype(np.float64) + nxt.astype(np.float64)) / 2.0
    mid = np.where(np.isinf(T), T.astype(np.float64), mid)
    even = (T.view(np.uint32) & np.uint32(1)) == 0
    return mid, np.where(even | np.isinf(T), LTE, LT)


def _sklearn_tree_nodes(tree, tree_id: int, leaf_values: np.ndarray, nodes: list[TreeNode]) -> None:
    """One scikit-learn tree as spec nodes; `leaf_values` (node_count, dims) holds what each
    node adds when it is the reached leaf."""
    left, right = tree.children_left, tree.children_right
    thresholds, modes = float32_input_thresholds(tree.threshold)
    missing_left = getattr(tree, "missing_go_to_left", np.zeros(tree.node_count, dtype=np.uint8))
    samples = tree.weighted_n_node_samples.tolist()
    feature, thresholds, modes = tree.feature.tolist(), thresholds.tolist(), modes.tolist()
    left_l, right_l, missing_l = left.tolist(), right.tolist(), missing_left.tolist()
    rows = np.asarray(leaf_values, dtype=np.float64).tolist()
    for i in range(tree.node_count):
        if left_l[i] == -1:
            nodes.append(TreeNode(tree_id, i, values=_sparse(rows[i]), hit_rate=samples[i]))
        else:
            nodes.append(TreeNode(tree_id, i, feature=feature[i], threshold=thresholds[i],
                                  mode=modes[i], true_child=left_l[i], false_child=right_l[i],
                                  missing_true=bool(missing_l[i]), hit_rate=samples[i]))


def _sparse(values: list[float]) -> dict[int, float]:
    """A leaf's non-zero values by dimension (Core ML leaves list only what they add)."""
    return {j: v for j, v in enumerate(values) if v != 0.0} or {0: 0.0}


def _forest(est, name: str) -> EstimatorPlan:
    trees = list(getattr(est, "estimators_", [est]))
    n = len(trees)
    nodes: list[TreeNode] = []
    classifier = name in FOREST_CLASSIFIERS
    if getattr(est, "n_outputs_", 1) != 1:
        raise NotCarried(f"{name} with {est.n_outputs_} outputs is not carried (one target only)")
    k = len(est.classes_) if classifier else 1
    for tree_id, member in enumerate(trees):
        value = np.asarray(member.tree_.value[:, 0, :], dtype=np.float64)
        if classifier:  # scikit-learn's tree predict_proba: the leaf's class fractions
            total = value.sum(axis=1, keepdims=True)
            value = np.divide(value, total, out=value.copy(), where=total > 0)
        _sklearn_tree_nodes(member.tree_, tree_id, value / n, nodes)
    kind = "tree_classifier" if classifier else "tree_regressor"
    what = (f"leaf values = class fractions / {n}, {k} dimensions" if classifier
            else f"leaf values = value / {n}")
    return EstimatorPlan(kind, nodes=nodes, dims=k, base=[0.0] * k, transform="NoTransform",
                         n_trees=n, threshold_rule="float32-input",
                         summary=f"{name} ({n} trees) → {_tree_kind(kind)}, {what}, NoTransform")


def _tree_kind(kind: str) -> str:
    return "TreeEnsembleClassifier" if kind == "tree_classifier" else "TreeEnsembleRegressor"


def _gradient_boosting(est, name: str) -> EstimatorPlan:
    init = est.init_
    if not (isinstance(init, str) and init == "zero") and \
            type(init).__name__ not in ("DummyClassifier", "DummyRegressor"):
        raise NotCarried(f"{name} with init={type(init).__name__} is not carried (constant init only)")
    classifier = name == "GradientBoostingClassifier"
    if classifier and getattr(est, "loss", "log_loss") != "log_loss":
        raise NotCarried(f"{name}(loss={est.loss!r}) is not carried (log_loss only)")
    d = est.n_features_in_
    base = np.asarray(est._raw_predict_init(np.zeros((1, d), dtype=np.float32)), dtype=np.float64)[0]
    lr = float(est.learning_rate)
    stages = est.estimators_
    k = stages.shape[1]
    nodes: list[TreeNode] = []
    tree_id = 0
    for i in range(stages.shape[0]):
        for j in range(k):
            tree = stages[i, j].tree_
            values = np.zeros((tree.node_count, k))
            values[:, j] = lr * tree.value[:, 0, 0]
            _sklearn_tree_nodes(tree, tree_id, values, nodes)
            tree_id += 1
    if classifier:
        transform = "Regression_Logistic" if k == 1 else "Classification_SoftMax"
        kind = "tree_classifier"
    else:
        transform, kind = "NoTransform", "tree_regressor"
    return EstimatorPlan(kind, nodes=nodes, dims=k, base=base.tolist(), transform=transform,
                         n_trees=tree_id, threshold_rule="float32-input",
                         summary=f"{name} ({tree_id} trees) → {_tree_kind(kind)}, leaf values × "
                                 f"learning_rate, base = init, {transform}")


def _hist_gradient_boosting(est, name: str) -> EstimatorPlan:
    natives = native_categoricals(est)
    if natives:
        raise NotCarried(f"{name} with native categorical features (indices {natives}) is not "
                         "carried; retrain with one-hot encoded categoricals "
                         "(categorical_features=None), as train_model does")
    link = type(est._loss.link).__name__
    classifier = name == "HistGradientBoostingClassifier"
    k = int(est.n_trees_per_iteration_)
    if classifier:
        if k == 1 and link != "LogitLink" or k > 1 and link != "MultinomialLogit":
            raise NotCarried(f"{name} with link {link} is not carried")
        transform = "Regression_Logistic" if k == 1 else "Classification_SoftMax"
    else:
        if link != "IdentityLink":
            raise NotCarried(f"{name}(loss={est.loss!r}) predicts through a {link}; Core ML tree "
                             "ensembles have no matching post-transform (identity-link losses only)")
        transform = "NoTransform"
    base = np.asarray(est._baseline_prediction, dtype=np.float64).reshape(-1)
    nodes: list[TreeNode] = []
    tree_id = 0
    for iteration in est._predictors:
        for j, predictor in enumerate(iteration):
            arr = predictor.nodes
            if np.any(arr["is_categorical"]):
                raise NotCarried(f"{name} has categorical splits; retrain with categorical_features=None")
            for i in range(len(arr)):
                node = arr[i]
                if node["is_leaf"]:
                    nodes.append(TreeNode(tree_id, i, values={j: float(node["value"])},
                                          hit_rate=float(node["count"])))
                else:
                    nodes.append(TreeNode(tree_id, i, feature=int(node["feature_idx"]),
                                          threshold=float(node["num_threshold"]), mode=LTE,
                                          true_child=int(node["left"]), false_child=int(node["right"]),
                                          missing_true=bool(node["missing_go_to_left"]),
                                          hit_rate=float(node["count"])))
            tree_id += 1
    return EstimatorPlan("tree_classifier" if classifier else "tree_regressor", nodes=nodes, dims=k,
                         base=base.tolist(), transform=transform, n_trees=tree_id,
                         threshold_rule="float64-input",
                         summary=f"{name} ({est.n_iter_} iterations × {k}: {tree_id} trees) → "
                                 f"{_tree_kind('tree_classifier' if classifier else 'tree_regressor')}, "
                                 f"base = baseline, {transform}")


# --------------------------------------------------------------------------- the exporter
class CoreMLExporter(Exporter):
    format = "coreml"
    title = "Core ML"
    device = True
    suffix = ".mlmodel"

    def __init__(self) -> None:
        self.author = DEFAULT_AUTHOR
        self.license = ""
        self._last_plan: tuple[int, Plan] | None = None  # check() and convert() share one plan

    def plan(self, subject: ExportSubject) -> Plan:
        key = id(subject.pipeline)
        if self._last_plan is None or self._last_plan[0] != key:
            self._last_plan = (key, plan_export(subject))
        return self._last_plan[1]

    def configure(self, settings: dict[str, Any]) -> None:
        self.author = str(settings.get("coreml_author") or DEFAULT_AUTHOR)
        self.license = str(settings.get("coreml_license") or "")

    def check(self, subject: ExportSubject) -> Capability:
        base = check_pipeline(subject, self.title, ESTIMATORS, native_categoricals_why=(
            "is not carried by Core ML tree ensembles"))
        if not base.supported:
            return base
        try:
            self.plan(subject)
        except NotCarried as exc:
            return Capability.no(str(exc))
        return Capability.yes()

    def environment(self) -> Capability:
        import importlib.util

        if importlib.util.find_spec("coremltools") is None:
            return Capability.no("coremltools not installed; pip install -r requirements.txt")
        return Capability.yes()

    def convert(self, subject: ExportSubject, workdir: Path) -> Conversion:
        import coremltools
        from coremltools.models.utils import save_spec

        from tasks.export import coreml_eval

        try:
            plan = self.plan(subject)
        except NotCarried as exc:
            raise ExportError(str(exc)) from exc
        spec = build_spec(plan, subject, self.author, self.license)
        problems = coreml_eval.check_spec(spec)
        if problems:
            raise ExportError("the Core ML spec is malformed: " + "; ".join(problems[:5]))
        path = workdir / f"{subject.basename}{self.suffix}"
        save_spec(spec, str(path))
        saved = coreml_eval.load(path)
        precision = coreml_eval.tree_precision_of(saved)
        details: dict[str, Any] = {
            "specification_version": SPEC_VERSION,
            "coremltools": coremltools.__version__,
            "stages": coreml_eval.stages(saved),
            "estimator": plan.estimator.summary,
            "features": plan.width,
            "on_device_check": "pending (Core ML does not run on Linux)",
        }
        notes = [ON_DEVICE_PENDING]
        if precision is not None:
            details["tree_precision"] = {
                "device": precision,
                "why": ("every threshold is a float32 number: Core ML's tree compiler may compare "
                        "in float32" if precision == "float32" else
                        "thresholds are not all float32 numbers: Core ML compares in double"),
                "thresholds": plan.estimator.threshold_rule}
        return Conversion(files=[path], precision="float64", inputs=_input_contract(plan),
                          outputs=_output_contract(plan), notes=notes, details=details)

    def quantize(self, subject: ExportSubject, conversion: Conversion,
                 workdir: Path) -> Conversion | str:
        return ("not applicable: Core ML's GLM and tree-ensemble models store doubles and have no "
                "quantized form (coremltools quantizes neural networks and ML programs only); "
                "the double-precision spec is published")

    def runner(self, subject: ExportSubject, conversion: Conversion) -> Runner:
        return CoreMLSpecRunner(conversion.model_file, subject, conversion)

    def library_versions(self) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        found = {}
        for name in ("coremltools", "protobuf"):
            try:
                found[name] = version(name)
            except PackageNotFoundError:
                pass
        return found


def _input_contract(plan: Plan) -> list[dict]:
    return [{"name": i["name"], "column": i["column"],
             "type": "Double" if i["kind"] == "double" else "String", "shape": "scalar",
             "missing": i["missing"], **({"vocabulary": i["vocabulary"]} if "vocabulary" in i else {})}
            for i in plan.inputs]


def _output_contract(plan: Plan) -> list[dict]:
    if plan.label_name:
        label_type = "Int64" if _int_labels(plan.classes) else "String"
        return [{"name": plan.label_name, "type": label_type, "role": "predicted class"},
                {"name": plan.proba_name, "type": f"Dictionary<{label_type}, Double>",
                 "role": "probability of each class", "classes": [_plain(c) for c in plan.classes]}]
    return [{"name": plan.output_name, "type": "Double", "role": "prediction"}]


def _int_labels(classes: list) -> bool:
    return bool(classes) and all(isinstance(c, (int, np.integer)) and not isinstance(c, (bool, np.bool_))
                                 for c in classes)


def _plain(value):
    return value.item() if hasattr(value, "item") else value


# --------------------------------------------------------------------------- building the spec
def build_spec(plan: Plan, subject: ExportSubject, author: str = DEFAULT_AUTHOR, license: str = ""):
    """The Core ML pipeline spec of a plan (imports coremltools: call only when exporting)."""
    from coremltools.proto import Model_pb2, OneHotEncoder_pb2

    spec = Model_pb2.Model()
    spec.specificationVersion = SPEC_VERSION
    desc = spec.description
    for item in plan.inputs:
        _add_feature(desc.input, item["name"], item["kind"], item["description"])
    int_labels = _int_labels(plan.classes)
    if subject.is_classifier:
        label_kind = "int64" if int_labels else "string"
        _add_feature(desc.output, plan.label_name, label_kind,
                     f"Predicted {subject.schema.target} (the most probable class).")
        _add_feature(desc.output, plan.proba_name, f"dict_{label_kind}",
                     f"Probability of each {subject.schema.target} class: "
                     + ", ".join(str(_plain(c)) for c in plan.classes) + ".")
        desc.predictedFeatureName = plan.label_name
        desc.predictedProbabilitiesName = plan.proba_name
        pipeline = spec.pipelineClassifier.pipeline
    else:
        _add_feature(desc.output, plan.output_name, "double", f"Predicted {subject.schema.target}.")
        desc.predictedFeatureName = plan.output_name
        pipeline = spec.pipelineRegressor.pipeline

    names = {i["column"]: i["name"] for i in plan.inputs}
    taken = set(names.values()) | {plan.label_name, plan.proba_name, plan.output_name}
    vector_inputs: list[tuple[str, int, str]] = []  # (feature, width, kind)

    def add(model_name: str) -> Any:
        model = pipeline.models.add()
        model.specificationVersion = SPEC_VERSION
        pipeline.names.append(feature_name(model_name, taken))
        return model

    for block in plan.blocks:
        if isinstance(block, NumericBlock):
            current = feature_name(f"{block.name}__raw", taken)
            m = add(f"{block.name}_vectorizer")
            for c in block.columns:
                _add_feature(m.description.input, names[c], "double")
                item = m.featureVectorizer.inputList.add()
                item.inputColumn, item.inputDimensions = names[c], 1
            _add_feature(m.description.output, current, "array", width=block.width)
            for op in block.ops:
                step = feature_name(f"{block.name}__{'imputed' if op[0] == 'impute' else 'scaled'}", taken)
                m = add(f"{block.name}_{op[0]}")
                _add_feature(m.description.input, current, "array", width=block.width)
                _add_feature(m.description.output, step, "array", width=block.width)
                if op[0] == "impute":
                    m.imputer.imputedDoubleArray.vector.extend(op[1])
                    m.imputer.replaceDoubleValue = op[2]
                else:
                    m.scaler.shiftValue.extend(op[1])
                    m.scaler.scaleValue.extend(op[2])
                current = step
            vector_inputs.append((current, block.width, "array"))
        else:
            for col in block:
                current = names[col.column]
                if col.fill is not None:
                    filled = feature_name(f"{current}__filled", taken)
                    m = add(f"{current}_impute")
                    _add_feature(m.description.input, current, "string")
                    _add_feature(m.description.output, filled, "string")
                    m.imputer.imputedStringValue = col.fill
                    m.imputer.replaceStringValue = MISSING_CATEGORY
                    current = filled
                onehot = feature_name(f"{names[col.column]}__onehot", taken)
                m = add(f"{names[col.column]}_onehot")
                _add_feature(m.description.input, current, "string")
                _add_feature(m.description.output, onehot, "dict_int64")
                m.oneHotEncoder.stringCategories.vector.extend(col.categories)
                m.oneHotEncoder.outputSparse = True
                m.oneHotEncoder.handleUnknown = (OneHotEncoder_pb2.OneHotEncoder.IgnoreUnknown
                                                 if col.handle_unknown == "ignore" else
                                                 OneHotEncoder_pb2.OneHotEncoder.ErrorOnUnknown)
                vector_inputs.append((onehot, col.width, "dict_int64"))
    features = feature_name("features", taken)
    m = add("features_vectorizer")
    for name, width, kind in vector_inputs:
        _add_feature(m.description.input, name, kind, width=width if kind == "array" else None)
        item = m.featureVectorizer.inputList.add()
        item.inputColumn, item.inputDimensions = name, width
    _add_feature(m.description.output, features, "array", width=plan.width)

    model = _estimator_spec(plan, features, int_labels)
    pipeline.models.append(model)
    pipeline.names.append(feature_name("estimator", taken))
    _metadata(spec, plan, subject, author, license)
    return spec


def _add_feature(container, name: str, kind: str, text: str = "", width: int | None = None) -> None:
    from coremltools.proto import FeatureTypes_pb2

    f = container.add()
    f.name = name
    if text:
        f.shortDescription = text
    t = f.type
    if kind == "double":
        t.doubleType.SetInParent()
    elif kind == "string":
        t.stringType.SetInParent()
    elif kind == "int64":
        t.int64Type.SetInParent()
    elif kind == "array":
        t.multiArrayType.shape.append(int(width or 0))
        t.multiArrayType.dataType = FeatureTypes_pb2.ArrayFeatureType.DOUBLE
    elif kind == "dict_int64":
        t.dictionaryType.int64KeyType.SetInParent()
    elif kind == "dict_string":
        t.dictionaryType.stringKeyType.SetInParent()
    else:
        raise ValueError(kind)


def _estimator_spec(plan: Plan, features: str, int_labels: bool):
    from coremltools.models import datatypes
    from coremltools.models._interface_management import (set_classifier_interface_params,
                                                          set_regressor_interface_params)
    from coremltools.models.tree_ensemble import TreeEnsembleClassifier, TreeEnsembleRegressor
    from coremltools.proto import Model_pb2

    est = plan.estimator
    inputs = [(features, datatypes.Array(plan.width))]
    label_type = datatypes.Int64() if int_labels else datatypes.String()
    labels = [int(c) for c in plan.classes] if int_labels else [str(_plain(c)) for c in plan.classes]
    outputs = [(plan.label_name, label_type), (plan.proba_name, datatypes.Dictionary(label_type))]
    if est.kind == "glm_classifier":
        spec = Model_pb2.Model()
        spec.specificationVersion = SPEC_VERSION
        set_classifier_interface_params(spec, inputs, labels, "glmClassifier", outputs)
        glm = spec.glmClassifier
        for row in est.weights:
            glm.weights.add().value.extend(np.asarray(row, dtype=np.float64).tolist())
        glm.offset.extend(np.asarray(est.offsets, dtype=np.float64).tolist())
        glm.postEvaluationTransform = glm.Logit
        glm.classEncoding = glm.ReferenceClass if est.encoding == "ReferenceClass" else glm.OneVsRest
        return spec
    if est.kind == "glm_regressor":
        spec = Model_pb2.Model()
        spec.specificationVersion = SPEC_VERSION
        set_regressor_interface_params(spec, inputs, plan.output_name)
        glm = spec.glmRegressor
        glm.weights.add().value.extend(np.asarray(est.weights[0], dtype=np.float64).tolist())
        glm.offset.extend(np.asarray(est.offsets, dtype=np.float64).tolist())
        glm.postEvaluationTransform = glm.NoTransform
        return spec
    if est.kind == "tree_classifier":
        builder = TreeEnsembleClassifier(inputs, labels, outputs)
    else:
        builder = TreeEnsembleRegressor(inputs, plan.output_name)
    builder.spec.specificationVersion = SPEC_VERSION
    builder.set_default_prediction_value(list(est.base) if est.dims > 1 else est.base[0])
    builder.set_post_evaluation_transform(est.transform)
    for node in est.nodes:
        if node.values is not None:
            values = node.values if est.dims > 1 else node.values.get(0, 0.0)
            builder.add_leaf_node(node.tree, node.node, values, relative_hit_rate=node.hit_rate)
        else:
            builder.add_branch_node(node.tree, node.node, node.feature, node.threshold, node.mode,
                                    node.true_child, node.false_child,
                                    relative_hit_rate=node.hit_rate,
                                    missing_value_tracks_true_child=node.missing_true)
    return builder.spec


def _metadata(spec, plan: Plan, subject: ExportSubject, author: str, license: str) -> None:
    import coremltools
    import sklearn

    md = spec.description.metadata
    est = type(subject.estimator).__name__
    task = subject.task
    predicts = (f"the class of {subject.schema.target} ({', '.join(str(_plain(c)) for c in plan.classes)})"
                if subject.is_classifier else f"{subject.schema.target}")
    md.shortDescription = (f"{subject.model_name} v{subject.version}: {est} ({task}) predicting "
                           f"{predicts} from {len(plan.inputs)} raw columns (numbers as Double, "
                           "NaN = missing; categories as String, empty = missing). Exported by "
                           "mlops-flows from a scikit-learn pipeline.")
    md.versionString = str(subject.version)
    md.author = author
    if license:
        md.license = license
    user = {
        "mlops.model_name": subject.model_name,
        "mlops.version": str(subject.version),
        "mlops.run_id": subject.run_id or "",
        "mlops.model_uri": subject.model_uri or "",
        "mlops.task": task,
        "mlops.family": subject.family or "",
        "mlops.estimator": f"{type(subject.estimator).__module__}.{est}",
        "mlops.target": subject.schema.target,
        "mlops.classes": json.dumps([_plain(c) for c in plan.classes]),
        "mlops.inputs": json.dumps({i["name"]: i["column"] for i in plan.inputs}),
        "mlops.missing_category": MISSING_CATEGORY,
        "mlops.exporter": "tasks.export.coreml",
        "mlops.verified_with": "tasks.export.coreml_eval (spec evaluation on Linux; on-device check pending)",
        "sklearn_version": sklearn.__version__,
        "com.github.apple.coremltools.version": coremltools.__version__,
        "com.github.apple.coremltools.source": "scikit-learn (spec built by mlops-flows)",
    }
    for key, value in user.items():
        md.userDefined[key] = value


# --------------------------------------------------------------------------- the runner
class CoreMLSpecRunner(Runner):
    """Evaluates the saved spec with tasks.export.coreml_eval (no Core ML runtime on Linux)."""

    measures_latency = False
    latency_note = LATENCY_NOTE

    def __init__(self, path: Path, subject: ExportSubject, conversion: Conversion | None = None,
                 tree_precision: str = "auto"):
        from tasks.export import coreml_eval

        self.eval = coreml_eval
        self.spec = coreml_eval.load(path)
        contract = (conversion.inputs if conversion is not None and conversion.inputs else None)
        if contract is None:
            mapping = json.loads(self.spec.description.metadata.userDefined.get("mlops.inputs", "{}"))
            kinds = {d.name: d.type.WhichOneof("Type") for d in self.spec.description.input}
            contract = [{"name": n, "column": c,
                         "type": "Double" if kinds.get(n) == "doubleType" else "String"}
                        for n, c in mapping.items()]
        self.contract = contract
        self.conversion = conversion
        self.checked_other_precision = False
        self.classes = subject.classes
        self.classifier = subject.is_classifier
        self.tree_precision = tree_precision
        self.runtime = ("tasks.export.coreml_eval spec walker (NumPy; Core ML itself does not run on "
                        "Linux: on-device check pending)")

    def prepare(self, X: pd.DataFrame) -> dict[str, np.ndarray]:
        feeds = {}
        for item in self.contract:
            col = X[item["column"]]
            if item["type"] == "Double":
                feeds[item["name"]] = col.to_numpy(dtype=np.float64, na_value=np.nan)
            else:
                values = col.astype(object).where(col.notna(), MISSING_CATEGORY)
                feeds[item["name"]] = np.asarray([str(v) for v in values], dtype=object)
        return feeds

    def run(self, native: dict[str, np.ndarray]) -> Prediction:
        prediction = self._predict(native, self.tree_precision)
        if not self.checked_other_precision:
            self.checked_other_precision = True
            self._other_precision(native, prediction)
        return prediction

    def _predict(self, native: dict[str, np.ndarray], precision: str) -> Prediction:
        scored = self.eval.predict(self.spec, native, precision)
        if not self.classifier:
            return Prediction(scores=np.asarray(scored.values, dtype=np.float64))
        position = {str(c): j for j, c in enumerate(scored.classes)}
        missing = [c for c in self.classes if str(_plain(c)) not in position]
        if missing:
            raise ExportError(f"the Core ML spec has no probability for classes {missing}; its "
                              f"classes: {scored.classes}")
        order = [position[str(_plain(c))] for c in self.classes]
        return Prediction(scores=scored.probabilities[:, order], labels=np.asarray(scored.labels))

    def _other_precision(self, native: dict[str, np.ndarray], prediction: Prediction) -> None:
        """How much the tree model depends on the device comparing in double (or float32): the
        same rows evaluated with the other precision, recorded in the conversion's details and
        notes (the parity sample is the first batch this runner sees)."""
        device = self.eval.tree_precision_of(self.spec)
        if device is None or self.conversion is None:
            return
        other = "float32" if device == "float64" else "float64"
        alt = self._predict(native, other)
        n = len(prediction.scores)
        diff = float(np.max(np.abs(np.asarray(alt.scores) - np.asarray(prediction.scores)))) if n else 0.0
        changed_rows = int(np.sum(np.any(np.abs(np.asarray(alt.scores).reshape(n, -1)
                                                - np.asarray(prediction.scores).reshape(n, -1)) > 0,
                                         axis=1))) if n else 0
        labels = (int(np.sum(np.asarray(alt.labels).astype(str) != np.asarray(prediction.labels).astype(str)))
                  if prediction.labels is not None else None)
        check = {"precision": other, "rows": n, "rows_changed": changed_rows,
                 "max_abs_diff": diff, "labels_changed": labels}
        info = self.conversion.details.setdefault("tree_precision", {})
        info[f"if_device_compared_in_{other}"] = check
        what = f"{changed_rows} of {n} parity rows would move (max |diff| {diff:.2g}" + \
            (f", {labels} labels)" if labels is not None else ")")
        self.conversion.notes.append(
            f"trees compare in {device} on device ({info.get('why', '')}); "
            f"had the device compared in {other}, {what}")
