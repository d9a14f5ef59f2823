"""Scikit-learn pipelines as TensorFlow Lite graphs (pure: numpy and the LiteRT flatbuffer schema).

No maintained converter turns a scikit-learn pipeline into TFLite (onnx-tf lacks the ai.onnx.ml
operators trees and linear models become), and TensorFlow's own converter would have to be handed
a TF graph first and then talked out of quantizing the wrong tensors. This module writes the
`.tflite` flatbuffer directly with the schema that ships in `ai_edge_litert`, which gives exact
control over every tensor's type: comparison tensors (thresholds, feature indices, child links,
path matrices, one-hot codes) are float32/int32/int64 by construction and never pass through a
quantizer. TensorFlow is not needed at all; operator versions and the minimum runtime are the ones
TensorFlow's converter writes for the same operators (checked by tests/test_export_tflite.py).

Three steps, each a plain function:

1. `layout_of(pipeline)`: what the ColumnTransformer computes, as data. Numeric columns are
   imputed in the graph (`SELECT_V2(x != x, fill, x)`), scalers are affine maps folded into the
   model (`a·x + b`), one-hot columns are `EQUAL(code[c], k)` on integer category codes.
2. `model_of(estimator)`: a `LinearModel` (coefficients in feature space) or a `TreeEnsemble`
   (node tables of every tree, leaf values, baseline, link, and the threshold rule).
3. `build(...)`: the graph, with a strategy for trees chosen by shape (`choose_strategy`, a
   latency model fitted here):

   * **gemm** (shallow or lopsided ensembles with few leaves: HistGradientBoosting) —
     hummingbird's GEMM form: every internal node's comparison at once (`GATHER` +
     `LESS_EQUAL`), `BATCH_MATMUL` with a per-tree path matrix `C` (+1 left subtree, −1 right
     subtree; stored int8 with scale 1, i.e. exactly), `EQUAL` to the per-leaf count of left
     turns marks the leaf reached, a second `BATCH_MATMUL` picks its value. Size and cost per
     row ≈ trees × internal nodes × leaves.
   * **gather** (deep trees, big forests) — a walk unrolled `depth` times over all trees at
     once: feature, threshold and right child looked up by `GATHER` (preorder ids: the left child
     is the next id), `SELECT_V2` on `x <= t`; leaves never pass their test and link to
     themselves, so trees of every depth run the same steps. 16 bytes per node for a binary
     forest (ONNX TreeEnsemble: about 39, measured).

Threshold semantics (the only way to zero label changes):

* scikit-learn's trees (`DecisionTree*`, `RandomForest*`, `ExtraTrees*`, `GradientBoosting*`) cast
  X to float32 and compare `float64(x32) <= t64`. The graph casts the float64 input to float32 the
  same way and compares with the largest float32 ≤ t64 (`nextafter` toward −inf where rounding
  went up): equivalent for every float32 x.
* `HistGradientBoosting*` compares float64 X with float64 thresholds (midpoints of data values,
  sometimes one float64 ulp from a data value: sklearn's diabetes data). No float32 threshold can
  reproduce that, and TFLite has no float64 comparison kernels, so the graph compares int64
  order keys of the float64 bits (`BITCAST`; bits for x ≥ 0, INT64_MIN − bits for x < 0):
  `x <= t` ⟺ `key(x) <= key(t)`, exactly.

Input contract (also embedded in the file's metadata, `mlops.contract`):

* `numeric`: float64 [N, n_numeric], columns in contract order, NaN = missing (imputed in the
  graph with the pipeline's imputer statistic, the training median for train_model's models).
* `categorical`: int32 [N, n_categorical]: the position of the value in that column's vocabulary
  (the fitted OneHotEncoder's categories); a missing value is sent as the column's `missing_code`
  (the position of the imputer's fill value, e.g. "missing", or −1 when training never saw it);
  −1 (any code outside the vocabulary) = unseen category → all-zero one-hot, as scikit-learn's
  handle_unknown="ignore".
* Outputs: classifiers `probabilities` float32 [N, n_classes] (manifest class order) and `label`
  int32 [N] (index into the classes, scikit-learn's rule for ties: `raw > 0` for binary
  HistGradientBoosting and logistic regression, `raw >= 0` for GradientBoosting, first maximum
  otherwise); regressors `prediction` float32 [N].
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CONTRACT_VERSION = 1
METADATA_CONTRACT = "mlops.contract"
GEMM_MAX_CELLS = 1 << 18  # trees × internal nodes × leaves (int8 path-matrix bytes) at most
# Latency model of the two tree strategies, fitted on LiteRT 2.3 (CPU, 1 thread, XNNPACK) on
# 16 forests and boosted ensembles here (within about 1.5x):
# single row  gemm ≈ 2.5 µs + 0.04 µs·trees + 1.2e-4 µs·cells    gather ≈ 1.5 µs + depth·(0.5 µs + 0.009 µs·trees)
# batch/row   gemm ≈ 0.08 µs·trees + 3.5e-4 µs·cells              gather ≈ 0.012 µs·depth·trees
GEMM_BATCH_SLACK = 1.5  # gemm may be this much slower per row in batches if it wins single rows
UNSEEN_CODE = -1


class Unsupported(Exception):
    """The pipeline uses something this converter does not carry (message = the reason)."""


# =========================================================================== 1. preprocessing
@dataclass
class NumericColumn:
    name: str
    fill: float | None  # imputation value (None: no imputer; NaN is outside the contract)


@dataclass
class CategoricalColumn:
    name: str
    vocabulary: list  # the encoder's categories (str; None for a NaN category)
    missing_code: int  # code that stands for a missing value
    fill: Any = None  # the imputer's fill value (what a missing value becomes)
    handle_unknown: str = "ignore"


@dataclass
class Feature:
    """One column of the ColumnTransformer's output: a·X_full[column] + b."""

    column: int
    a: float = 1.0
    b: float = 0.0


@dataclass
class Layout:
    """The graph's feature block X_full = [imputed numeric | one-hot], and how scikit-learn's
    transformed features map onto it."""

    numeric: list[NumericColumn]
    categorical: list[CategoricalColumn]
    onehot: list[tuple[int, int]]  # X_full column n_numeric + i is (categorical index, code)
    features: list[Feature]  # scikit-learn feature f

    @property
    def width(self) -> int:
        return len(self.numeric) + len(self.onehot)

    @property
    def n_features(self) -> int:
        return len(self.features)

    def encode(self, X) -> tuple[np.ndarray, np.ndarray]:
        """A DataFrame of raw columns as the graph's inputs (float64 numeric, int32 codes)."""
        n = len(X)
        num = np.empty((n, len(self.numeric)), dtype=np.float64)
        for j, col in enumerate(self.numeric):
            num[:, j] = X[col.name].to_numpy(dtype=np.float64, na_value=np.nan)
        codes = np.empty((n, len(self.categorical)), dtype=np.int32)
        for j, col in enumerate(self.categorical):
            codes[:, j] = encode_column(X[col.name], col)
        return num, codes

    def full(self, num: np.ndarray, codes: np.ndarray, dtype=np.float64) -> np.ndarray:
        """X_full in numpy (what the graph computes before the model), for checks."""
        out = np.zeros((num.shape[0], self.width), dtype=dtype)
        for j, col in enumerate(self.numeric):
            x = num[:, j].astype(dtype)
            out[:, j] = np.where(np.isnan(x), np.nan if col.fill is None else col.fill, x)
        for i, (c, k) in enumerate(self.onehot):
            out[:, len(self.numeric) + i] = codes[:, c] == k
        return out

    def transformed(self, num: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """scikit-learn's transformed features, from the layout (float64), for the self-check."""
        full = self.full(num.astype(np.float64), codes)
        return np.stack([f.a * full[:, f.column] + f.b for f in self.features], axis=1) \
            if self.features else np.zeros((num.shape[0], 0))


def encode_column(values, col: CategoricalColumn) -> np.ndarray:
    """Category codes of one column: position in the vocabulary, `missing_code` for NaN/None,
    UNSEEN_CODE for anything else. The same rule a phone app applies."""
    index = {v: i for i, v in enumerate(col.vocabulary) if v is not None}
    out = np.empty(len(values), dtype=np.int32)
    for r, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out[r] = col.missing_code
        else:
            out[r] = index.get(str(v), UNSEEN_CODE)
    return out


def _steps(transformer) -> list:
    if isinstance(transformer, str):
        return []  # "passthrough"
    if type(transformer).__name__ == "Pipeline":
        return [s for _, s in transformer.steps if s is not None and s != "passthrough"]
    return [transformer]


def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def layout_of(pipeline, numeric_names: list[str] | None = None) -> Layout:
    """Read the fitted preprocessing (a ColumnTransformer, or nothing) into a Layout.

    Supported: per branch, numeric `[SimpleImputer] [StandardScaler | MinMaxScaler]*` or
    passthrough; categorical `[SimpleImputer(constant | most_frequent)] OneHotEncoder`."""
    steps = getattr(pipeline, "steps", None) or []
    if len(steps) == 1:
        raise Unsupported("a pipeline without preprocessing: the TFLite contract needs the "
                          "ColumnTransformer that names the raw columns")
    pre = steps[0][1] if len(steps) > 1 else None
    if len(steps) > 2:
        raise Unsupported(f"pipelines of more than preprocessing + estimator "
                          f"({[n for n, _ in steps]})")
    if type(pre).__name__ != "ColumnTransformer":
        raise Unsupported(f"preprocessing {type(pre).__name__}: the TFLite converter reads a "
                          "ColumnTransformer of imputers, scalers and one-hot encoders")
    names = [str(c) for c in pre.feature_names_in_]
    numeric: list[NumericColumn] = []
    categorical: list[CategoricalColumn] = []
    onehot: list[tuple[int, int]] = []
    pending: list[tuple[str, Any]] = []  # features in output order: ("num", (col, a, b)) | ("oh", i)
    num_index: dict[str, int] = {}
    cat_index: dict[str, int] = {}
    for name, trans, _cols in pre.transformers_:
        if isinstance(trans, str) and trans == "drop":
            continue
        indices = list(pre._transformer_to_input_indices.get(name, []))
        if not indices:
            continue
        cols = [names[i] for i in indices]
        steps_ = _steps(trans)
        kinds = [type(s).__name__ for s in steps_]
        sl = pre.output_indices_[name]
        before = len(pending)
        if "OneHotEncoder" in kinds:
            _categorical_branch(name, cols, steps_, kinds, categorical, cat_index, onehot, pending)
        else:
            _numeric_branch(name, cols, steps_, kinds, numeric, num_index, pending)
        produced = len(pending) - before
        if produced != sl.stop - sl.start:
            raise Unsupported(f"branch {name!r} yields {sl.stop - sl.start} features but the "
                              f"converter read {produced}")
    n_num = len(numeric)
    features = [Feature(arg[0], arg[1], arg[2]) if kind == "num" else Feature(n_num + arg)
                for kind, arg in pending]
    overlap = set(num_index) & set(cat_index)
    if overlap:
        raise Unsupported(f"columns {sorted(overlap)} are both numeric and one-hot encoded")
    if numeric_names is not None:
        wrong = [c for c in cat_index if c in numeric_names]
        if wrong:
            raise Unsupported(f"numeric schema columns {wrong} are one-hot encoded; the TFLite "
                              "contract sends numeric columns as float32")
    return Layout(numeric, categorical, onehot, features)


def _numeric_branch(name, cols, steps_, kinds, numeric, num_index, pending):
    fills: list[float | None] = [None] * len(cols)
    keep = [True] * len(cols)
    a = np.ones(len(cols))
    b = np.zeros(len(cols))
    for pos, (step, kind) in enumerate(zip(steps_, kinds)):
        if kind == "SimpleImputer":
            if pos != 0:
                raise Unsupported(f"branch {name!r}: a SimpleImputer after another step; "
                                  "put the imputer first")
            if not _is_nan(step.missing_values):
                raise Unsupported(f"branch {name!r}: SimpleImputer(missing_values="
                                  f"{step.missing_values!r}); the graph imputes NaN")
            if step.add_indicator:
                raise Unsupported(f"branch {name!r}: SimpleImputer(add_indicator=True)")
            stats = np.asarray(step.statistics_, dtype=np.float64)
            for j, s in enumerate(stats):
                if math.isnan(s):
                    if step.keep_empty_features:
                        fills[j] = 0.0
                    else:
                        keep[j] = False  # scikit-learn drops an all-missing column
                else:
                    fills[j] = float(s)
        elif kind == "StandardScaler":
            mean = np.zeros(len(cols)) if step.mean_ is None else np.asarray(step.mean_)
            scale = np.ones(len(cols)) if step.scale_ is None else np.asarray(step.scale_)
            kept = np.flatnonzero(keep)
            if len(mean) != len(kept):
                raise Unsupported(f"branch {name!r}: scaler width does not match")
            full_mean, full_scale = np.zeros(len(cols)), np.ones(len(cols))
            full_mean[kept], full_scale[kept] = mean, scale
            a, b = a / full_scale, (b - full_mean) / full_scale
        elif kind == "MinMaxScaler":
            if step.clip:
                raise Unsupported(f"branch {name!r}: MinMaxScaler(clip=True)")
            kept = np.flatnonzero(keep)
            s, m = np.ones(len(cols)), np.zeros(len(cols))
            s[kept], m[kept] = step.scale_, step.min_
            a, b = a * s, b * s + m
        else:
            raise Unsupported(f"branch {name!r}: numeric step {kind} (supported: SimpleImputer, "
                              "StandardScaler, MinMaxScaler)")
    for j, col in enumerate(cols):
        if col not in num_index:
            num_index[col] = len(numeric)
            numeric.append(NumericColumn(col, fills[j]))
        elif numeric[num_index[col]].fill != fills[j]:
            raise Unsupported(f"column {col!r} is imputed differently in two branches")
        if keep[j]:
            if a[j] <= 0 or not np.isfinite(a[j]):
                raise Unsupported(f"column {col!r}: non-positive scale {a[j]}")
            pending.append(("num", (num_index[col], float(a[j]), float(b[j]))))


def _categorical_branch(name, cols, steps_, kinds, categorical, cat_index, onehot, pending):
    if kinds[-1] != "OneHotEncoder" or any(k not in ("SimpleImputer",) for k in kinds[:-1]) \
            or len(kinds) > 2:
        raise Unsupported(f"branch {name!r}: categorical steps {kinds} (supported: "
                          "[SimpleImputer] OneHotEncoder)")
    enc = steps_[-1]
    if getattr(enc, "max_categories", None) or getattr(enc, "min_frequency", None):
        raise Unsupported(f"branch {name!r}: OneHotEncoder infrequent categories")
    fills: list[Any] = [None] * len(cols)
    if len(steps_) == 2:
        imp = steps_[0]
        if not _is_nan(imp.missing_values):
            raise Unsupported(f"branch {name!r}: SimpleImputer(missing_values="
                              f"{imp.missing_values!r}) on categories")
        if imp.add_indicator:
            raise Unsupported(f"branch {name!r}: SimpleImputer(add_indicator=True)")
        fills = list(np.asarray(imp.statistics_, dtype=object))
    drop = getattr(enc, "drop_idx_", None)
    for j, col in enumerate(cols):
        cats = list(enc.categories_[j])
        vocab = [None if _is_nan(c) else str(c) for c in cats]
        fill = fills[j]
        if fill is not None and not _is_nan(fill):
            missing = vocab.index(str(fill)) if str(fill) in vocab else UNSEEN_CODE
        else:
            missing = vocab.index(None) if None in vocab else UNSEEN_CODE
        if col in cat_index:
            raise Unsupported(f"column {col!r} is one-hot encoded twice")
        cat_index[col] = len(categorical)
        categorical.append(CategoricalColumn(col, vocab, missing, None if _is_nan(fill) else fill,
                                             enc.handle_unknown))
        dropped = None if drop is None or drop[j] is None else int(drop[j])
        for k in range(len(cats)):
            if k == dropped:
                continue
            onehot.append((cat_index[col], k))
            pending.append(("oh", len(onehot) - 1))


# =========================================================================== 2. models
@dataclass
class LinearModel:
    coef: np.ndarray  # [F, K] in scikit-learn feature space (float64)
    intercept: np.ndarray  # [K]
    link: str  # identity | logistic | softmax
    label: str = "argmax"  # argmax | raw>0


@dataclass
class Tree:
    feature: np.ndarray  # [n] scikit-learn feature index (internal nodes)
    threshold: np.ndarray  # [n] float64
    left: np.ndarray  # [n] (-1 at leaves)
    right: np.ndarray
    value: np.ndarray  # [n, W] float64 (used at leaves)

    max_depth: int | None = None  # when the estimator records it

    @property
    def n_nodes(self) -> int:
        return len(self.feature)

    @property
    def is_leaf(self) -> np.ndarray:
        return self.left < 0

    def depth(self) -> int:
        if self.max_depth is not None:
            return self.max_depth
        depth = np.zeros(self.n_nodes, dtype=np.int64)
        for i in range(self.n_nodes):  # parents precede children in scikit-learn's arrays
            if self.left[i] >= 0:
                depth[self.left[i]] = depth[self.right[i]] = depth[i] + 1
        return int(depth.max()) if self.n_nodes else 0


@dataclass
class TreeEnsemble:
    trees: list[Tree]
    width: int  # W: leaf value columns (K for forest classifiers, else 1)
    groups: int  # G: outputs fed by consecutive trees when W == 1 (HGB/GB multiclass: K)
    baseline: np.ndarray  # [n_outputs] added to the sum
    divide: int  # sum / divide (forests average; boosting 1)
    link: str  # identity | exp | logistic | softmax | proba (binary forests: [1-p, p])
    rule: str  # float32 (x cast to float32, as scikit-learn's trees) | float64 (HistGradientBoosting)
    label: str = "argmax"  # argmax | raw>0 | raw>=0

    @property
    def n_trees(self) -> int:
        return len(self.trees)

    @property
    def domain(self) -> str:
        """Type of the compared tensors: float32 (floor-rounded thresholds) or int64 order keys
        of float64 values."""
        return "float32" if self.rule == "float32" else "int64"

    @property
    def n_nodes(self) -> int:
        return sum(t.n_nodes for t in self.trees)

    @property
    def depth(self) -> int:
        return max((t.depth() for t in self.trees), default=0)

    @property
    def n_outputs(self) -> int:
        return self.width if self.width > 1 else self.groups


FOREST_LIKE = {"DecisionTreeClassifier", "DecisionTreeRegressor", "RandomForestClassifier",
               "RandomForestRegressor", "ExtraTreesClassifier", "ExtraTreesRegressor"}
BOOSTING = {"GradientBoostingClassifier", "GradientBoostingRegressor"}
HIST = {"HistGradientBoostingClassifier", "HistGradientBoostingRegressor"}
LINEAR = {"LogisticRegression", "LinearRegression", "Ridge", "Lasso", "ElasticNet"}
SUPPORTED = FOREST_LIKE | BOOSTING | HIST | LINEAR
LINKS = {"IdentityLink": "identity", "LogLink": "exp", "LogitLink": "logistic",
         "MultinomialLogit": "softmax"}


def model_of(estimator, n_features: int) -> LinearModel | TreeEnsemble:
    kind = type(estimator).__name__
    if kind not in SUPPORTED:
        raise Unsupported(f"estimator {kind} (supported: {', '.join(sorted(SUPPORTED))})")
    if getattr(estimator, "n_features_in_", n_features) != n_features:
        raise Unsupported(f"{kind} expects {estimator.n_features_in_} features, the "
                          f"preprocessing yields {n_features}")
    if kind in LINEAR:
        return _linear(estimator, kind)
    if kind in FOREST_LIKE:
        return _forest(estimator, kind)
    if kind in HIST:
        return _hist(estimator, kind)
    return _boosting(estimator, kind)


def _linear(est, kind) -> LinearModel:
    coef = np.asarray(est.coef_, dtype=np.float64)
    intercept = np.atleast_1d(np.asarray(est.intercept_, dtype=np.float64))
    if kind == "LogisticRegression":
        if coef.shape[0] == 1:  # binary: p1 = expit(decision); label decision > 0
            return LinearModel(coef.T, intercept, "logistic", "raw>0")
        return LinearModel(coef.T, intercept, "softmax", "argmax")
    if coef.ndim == 2 and coef.shape[0] != 1:
        raise Unsupported(f"{kind} with {coef.shape[0]} targets (one target supported)")
    return LinearModel(coef.reshape(-1, 1), intercept.reshape(1), "identity")


def _sk_tree(tree_, values: np.ndarray) -> Tree:
    return Tree(np.asarray(tree_.feature, dtype=np.int64), np.asarray(tree_.threshold, np.float64),
                np.asarray(tree_.children_left, np.int64), np.asarray(tree_.children_right, np.int64),
                np.asarray(values, dtype=np.float64), int(tree_.max_depth))


def _forest(est, kind) -> TreeEnsemble:
    if getattr(est, "n_outputs_", 1) != 1:
        raise Unsupported(f"{kind} with several outputs")
    members = est.estimators_ if hasattr(est, "estimators_") else [est]
    classifier = kind.endswith("Classifier")
    trees = []
    n_classes = int(est.n_classes_) if classifier else 0
    for m in members:
        value = m.tree_.value[:, 0, :]  # classifier: class fractions (scikit-learn >= 1.4)
        if classifier:
            value = value[:, :n_classes]
            if n_classes == 2:
                value = value[:, 1:2]  # p(class 1); p(class 0) = 1 - p in the graph
        trees.append(_sk_tree(m.tree_, value))
    if classifier:
        width = 1 if n_classes == 2 else n_classes
        link = "proba" if n_classes == 2 else "identity"
        return TreeEnsemble(trees, width, 1, np.zeros(max(width, 1)), len(trees), link, "float32")
    return TreeEnsemble(trees, 1, 1, np.zeros(1), len(trees), "identity", "float32")


def _hist(est, kind) -> TreeEnsemble:
    if getattr(est, "is_categorical_", None) is not None and np.any(est.is_categorical_):
        raise Unsupported(f"{kind} with native categorical features; retrain with one-hot "
                          "encoded categoricals (categorical_features=None), as train_model does")
    if getattr(est, "_preprocessor", None) is not None:
        raise Unsupported(f"{kind} with its own categorical preprocessor")
    link = LINKS.get(type(est._loss.link).__name__)
    if link is None:
        raise Unsupported(f"{kind} with loss link {type(est._loss.link).__name__}")
    k = int(est.n_trees_per_iteration_)
    trees = []
    for iteration in est._predictors:
        for predictor in iteration:
            nodes = predictor.nodes
            if np.any(nodes["is_categorical"]):
                raise Unsupported(f"{kind} with categorical splits")
            leaf = nodes["is_leaf"].astype(bool)
            left = np.where(leaf, -1, nodes["left"].astype(np.int64))
            right = np.where(leaf, -1, nodes["right"].astype(np.int64))
            trees.append(Tree(nodes["feature_idx"].astype(np.int64),
                              nodes["num_threshold"].astype(np.float64), left, right,
                              nodes["value"].astype(np.float64).reshape(-1, 1),
                              int(nodes["depth"].max())))
    baseline = np.asarray(est._baseline_prediction, dtype=np.float64).reshape(-1)
    label = "raw>0" if link == "logistic" else "argmax"
    return TreeEnsemble(trees, 1, k, baseline, 1, link, "float64", label)


def _boosting(est, kind) -> TreeEnsemble:
    init = est.init_
    if not (init == "zero" or type(init).__name__ in ("DummyClassifier", "DummyRegressor")):
        raise Unsupported(f"{kind} with init estimator {type(init).__name__} (constant inits only)")
    link = LINKS.get(type(est._loss.link).__name__)
    if link is None:
        raise Unsupported(f"{kind} with loss link {type(est._loss.link).__name__}")
    probe = np.zeros((1, est.n_features_in_), dtype=np.float32)
    baseline = np.asarray(est._raw_predict_init(probe), dtype=np.float64).reshape(-1)
    lr = float(est.learning_rate)
    stages = est.estimators_  # [n_iter, K]
    trees = [_sk_tree(stages[i, j].tree_, stages[i, j].tree_.value[:, 0, :1] * lr)
             for i in range(stages.shape[0]) for j in range(stages.shape[1])]
    label = "raw>=0" if link == "logistic" else "argmax"
    return TreeEnsemble(trees, 1, stages.shape[1], baseline, 1, link, "float32", label)


# --------------------------------------------------------------------------- threshold rules
INT64_MIN = np.iinfo(np.int64).min


def float32_floor(t64: np.ndarray) -> np.ndarray:
    """The largest float32 <= t64: scikit-learn's trees compare float64(x32) <= t64, and for every
    float32 x that holds exactly when x <= float32_floor(t64)."""
    t64 = np.asarray(t64, dtype=np.float64)
    with np.errstate(over="ignore"):
        t32 = t64.astype(np.float32)
    up = t32.astype(np.float64) > t64
    t32[up] = np.nextafter(t32[up], np.float32(-np.inf))
    return t32


def order_key(x64: np.ndarray) -> np.ndarray:
    """int64 keys ordered as the float64 values: bits for x >= 0, INT64_MIN − bits for x < 0
    (so −0.0 and +0.0 share key 0). `x <= t` ⟺ `key(x) <= key(t)` for every non-NaN x and t —
    how the graph compares float64 without float64 kernels (TFLite has BITCAST, not float64
    LESS_EQUAL)."""
    bits = np.ascontiguousarray(x64, dtype=np.float64).view(np.int64)
    return np.where(bits < 0, INT64_MIN - bits, bits).astype(np.int64)


def thresholds_in(domain: str, t64: np.ndarray) -> np.ndarray:
    return float32_floor(t64) if domain == "float32" else order_key(t64)


def in_feature_space(ens: TreeEnsemble, layout: Layout) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per tree: (X_full column, threshold in the ensemble's domain) of every node, the scaler's
    affine map undone (a·x + b <= t ⟺ x <= (t − b)/a for a > 0; exact when a = 1, b = 0, which is
    what train_model builds for trees)."""
    cols = np.asarray([f.column for f in layout.features], dtype=np.int64)
    a = np.asarray([f.a for f in layout.features], dtype=np.float64)
    b = np.asarray([f.b for f in layout.features], dtype=np.float64)
    out = []
    for tree in ens.trees:
        internal = ~tree.is_leaf
        f = np.where(internal, tree.feature, 0)
        t = np.where(internal, (tree.threshold - b[f]) / a[f], 0.0)
        out.append((np.where(internal, cols[f], 0), thresholds_in(ens.domain, t)))
    return out


# =========================================================================== 3. cost and strategy
@dataclass
class Shape:
    n_trees: int
    n_nodes: int
    max_internal: int
    max_leaves: int
    depth: int
    width: int
    threshold_bytes: int = 4  # float32; 8 for int64 order keys

    @property
    def gemm_cells(self) -> int:
        return self.n_trees * self.max_internal * self.max_leaves

    def gemm_bytes(self) -> int:  # path matrix int8, leaf counts and values, features, thresholds
        t = self.n_trees
        return (self.gemm_cells + t * self.max_leaves * (4 + 4 * self.width)
                + t * self.max_internal * (4 + self.threshold_bytes))

    def gather_bytes(self) -> int:  # feature, threshold, right link and values per node
        return self.n_nodes * (8 + self.threshold_bytes + 4 * self.width)

    def single_row_us(self) -> dict[str, float]:
        return {"gemm": 2.5 + 0.04 * self.n_trees + 1.2e-4 * self.gemm_cells,
                "gather": 1.5 + self.depth * (0.5 + 0.009 * self.n_trees)}

    def batch_row_us(self) -> dict[str, float]:
        return {"gemm": 0.08 * self.n_trees + 3.5e-4 * self.gemm_cells,
                "gather": 0.012 * self.depth * self.n_trees}


def shape_of(ens: TreeEnsemble) -> Shape:
    internal = [int((~t.is_leaf).sum()) for t in ens.trees]
    leaves = [int(t.is_leaf.sum()) for t in ens.trees]
    return Shape(ens.n_trees, ens.n_nodes, max(max(internal, default=0), 1),
                 max(max(leaves, default=1), 1), max(ens.depth, 1), ens.width,
                 4 if ens.domain == "float32" else 8)


def choose_strategy(shape: Shape, forced: str | None = None) -> tuple[str, str]:
    """gemm for shallow or lopsided ensembles with few leaves (HistGradientBoosting grows leaf by
    leaf: depth 11-17 with 15-31 leaves), gather for the rest. Returns (strategy, why)."""
    single, batch = shape.single_row_us(), shape.batch_row_us()
    figures = (f"model estimate per row: gemm {single['gemm']:.1f} µs single / "
               f"{batch['gemm']:.2f} µs batched, gather {single['gather']:.1f} µs / "
               f"{batch['gather']:.2f} µs")
    if forced in ("gemm", "gather"):
        if forced == "gemm" and shape.gemm_cells > 16 * GEMM_MAX_CELLS:
            raise Unsupported(f"gemm forced on {shape.gemm_cells:,} path-matrix cells; use gather")
        return forced, f"forced by settings ({forced}); {figures}"
    if shape.gemm_cells > GEMM_MAX_CELLS:
        return "gather", (f"{shape.n_trees} trees × {shape.max_internal} internal nodes × "
                          f"{shape.max_leaves} leaves = {shape.gemm_cells:,} path-matrix cells "
                          f"> {GEMM_MAX_CELLS:,}: a depth-{shape.depth} walk is smaller and faster")
    if single["gemm"] < single["gather"] and batch["gemm"] <= GEMM_BATCH_SLACK * batch["gather"]:
        return "gemm", (f"{shape.gemm_cells:,} path-matrix cells replace a {shape.depth}-step "
                        f"walk; {figures}")
    return "gather", f"a {shape.depth}-step walk is cheaper; {figures}"


# =========================================================================== 4. flatbuffer graph
def _schema():
    from ai_edge_litert import schema_py_generated as fb

    return fb


_NP_TO_TFL = {"float64": "FLOAT64", "float32": "FLOAT32", "float16": "FLOAT16", "int32": "INT32", "int8": "INT8",
              "int16": "INT16", "int64": "INT64", "bool": "BOOL", "uint8": "UINT8"}


class Graph:
    """A single-subgraph TFLite model under construction. Shapes use 1 for the batch and −1 in
    the shape signature, so the interpreter can resize the batch."""

    def __init__(self):
        self.fb = _schema()
        self.tensors: list = []
        self.buffers: list[bytes | None] = [None]  # buffer 0: the empty sentinel
        self.ops: list = []
        self.opcodes: dict[int, int] = {}  # builtin code -> version
        self.names: dict[int, str] = {}
        self.shapes: list[tuple[int, ...]] = []  # -1 = batch
        self.dtypes: list[str] = []
        self.roles: dict[int, str] = {}  # constant tensor -> role (for the manifest)
        self.counts: dict[str, int] = {}

    # ---------------------------------------------------------------- tensors
    def _tensor(self, name: str, dtype: str, shape: tuple[int, ...], buffer: int = 0,
                quant=None) -> int:
        t = self.fb.TensorT()
        t.name = name
        t.type = getattr(self.fb.TensorType, _NP_TO_TFL[dtype])
        t.shape = [1 if d < 0 else d for d in shape]
        if any(d < 0 for d in shape):
            t.shapeSignature = list(shape)
        t.buffer = buffer
        t.quantization = quant
        self.tensors.append(t)
        self.shapes.append(tuple(shape))
        self.dtypes.append(dtype)
        return len(self.tensors) - 1

    def input(self, name: str, dtype: str, shape: tuple[int, ...]) -> int:
        return self._tensor(name, dtype, shape)

    def const(self, array: np.ndarray, name: str, role: str = "structure") -> int:
        array = np.ascontiguousarray(array)
        self.buffers.append(array.tobytes())
        idx = self._tensor(name, str(array.dtype), tuple(array.shape), len(self.buffers) - 1)
        self.roles[idx] = role
        return idx

    def weights(self, array: np.ndarray, name: str, precision: str, axis: int | None = None) -> int:
        """A float32 weight tensor stored at `precision` (float32 | float16 | int8), dequantized
        once at load (DEQUANTIZE on a constant is computed in Prepare and cached)."""
        array = np.asarray(array, dtype=np.float64)
        if precision == "float32":
            return self.const(array.astype(np.float32), name, "weights:float32")
        if precision == "float16":
            q = self.const(array.astype(np.float16), name + "/float16", "weights:float16")
            return self.op("DEQUANTIZE", [q], "float32", self.shapes[q])
        if precision != "int8":
            raise ValueError(precision)
        q_arr, scale = quantize_int8(array, axis)
        quant = self.fb.QuantizationParametersT()
        quant.scale = [float(s) for s in np.atleast_1d(scale)]
        quant.zeroPoint = [0] * len(quant.scale)
        quant.quantizedDimension = 0 if axis is None else axis
        self.buffers.append(np.ascontiguousarray(q_arr).tobytes())
        q = self._tensor(name + "/int8", "int8", tuple(q_arr.shape), len(self.buffers) - 1, quant)
        self.roles[q] = "weights:int8"
        return self.op("DEQUANTIZE", [q], "float32", self.shapes[q])

    def exact_int8(self, array: np.ndarray, name: str, role: str) -> int:
        """Small integers (path matrices: −1, 0, 1) stored as int8 and dequantized with scale 1:
        lossless, a quarter of the float32 size."""
        ints = np.asarray(array)
        if np.any(np.abs(ints) > 127) or np.any(ints != np.round(ints)):
            raise ValueError("exact_int8 takes integers in [-127, 127]")
        quant = self.fb.QuantizationParametersT()
        quant.scale, quant.zeroPoint, quant.quantizedDimension = [1.0], [0], 0
        self.buffers.append(np.ascontiguousarray(ints.astype(np.int8)).tobytes())
        q = self._tensor(name + "/int8", "int8", tuple(ints.shape), len(self.buffers) - 1, quant)
        self.roles[q] = role
        return self.op("DEQUANTIZE", [q], "float32", self.shapes[q])

    # ---------------------------------------------------------------- operators
    def op(self, code: str, inputs: list[int], dtype: str, shape: tuple[int, ...],
           options: tuple[str, Any] | None = None, name: str | None = None) -> int:
        out = self._tensor(name or f"{code.lower()}_{len(self.ops)}", dtype, shape)
        self.raw_op(code, inputs, [out], options)
        return out

    def raw_op(self, code: str, inputs: list[int], outputs: list[int],
               options: tuple[str, Any] | None = None) -> None:
        fb = self.fb
        builtin = getattr(fb.BuiltinOperator, code)
        q = self.tensors[inputs[0]].quantization if inputs else None
        per_channel = bool(q is not None and q.scale is not None and len(q.scale) > 1)
        version = op_version(code, [self.dtypes[i] for i in inputs], self.dtypes[outputs[0]],
                             options, per_channel)
        # one OperatorCode per builtin at the highest version its uses need (as TF's converter)
        self.opcodes[builtin] = max(version, self.opcodes.get(builtin, 0))
        self.names[builtin] = code
        o = fb.OperatorT()
        o.opcodeIndex = builtin  # replaced by the OperatorCode's position in serialize()
        o.inputs = list(inputs)
        o.outputs = list(outputs)
        if options is not None:
            kind, obj = options
            o.builtinOptionsType = getattr(fb.BuiltinOptions, kind)
            o.builtinOptions = obj
        self.ops.append(o)
        self.counts[code] = self.counts.get(code, 0) + 1

    def op_versions(self) -> set[tuple[str, int]]:
        return {(self.names[b], v) for b, v in self.opcodes.items()}

    def _opts(self, cls: str, **values):
        obj = getattr(self.fb, cls + "T")()
        for k, v in values.items():
            setattr(obj, k, v)
        return cls, obj

    # convenience wrappers (output shapes computed here)
    def gather(self, params: int, indices: int, axis: int = 0, batch_dims: int = 0) -> int:
        p, i = self.shapes[params], self.shapes[indices]
        shape = p[:axis] + i[batch_dims:] + p[axis + 1:]
        return self.op("GATHER", [params, indices], self.dtypes[params], shape,
                       self._opts("GatherOptions", axis=axis, batchDims=batch_dims))

    def binary(self, code: str, a: int, b: int, dtype: str | None = None) -> int:
        shape = broadcast(self.shapes[a], self.shapes[b])
        options = {"ADD": "AddOptions", "SUB": "SubOptions", "MUL": "MulOptions",
                   "DIV": "DivOptions", "LESS_EQUAL": "LessEqualOptions",
                   "GREATER": "GreaterOptions", "EQUAL": "EqualOptions",
                   "NOT_EQUAL": "NotEqualOptions"}.get(code)
        compare = code in ("LESS_EQUAL", "GREATER", "EQUAL", "NOT_EQUAL", "GREATER_EQUAL")
        return self.op(code, [a, b], dtype or ("bool" if compare else self.dtypes[a]), shape,
                       self._opts(options) if options else None)

    def select(self, cond: int, a: int, b: int) -> int:
        shape = broadcast(broadcast(self.shapes[cond], self.shapes[a]), self.shapes[b])
        return self.op("SELECT_V2", [cond, a, b], self.dtypes[a], shape,
                       self._opts("SelectV2Options"))

    def cast(self, x: int, dtype: str) -> int:
        fb = self.fb
        return self.op("CAST", [x], dtype, self.shapes[x],
                       self._opts("CastOptions",
                                  inDataType=getattr(fb.TensorType, _NP_TO_TFL[self.dtypes[x]]),
                                  outDataType=getattr(fb.TensorType, _NP_TO_TFL[dtype])))

    def reshape(self, x: int, shape: tuple[int, ...]) -> int:
        new = self.const(np.asarray(shape, dtype=np.int32), f"shape_{len(self.ops)}")
        return self.op("RESHAPE", [x, new], self.dtypes[x], tuple(shape),
                       self._opts("ReshapeOptions", newShape=list(shape)))

    def reduce_sum(self, x: int, axis: int) -> int:
        ax = self.const(np.asarray([axis], dtype=np.int32), f"axis_{len(self.ops)}")
        shape = self.shapes[x][:axis] + self.shapes[x][axis + 1:]
        return self.op("SUM", [x, ax], self.dtypes[x], shape,
                       self._opts("ReducerOptions", keepDims=False))

    def concat(self, xs: list[int], axis: int) -> int:
        shapes = [self.shapes[x] for x in xs]
        width = sum(s[axis] for s in shapes)
        shape = shapes[0][:axis] + (width,) + shapes[0][axis + 1:]
        return self.op("CONCATENATION", xs, self.dtypes[xs[0]], shape,
                       self._opts("ConcatenationOptions", axis=axis))

    def fully_connected(self, x: int, w: int, bias: int) -> int:
        shape = self.shapes[x][:-1] + (self.shapes[w][0],)
        return self.op("FULLY_CONNECTED", [x, w, bias], "float32", shape,
                       self._opts("FullyConnectedOptions", keepNumDims=False))

    def batch_matmul(self, a: int, b: int) -> int:
        sa, sb = self.shapes[a], self.shapes[b]
        batch = broadcast(sa[:-2], sb[:-2])
        return self.op("BATCH_MATMUL", [a, b], "float32", batch + (sa[-2], sb[-1]),
                       self._opts("BatchMatMulOptions", adjX=False, adjY=False))

    def unary(self, code: str, x: int, options=None) -> int:
        return self.op(code, [x], self.dtypes[x], self.shapes[x], options)

    def argmax(self, x: int, axis: int) -> int:
        ax = self.const(np.asarray([axis], dtype=np.int32), f"axis_{len(self.ops)}")
        fb = self.fb
        shape = self.shapes[x][:axis] + self.shapes[x][axis + 1:]
        return self.op("ARG_MAX", [x, ax], "int32", shape,
                       self._opts("ArgMaxOptions", outputType=fb.TensorType.INT32))

    # ---------------------------------------------------------------- serialise
    def serialize(self, inputs: dict[str, int], outputs: dict[str, int], description: str,
                  metadata: dict[str, bytes]) -> bytes:
        import flatbuffers

        fb = self.fb
        for name, idx in {**inputs, **outputs}.items():
            self.tensors[idx].name = name
        sub = fb.SubGraphT()
        sub.tensors = self.tensors
        sub.inputs = list(inputs.values())
        sub.outputs = list(outputs.values())
        sub.operators = self.ops
        sub.name = "main"
        model = fb.ModelT()
        model.version = 3
        model.description = description
        codes, position = [], {}
        for builtin in dict.fromkeys(o.opcodeIndex for o in self.ops):  # first-use order
            oc = fb.OperatorCodeT()
            oc.builtinCode = builtin
            oc.deprecatedBuiltinCode = min(builtin, 127)  # PLACEHOLDER_FOR_GREATER_OP_CODES
            oc.version = self.opcodes[builtin]
            position[builtin] = len(codes)
            codes.append(oc)
        for o in self.ops:
            o.opcodeIndex = position[o.opcodeIndex]
        model.operatorCodes = codes
        model.subgraphs = [sub]
        buffers = list(self.buffers)
        model.metadata = []
        for name, payload in metadata.items():
            buffers.append(payload)
            md = fb.MetadataT()
            md.name, md.buffer = name, len(buffers) - 1
            model.metadata.append(md)
        model.buffers = [_AlignedBuffer(b) for b in buffers]
        sig = fb.SignatureDefT()
        sig.signatureKey = "serving_default"
        sig.subgraphIndex = 0
        sig.inputs = [_tensor_map(fb, n, i) for n, i in inputs.items()]
        sig.outputs = [_tensor_map(fb, n, i) for n, i in outputs.items()]
        model.signatureDefs = [sig]
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


class _AlignedBuffer:
    """A Buffer whose data is 16-byte aligned (the schema's force_align, which the generated
    Python object API does not honour)."""

    def __init__(self, data: bytes | None):
        self.data = data

    def Pack(self, builder):  # noqa: N802 (flatbuffers naming)
        fb = _schema()
        vec = None
        if self.data:
            n = len(self.data)
            builder.StartVector(1, n, 16)
            builder.head = builder.head - n
            builder.Bytes[builder.head:builder.head + n] = self.data
            vec = builder.EndVector(n) if _end_vector_takes_len(builder) else builder.EndVector()
        fb.BufferStart(builder)
        if vec is not None:
            fb.BufferAddData(builder, vec)
        return fb.BufferEnd(builder)


def _end_vector_takes_len(builder) -> bool:
    import inspect

    return len(inspect.signature(builder.EndVector).parameters) >= 1


def _tensor_map(fb, name: str, idx: int):
    m = fb.TensorMapT()
    m.name, m.tensorIndex = name, idx
    return m


def broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x == -1 or y == -1:
            out.append(-1 if 1 in (x, y) or x == y else max(x, y))
        else:
            out.append(max(x, y))
    return tuple(out)


def quantize_int8(array: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 (zero point 0), per tensor or per channel along `axis`."""
    if axis is None:
        m = float(np.max(np.abs(array))) if array.size else 0.0
        scale = np.asarray([m / 127.0 if m > 0 else 1.0])
        q = np.clip(np.round(array / scale[0]), -127, 127).astype(np.int8)
        return q, scale
    moved = np.moveaxis(array, axis, 0)
    m = np.max(np.abs(moved.reshape(moved.shape[0], -1)), axis=1)
    scale = np.where(m > 0, m / 127.0, 1.0)
    q = np.clip(np.round(moved / scale.reshape((-1,) + (1,) * (moved.ndim - 1))), -127, 127)
    return np.moveaxis(q.astype(np.int8), 0, axis), scale


# Operator versions as TensorFlow's converter assigns them for these input types and options
# (tensorflow/lite/tools/versioning/op_version.cc), and the LiteRT release that introduced each
# (runtime_version.cc); tests/test_export_tflite.py checks both against TensorFlow 2.21.
def op_version(code: str, dtypes: list[str], out: str, options, per_channel: bool = False) -> int:
    first = dtypes[0] if dtypes else "float32"
    if code == "GATHER":
        if len(dtypes) > 1 and dtypes[1] == "int16":
            return 6
        if options is not None and options[1].batchDims != 0:
            return 5
        return {"int16": 4, "bool": 3, "int8": 2}.get(first, 1)
    if code == "DEQUANTIZE":
        if first in ("float16", "int16"):
            return 3
        if first == "int8":
            return 5 if per_channel else 2
        return 1
    if code == "SUB":
        return 4 if first == "int64" else 2 if first == "int8" else 1
    if code == "CAST":
        return 5 if "float64" in (first, out) or "float16" in (first, out) else 1
    return 1


MIN_RUNTIME = {("BITCAST", 1): "2.13.0", ("CAST", 5): "2.12.0", ("SELECT_V2", 1): "2.6.0",
               ("GATHER", 5): "2.5.0", ("SUB", 4): "2.4.0", ("BATCH_MATMUL", 1): "2.3.0",
               ("DEQUANTIZE", 5): "2.7.0", ("DEQUANTIZE", 3): "1.15.0", ("DEQUANTIZE", 2): "1.14.0",
               ("DEQUANTIZE", 1): "1.13.1"}


def min_runtime(ops: set[tuple[str, int]]) -> str:
    found = [MIN_RUNTIME.get(op, "1.14.0") for op in ops]
    return max(found, key=lambda v: tuple(int(p) for p in v.split("."))) if found else "1.14.0"


# =========================================================================== 5. lowering
@dataclass
class Built:
    content: bytes
    strategy: str
    why: str
    ops: dict[str, int]
    tensors: dict[str, Any]
    shape: dict[str, Any] = field(default_factory=dict)


def build(layout: Layout, model: LinearModel | TreeEnsemble, precision: str = "float32",
          strategy: str | None = None, classes: list | None = None,
          contract: dict | None = None, description: str = "") -> Built:
    """The .tflite bytes. `precision` applies to weights only (linear coefficients, leaf values);
    comparison tensors are exact whatever it says."""
    g = Graph()
    domain = "float32" if isinstance(model, LinearModel) else model.domain
    inputs, x = _features(g, layout, domain)

    shape_info: dict[str, Any] = {}
    if isinstance(model, LinearModel):
        raw = _linear_graph(g, layout, model, x, precision)
        chosen, why = "dense", "linear model folded into one dense layer"
    else:
        sh = shape_of(model)
        chosen, why = choose_strategy(sh, strategy)
        feats = in_feature_space(model, layout)
        if chosen == "gemm":
            raw = _gemm_graph(g, model, feats, x, precision, sh)
        else:
            raw = _gather_graph(g, model, feats, x, precision)
        shape_info = {"trees": sh.n_trees, "nodes": sh.n_nodes, "depth": sh.depth,
                      "max_internal_nodes": sh.max_internal, "max_leaves": sh.max_leaves,
                      "gemm_cells": sh.gemm_cells, "gemm_bytes_estimate": sh.gemm_bytes(),
                      "gather_bytes_estimate": sh.gather_bytes(),
                      "threshold_rule": model.rule}
    outputs = _head(g, raw, model.link, model.label, classes)
    metadata = {METADATA_CONTRACT: json.dumps(contract or {}, default=str).encode(),
                "min_runtime_version": min_runtime(g.op_versions()).encode()}
    content = g.serialize(inputs, outputs, description, metadata)
    roles = set(g.roles.values())
    tensors = {"weights": sorted(r for r in roles if r.startswith("weights")),
               "never_quantized": sorted(r for r in roles if not r.startswith("weights"))}
    shape_info["min_runtime_version"] = min_runtime(g.op_versions())
    shape_info["op_versions"] = dict(sorted(g.op_versions()))
    return Built(content, chosen, why, dict(sorted(g.counts.items())), tensors, shape_info)


def _features(g: Graph, layout: Layout, domain: str) -> tuple[dict[str, int], int]:
    """Inputs -> X_full [N, width] in the model's domain: float32 (linear models, scikit-learn's
    trees, which cast to float32 themselves) or int64 order keys of the float64 values
    (HistGradientBoosting compares float64). Imputation and one-hot happen here."""
    inputs: dict[str, int] = {}
    parts = []
    if layout.numeric:
        n = len(layout.numeric)
        x64 = g.input("numeric", "float64", (-1, n))
        inputs["numeric"] = x64
        fill = np.asarray([np.nan if c.fill is None else c.fill for c in layout.numeric],
                          dtype=np.float64)
        x32 = g.cast(x64, "float32")
        isnan = None if np.all(np.isnan(fill)) else g.binary("NOT_EQUAL", x32, x32)
        if domain == "float32":
            part = x32  # scikit-learn imputes in float64, then its trees cast: same float32
            if isnan is not None:
                part = g.select(isnan, g.const(fill.astype(np.float32), "impute/fill"), x32)
        else:
            bits = g.op("BITCAST", [x64], "int64", (-1, n))
            neg = g.op("LESS", [bits, g.const(np.zeros(1, np.int64), "zero64")], "bool", (-1, n),
                       g._opts("LessOptions"))
            flipped = g.binary("SUB", g.const(np.asarray([INT64_MIN], np.int64), "int64_min"), bits)
            part = g.select(neg, flipped, bits)
            if isnan is not None:
                part = g.select(isnan, g.const(order_key(fill), "impute/fill_key"), part)
        parts.append(part)
    if layout.categorical:
        codes = g.input("categorical", "int32", (-1, len(layout.categorical)))
        inputs["categorical"] = codes
        if layout.onehot:
            src = np.asarray([c for c, _ in layout.onehot], dtype=np.int32)
            k = np.asarray([k for _, k in layout.onehot], dtype=np.int32)
            picked = g.gather(codes, g.const(src, "onehot/column"), axis=1)
            hot = g.binary("EQUAL", picked, g.const(k, "onehot/code"))
            if domain == "float32":
                parts.append(g.cast(hot, "float32"))
            else:
                parts.append(g.select(hot, g.const(order_key(np.ones(1)), "onehot/key1"),
                                      g.const(order_key(np.zeros(1)), "onehot/key0")))
    if not parts:
        raise Unsupported("the pipeline uses no input column")
    return inputs, (parts[0] if len(parts) == 1 else g.concat(parts, axis=1))


def _linear_graph(g: Graph, layout: Layout, model: LinearModel, x: int, precision: str) -> int:
    """logits = X_full @ W' + b' with the scalers folded in: W'[col] += a·W[f], b' += b·W[f]."""
    w = np.zeros((layout.width, model.coef.shape[1]))
    bias = model.intercept.astype(np.float64).copy()
    for f, feat in enumerate(layout.features):
        w[feat.column] += feat.a * model.coef[f]
        bias += feat.b * model.coef[f]
    weights = g.weights(w.T, "dense/kernel", precision, axis=0 if precision == "int8" else None)
    b = g.const(bias.astype(np.float32), "dense/bias", "bias:float32")
    return g.fully_connected(x, weights, b)


def preorder(tree: Tree) -> np.ndarray:
    """Node ids in preorder (parent, left subtree, right subtree): then every internal node's
    left child is the next id. scikit-learn's depth-first builder and HistGradientBoosting already
    number nodes this way; best-first trees (max_leaf_nodes) are renumbered."""
    internal = np.flatnonzero(~tree.is_leaf)
    if np.all(tree.left[internal] == internal + 1):
        return np.arange(tree.n_nodes)
    order, stack = [], [0]
    while stack:
        nid = stack.pop()
        order.append(nid)
        if tree.left[nid] >= 0:
            stack.append(int(tree.right[nid]))
            stack.append(int(tree.left[nid]))
    return np.asarray(order, dtype=np.int64)


def _gather_graph(g: Graph, ens: TreeEnsemble, feats, x: int, precision: str) -> int:
    """Unrolled walk of every tree at once. Node ids are global (trees concatenated, each in
    preorder), so the left child of node i is i + 1 and only `right` needs a table. A leaf's
    threshold can never be met (float32 NaN: `x <= NaN` is false for every x; int64: INT64_MIN,
    below every order key) and its right link points to itself, so a walk that reached a leaf stays
    there while deeper trees finish. Per node: feature, threshold, right link, leaf value."""
    offsets = np.cumsum([0] + [t.n_nodes for t in ens.trees])[:-1]
    n = ens.n_nodes
    float_domain = ens.domain == "float32"
    feature = np.zeros(n, dtype=np.int32)
    threshold = np.zeros(n, dtype=np.float32 if float_domain else np.int64)
    never = np.float32(np.nan) if float_domain else np.int64(INT64_MIN)
    right = np.zeros(n, dtype=np.int32)
    values = np.zeros((n, ens.width), dtype=np.float64)
    for tree, off, (col, thr) in zip(ens.trees, offsets, feats):
        order = preorder(tree)  # new position -> old id
        new_id = np.empty(tree.n_nodes, dtype=np.int64)
        new_id[order] = np.arange(tree.n_nodes)
        leaf = tree.is_leaf[order]
        ids = np.arange(tree.n_nodes) + off
        feature[ids] = np.where(leaf, 0, col[order])
        threshold[ids] = np.where(leaf, never, thr[order])
        right[ids] = np.where(leaf, ids, new_id[np.maximum(tree.right[order], 0)] + off)
        values[ids] = np.where(leaf[:, None], tree.value[order], 0.0)
    roots = offsets.astype(np.int32)
    t_feat = g.const(feature, "tree/feature")
    t_thr = g.const(threshold, "tree/threshold", f"threshold:{threshold.dtype}")
    t_right = g.const(right, "tree/right")
    one = g.const(np.ones(1, dtype=np.int32), "one_i32")
    # first step: the roots' features, thresholds and children are constants
    xv = g.gather(x, g.const(feature[roots], "root/feature"), axis=1)
    go_left = g.binary("LESS_EQUAL", xv, g.const(threshold[roots], "root/threshold",
                                                 f"threshold:{threshold.dtype}"))
    idx = g.select(go_left, g.const(roots + 1, "root/left"), g.const(right[roots], "root/right"))
    for _ in range(ens.depth - 1):
        f = g.gather(t_feat, idx)
        xv = g.gather(x, f, axis=1, batch_dims=1)
        go_left = g.binary("LESS_EQUAL", xv, g.gather(t_thr, idx))
        idx = g.select(go_left, g.binary("ADD", idx, one), g.gather(t_right, idx))
    if ens.width == 1:
        table = g.weights(values[:, 0], "tree/value", precision)
    else:
        table = g.weights(values, "tree/value", precision,
                          axis=1 if precision == "int8" else None)
    v = g.gather(table, idx)  # [N, T] or [N, T, W]
    return _aggregate(g, ens, v)


def _gemm_graph(g: Graph, ens: TreeEnsemble, feats, x: int, precision: str, sh: Shape) -> int:
    """Hummingbird's GEMM form with per-tree padding: I internal nodes, L leaves per tree."""
    T, I, L, W = sh.n_trees, sh.max_internal, sh.max_leaves, ens.width
    feature = np.zeros((T, I), dtype=np.int32)
    threshold = np.zeros((T, I), dtype=np.float32 if ens.domain == "float32" else np.int64)
    C = np.zeros((T, I, L), dtype=np.int8)
    D = np.full((T, 1, L), -1.0, dtype=np.float32)  # unreachable for padded leaves
    E = np.zeros((T, L, W), dtype=np.float64)
    for t, (tree, (col, t32)) in enumerate(zip(ens.trees, feats)):
        internal = np.flatnonzero(~tree.is_leaf)
        leaves = np.flatnonzero(tree.is_leaf)
        pos_i = {int(nid): i for i, nid in enumerate(internal)}
        pos_l = {int(nid): i for i, nid in enumerate(leaves)}
        feature[t, :len(internal)] = col[internal]
        threshold[t, :len(internal)] = t32[internal]
        E[t, :len(leaves)] = tree.value[leaves]
        # walk root -> leaves keeping the path
        stack = [(0, [])]
        while stack:
            nid, path = stack.pop()
            if tree.left[nid] < 0:
                li = pos_l[nid]
                lefts = 0
                for anc, went_left in path:
                    C[t, pos_i[anc], li] = 1 if went_left else -1
                    lefts += went_left
                D[t, 0, li] = lefts
            else:
                stack.append((int(tree.left[nid]), path + [(nid, True)]))
                stack.append((int(tree.right[nid]), path + [(nid, False)]))
    xv = g.gather(x, g.const(feature.reshape(-1), "gemm/feature"), axis=1)  # [N, T*I]
    le = g.binary("LESS_EQUAL", xv, g.const(threshold.reshape(-1), "gemm/threshold",
                                            f"threshold:{threshold.dtype}"))
    bits = g.reshape(g.cast(le, "float32"), (-1, T, 1, I))
    paths = g.batch_matmul(bits, g.exact_int8(C, "gemm/path", "path_matrix:int8-exact"))
    hit = g.cast(g.binary("EQUAL", paths, g.const(D, "gemm/left_turns", "path_count:float32")),
                 "float32")
    vals = g.batch_matmul(hit, g.weights(E, "gemm/value", precision))  # [N, T, 1, W]
    v = g.reshape(vals, (-1, T) if W == 1 else (-1, T, W))
    return _aggregate(g, ens, v)


def _aggregate(g: Graph, ens: TreeEnsemble, v: int) -> int:
    """Leaf values [N, T] or [N, T, W] -> raw scores [N, K]."""
    if ens.width > 1:
        s = g.reduce_sum(v, axis=1)  # [N, W]
    else:
        G = ens.groups
        s = g.reduce_sum(g.reshape(v, (-1, ens.n_trees // G, G)), axis=1)  # [N, G]
    if ens.divide != 1:
        s = g.binary("DIV", s, g.const(np.asarray([ens.divide], dtype=np.float32), "n_trees"))
    if np.any(ens.baseline != 0):
        s = g.binary("ADD", s, g.const(ens.baseline.astype(np.float32), "baseline",
                                       "bias:float32"))
    return s


def _head(g: Graph, raw: int, link: str, label_rule: str, classes) -> dict[str, int]:
    """Link function and outputs: probabilities + label (classifiers) or prediction."""
    if classes is None or len(classes) == 0:  # regression
        y = g.unary("EXP", raw) if link == "exp" else raw
        return {"prediction": g.reshape(y, (-1,))}
    if link in ("logistic", "proba"):
        p1 = g.unary("LOGISTIC", raw) if link == "logistic" else raw  # [N, 1]
        one = g.const(np.asarray([1.0], dtype=np.float32), "one")
        proba = g.concat([g.binary("SUB", one, p1), p1], axis=1)
    elif link == "softmax":
        proba = g.unary("SOFTMAX", raw, g._opts("SoftmaxOptions", beta=1.0))
    else:
        proba = raw  # forest classifiers: averaged class fractions
    if label_rule in ("raw>0", "raw>=0"):
        zero = g.const(np.asarray([0.0], dtype=np.float32), "zero")
        code = "GREATER" if label_rule == "raw>0" else "GREATER_EQUAL"
        opt = "GreaterOptions" if code == "GREATER" else "GreaterEqualOptions"
        flag = g.op(code, [raw, zero], "bool", g.shapes[raw], g._opts(opt))
        label = g.reshape(g.cast(flag, "int32"), (-1,))
    else:
        label = g.argmax(proba, axis=1)
    return {"probabilities": proba, "label": label}
