"""TensorFlow Lite export: every family train_model produces, on real bundled data
(churn: numeric + categorical, binary; iris: multiclass; diabetes: regression), run in LiteRT
through the framework's parity gate; quantized variants within their bounds or refused; the
input contract in the manifest and in the file; float32/float64 threshold semantics; strategies
chosen by shape; a deep forest within its size bound; unsupported models refused up front.

Converter tests build pipelines with tasks.training_search.build_pipeline (what train_model fits);
one module-scoped state folder serves the tests that go through train_model and export_model.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_diabetes, load_iris
from sklearn.ensemble import (ExtraTreesClassifier, GradientBoostingClassifier,
                              GradientBoostingRegressor, HistGradientBoostingClassifier,
                              RandomForestClassifier)
from sklearn.impute import SimpleImputer
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OrdinalEncoder
from sklearn.tree import DecisionTreeRegressor

from tasks.demo_data import churn_frame
from tasks.export import tflite_graph as tg
from tasks.export.base import ExportSubject, load_exporter, plan_formats
from tasks.export.core import export_format, sklearn_predict, sklearn_reference
from tasks.export.parity import BOUNDS, Bound, compare
from tasks.export.tflite import TFLiteExporter, read_contract
from tasks.training_search import build_pipeline, infer_schema, prepare_features
from tests.conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning",
                                        "ignore:Found unknown categories:UserWarning")

PARAMS = {  # small members of each family (the old grid's cheapest; the search starts near them)
    "linear": {"C": 1.0},
    "random_forest": {"n_estimators": 100, "min_samples_leaf": 3, "max_depth": 12},
    "hist_gradient_boosting": {"learning_rate": 0.1, "max_leaf_nodes": 15},
}
FAMILIES = list(PARAMS)
DATASETS = ["churn", "iris", "diabetes"]


# --------------------------------------------------------------------------- data and models
def _frame(name: str) -> tuple[pd.DataFrame, str, str]:
    if name == "churn":
        return churn_frame().sample(2400, random_state=11).reset_index(drop=True), "churn", "binary"
    if name == "iris":
        frame = load_iris(as_frame=True).frame
        frame["target"] = frame["target"].map({0: "setosa", 1: "versicolor", 2: "virginica"})
        return frame, "target", "multiclass"
    return load_diabetes(as_frame=True).frame, "target", "regression"


@pytest.fixture(scope="module")
def datasets():
    """name -> (X_train, y_train, X_sample, schema); iris and diabetes check on all their rows."""
    out = {}
    for name in DATASETS:
        frame, target, task = _frame(name)
        schema = infer_schema(frame, target, task)
        X, y = prepare_features(frame, schema), frame[target]
        if name == "churn":
            out[name] = (X.iloc[:1800], y.iloc[:1800], X.iloc[1800:].reset_index(drop=True), schema)
        else:
            out[name] = (X, y, X, schema)
    return out


@pytest.fixture(scope="module")
def fitted(datasets):
    """(dataset, family) -> ExportSubject, fitted once."""
    out = {}
    for name in DATASETS:
        X, y, _, schema = datasets[name]
        for family in FAMILIES:
            params = dict(PARAMS[family])
            if family == "linear" and schema.task == "regression":
                params = {"alpha": 1.0}
            pipeline = build_pipeline(schema, family, params, 0).fit(X, y)
            out[name, family] = ExportSubject(f"{name}_{family}", 1, pipeline, schema,
                                              family=family)
    return out


def subject_of(pipeline, schema, name="unit") -> ExportSubject:
    return ExportSubject(model_name=name, version=1, pipeline=pipeline, schema=schema)


def export(subject, sample, workdir, quantize=False, settings=None):
    reference = sklearn_reference(subject, sample, with_latency=False)
    return export_format("tflite", subject, sample, reference, workdir, quantize=quantize,
                         settings=settings, latency_rows=30)


def tolerance(task: str, precision: str, reference) -> float:
    scale = max(1.0, float(np.max(np.abs(reference.scores)))) if task == "regression" else 1.0
    return BOUNDS[precision].max_abs_diff * scale


def convert(subject, workdir: Path, settings=None):
    exporter = TFLiteExporter()
    exporter.configure(settings or {})
    assert exporter.check(subject).supported, exporter.check(subject).reason
    workdir.mkdir(parents=True, exist_ok=True)
    return exporter, exporter.convert(subject, workdir)


def litert(exporter, subject, conversion, X):
    runner = exporter.runner(subject, conversion)
    try:
        return runner.predict(X)
    finally:
        runner.close()


def tensors_of(path: Path) -> list[tuple[str, str]]:
    """(name, type) of every tensor in a .tflite file."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAs(Path(path).read_bytes(), 0)
    types = {v: k for k, v in vars(fb.TensorType).items() if not k.startswith("_")}
    graph = model.Subgraphs(0)
    return [(graph.Tensors(i).Name().decode(), types[graph.Tensors(i).Type()])
            for i in range(graph.TensorsLength())]


# --------------------------------------------------------------------------- every family
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_in_litert_within_float32_parity(datasets, fitted, tmp_path, dataset,
                                                           family):
    subject = fitted[dataset, family]
    sample = datasets[dataset][2]
    outcome = export(subject, sample, tmp_path)
    r = outcome.result

    assert r.status == "ok", r.reason
    assert r.precision == "float32" and r.quantization == "not requested"
    assert r.runtime.startswith("ai-edge-litert ") and "LiteRT Interpreter" in r.runtime
    reference = sklearn_predict(subject, sample)
    assert r.max_abs_diff <= tolerance(subject.task, "float32", reference)
    if subject.is_classifier:
        assert r.changed_labels == 0 and r.max_abs_diff <= 1e-5
    else:
        assert r.changed_labels is None
    assert r.latency_p50_us > 0 and r.rows_per_s > 0
    path = Path(r.path)
    assert path.suffix == ".tflite" and path.stat().st_size == r.size_bytes
    details = outcome.conversion.details
    expected = {"linear": {"dense"}, "random_forest": {"gather", "gemm"},
                "hist_gradient_boosting": {"gemm", "gather"}}[family]
    assert details["strategy"] in expected and details["strategy_reason"]
    if family == "hist_gradient_boosting":  # float64 comparisons through int64 order keys
        assert details["threshold_rule"] == "float64" and "BITCAST" in details["ops"]
    elif family == "random_forest":
        assert details["threshold_rule"] == "float32" and "BITCAST" not in details["ops"]


# --------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("dataset, family", [
    ("churn", "random_forest"), ("churn", "hist_gradient_boosting"),
    ("iris", "random_forest"), ("diabetes", "hist_gradient_boosting")])
def test_trees_quantize_their_leaf_values_within_the_documented_bounds(datasets, fitted, tmp_path,
                                                                       dataset, family):
    subject = fitted[dataset, family]
    sample = datasets[dataset][2]
    outcome = export(subject, sample, tmp_path, quantize=True)
    r = outcome.result

    assert r.status == "ok", r.reason
    assert r.precision in ("int8", "float16"), r.quantization  # measured: int8 passes on these
    bound = BOUNDS[r.precision]
    assert r.max_abs_diff <= tolerance(subject.task, r.precision, sklearn_predict(subject, sample))
    if subject.is_classifier:
        assert r.changed_labels <= np.floor(bound.max_changed_share * len(sample))
    float_size = outcome.conversion.details["float32_size_bytes"]
    assert r.size_bytes < float_size and f"{float_size:,} -> {r.size_bytes:,} bytes" in r.quantization
    assert "comparison tensors exact" in r.quantization and "within bounds" in r.quantization
    # only leaf values are stored narrow; thresholds, links, features, path matrices are not
    published = [f.name for f in r.files]
    assert published == [Path(r.path).name] and Path(r.path).stem.endswith(("-int8", "-float16"))
    assert not (tmp_path / "tflite" / f"{subject.basename}.tflite").exists()  # replaced
    narrow = [(n, t) for n, t in tensors_of(Path(r.path)) if t in ("INT8", "FLOAT16")]
    for name, kind in narrow:
        assert name.startswith(("tree/value", "gemm/value", "gemm/path")), name
        if name.startswith("gemm/path"):
            assert kind == "INT8"  # −1/0/1 with scale 1: exact (checked below)
    for name, kind in tensors_of(Path(r.path)):
        if "threshold" in name:
            assert kind in ("FLOAT32", "INT64"), (name, kind)
        if name.endswith(("/feature", "/right", "onehot/code")):
            assert kind == "INT32", (name, kind)


def test_a_linear_model_is_not_quantized_because_it_would_not_shrink(fitted, datasets, tmp_path):
    subject = fitted["churn", "linear"]
    r = export(subject, datasets["churn"][2], tmp_path, quantize=True).result
    assert r.status == "ok" and r.precision == "float32"
    assert r.quantization.startswith("not applied: int8 would not be smaller")
    assert r.quantization.endswith("float32 published")


def test_quantization_that_breaks_parity_is_refused_and_float32_published(fitted, datasets,
                                                                          tmp_path, monkeypatch):
    monkeypatch.setitem(BOUNDS, "int8", Bound(1e-9, 0.0))  # no int8 file can meet this
    subject = fitted["churn", "random_forest"]
    r = export(subject, datasets["churn"][2], tmp_path, quantize=True,
               settings={"tflite_quantization": "int8"}).result
    assert r.status == "ok" and r.precision == "float32" and r.changed_labels == 0
    assert r.quantization.startswith("not applied: int8 refused: max |diff|")
    assert r.quantization.endswith("float32 published")
    assert [f.name for f in r.files] == [f"{subject.basename}.tflite"]


# --------------------------------------------------------------------------- the input contract
@pytest.fixture(scope="module")
def churn_with_gaps(datasets):
    """Churn with missing values in training (so 'missing' is a category of some columns)."""
    X, y, sample, schema = datasets["churn"]
    rng = np.random.default_rng(5)
    X = X.copy()
    for col in ("contract", "payment_method", "tenure", "monthly_charges"):
        X.loc[rng.random(len(X)) < 0.05, col] = np.nan
    probe = sample.iloc[:300].copy()
    for col in schema.columns:  # missing everywhere, and categories never seen in training
        probe.loc[rng.random(len(probe)) < 0.1, col] = np.nan
    for col in schema.categorical:
        probe.loc[rng.random(len(probe)) < 0.1, col] = "never seen"
    return X, y, probe, schema


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_values_and_unseen_categories_follow_scikit_learn(churn_with_gaps, tmp_path,
                                                                  family):
    X, y, probe, schema = churn_with_gaps
    subject = subject_of(build_pipeline(schema, family, PARAMS[family], 0).fit(X, y), schema)
    exporter, conversion = convert(subject, tmp_path)
    got = litert(exporter, subject, conversion, probe)
    parity = compare(subject.task, sklearn_predict(subject, probe), got, BOUNDS["float32"],
                     subject.classes)
    assert parity.passed and parity.changed_labels == 0, parity.explanation

    columns = {c["name"]: c for entry in conversion.inputs for c in entry["columns"]}
    encoder = subject.pipeline.named_steps["preprocess"].named_transformers_["cat"]["onehot"]
    for j, name in enumerate(schema.categorical):
        vocab = columns[name]["vocabulary"]
        assert vocab == [str(c) for c in encoder.categories_[j]]
        if name in ("contract", "payment_method"):  # missing in training: a category of its own
            assert columns[name]["missing_code"] == vocab.index("missing")
        else:  # never missing in training: scikit-learn's "missing" is unseen, all-zero
            assert columns[name]["missing_code"] == -1 and "missing" not in vocab
    imputer = subject.pipeline.named_steps["preprocess"].named_transformers_["num"]["impute"]
    for j, name in enumerate(schema.numeric):
        assert columns[name]["imputed_with"] == pytest.approx(imputer.statistics_[j], abs=0)


def test_the_manifest_and_the_file_carry_the_same_contract(fitted, datasets, tmp_path):
    subject = fitted["churn", "hist_gradient_boosting"]
    outcome = export(subject, datasets["churn"][2], tmp_path)
    conversion, path = outcome.conversion, Path(outcome.result.path)

    numeric, categorical = conversion.inputs
    assert (numeric["name"], numeric["type"], numeric["shape"]) == \
        ("numeric", "float64", [None, len(subject.schema.numeric)])
    assert [c["name"] for c in numeric["columns"]] == subject.schema.numeric
    assert (categorical["name"], categorical["type"], categorical["unseen_code"]) == \
        ("categorical", "int32", -1)
    assert [c["name"] for c in categorical["columns"]] == subject.schema.categorical
    assert all(c["vocabulary"] == subject.schema.categories[c["name"]]
               for c in categorical["columns"])
    assert conversion.outputs[0] == {"name": "probabilities", "type": "float32",
                                     "shape": [None, 2], "classes": ["No", "Yes"]}
    assert conversion.outputs[1]["name"] == "label"

    embedded = read_contract(path)
    assert embedded["inputs"] == json.loads(json.dumps(conversion.inputs))
    assert embedded["outputs"] == json.loads(json.dumps(conversion.outputs))
    assert (embedded["model_name"], embedded["version"]) == (subject.model_name, 1)
    assert conversion.details["min_runtime_version"] == "2.13.0"  # BITCAST

    # a phone needs nothing else: codes from the vocabularies, the signature, two tensors
    from ai_edge_litert.interpreter import Interpreter

    sample = datasets["churn"][2].iloc[:5]
    num = sample[[c["name"] for c in numeric["columns"]]].to_numpy(np.float64)
    codes = np.asarray([[c["vocabulary"].index(v) if v in c["vocabulary"] else -1
                         for c, v in zip(categorical["columns"], row)]
                        for row in sample[[c["name"] for c in categorical["columns"]]].to_numpy()],
                       dtype=np.int32)
    interpreter = Interpreter(model_path=str(path))
    assert interpreter.get_signature_list() == {"serving_default": {
        "inputs": ["categorical", "numeric"], "outputs": ["label", "probabilities"]}}
    out = interpreter.get_signature_runner()(numeric=num, categorical=codes)
    np.testing.assert_allclose(out["probabilities"], subject.pipeline.predict_proba(sample),
                               atol=1e-6)
    assert [["No", "Yes"][i] for i in out["label"]] == list(subject.pipeline.predict(sample))


# --------------------------------------------------------------------------- thresholds
def test_threshold_rules_decide_exactly_as_scikit_learn():
    rng = np.random.default_rng(0)
    t64 = np.concatenate([rng.normal(0, 100, 2000), rng.normal(0, 1e-30, 100),
                          [0.0, -0.0, 1.5, np.float32(0.1).item(), 1e300, -1e300, 19.85]])
    with np.errstate(over="ignore"):  # ±1e300 become ±inf in float32, as in scikit-learn
        near = t64.astype(np.float32)
    x32 = np.concatenate([near, np.nextafter(near, np.float32(np.inf)),
                          np.nextafter(near, np.float32(-np.inf))])
    floor = tg.float32_floor(t64)
    for shift in (0, len(t64), 2 * len(t64)):  # scikit-learn's trees: float64(x32) <= t64
        x = x32[shift:shift + len(t64)]
        np.testing.assert_array_equal(x.astype(np.float64) <= t64, x <= floor)

    values = np.concatenate([rng.normal(0, 1e3, 500), rng.normal(0, 1e-300, 50),
                             [0.0, -0.0, np.inf, -np.inf, 5e-324, -5e-324, 1.0,
                              np.nextafter(1.0, 2.0)]])
    a, b = np.meshgrid(values, values)  # HistGradientBoosting: float64 x <= float64 t
    np.testing.assert_array_equal(a <= b, tg.order_key(a.ravel()).reshape(a.shape)
                                  <= tg.order_key(b.ravel()).reshape(b.shape))


def test_hist_gradient_boosting_splits_values_float32_cannot_tell_apart(tmp_path):
    """1 + k·2⁻⁴⁰ are 200 distinct float64 values and a single float32: a float32 input could
    not reproduce scikit-learn; the float64 contract with int64 order keys does."""
    k = np.arange(200)
    frame = pd.DataFrame({"x": 1.0 + k * 2.0 ** -40, "noise": (k * 7919) % 13,
                          "y": np.where((k // 10) % 2 == 0, "a", "b")})
    assert len(np.unique(frame["x"].astype(np.float32))) == 1
    schema = infer_schema(frame, "y", "binary")
    X = prepare_features(frame, schema)
    model = build_pipeline(schema, "hist_gradient_boosting", {"max_leaf_nodes": 31}, 0)
    model.set_params(model__early_stopping=False, model__max_iter=30).fit(X, frame["y"])
    assert (model.predict(X) == frame["y"]).mean() > 0.9  # it did learn the float64 splits
    subject = subject_of(model, schema)
    exporter, conversion = convert(subject, tmp_path)
    got = litert(exporter, subject, conversion, X)
    assert list(got.labels) == list(model.predict(X))
    np.testing.assert_allclose(got.scores, model.predict_proba(X), atol=1e-6)


# --------------------------------------------------------------------------- strategies
def test_strategy_is_chosen_by_shape_and_both_strategies_agree(fitted, datasets, tmp_path):
    sample = datasets["churn"][2]
    hgb = fitted["churn", "hist_gradient_boosting"]
    forest = fitted["churn", "random_forest"]
    assert TFLiteExporter()._plan(hgb).strategy == "gemm"  # leaf-wise: deep, few leaves
    assert TFLiteExporter()._plan(forest).strategy == "gather"  # 100 trees × ~200 leaves

    outputs = {}
    for strategy in ("gemm", "gather"):
        exporter, conversion = convert(hgb, tmp_path / strategy, {"tflite_strategy": strategy})
        assert conversion.details["strategy"] == strategy
        assert "forced by settings" in conversion.details["strategy_reason"]
        outputs[strategy] = litert(exporter, hgb, conversion, sample)
        ops = conversion.details["ops"]
        if strategy == "gemm":
            assert ops["BATCH_MATMUL"] == 2 and "SELECT_V2" in ops
        else:
            depth = conversion.details["depth"]
            assert ops["GATHER"] >= 4 * (depth - 1) and "BATCH_MATMUL" not in ops
    np.testing.assert_allclose(outputs["gemm"].scores, outputs["gather"].scores, atol=1e-6)
    assert list(outputs["gemm"].labels) == list(outputs["gather"].labels)


def test_deep_forest_stays_within_its_size_bound_and_under_onnx(datasets, tmp_path):
    """Gather layout: 16 bytes per node for a binary forest (feature, float32 threshold, right
    link, leaf value) + < 64 KB of graph; ONNX's TreeEnsemble spends about 39 per node."""
    from tasks.export.onnx import OnnxExporter

    X, y, sample, schema = datasets["churn"]
    model = build_pipeline(schema, "random_forest",
                           {"n_estimators": 60, "min_samples_leaf": 1, "max_depth": None}, 0)
    subject = subject_of(model.fit(X, y), schema)
    forest = subject.estimator
    nodes = sum(e.tree_.node_count for e in forest.estimators_)
    depth = max(e.tree_.max_depth for e in forest.estimators_)
    assert depth >= 20  # deep: a GEMM form would need 60 × ~400 × ~400 path cells

    r = export(subject, sample, tmp_path).result
    assert r.status == "ok" and r.changed_labels == 0 and r.max_abs_diff <= 1e-5
    assert r.size_bytes <= 16 * nodes + 64 * 1024
    onnx = OnnxExporter().convert(subject, tmp_path)
    assert r.size_bytes <= 0.5 * onnx.model_file.stat().st_size


# --------------------------------------------------------------------------- coverage
@pytest.mark.parametrize("dataset, estimator", [
    ("iris", GradientBoostingClassifier(n_estimators=30, random_state=0)),
    ("churn", GradientBoostingClassifier(n_estimators=30, max_depth=4, random_state=0)),
    ("diabetes", GradientBoostingRegressor(n_estimators=40, random_state=0)),
    ("churn", ExtraTreesClassifier(n_estimators=30, max_depth=10, random_state=0)),
    ("diabetes", DecisionTreeRegressor(max_depth=8, random_state=0)),
    ("churn", RandomForestClassifier(n_estimators=20, max_leaf_nodes=40, random_state=0)),
])
def test_other_tree_families_convert_with_float32_parity(datasets, tmp_path, dataset, estimator):
    """GradientBoosting, ExtraTrees, a single tree, and best-first trees (max_leaf_nodes: their
    nodes are renumbered in preorder) — none is trained by train_model today."""
    X, y, sample, schema = datasets[dataset]
    pipeline = build_pipeline(schema, "random_forest", {}, 0)
    pipeline.steps[-1] = ("model", estimator)
    subject = subject_of(pipeline.fit(X, y), schema)
    r = export(subject, sample, tmp_path).result
    assert r.status == "ok", r.reason
    assert r.max_abs_diff <= tolerance(subject.task, "float32", sklearn_predict(subject, sample))
    assert r.changed_labels in (0, None)


def test_unsupported_models_are_refused_before_any_file_is_written(datasets, tmp_path):
    X, y, sample, schema = datasets["churn"]
    knn = build_pipeline(schema, "linear", {}, 0)
    knn.steps[-1] = ("model", KNeighborsClassifier())
    ordinal = ColumnTransformer([("cat", OrdinalEncoder(), schema.categorical),
                                 ("num", SimpleImputer(), schema.numeric)],
                                verbose_feature_names_out=False)
    native = Pipeline([("preprocess", ordinal), ("model", HistGradientBoostingClassifier(
        max_iter=10, categorical_features=list(range(len(schema.categorical)))))])
    ordinal_forest = Pipeline([("preprocess", ordinal),
                               ("model", RandomForestClassifier(n_estimators=5, random_state=0))])
    cases = [(knn, "does not support the estimator KNeighborsClassifier"),
             (native, "native categorical features"),
             (ordinal_forest, "numeric step OrdinalEncoder")]
    for i, (pipeline, reason) in enumerate(cases):
        subject = subject_of(pipeline.fit(X, y), schema)
        r = export(subject, sample, tmp_path / str(i), quantize=True).result
        assert r.status == "unsupported" and reason in r.reason, r.reason
        assert r.path is None and not (tmp_path / str(i) / "tflite").exists()


def test_tflite_is_a_device_format_and_importing_it_loads_no_tensorflow():
    assert isinstance(load_exporter("tflite"), TFLiteExporter)
    assert "tflite" in plan_formats("edge").formats and "tflite" in plan_formats("edge").quantize
    code = ("import sys, tasks.export.tflite, tasks.export.tflite_graph\n"
            "print(sorted(m for m in ('tensorflow', 'ai_edge_litert') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


OP_VERSIONS_SCRIPT = r'''
import json, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
from ai_edge_litert.tools import flatbuffer_utils as fu
from ai_edge_litert import schema_py_generated as fb
from tasks.export import tflite_graph as tg

names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
opt_names = {v: k for k, v in vars(fb.BuiltinOptions).items() if not k.startswith("_")}
types = {v: k.lower() for k, v in vars(fb.TensorType).items() if not k.startswith("_")}


def convert(fn, specs, float16=False):
    conv = tf.lite.TFLiteConverter.from_concrete_functions(
        [tf.function(fn).get_concrete_function(*specs)])
    if float16:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    return fu.convert_bytearray_to_object(conv.convert())


def graph(x64, codes, x32):
    x = tf.cast(x64, tf.float32)
    bits = tf.bitcast(x64, tf.int64)
    key = tf.where(bits < 0, tf.constant(-5, tf.int64) - bits, bits)
    key = tf.where(tf.not_equal(x, x), tf.constant([1, 2, 3], tf.int64), key)
    filled = tf.where(tf.not_equal(x, x), tf.constant([1., 2., 3.]), x)
    hot = tf.equal(tf.gather(codes, tf.constant([2, 0, 1]), axis=1), tf.constant([1, 2, 3]))
    full = tf.concat([filled, tf.cast(hot, tf.float32)], 1)
    keys = tf.concat([key, tf.where(hot, tf.constant([9], tf.int64), tf.constant([3], tf.int64))], 1)
    idx = tf.where(full[:, :3] <= tf.constant([1., 2., 3.]), codes, codes + 1)
    walked = tf.gather(full, idx, axis=1, batch_dims=1)
    walked64 = tf.gather(keys, idx, axis=1, batch_dims=1)
    le64 = tf.cast(walked64 <= tf.gather(tf.constant(np.arange(50, dtype=np.int64)), idx), tf.float32)
    right = tf.gather(tf.constant(np.arange(50, dtype=np.int32)), idx)
    vals = tf.gather(tf.constant(np.linspace(0, 1, 50, dtype=np.float32)), right)
    bmm = tf.matmul(tf.reshape(walked + le64, [-1, 3, 1, 1]), tf.constant(np.ones((3, 1, 2), np.float32)))
    s = tf.reduce_sum(tf.reshape(bmm, [-1, 3, 2]), axis=1) / tf.reshape(tf.reduce_sum(vals, axis=1), [-1, 1])
    dense = tf.matmul(x32, tf.constant(np.ones((3, 2), np.float32))) + tf.constant([1., 2.])
    p = tf.nn.softmax(s + dense)
    return (p, tf.sigmoid(s), tf.exp(s), 1.0 - s, tf.argmax(p, axis=1, output_type=tf.int32),
            tf.cast(s > 0.0, tf.int32), tf.cast(s >= 0.0, tf.int32))


def fp16(x):
    return tf.gather(tf.constant(np.random.rand(4000).astype(np.float32)), x)


models = [convert(graph, [tf.TensorSpec([None, 3], tf.float64), tf.TensorSpec([None, 3], tf.int32),
                          tf.TensorSpec([None, 3], tf.float32)]),
          convert(fp16, [tf.TensorSpec([None, 3], tf.int32)], float16=True)]
cases = []
for m in models:
    ours, theirs = {}, {}
    for sg in m.subgraphs:
        for op in sg.operators:
            oc = m.operatorCodes[op.opcodeIndex]
            code = names[max(oc.builtinCode, oc.deprecatedBuiltinCode)]
            ins = [types[sg.tensors[i].type] for i in op.inputs if i >= 0]
            out = types[sg.tensors[op.outputs[0]].type]
            options = (opt_names[op.builtinOptionsType], op.builtinOptions) \
                if op.builtinOptionsType else None
            q = sg.tensors[op.inputs[0]].quantization
            per_channel = bool(q is not None and q.scale is not None and len(q.scale) > 1)
            ours[code] = max(ours.get(code, 0), tg.op_version(code, ins, out, options, per_channel))
            theirs[code] = oc.version
    cases += [{"op": code, "ours": ours[code], "tensorflow": theirs[code]} for code in sorted(ours)]
    meta = {md.name.decode(): bytes(m.buffers[md.buffer].data).rstrip(b"\0").decode()
            for md in m.metadata or [] if md.name.decode() == "min_runtime_version"}
    cases.append({"op": "min_runtime_version", "ours": tg.min_runtime(set(theirs.items())),
                  "tensorflow": meta["min_runtime_version"]})
print(json.dumps(cases))
'''


def test_operator_versions_are_those_tensorflows_converter_writes():
    """Every operator this converter writes, with the version (and the file's minimum runtime)
    TensorFlow 2.21's converter assigns to the same operator on the same types — run in a
    subprocess, because TensorFlow and LiteRT each load their own TFLite runtime."""
    pytest.importorskip("tensorflow")
    done = subprocess.run([sys.executable, "-c", OP_VERSIONS_SCRIPT], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cases = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"BITCAST", "CAST", "GATHER", "SELECT_V2", "SUB", "BATCH_MATMUL", "DEQUANTIZE",
            "LESS_EQUAL", "FULLY_CONNECTED"} <= {c["op"] for c in cases}
    for case in cases:
        assert case["ours"] == case["tensorflow"], case


# --------------------------------------------------------------------------- through the flows
@pytest.fixture(scope="module")
def home(tmp_path_factory, mlflow_template_db):
    """One embedded state folder for the module's registered model (conftest's state_dir, at
    module scope)."""
    patch = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("tflite-state")
    shutil.copyfile(mlflow_template_db, path / "mlflow.db")
    patch.setenv("MLOPS_HOME", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="module")
def registered(home):
    from flows.training import train_model

    frame = churn_frame().sample(2000, random_state=4).reset_index(drop=True)
    result = train_model(frame, "churn", "tflite_churn", time_budget_s=5,
                         candidates=["hist_gradient_boosting"], max_trials=1)
    assert result.family == "hist_gradient_boosting"
    return result


def test_export_model_publishes_tflite_with_its_contract_in_the_edge_bundle(registered):
    """train_model's HistGradientBoosting on churn, exported as "edge" (every device format,
    quantized where parity holds): the TFLite file, its manifest entry, download and bundle."""
    from flows.export import download_export, export_model

    report = export_model("tflite_churn", "champion", formats=["edge"])
    r = report.result("tflite")
    assert r.status == "ok", r.reason
    assert r.precision in ("int8", "float16", "float32") and r.quantization != "not requested"
    assert r.parity_rows == report.sample_rows and r.changed_labels is not None
    assert r.sklearn_p50_us > 0 and r.latency_p50_us > 0 and r.speedup_p50 > 0
    manifest = json.loads(Path(report.manifest_path).read_text())
    entry = manifest["formats"]["tflite"]
    assert entry["parity"]["passed"] and [i["name"] for i in entry["inputs"]] == \
        ["numeric", "categorical"]
    assert entry["details"]["threshold_rule"] == "float64"
    assert entry["library_versions"]["ai-edge-litert"]
    downloaded = download_export("tflite_churn", registered.version, "tflite")
    assert Path(downloaded).read_bytes() == Path(r.path).read_bytes()
    assert read_contract(Path(downloaded))["inputs"] == entry["inputs"]
    with zipfile.ZipFile(report.bundle_path) as zf:
        inner = json.loads(zf.read("manifest.json"))
        tfl = inner["formats"]["tflite"]
        assert tfl["status"] == "ok" and tfl["inputs"] == entry["inputs"]
        assert zf.read(tfl["files"][0]["path"]) == Path(r.path).read_bytes()
