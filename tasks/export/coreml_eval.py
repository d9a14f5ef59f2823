"""Evaluate a saved Core ML model spec (`.mlmodel`) with NumPy, where Core ML cannot run.

Core ML's runtime exists only on Apple platforms, so on Linux the export's parity gate runs this
walker over the saved protobuf instead: pipeline → feature vectorizer → imputer / scaler /
one-hot encoder → GLM or tree ensemble, with Core ML's semantics. It imports neither
scikit-learn (it must not agree with scikit-learn by construction) nor coremltools' Python
package (~8 s: it imports TensorFlow and scikit-learn); it loads only coremltools' generated
protobuf modules (`coremltools/proto/*_pb2.py`), in ~0.1 s.

Model types: Pipeline, PipelineClassifier, PipelineRegressor, FeatureVectorizer, Imputer,
Scaler, OneHotEncoder, ArrayFeatureExtractor, Identity, GLMRegressor, GLMClassifier,
TreeEnsembleRegressor, TreeEnsembleClassifier. Anything else raises `UnsupportedSpec`.

Semantics (Core ML format reference; where it is silent, what Apple's own converters imply —
marked "inferred"; the on-device check is what settles those):

- Imputer: values equal to the replace value (NaN when `replaceDoubleValue` is NaN or unset)
  become the imputed value (scalar, or per position for arrays); strings: `replaceStringValue`.
- Scaler: `(x + shiftValue) * scaleValue`, per position.
- OneHotEncoder: 1 at the category's position; an unknown value gives all zeros
  (`IgnoreUnknown`) or an error (`ErrorOnUnknown`). Sparse output = {index: 1.0}.
- FeatureVectorizer: concatenation in `inputList` order; a double is one column, an array its
  values, an int-keyed dictionary its keys 0..inputDimensions-1 (absent keys are 0).
- GLMRegressor: `W x + offset`, then NoTransform / Logit / Probit.
- GLMClassifier: one weight row and two classes: p(class 1) = σ(z) (Logit) or Φ(z) (Probit).
  ReferenceClass with K classes and K-1 rows: the multinomial logit with the first class as
  reference, p_0 = 1 / (1 + Σ e^z_k), p_k = e^z_k / (1 + Σ e^z_j) (how Turi Create's
  multinomial logistic regression exports). OneVsRest with K rows: σ(z_k) normalised to sum 1
  (inferred; our exporter never writes it).
- Tree ensembles: every tree walks from its root: a branch compares input[branchFeatureIndex]
  with branchFeatureValue (≤, <, ≥, >, =, ≠) and goes to the true child when it holds; a NaN
  goes to the true child when missingValueTracksTrueChild, else the false one (inferred). The
  reached leaves' evaluation values are added to basePredictionValue per dimension, then the
  post-evaluation transform: NoTransform, Classification_SoftMax (softmax over dimensions),
  Regression_Logistic (σ per dimension), Classification_SoftMaxWithZeroClassReference
  (softmax over [0, scores]).
- Tree precision: Core ML's tree compiler evaluates in float32 when the thresholds are float32
  numbers (coremltools' XGBoost converter casts thresholds to float32 "to trigger the internal
  float32 detection in the tree ensemble compiler"), in double otherwise. `tree_precision=
  "auto"` does the same (inputs and thresholds rounded to float32 when every threshold is a
  float32 number); "float64" / "float32" force one, to measure how much a model depends on it.
- Classifier outputs: with one score dimension and two classes (binary mode) p(class 1) is the
  score and p(class 0) = 1 - score, and the label is class 1 when p ≥ 0.5 (inferred: Apple's
  scikit-learn converter moves leaf values of exactly 0.5 down by 1e-7 so that scikit-learn's
  "class 0 on a tie" survives); otherwise the probabilities are the scores and the label is
  the first class with the highest score.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

PROTO_PACKAGE = "_mlops_coreml_proto"
TREE_PRECISIONS = ("auto", "float64", "float32")
TRANSFORMS = {0: "NoTransform", 1: "Classification_SoftMax", 2: "Regression_Logistic",
              3: "Classification_SoftMaxWithZeroClassReference"}
BEHAVIOURS = {0: "<=", 1: "<", 2: ">=", 3: ">", 4: "==", 5: "!=", 6: "leaf"}
LEAF = 6
ROW_CHUNK_CELLS = 2_000_000  # rows x trees evaluated at once (memory bound)
FLOAT32_ARRAY = 65568  # ArrayFeatureType.FLOAT32


class CoreMLEvalError(RuntimeError):
    """The spec cannot be evaluated (malformed, or an input is missing or of the wrong kind)."""


class UnsupportedSpec(CoreMLEvalError):
    """A model type or option this walker does not implement."""


# --------------------------------------------------------------------------- protobuf
@lru_cache(maxsize=1)
def proto():
    """coremltools' generated `Model_pb2` module, without importing coremltools itself."""
    loaded = sys.modules.get("coremltools.proto.Model_pb2")
    if loaded is not None:  # coremltools already imported: same message classes either way
        return loaded
    found = importlib.util.find_spec("coremltools")
    if found is None or not found.submodule_search_locations:
        raise CoreMLEvalError("coremltools is not installed (its protobuf definitions are needed "
                              "to read .mlmodel files); pip install -r requirements.txt")
    folder = Path(list(found.submodule_search_locations)[0]) / "proto"
    spec = importlib.util.spec_from_file_location(PROTO_PACKAGE, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PROTO_PACKAGE] = package
    spec.loader.exec_module(package)  # type: ignore[union-attr]
    return importlib.import_module(f"{PROTO_PACKAGE}.Model_pb2")


def load(source: Any):
    """A Model message from a path, bytes or a Model message (returned as is)."""
    if hasattr(source, "WhichOneof"):
        return source
    data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    model = proto().Model()
    try:
        model.ParseFromString(bytes(data))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise CoreMLEvalError(f"not a Core ML model spec: {exc}") from exc
    if model.WhichOneof("Type") is None:
        raise CoreMLEvalError("the file parses but holds no model (no Type set)")
    return model


# --------------------------------------------------------------------------- values
@dataclass
class IntDict:
    """A batch of dictionaries with int64 keys 0..width-1 as a dense matrix (one-hot output)."""

    values: np.ndarray  # (n, width)


@dataclass
class ClassScores:
    """A batch of class-probability dictionaries: `values[:, j]` is the score of `classes[j]`."""

    classes: list
    values: np.ndarray  # (n, k)


@dataclass
class Scored:
    """What a classifier or regressor spec predicts on a batch."""

    kind: str  # "classifier" | "regressor"
    labels: np.ndarray | None = None
    classes: list = field(default_factory=list)
    probabilities: np.ndarray | None = None  # (n, k) in `classes` order
    values: np.ndarray | None = None  # regression (n,)
    outputs: dict[str, Any] = field(default_factory=dict)


def _rows(env: Mapping[str, Any]) -> int:
    for value in env.values():
        arr = value.values if isinstance(value, (IntDict, ClassScores)) else np.asarray(value)
        return int(arr.shape[0])
    return 0


def _coerce_input(desc, value) -> Any:
    """A user-supplied batch of one input feature, as the walker's representation."""
    kind = desc.type.WhichOneof("Type")
    if kind == "doubleType":
        arr = np.asarray(value, dtype=np.float64)
        return arr.reshape(-1)
    if kind == "int64Type":
        return np.asarray(value, dtype=np.int64).reshape(-1)
    if kind == "stringType":
        arr = np.asarray(value, dtype=object).reshape(-1)
        bad = [v for v in arr[:1000] if not isinstance(v, str)]
        if bad:
            raise CoreMLEvalError(f"input {desc.name!r} is a string feature; got {type(bad[0]).__name__} "
                                  f"values such as {bad[0]!r}")
        return arr
    if kind == "multiArrayType":
        arr = np.asarray(value)
        shape = list(desc.type.multiArrayType.shape)
        if arr.ndim == 1:  # one row of a 1-D array feature
            arr = arr.reshape(1, -1)
        if arr.ndim != 2 or (shape and arr.shape[1] != shape[-1]):
            raise CoreMLEvalError(f"input {desc.name!r} is an array of shape {shape}; give a "
                                  f"(rows, {shape[-1] if shape else 'd'}) batch, got {arr.shape}")
        if desc.type.multiArrayType.dataType == FLOAT32_ARRAY:
            return arr.astype(np.float32).astype(np.float64)
        return arr.astype(np.float64)
    raise UnsupportedSpec(f"input {desc.name!r} has feature type {kind}, which the walker does not "
                          "take as an input")



# --------------------------------------------------------------------------- evaluation
def evaluate(model: Any, inputs: Mapping[str, Any], tree_precision: str = "auto") -> dict[str, Any]:
    """Every output of `model` (a Model message, path or bytes) on a batch of inputs.

    `inputs` maps each input name of the spec to a batch: doubles and int64 as 1-D arrays,
    strings as 1-D object arrays of str, multi-arrays as (n, d). Returns output name → value
    (1-D arrays; multi-arrays (n, d); probability dictionaries as `ClassScores`).
    """
    if tree_precision not in TREE_PRECISIONS:
        raise ValueError(f"tree_precision must be one of {TREE_PRECISIONS}")
    model = load(model)
    env: dict[str, Any] = {}
    for desc in model.description.input:
        if desc.name not in inputs:
            raise CoreMLEvalError(f"missing input {desc.name!r}; the model takes "
                                  f"{[d.name for d in model.description.input]}")
        env[desc.name] = _coerce_input(desc, inputs[desc.name])
    sizes = {_rows({k: v}) for k, v in env.items()}
    if len(sizes) > 1:
        raise CoreMLEvalError(f"inputs have different numbers of rows: {sorted(sizes)}")
    return _run(model, env, tree_precision)


def predict(model: Any, inputs: Mapping[str, Any], tree_precision: str = "auto") -> Scored:
    """Labels and class probabilities (classifiers) or predictions (regressors) of a spec."""
    model = load(model)
    outputs = evaluate(model, inputs, tree_precision)
    desc = model.description
    kind = model.WhichOneof("Type")
    classifier = bool(desc.predictedProbabilitiesName) or kind in (
        "pipelineClassifier", "glmClassifier", "treeEnsembleClassifier")
    if classifier:
        label_name = desc.predictedFeatureName
        scores = outputs.get(desc.predictedProbabilitiesName) if desc.predictedProbabilitiesName else None
        if not isinstance(scores, ClassScores):
            scores = next((v for v in outputs.values() if isinstance(v, ClassScores)), None)
        if scores is None:
            raise CoreMLEvalError("the classifier spec has no class-probability output")
        labels = outputs.get(label_name)
        return Scored("classifier", labels=labels, classes=list(scores.classes),
                      probabilities=scores.values, outputs=outputs)
    name = desc.predictedFeatureName or desc.output[0].name
    values = np.asarray(outputs[name], dtype=np.float64)
    return Scored("regressor", values=values.reshape(values.shape[0], -1)[:, 0]
                  if values.ndim > 1 else values, outputs=outputs)


def _run(model, env: dict[str, Any], tree_precision: str) -> dict[str, Any]:
    kind = model.WhichOneof("Type")
    if kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
        pipe = model.pipeline if kind == "pipeline" else getattr(model, kind).pipeline
        scope = dict(env)
        for i, sub in enumerate(pipe.models):
            missing = [d.name for d in sub.description.input if d.name not in scope]
            if missing:
                name = pipe.names[i] if i < len(pipe.names) else f"model{i}"
                raise CoreMLEvalError(f"pipeline model {name!r} ({sub.WhichOneof('Type')}) needs "
                                      f"{missing}, which no earlier model produces")
            scope.update(_run(sub, {d.name: scope[d.name] for d in sub.description.input},
                              tree_precision))
        out = {}
        for desc in model.description.output:
            if desc.name not in scope:
                raise CoreMLEvalError(f"pipeline output {desc.name!r} is produced by no model")
            out[desc.name] = scope[desc.name]
        return out
    handler = _HANDLERS.get(kind)
    if handler is None:
        raise UnsupportedSpec(f"model type {kind!r} is not evaluated by tasks.export.coreml_eval")
    return handler(model, env, tree_precision)


def _single_io(model):
    if len(model.description.input) != 1 or len(model.description.output) < 1:
        raise CoreMLEvalError(f"{model.WhichOneof('Type')} needs exactly one input and an output")
    return model.description.input[0].name, model.description.output[0].name


def _imputer(model, env, _precision):
    src, dst = _single_io(model)
    imp = model.imputer
    value = env[src]
    which = imp.WhichOneof("ImputedValue")
    replace = imp.WhichOneof("ReplaceValue")
    if which in ("imputedDoubleValue", "imputedDoubleArray"):
        arr = np.array(value, dtype=np.float64, copy=True)
        target = imp.replaceDoubleValue if replace == "replaceDoubleValue" else math.nan
        mask = np.isnan(arr) if math.isnan(target) else arr == target
        if which == "imputedDoubleValue":
            arr[mask] = imp.imputedDoubleValue
        else:
            fill = np.asarray(imp.imputedDoubleArray.vector, dtype=np.float64)
            if arr.ndim != 2 or arr.shape[1] != fill.size:
                raise CoreMLEvalError(f"imputer {src!r}: array width {arr.shape} does not match "
                                      f"{fill.size} imputed values")
            arr = np.where(mask, fill[None, :], arr)
        return {dst: arr}
    if which == "imputedStringValue":
        target = imp.replaceStringValue if replace == "replaceStringValue" else ""
        arr = np.asarray(value, dtype=object)
        out = np.where(arr == target, imp.imputedStringValue, arr).astype(object)
        return {dst: out}
    if which == "imputedInt64Value":
        arr = np.array(value, dtype=np.int64, copy=True)
        arr[arr == imp.replaceInt64Value] = imp.imputedInt64Value
        return {dst: arr}
    raise UnsupportedSpec(f"imputer with {which} is not evaluated")


def _scaler(model, env, _precision):
    src, dst = _single_io(model)
    arr = np.asarray(env[src], dtype=np.float64)
    shift = np.asarray(model.scaler.shiftValue, dtype=np.float64)
    scale = np.asarray(model.scaler.scaleValue, dtype=np.float64)
    width = arr.shape[1] if arr.ndim == 2 else 1
    shift = shift if shift.size else np.zeros(1)
    scale = scale if scale.size else np.ones(1)
    for name, vec in (("shiftValue", shift), ("scaleValue", scale)):
        if vec.size not in (1, width):
            raise CoreMLEvalError(f"scaler {src!r}: {name} has {vec.size} values for width {width}")
    return {dst: (arr + shift) * scale}


def _one_hot(model, env, _precision):
    src, dst = _single_io(model)
    enc = model.oneHotEncoder
    which = enc.WhichOneof("CategoryType")
    if which == "stringCategories":
        cats = list(enc.stringCategories.vector)
        values = np.asarray(env[src], dtype=object)
    elif which == "int64Categories":
        cats = [int(v) for v in enc.int64Categories.vector]
        values = np.asarray(env[src], dtype=np.int64).astype(object)
    else:
        raise CoreMLEvalError(f"one-hot encoder {src!r} has no categories")
    index = {c: i for i, c in enumerate(cats)}
    positions = np.fromiter((index.get(v, -1) for v in values), dtype=np.int64, count=len(values))
    unknown = positions < 0
    if unknown.any() and enc.handleUnknown == 0:  # ErrorOnUnknown
        raise CoreMLEvalError(f"one-hot encoder {src!r}: unknown value {values[unknown][0]!r} "
                              "(handleUnknown = ErrorOnUnknown)")
    out = np.zeros((len(values), len(cats)), dtype=np.float64)
    rows = np.flatnonzero(~unknown)
    out[rows, positions[rows]] = 1.0
    return {dst: IntDict(out) if enc.outputSparse else out}


def _feature_vectorizer(model, env, _precision):
    dst = model.description.output[0].name
    parts = []
    n = _rows(env)
    for item in model.featureVectorizer.inputList:
        if item.inputColumn not in env:
            raise CoreMLEvalError(f"feature vectorizer input {item.inputColumn!r} is missing")
        value = env[item.inputColumn]
        width = int(item.inputDimensions)
        if isinstance(value, IntDict):
            arr = value.values
            if arr.shape[1] < width:
                arr = np.hstack([arr, np.zeros((arr.shape[0], width - arr.shape[1]))])
            arr = arr[:, :width]
        else:
            arr = np.asarray(value, dtype=np.float64)
            arr = arr.reshape(-1, 1) if arr.ndim == 1 else arr
            if arr.shape[1] != width:
                raise CoreMLEvalError(f"feature vectorizer: {item.inputColumn!r} has width "
                                      f"{arr.shape[1]}, the spec says {width}")
        parts.append(arr)
    return {dst: np.hstack(parts) if parts else np.zeros((n, 0))}


def _array_feature_extractor(model, env, _precision):
    src, dst = _single_io(model)
    arr = np.asarray(env[src], dtype=np.float64)
    idx = [int(i) for i in model.arrayFeatureExtractor.extractIndex]
    out = arr[:, idx]
    kind = model.description.output[0].type.WhichOneof("Type")
    return {dst: out[:, 0] if kind == "doubleType" and len(idx) == 1 else out}


def _identity(model, env, _precision):
    return {o.name: env[i.name] for i, o in zip(model.description.input, model.description.output)}


def _vector(model, env) -> np.ndarray:
    """The inputs of a GLM or tree ensemble as one (n, d) matrix, in input order."""
    parts = []
    for desc in model.description.input:
        value = env[desc.name]
        arr = value.values if isinstance(value, IntDict) else np.asarray(value, dtype=np.float64)
        parts.append(arr.reshape(-1, 1) if arr.ndim == 1 else arr)
    return np.hstack(parts).astype(np.float64, copy=False)


def _class_labels(params) -> list:
    which = params.WhichOneof("ClassLabels")
    if which == "stringClassLabels":
        return list(params.stringClassLabels.vector)
    if which == "int64ClassLabels":
        return [int(v) for v in params.int64ClassLabels.vector]
    return []


def _classifier_outputs(model, classes: list, probs: np.ndarray, binary_mode: bool) -> dict[str, Any]:
    desc = model.description
    if binary_mode:
        chosen = (probs[:, 1] >= 0.5).astype(np.int64)
    else:
        chosen = np.argmax(probs, axis=1)
    labels = np.asarray(classes, dtype=object)[chosen]
    if classes and isinstance(classes[0], int):
        labels = labels.astype(np.int64)
    out: dict[str, Any] = {}
    label_name = desc.predictedFeatureName or desc.output[0].name
    out[label_name] = labels
    proba_name = desc.predictedProbabilitiesName or next(
        (o.name for o in desc.output if o.type.WhichOneof("Type") == "dictionaryType"), "")
    if proba_name:
        out[proba_name] = ClassScores(list(classes), probs)
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _probit(z: np.ndarray) -> np.ndarray:
    erf = np.frompyfunc(math.erf, 1, 1)
    return (0.5 * (1.0 + erf(z / math.sqrt(2.0)).astype(np.float64)))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _glm_regressor(model, env, _precision):
    glm = model.glmRegressor
    X = _vector(model, env)
    W = np.asarray([list(w.value) for w in glm.weights], dtype=np.float64)
    b = np.asarray(glm.offset, dtype=np.float64)
    if W.ndim != 2 or W.shape[1] != X.shape[1] or W.shape[0] != b.size:
        raise CoreMLEvalError(f"GLM regressor: weights {W.shape} / offsets {b.size} do not fit "
                              f"inputs of width {X.shape[1]}")
    z = X @ W.T + b
    transform = glm.postEvaluationTransform
    y = z if transform == 0 else _sigmoid(z) if transform == 1 else _probit(z)
    name = model.description.predictedFeatureName or model.description.output[0].name
    return {name: y[:, 0] if y.shape[1] == 1 else y}


def _glm_classifier(model, env, _precision):
    glm = model.glmClassifier
    X = _vector(model, env)
    W = np.asarray([list(w.value) for w in glm.weights], dtype=np.float64)
    b = np.asarray(glm.offset, dtype=np.float64)
    classes = _class_labels(glm)
    if W.ndim != 2 or W.shape[1] != X.shape[1] or W.shape[0] != b.size:
        raise CoreMLEvalError(f"GLM classifier: weights {W.shape} / offsets {b.size} do not fit "
                              f"inputs of width {X.shape[1]}")
    z = X @ W.T + b
    link = _sigmoid if glm.postEvaluationTransform == 0 else _probit
    k = len(classes) or (2 if W.shape[0] == 1 else W.shape[0] + (1 if glm.classEncoding == 0 else 0))
    if not classes:
        classes = list(range(k))
    if W.shape[0] == 1 and k == 2:
        p1 = link(z[:, 0])
        return _classifier_outputs(model, classes, np.column_stack([1.0 - p1, p1]), True)
    if glm.postEvaluationTransform != 0:
        raise CoreMLEvalError("GLM classifier: Probit is for binary classification only")
    if glm.classEncoding == 0:  # ReferenceClass: multinomial logit, first class the reference
        if W.shape[0] != k - 1:
            raise CoreMLEvalError(f"GLM classifier: ReferenceClass needs {k - 1} weight rows for "
                                  f"{k} classes, got {W.shape[0]}")
        probs = _softmax(np.column_stack([np.zeros(len(z)), z]))
    else:  # OneVsRest
        if W.shape[0] != k:
            raise CoreMLEvalError(f"GLM classifier: OneVsRest needs {k} weight rows, got {W.shape[0]}")
        s = _sigmoid(z)
        probs = s / s.sum(axis=1, keepdims=True)
    return _classifier_outputs(model, classes, probs, False)


# --------------------------------------------------------------------------- tree ensembles
@dataclass
class CompiledTrees:
    """A tree ensemble as flat arrays (one entry per node, all trees together)."""

    feature: np.ndarray
    threshold: np.ndarray
    behaviour: np.ndarray
    true_child: np.ndarray
    false_child: np.ndarray
    missing_true: np.ndarray
    is_leaf: np.ndarray
    leaf_values: np.ndarray  # (n_nodes, dims)
    roots: np.ndarray  # one node index per tree, in tree-id order
    tree_ids: list[int]
    depth: int
    dims: int
    base: np.ndarray  # (dims,)
    thresholds_are_float32: bool

    @property
    def n_trees(self) -> int:
        return int(self.roots.size)

    def precision(self, requested: str = "auto") -> str:
        if requested == "auto":
            return "float32" if self.thresholds_are_float32 else "float64"
        return requested


def compile_trees(params) -> CompiledTrees:
    """Flatten TreeEnsembleParameters, checking the structure Core ML's validator checks."""
    nodes = list(params.nodes)
    dims = int(params.numPredictionDimensions)
    if dims <= 0:
        raise CoreMLEvalError("tree ensemble: numPredictionDimensions must be > 0")
    if not nodes:
        raise CoreMLEvalError("tree ensemble has no nodes")
    index: dict[tuple[int, int], int] = {}
    for i, node in enumerate(nodes):
        key = (int(node.treeId), int(node.nodeId))
        if key in index:
            raise CoreMLEvalError(f"tree ensemble: node {key} appears twice")
        index[key] = i
    n = len(nodes)
    feature = np.zeros(n, dtype=np.int64)
    threshold = np.zeros(n, dtype=np.float64)
    behaviour = np.zeros(n, dtype=np.int64)
    true_child = np.arange(n, dtype=np.int64)
    false_child = np.arange(n, dtype=np.int64)
    missing_true = np.zeros(n, dtype=bool)
    is_leaf = np.zeros(n, dtype=bool)
    leaf_values = np.zeros((n, dims), dtype=np.float64)
    parent = np.full(n, -1, dtype=np.int64)
    for i, node in enumerate(nodes):
        behaviour[i] = int(node.nodeBehavior)
        if node.nodeBehavior == LEAF:
            is_leaf[i] = True
            if not node.evaluationInfo:
                raise CoreMLEvalError(f"tree ensemble: leaf ({node.treeId}, {node.nodeId}) has no "
                                      "evaluation value")
            seen = set()
            for info in node.evaluationInfo:
                j = int(info.evaluationIndex)
                if j >= dims or j in seen:
                    raise CoreMLEvalError(f"tree ensemble: leaf ({node.treeId}, {node.nodeId}) "
                                          f"has a bad or repeated evaluation index {j}")
                seen.add(j)
                leaf_values[i, j] = info.evaluationValue
            continue
        feature[i] = int(node.branchFeatureIndex)
        threshold[i] = node.branchFeatureValue
        missing_true[i] = bool(node.missingValueTracksTrueChild)
        for child_id, target in ((node.trueChildNodeId, true_child), (node.falseChildNodeId, false_child)):
            child = index.get((int(node.treeId), int(child_id)))
            if child is None or child == i:
                raise CoreMLEvalError(f"tree ensemble: node ({node.treeId}, {node.nodeId}) points "
                                      f"to a missing child {child_id}")
            if parent[child] != -1:
                raise CoreMLEvalError(f"tree ensemble: node ({node.treeId}, {child_id}) has two "
                                      "parents")
            parent[child] = i
            target[i] = child
    tree_of = np.asarray([int(node.treeId) for node in nodes])
    roots_by_tree: dict[int, int] = {}
    for i in np.flatnonzero(parent == -1):
        t = int(tree_of[i])
        if t in roots_by_tree:
            raise CoreMLEvalError(f"tree ensemble: tree {t} has more than one root")
        roots_by_tree[t] = int(i)
    missing_roots = sorted(set(tree_of.tolist()) - set(roots_by_tree))
    if missing_roots:
        raise CoreMLEvalError(f"tree ensemble: trees {missing_roots[:5]} have no root (a cycle)")
    tree_ids = sorted(roots_by_tree)
    roots = np.asarray([roots_by_tree[t] for t in tree_ids], dtype=np.int64)
    # depth (and a cycle check): walk level by level from the roots
    level = roots.copy()
    depth = 0
    reached = np.zeros(n, dtype=bool)
    reached[level] = True
    while True:
        branching = level[~is_leaf[level]]
        if branching.size == 0:
            break
        level = np.concatenate([true_child[branching], false_child[branching]])
        reached[level] = True
        depth += 1
        if depth > n:
            raise CoreMLEvalError("tree ensemble: a cycle between nodes")
    if not reached.all():
        raise CoreMLEvalError("tree ensemble: nodes not connected to any root")
    base = np.asarray(params.basePredictionValue, dtype=np.float64)
    if base.size == 0:
        base = np.zeros(dims)
    elif base.size != dims:
        raise CoreMLEvalError(f"tree ensemble: {base.size} base values for {dims} dimensions")
    branch = threshold[~is_leaf]
    finite = branch[np.isfinite(branch)]
    as_float32 = bool(np.all(finite.astype(np.float32).astype(np.float64) == finite))
    return CompiledTrees(feature, threshold, behaviour, true_child, false_child, missing_true,
                         is_leaf, leaf_values, roots, tree_ids, depth, dims, base, as_float32)


def tree_scores(trees: CompiledTrees, X: np.ndarray, precision: str = "auto") -> np.ndarray:
    """Raw scores (n, dims): base + the reached leaves' values, before the post-transform."""
    mode = trees.precision(precision)
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise CoreMLEvalError("tree ensemble input must be 2-D")
    if X.shape[1] <= int(trees.feature[~trees.is_leaf].max(initial=-1)):
        raise CoreMLEvalError(f"tree ensemble splits on feature "
                              f"{int(trees.feature[~trees.is_leaf].max())} but the input has "
                              f"{X.shape[1]} columns")
    values = X.astype(np.float32) if mode == "float32" else X
    thresholds = trees.threshold.astype(np.float32) if mode == "float32" else trees.threshold
    n, T = X.shape[0], trees.n_trees
    out = np.empty((n, trees.dims), dtype=np.float64)
    chunk = max(1, ROW_CHUNK_CELLS // max(T, 1))
    for start in range(0, n, chunk):
        rows = values[start:start + chunk]
        m = rows.shape[0]
        cur = np.broadcast_to(trees.roots, (m, T)).copy()
        row_index = np.arange(m)[:, None]
        for _ in range(trees.depth):
            active = ~trees.is_leaf[cur]
            if not active.any():
                break
            x = rows[row_index, trees.feature[cur]]
            t = thresholds[cur]
            b = trees.behaviour[cur]
            go = np.select([b == 0, b == 1, b == 2, b == 3, b == 4, b == 5],
                           [x <= t, x < t, x >= t, x > t, x == t, x != t], default=False)
            nan = np.isnan(x)
            if nan.any():
                go = np.where(nan, trees.missing_true[cur], go)
            nxt = np.where(go, trees.true_child[cur], trees.false_child[cur])
            cur = np.where(active, nxt, cur)
        if (~trees.is_leaf[cur]).any():
            raise CoreMLEvalError("tree ensemble: a walk did not end on a leaf")
        out[start:start + m] = trees.base + trees.leaf_values[cur].sum(axis=1)
    return out


def _post_transform(code: int, scores: np.ndarray) -> np.ndarray:
    if code == 0:
        return scores
    if code == 1:
        return _softmax(scores)
    if code == 2:
        return _sigmoid(scores)
    if code == 3:
        return _softmax(np.column_stack([np.zeros(len(scores)), scores]))
    raise UnsupportedSpec(f"tree post-evaluation transform {code} is not evaluated")


@lru_cache(maxsize=16)
def _compiled(message_class: type, serialized: bytes) -> CompiledTrees:
    params = message_class()
    params.ParseFromString(serialized)
    return compile_trees(params)


def compiled_trees(model) -> CompiledTrees:
    """The compiled tree ensemble of a TreeEnsemble{Classifier,Regressor} model (cached)."""
    kind = model.WhichOneof("Type")
    if kind not in ("treeEnsembleClassifier", "treeEnsembleRegressor"):
        raise CoreMLEvalError(f"{kind} is not a tree ensemble")
    params = getattr(model, kind).treeEnsemble
    return _compiled(type(params), params.SerializeToString())


def _tree_regressor(model, env, precision):
    trees = compiled_trees(model)
    scores = _post_transform(model.treeEnsembleRegressor.postEvaluationTransform,
                             tree_scores(trees, _vector(model, env), precision))
    name = model.description.predictedFeatureName or model.description.output[0].name
    return {name: scores[:, 0] if scores.shape[1] == 1 else scores}


def _tree_classifier(model, env, precision):
    params = model.treeEnsembleClassifier
    trees = compiled_trees(model)
    classes = _class_labels(params)
    dims = trees.dims
    transform = params.postEvaluationTransform
    scores = _post_transform(transform, tree_scores(trees, _vector(model, env), precision))
    if not classes:
        classes = [0, 1] if dims == 1 else list(range(scores.shape[1]))
    binary = dims == 1 and len(classes) == 2 and transform != 3
    if binary:
        probs = np.column_stack([1.0 - scores[:, 0], scores[:, 0]])
    elif scores.shape[1] == len(classes):
        probs = scores
    else:
        raise CoreMLEvalError(f"tree classifier: {scores.shape[1]} scores for {len(classes)} "
                              "class labels")
    return _classifier_outputs(model, classes, probs, binary)


_HANDLERS = {
    "imputer": _imputer,
    "scaler": _scaler,
    "oneHotEncoder": _one_hot,
    "featureVectorizer": _feature_vectorizer,
    "arrayFeatureExtractor": _array_feature_extractor,
    "identity": _identity,
    "glmRegressor": _glm_regressor,
    "glmClassifier": _glm_classifier,
    "treeEnsembleRegressor": _tree_regressor,
    "treeEnsembleClassifier": _tree_classifier,
}


# --------------------------------------------------------------------------- inspection
def stages(model: Any) -> list[str]:
    """The model types of a spec, pipelines flattened (e.g. ['featureVectorizer', 'imputer', ...])."""
    model = load(model)
    kind = model.WhichOneof("Type")
    if kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
        pipe = model.pipeline if kind == "pipeline" else getattr(model, kind).pipeline
        return [s for sub in pipe.models for s in stages(sub)]
    return [kind]


def tree_models(model: Any) -> list:
    """Every tree-ensemble model inside a spec."""
    model = load(model)
    kind = model.WhichOneof("Type")
    if kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
        pipe = model.pipeline if kind == "pipeline" else getattr(model, kind).pipeline
        return [t for sub in pipe.models for t in tree_models(sub)]
    return [model] if kind in ("treeEnsembleClassifier", "treeEnsembleRegressor") else []


def tree_precision_of(model: Any) -> str | None:
    """"float32" or "float64": how Core ML's tree compiler will compare (None: no trees)."""
    found = tree_models(model)
    if not found:
        return None
    return "float32" if all(compiled_trees(t).thresholds_are_float32 for t in found) else "float64"


# --------------------------------------------------------------------------- structural checks
PIPELINES = ("pipeline", "pipelineClassifier", "pipelineRegressor")


def check_spec(model: Any) -> list[str]:
    """What Core ML's own validator would reject (the checks of its Pipeline, TreeEnsemble, GLM,
    OneHotEncoder, Imputer and FeatureVectorizer validators that matter here); [] when none.
    Core ML's validator is not available on Linux (coremltools' libcoremlpython is macOS-only)."""
    model = load(model)
    problems: list[str] = []
    if model.specificationVersion < 1:
        problems.append("specificationVersion is not set")
    _check(model, problems, "model")
    return problems


def _type_name(feature_type) -> str:
    kind = feature_type.WhichOneof("Type") or "unset"
    if kind == "multiArrayType":
        return f"multiArray{list(feature_type.multiArrayType.shape)}"
    if kind == "dictionaryType":
        return f"dictionary[{feature_type.dictionaryType.WhichOneof('KeyType')}]"
    return kind


def _check(model, problems: list[str], where: str) -> None:
    kind = model.WhichOneof("Type")
    desc = model.description
    names = [d.name for d in desc.input] + [d.name for d in desc.output]
    if any(not n for n in names):
        problems.append(f"{where} ({kind}): a feature without a name")
    if kind in PIPELINES:
        pipe = model.pipeline if kind == "pipeline" else getattr(model, kind).pipeline
        if not pipe.models:
            problems.append(f"{where}: empty pipeline")
        if pipe.names and (len(pipe.names) != len(pipe.models) or len(set(pipe.names)) != len(pipe.names)):
            problems.append(f"{where}: pipeline names must be unique, one per model")
        table = {d.name: d.type for d in desc.input}
        for i, sub in enumerate(pipe.models):
            label = f"{where}/{pipe.names[i] if i < len(pipe.names) else i}"
            for d in sub.description.input:
                if d.name not in table:
                    problems.append(f"{label}: input {d.name!r} is not produced earlier")
                elif table[d.name] != d.type:
                    problems.append(f"{label}: input {d.name!r} is {_type_name(d.type)} but was "
                                    f"produced as {_type_name(table[d.name])}")
            _check(sub, problems, label)
            for d in sub.description.output:
                table[d.name] = d.type
        for d in desc.output:
            if d.name not in table:
                problems.append(f"{where}: output {d.name!r} is produced by no model")
            elif table[d.name] != d.type:
                problems.append(f"{where}: output {d.name!r} type {_type_name(d.type)} differs from "
                                f"the producing model's {_type_name(table[d.name])}")
    elif kind in ("glmClassifier", "treeEnsembleClassifier"):
        params = getattr(model, kind)
        classes = _class_labels(params)
        _check_classifier_interface(model, classes, problems, where)
        if kind == "glmClassifier":
            rows = len(params.weights)
            if rows == 0 or rows != len(params.offset):
                problems.append(f"{where}: GLM weights and offsets must be non-empty and as many")
            elif params.classEncoding == 0 and classes and rows != len(classes) - 1:
                problems.append(f"{where}: ReferenceClass needs {len(classes) - 1} weight rows")
            elif params.classEncoding == 1 and classes and rows != (1 if len(classes) == 2 else len(classes)):
                problems.append(f"{where}: OneVsRest weight rows do not match the classes")
            widths = {len(w.value) for w in params.weights}
            if len(widths) > 1 or 0 in widths:
                problems.append(f"{where}: GLM weight rows must have one non-zero length")
        else:
            try:
                trees = compiled_trees(model)
                dims = trees.dims
                if classes and not ((dims == 1 and len(classes) == 2) or (dims >= 2 and dims == len(classes))):
                    problems.append(f"{where}: {dims} prediction dimensions for {len(classes)} classes")
            except CoreMLEvalError as exc:
                problems.append(f"{where}: {exc}")
    elif kind == "treeEnsembleRegressor":
        try:
            compiled_trees(model)
        except CoreMLEvalError as exc:
            problems.append(f"{where}: {exc}")
        _check_regressor_interface(model, problems, where)
    elif kind == "glmRegressor":
        glm = model.glmRegressor
        if len(glm.weights) != len(glm.offset):
            problems.append(f"{where}: GLM regressor weights and offsets differ in number")
        _check_regressor_interface(model, problems, where)
    elif kind == "oneHotEncoder":
        enc = model.oneHotEncoder
        if enc.WhichOneof("CategoryType") is None:
            problems.append(f"{where}: one-hot encoder without categories")
        if len(desc.input) != 1 or desc.input[0].type.WhichOneof("Type") not in ("stringType", "int64Type"):
            problems.append(f"{where}: one-hot encoder takes one string or int64 input")
        want = "dictionaryType" if enc.outputSparse else "multiArrayType"
        if len(desc.output) != 1 or desc.output[0].type.WhichOneof("Type") != want:
            problems.append(f"{where}: one-hot encoder output must be one {want}")
    elif kind == "imputer":
        imp = model.imputer
        if imp.WhichOneof("ImputedValue") is None:
            problems.append(f"{where}: imputer without an imputed value")
        elif len(desc.input) != 1 or len(desc.output) != 1 or \
                desc.input[0].type.WhichOneof("Type") != desc.output[0].type.WhichOneof("Type"):
            problems.append(f"{where}: imputer needs one input and one output of the same type")
        else:
            allowed = {"imputedDoubleValue": {"doubleType", "multiArrayType"},
                       "imputedDoubleArray": {"multiArrayType"},
                       "imputedStringValue": {"stringType"}, "imputedInt64Value": {"int64Type"}}
            ok = allowed.get(imp.WhichOneof("ImputedValue"))
            if ok is not None and desc.input[0].type.WhichOneof("Type") not in ok:
                problems.append(f"{where}: imputed value type does not fit the input type")
    elif kind == "featureVectorizer":
        if any(item.inputDimensions <= 0 for item in model.featureVectorizer.inputList):
            problems.append(f"{where}: feature vectorizer dimensions must be > 0")
        if len(desc.output) != 1 or desc.output[0].type.WhichOneof("Type") != "multiArrayType":
            problems.append(f"{where}: feature vectorizer output must be one multiArray")
        else:
            shape = list(desc.output[0].type.multiArrayType.shape)
            total = sum(int(item.inputDimensions) for item in model.featureVectorizer.inputList)
            if shape and shape[-1] != total:
                problems.append(f"{where}: feature vectorizer output width {shape} != {total}")
    elif kind not in _HANDLERS:
        problems.append(f"{where}: model type {kind!r} is not checked here")


def _check_classifier_interface(model, classes: list, problems: list[str], where: str) -> None:
    desc = model.description
    outputs = {d.name: d.type for d in desc.output}
    label_type = "int64Type" if classes and isinstance(classes[0], int) else "stringType"
    key_type = "int64KeyType" if label_type == "int64Type" else "stringKeyType"
    if desc.predictedFeatureName not in outputs:
        problems.append(f"{where}: predictedFeatureName {desc.predictedFeatureName!r} is not an output")
    elif outputs[desc.predictedFeatureName].WhichOneof("Type") != label_type:
        problems.append(f"{where}: the label output must be {label_type} for these class labels")
    if desc.predictedProbabilitiesName:
        proba = outputs.get(desc.predictedProbabilitiesName)
        if proba is None or proba.WhichOneof("Type") != "dictionaryType" or \
                proba.dictionaryType.WhichOneof("KeyType") != key_type:
            problems.append(f"{where}: the probability output must be a dictionary with {key_type}")


def _check_regressor_interface(model, problems: list[str], where: str) -> None:
    desc = model.description
    if not desc.output or desc.output[0].type.WhichOneof("Type") not in ("doubleType", "multiArrayType"):
        problems.append(f"{where}: a regressor's output must be a double")
