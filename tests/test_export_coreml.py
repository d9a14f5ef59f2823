"""Core ML export: every family train_model produces, on bundled data, through the
framework's parity gate; the spec walker against hand-built specs with known outputs; tree
thresholds at their exact boundaries; one export through the flow."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes, load_iris

from tasks.demo_data import churn_frame
from tasks.export import coreml_eval
from tasks.export.base import ExportSubject, load_exporter
from tasks.export.core import export_format, sklearn_reference
from tasks.export.parity import BOUNDS
from tasks.training_search import build_pipeline, infer_schema, prepare_features
from tests.budgets import ONE_LINEAR_TRIAL
from tests.conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

# small, fast members of each family (the structure is what matters, not the size)
FAMILIES = {
    "linear": ({}, {}),
    "random_forest": ({"n_estimators": 25, "min_samples_leaf": 2, "max_depth": 10}, {}),
    "hist_gradient_boosting": ({"learning_rate": 0.2, "max_leaf_nodes": 15},
                               {"model__max_iter": 30, "model__early_stopping": False}),
}


def churn_data():
    frame = churn_frame().sample(1600, random_state=5).reset_index(drop=True)
    return frame, "churn", "binary"


def iris_data():
    frame = load_iris(as_frame=True).frame.rename(columns={"target": "species"})
    return frame.sample(frac=1.0, random_state=2).reset_index(drop=True), "species", "multiclass"


def diabetes_data():
    frame = load_diabetes(as_frame=True, scaled=False).frame
    frame["sex"] = frame["sex"].map({1.0: "one", 2.0: "two"})  # a categorical column in regression
    return frame.sample(frac=1.0, random_state=3).reset_index(drop=True), "target", "regression"


DATASETS = {"churn": churn_data, "iris": iris_data, "diabetes": diabetes_data}


@pytest.fixture(scope="module")
def datasets():
    """(schema, X_train, y_train, X_check) per dataset; the check rows carry missing values and
    categories never seen in training, which the Core ML pipeline must treat as scikit-learn."""
    out = {}
    for name, make in DATASETS.items():
        frame, target, task = make()
        schema = infer_schema(frame, target, task)
        X = prepare_features(frame, schema)
        cut = int(len(X) * 0.7)
        if schema.categorical:  # a category missing in training: "missing" becomes a category
            X.loc[: cut // 20, schema.categorical[-1]] = np.nan
        check = X.iloc[cut:].reset_index(drop=True).copy()
        num = schema.numeric
        check.loc[0:4, num[0]] = np.nan
        check.loc[5:7, num[-1]] = np.nan
        for c in schema.categorical:
            check.loc[8:9, c] = np.nan
            check.loc[10:11, c] = "never-seen"
        out[name] = (schema, X.iloc[:cut], frame[target].iloc[:cut], check)
    return out


def fitted(datasets, dataset: str, family: str):
    schema, X, y, check = datasets[dataset]
    params, extra = FAMILIES[family]
    pipe = build_pipeline(schema, family, params, 0)
    if extra:
        pipe.set_params(**extra)
    pipe.fit(X, y)
    subject = ExportSubject(model_name=f"{dataset}_model", version=3, pipeline=pipe, schema=schema,
                            run_id="run-123", family=family, model_uri=f"models:/{dataset}_model/3")
    return subject, check


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_passes_the_gate_and_the_spec_takes_raw_columns(datasets, dataset, family,
                                                                     tmp_path):
    import coremltools

    subject, check = fitted(datasets, dataset, family)
    reference = sklearn_reference(subject, check, with_latency=False)
    outcome = export_format("coreml", subject, check, reference, tmp_path, quantize=True)
    r = outcome.result
    assert r.status == "ok", r.reason
    bound = BOUNDS["float32"]
    scale = max(1.0, float(np.abs(reference.prediction.scores).max())) if dataset == "diabetes" else 1.0
    assert r.max_abs_diff <= bound.max_abs_diff * scale, r.max_abs_diff
    assert r.changed_labels == (None if dataset == "diabetes" else 0)
    assert r.parity_rows == len(check)
    # honest about the runtime: no latency, the on-device check pending, no fake quantization
    assert r.latency_p50_us is None and r.latency_p99_us is None
    assert "not measured" in r.latency_note and "Linux" in r.latency_note
    assert any("on-device check pending" in n for n in r.notes)
    assert r.quantization.startswith("not applicable")

    spec = coremltools.utils.load_spec(r.path)
    kind = spec.WhichOneof("Type")
    assert kind == ("pipelineRegressor" if dataset == "diabetes" else "pipelineClassifier")
    schema = subject.schema
    inputs = {d.name: d.type.WhichOneof("Type") for d in spec.description.input}
    contract = {i["column"]: i["name"] for i in outcome.conversion.inputs}
    assert sorted(contract) == sorted(schema.columns)  # one input per raw column
    for c in schema.numeric:
        assert inputs[contract[c]] == "doubleType"
    for c in schema.categorical:
        assert inputs[contract[c]] == "stringType"
    assert all(d.shortDescription for d in spec.description.input)
    assert all(d.shortDescription for d in spec.description.output)
    stages = coreml_eval.stages(spec)
    assert stages[-1] == {"linear": "glmRegressor" if dataset == "diabetes" else "glmClassifier"}.get(
        family, "treeEnsembleRegressor" if dataset == "diabetes" else "treeEnsembleClassifier")
    assert "imputer" in stages and stages.count("featureVectorizer") == 2
    assert ("scaler" in stages) == (family == "linear")
    assert stages.count("oneHotEncoder") == len(schema.categorical)
    assert coreml_eval.check_spec(spec) == []

    md = spec.description.metadata
    assert md.versionString == "3" and md.author and subject.model_name in md.shortDescription
    user = dict(md.userDefined)
    assert user["mlops.run_id"] == "run-123" and user["mlops.model_name"] == subject.model_name
    assert user["mlops.family"] == family and user["mlops.task"] == schema.task
    assert json.loads(user["mlops.inputs"]) == {v: k for k, v in contract.items()}
    if dataset != "diabetes":
        labels = (list(spec.pipelineClassifier.pipeline.models[-1].glmClassifier.int64ClassLabels.vector)
                  if family == "linear" and dataset == "iris" else None)
        assert json.loads(user["mlops.classes"]) == [c.item() if hasattr(c, "item") else c
                                                     for c in subject.classes]
        if labels is not None:
            assert labels == [0, 1, 2]  # integer classes stay Int64 labels
        assert spec.description.predictedProbabilitiesName.endswith("Probability")


@pytest.mark.parametrize("dataset, estimator", [
    ("churn", "GradientBoostingClassifier"), ("iris", "GradientBoostingClassifier"),
    ("diabetes", "GradientBoostingRegressor"), ("iris", "ExtraTreesClassifier"),
    ("diabetes", "DecisionTreeRegressor"), ("diabetes", "Lasso")])
def test_close_kin_of_the_trained_families_convert_too(datasets, dataset, estimator, tmp_path):
    import sklearn.ensemble
    import sklearn.linear_model
    import sklearn.tree

    module = next(m for m in (sklearn.ensemble, sklearn.linear_model, sklearn.tree)
                  if hasattr(m, estimator))
    params = {"Lasso": {"alpha": 0.1}, "DecisionTreeRegressor": {"max_depth": 6}}.get(
        estimator, {"n_estimators": 10})
    subject, check = fitted(datasets, dataset, "linear" if estimator == "Lasso" else "random_forest")
    subject.pipeline.steps[-1] = ("model", getattr(module, estimator)(random_state=0, **params)
                                  if estimator != "Lasso" else getattr(module, estimator)(**params))
    schema, X, y, _ = datasets[dataset]
    subject.pipeline.fit(X, y)
    reference = sklearn_reference(subject, check, with_latency=False)
    r = export_format("coreml", subject, check, reference, tmp_path).result
    assert r.status == "ok", r.reason
    assert r.changed_labels in (None, 0) and r.max_abs_diff < 1e-9 * max(
        1.0, float(np.abs(reference.prediction.scores).max()))


def test_tree_thresholds_hold_at_their_exact_boundaries(datasets):
    """Rows placed on, just below and just above every threshold of one numeric feature: the
    spec agrees with scikit-learn whether the device compares in double or in float32 (random
    forest), and in double (histogram boosting, which compares float64 inputs)."""
    schema, _, _, check = datasets["churn"]
    column = "monthly_charges"
    j = schema.numeric.index(column)  # trees see the numeric block first, unscaled
    for family in ("random_forest", "hist_gradient_boosting"):
        subject, _ = fitted(datasets, "churn", family)
        est = subject.estimator
        if family == "random_forest":
            t = np.concatenate([e.tree_.threshold[e.tree_.feature == j] for e in est.estimators_])
        else:
            t = np.asarray([n["num_threshold"] for it in est._predictors for p in it
                            for n in p.nodes if not n["is_leaf"] and n["feature_idx"] == j])
        assert t.size > 5
        f32 = t.astype(np.float32)
        values = np.unique(np.concatenate([
            t, np.nextafter(t, np.inf), np.nextafter(t, -np.inf), f32.astype(np.float64),
            np.nextafter(f32, np.float32(np.inf)).astype(np.float64),
            np.nextafter(f32, np.float32(-np.inf)).astype(np.float64),
            (f32.astype(np.float64) + np.nextafter(f32, np.float32(np.inf)).astype(np.float64)) / 2]))
        rows = pd.concat([check.iloc[[20]]] * len(values), ignore_index=True)
        rows[column] = values
        plan_spec = _spec_of(subject)
        runner_inputs = _feeds(plan_spec, rows)
        want = subject.pipeline.predict_proba(rows)
        precisions = ("float64", "float32") if family == "random_forest" else ("float64",)
        for precision in precisions:
            got = coreml_eval.predict(plan_spec, runner_inputs, tree_precision=precision)
            assert np.abs(got.probabilities - want).max() < 1e-12, (family, precision)
            assert list(got.labels) == list(subject.pipeline.predict(rows)), (family, precision)
        if family == "hist_gradient_boosting":  # what float32 comparisons would cost here
            got = coreml_eval.predict(plan_spec, runner_inputs, tree_precision="float32")
            moved = int(np.sum(np.abs(got.probabilities - want).max(axis=1) > 1e-12))
            print(f"HGB, {len(values)} boundary rows: {moved} would move under float32 comparisons")


def _spec_of(subject):
    from tasks.export.coreml import build_spec, plan_export

    return coreml_eval.load(build_spec(plan_export(subject), subject).SerializeToString())


def _feeds(spec, rows):
    mapping = json.loads(spec.description.metadata.userDefined["mlops.inputs"])
    kinds = {d.name: d.type.WhichOneof("Type") for d in spec.description.input}
    feeds = {}
    for name, column in mapping.items():
        col = rows[column]
        feeds[name] = (col.to_numpy(dtype=np.float64, na_value=np.nan) if kinds[name] == "doubleType"
                       else np.asarray([str(v) if isinstance(v, str) else "" for v in col], dtype=object))
    return feeds


def test_what_core_ml_cannot_carry_is_unsupported_with_the_reason(datasets):
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OrdinalEncoder

    exporter = load_exporter("coreml")
    schema, X, y, _ = datasets["churn"]
    knn = build_pipeline(schema, "linear", {}, 0)
    knn.steps[-1] = ("model", KNeighborsClassifier())
    cap = exporter.check(ExportSubject("m", 1, knn.fit(X, y), schema))
    assert not cap.supported and "does not support the estimator KNeighborsClassifier" in cap.reason

    native = Pipeline([("preprocess", ColumnTransformer(
        [("cat", OrdinalEncoder(), schema.categorical), ("num", "passthrough", schema.numeric)])),
        ("model", HistGradientBoostingClassifier(max_iter=5, categorical_features=list(
            range(len(schema.categorical)))))]).fit(X.fillna({c: "missing" for c in schema.categorical}), y)
    cap = exporter.check(ExportSubject("m", 1, native, schema))
    assert not cap.supported and "native categorical features" in cap.reason

    schema_d, Xd, yd, _ = datasets["diabetes"]
    poisson = build_pipeline(schema_d, "linear", {}, 0)
    poisson.steps[-1] = ("model", HistGradientBoostingRegressor(loss="poisson", max_iter=5))
    cap = exporter.check(ExportSubject("m", 1, poisson.fit(Xd, yd), schema_d))
    assert not cap.supported and "LogLink" in cap.reason and "post-transform" in cap.reason


def _imported(code: str) -> list[str]:
    code = "import sys\n" + code + ("\nprint(sorted(m for m in ('coremltools', 'sklearn', "
                                   "'tensorflow') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_edge_picks_up_core_ml_and_nothing_imports_coremltools_before_converting(datasets):
    assert _imported("from tasks.export.base import load_exporter, plan_formats\n"
                     "from tasks.export.coreml import CoreMLExporter\n"
                     "assert type(load_exporter('coreml')) is CoreMLExporter\n"
                     "assert 'coreml' in plan_formats('edge').formats") == ["sklearn"]
    # the walker: neither scikit-learn nor coremltools' package (only its protobuf modules)
    assert _imported("import tasks.export.coreml_eval as ev\nev.proto()") == []
    subject, _ = fitted(datasets, "iris", "linear")
    assert load_exporter("coreml").check(subject).supported  # checking converts nothing


# --------------------------------------------------------------------------- the walker itself
def _pb():
    M = coreml_eval.proto()
    return M, sys.modules[M.__name__.rsplit(".", 1)[0] + ".FeatureTypes_pb2"]


def _feature(container, name, kind, width=None):
    M, FT = _pb()
    f = container.add()
    f.name = name
    if kind == "double":
        f.type.doubleType.SetInParent()
    elif kind == "string":
        f.type.stringType.SetInParent()
    elif kind == "array":
        f.type.multiArrayType.shape.append(width)
        f.type.multiArrayType.dataType = FT.ArrayFeatureType.DOUBLE
    elif kind == "dict_int":
        f.type.dictionaryType.int64KeyType.SetInParent()
    elif kind == "dict_str":
        f.type.dictionaryType.stringKeyType.SetInParent()


def _preprocessing(pipe):
    """x (double, NaN → 2) → (x - 1) * 2; c (string) one-hot over [a, b]; → v = [x', a, b]."""
    m = pipe.models.add()
    _feature(m.description.input, "x", "double")
    _feature(m.description.output, "x_filled", "double")
    m.imputer.imputedDoubleValue = 2.0
    m.imputer.replaceDoubleValue = math.nan
    m = pipe.models.add()
    _feature(m.description.input, "x_filled", "double")
    _feature(m.description.output, "x_scaled", "double")
    m.scaler.shiftValue.append(-1.0)
    m.scaler.scaleValue.append(2.0)
    m = pipe.models.add()
    _feature(m.description.input, "c", "string")
    _feature(m.description.output, "c_onehot", "dict_int")
    m.oneHotEncoder.stringCategories.vector.extend(["a", "b"])
    m.oneHotEncoder.outputSparse = True
    m.oneHotEncoder.handleUnknown = 1
    m = pipe.models.add()
    _feature(m.description.input, "x_scaled", "double")
    _feature(m.description.input, "c_onehot", "dict_int")
    _feature(m.description.output, "v", "array", 3)
    for name, width in (("x_scaled", 1), ("c_onehot", 2)):
        item = m.featureVectorizer.inputList.add()
        item.inputColumn, item.inputDimensions = name, width


def _pipeline_spec(kind: str):
    M, _ = _pb()
    spec = M.Model()
    spec.specificationVersion = 1
    _feature(spec.description.input, "x", "double")
    _feature(spec.description.input, "c", "string")
    pipe = getattr(spec, kind).pipeline
    _preprocessing(pipe)
    return spec, pipe


def _node(params, tree, node, behaviour=6, feature=0, value=0.0, true=0, false=0, leaf=None,
          missing_true=False):
    n = params.nodes.add()
    n.treeId, n.nodeId, n.nodeBehavior = tree, node, behaviour
    if behaviour == 6:
        for j, v in leaf.items():
            info = n.evaluationInfo.add()
            info.evaluationIndex, info.evaluationValue = j, v
    else:
        n.branchFeatureIndex, n.branchFeatureValue = feature, value
        n.trueChildNodeId, n.falseChildNodeId = true, false
        n.missingValueTracksTrueChild = missing_true


INPUTS = {"x": np.array([3.0, np.nan, 1.25, 0.0]), "c": np.array(["b", "zzz", "a", ""], dtype=object)}
# v = [(x or 2) - 1) * 2, c == a, c == b]
V = np.array([[4.0, 0, 1], [2.0, 0, 0], [0.5, 1, 0], [-2.0, 0, 0]])


def test_walker_pipeline_with_a_glm_regressor_gives_the_hand_computed_values():
    spec, pipe = _pipeline_spec("pipelineRegressor")
    _feature(spec.description.output, "y", "double")
    spec.description.predictedFeatureName = "y"
    m = pipe.models.add()
    _feature(m.description.input, "v", "array", 3)
    _feature(m.description.output, "y", "double")
    m.description.predictedFeatureName = "y"
    m.glmRegressor.weights.add().value.extend([1.0, 10.0, 100.0])
    m.glmRegressor.offset.append(0.5)
    assert coreml_eval.check_spec(spec) == []
    out = coreml_eval.predict(spec.SerializeToString(), INPUTS)
    assert out.kind == "regressor"
    assert out.values.tolist() == [104.5, 2.5, 11.0, -1.5]  # 4+100+.5, 2+.5, .5+10+.5, -2+.5
    with pytest.raises(coreml_eval.CoreMLEvalError, match="missing input 'c'"):
        coreml_eval.evaluate(spec, {"x": INPUTS["x"]})


def _tree_classifier(spec, pipe, labels, dims, transform=0, base=None):
    spec.description.predictedFeatureName = "label"
    spec.description.predictedProbabilitiesName = "labelProbability"
    for container in (spec.description.output,):
        _feature(container, "label", "string")
        _feature(container, "labelProbability", "dict_str")
    m = pipe.models.add()
    _feature(m.description.input, "v", "array", 3)
    _feature(m.description.output, "label", "string")
    _feature(m.description.output, "labelProbability", "dict_str")
    m.description.predictedFeatureName = "label"
    m.description.predictedProbabilitiesName = "labelProbability"
    m.treeEnsembleClassifier.stringClassLabels.vector.extend(labels)
    m.treeEnsembleClassifier.postEvaluationTransform = transform
    params = m.treeEnsembleClassifier.treeEnsemble
    params.numPredictionDimensions = dims
    params.basePredictionValue.extend(base or [0.0] * dims)
    return params


def test_walker_tree_classifier_sums_leaves_and_respects_each_branch_mode():
    spec, pipe = _pipeline_spec("pipelineClassifier")
    params = _tree_classifier(spec, pipe, ["p", "q", "r"], 3, base=[0.1, 0.0, 0.0])
    # tree 0: v0 <= 0.5 → {p: .7, q: .3} else {q: 1}; NaN would follow the true child
    _node(params, 0, 0, behaviour=0, feature=0, value=0.5, true=1, false=2, missing_true=True)
    _node(params, 0, 1, leaf={0: 0.7, 1: 0.3})
    _node(params, 0, 2, leaf={1: 1.0})
    # tree 1 (ids need not be 0-based or ordered): v1 < 1 → {p: .2} else {r: .4}
    _node(params, 7, 5, leaf={2: 0.4})
    _node(params, 7, 3, behaviour=1, feature=1, value=1.0, true=4, false=5)
    _node(params, 7, 4, leaf={0: 0.2})
    assert coreml_eval.check_spec(spec) == []
    out = coreml_eval.predict(spec, INPUTS)
    want = np.array([[0.3, 1.0, 0.0],   # v0 = 4 > .5: {q: 1}; v1 = 0 < 1: {p: .2}; + base .1
                     [0.3, 1.0, 0.0],   # v0 = 2, v1 = 0
                     [0.8, 0.3, 0.4],   # v0 = .5 <= .5: {p .7, q .3}; v1 = 1 not < 1: {r .4}
                     [1.0, 0.3, 0.0]])  # v0 = -2: {p .7, q .3}; v1 = 0: {p: .2}; + base
    assert np.allclose(out.probabilities, want, atol=1e-15)
    assert list(out.labels) == ["q", "q", "p", "p"] and out.classes == ["p", "q", "r"]
    trees = coreml_eval.compiled_trees(pipe.models[-1])
    nan_row = coreml_eval.tree_scores(trees, np.array([[np.nan, 5.0, 0.0]]))
    assert np.allclose(nan_row, [[0.8, 0.3, 0.4]])  # NaN tracked the true child of tree 0


def test_walker_binary_mode_logistic_and_softmax_transforms():
    import math as m_

    spec, pipe = _pipeline_spec("pipelineClassifier")
    params = _tree_classifier(spec, pipe, ["no", "yes"], 1, transform=2, base=[0.0])
    _node(params, 0, 0, behaviour=3, feature=1, value=0.5, true=1, false=2)  # a > .5
    _node(params, 0, 1, leaf={0: m_.log(3.0)})  # σ(ln 3) = .75
    _node(params, 0, 2, leaf={0: 0.0})  # σ(0) = .5: a tie, which binary mode gives to class 1
    out = coreml_eval.predict(spec, INPUTS)
    assert np.allclose(out.probabilities[:, 1], [0.5, 0.5, 0.75, 0.5])
    assert np.allclose(out.probabilities.sum(axis=1), 1.0)
    assert list(out.labels) == ["yes"] * 4

    spec, pipe = _pipeline_spec("pipelineClassifier")
    params = _tree_classifier(spec, pipe, ["u", "v", "w"], 3, transform=1, base=[0.0, 1.0, 0.0])
    _node(params, 0, 0, leaf={2: 1.0})
    out = coreml_eval.predict(spec, INPUTS)
    e = np.exp([0.0, 1.0, 1.0])
    assert np.allclose(out.probabilities, np.tile(e / e.sum(), (4, 1)))
    assert list(out.labels) == ["v"] * 4  # a tie between v and w: the first wins


def test_walker_glm_classifier_reference_class_is_the_softmax():
    spec, pipe = _pipeline_spec("pipelineClassifier")
    spec.description.predictedFeatureName = "k"
    spec.description.predictedProbabilitiesName = "kProbability"
    m = pipe.models.add()
    for container in (spec.description.output, m.description.output):
        _feature(container, "k", "string")
        _feature(container, "kProbability", "dict_str")
    _feature(m.description.input, "v", "array", 3)
    m.description.predictedFeatureName = "k"
    m.description.predictedProbabilitiesName = "kProbability"
    glm = m.glmClassifier
    glm.stringClassLabels.vector.extend(["k0", "k1", "k2"])
    W = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    for row in W:
        glm.weights.add().value.extend(row.tolist())
    glm.offset.extend([0.25, -0.5])
    glm.classEncoding = 0  # ReferenceClass
    assert coreml_eval.check_spec(spec) == []
    out = coreml_eval.predict(spec, INPUTS)
    z = np.column_stack([np.zeros(4), V @ W.T + [0.25, -0.5]])
    want = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert np.allclose(out.probabilities, want, rtol=1e-13, atol=1e-15)
    assert list(out.labels) == [f"k{i}" for i in np.argmax(want, axis=1)]


def test_walker_tree_precision_follows_core_mls_float32_detection():
    M, _ = _pb()
    model = M.Model()
    _feature(model.description.input, "v", "array", 1)
    _feature(model.description.output, "y", "double")
    params = model.treeEnsembleRegressor.treeEnsemble
    params.numPredictionDimensions = 1
    _node(params, 0, 0, behaviour=0, feature=0, value=0.1, true=1, false=2)
    _node(params, 0, 1, leaf={0: 1.0})
    _node(params, 0, 2, leaf={0: 2.0})
    x = np.array([[float(np.float32(0.1))]])  # 0.10000000149 > 0.1 in double
    assert coreml_eval.tree_precision_of(model) == "float64"
    assert coreml_eval.evaluate(model, {"v": x})["y"].tolist() == [2.0]
    assert coreml_eval.evaluate(model, {"v": x}, tree_precision="float32")["y"].tolist() == [1.0]
    params.nodes[0].branchFeatureValue = 0.5  # a float32 number: the compiler may use float32
    assert coreml_eval.tree_precision_of(model) == "float32"


def test_check_spec_finds_what_core_mls_validator_would_reject():
    spec, pipe = _pipeline_spec("pipelineClassifier")
    params = _tree_classifier(spec, pipe, ["p", "q"], 3)
    _node(params, 0, 0, behaviour=0, feature=0, value=0.5, true=1, false=9)  # child 9 missing
    _node(params, 0, 1, leaf={0: 1.0})
    _node(params, 1, 0, leaf={5: 1.0})  # dimension out of range
    pipe.models[3].description.input[0].type.stringType.SetInParent()  # x_scaled is a double
    problems = " | ".join(coreml_eval.check_spec(spec))
    assert "input 'x_scaled' is stringType but was produced as doubleType" in problems
    assert "missing child 9" in problems
    with pytest.raises(coreml_eval.CoreMLEvalError, match="not a Core ML model spec"):
        coreml_eval.load(b"\x08\x01\x12\xff\xff")


# --------------------------------------------------------------------------- through the flow
def test_export_model_flow_publishes_core_ml_with_an_honest_report(state_dir):
    import coremltools

    from flows.export import export_model
    from flows.training import train_model

    frame = churn_frame().sample(1200, random_state=8).reset_index(drop=True)
    trained = train_model(frame, "churn", "customer_churn", **ONE_LINEAR_TRIAL)
    report = export_model("customer_churn", "champion", formats=["coreml"])
    r = report.result("coreml")
    assert r.status == "ok", r.reason
    assert r.changed_labels == 0 and r.max_abs_diff <= 1e-5 and r.parity_rows == report.sample_rows
    assert r.latency_p50_us is None and "not measured" in r.latency_note
    assert any("on-device check pending" in n for n in r.notes)
    spec = coremltools.utils.load_spec(r.path)
    md = spec.description.metadata
    assert md.userDefined["mlops.run_id"] == trained.run_id == report.run_id
    assert md.versionString == str(trained.version)
    manifest = json.loads(Path(report.manifest_path).read_text())
    entry = manifest["formats"]["coreml"]
    assert entry["status"] == "ok" and entry["latency"] is None
    assert entry["details"]["on_device_check"].startswith("pending")
    assert {i["column"] for i in entry["inputs"]} == {c["name"] for c in
                                                      manifest["input_schema"]["columns"]}
    assert entry["files"][0]["name"] == f"customer-churn-v{trained.version}.mlmodel"
