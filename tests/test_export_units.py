"""The export framework's plain parts: format plans, the exporter registry and its plug-in point,
capability checks, the parity gate, latency, quantization and Java detection (no MLflow)."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OrdinalEncoder

from tasks.demo_data import churn_frame
from tasks.errors import ConfigurationError
from tasks.export.base import (FORMATS, Conversion, Exporter, ExporterEntry,
                               ExportSubject, PendingExporter, Prediction, Runner, load_exporter,
                               plan_formats)
from tasks.export.core import export_format, sha256_file, sklearn_reference
from tasks.export.latency import measure
from tasks.export.parity import BOUNDS, bound_for, compare
from tasks.training_search import build_pipeline, infer_schema, prepare_features
from tests.conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


# --------------------------------------------------------------------------- shared data
@pytest.fixture(scope="module")
def churn():
    frame = churn_frame().sample(2400, random_state=11).reset_index(drop=True)
    schema = infer_schema(frame, "churn", "binary")
    X = prepare_features(frame, schema)
    return X.iloc[:1800], frame["churn"].iloc[:1800], X.iloc[1800:].reset_index(drop=True), schema


def subject_of(pipeline, schema, name="unit") -> ExportSubject:
    return ExportSubject(model_name=name, version=1, pipeline=pipeline, schema=schema, run_id=None)


@pytest.fixture(scope="module")
def linear(churn):
    X, y, _, schema = churn
    return subject_of(build_pipeline(schema, "linear", {"C": 1.0}, 0).fit(X, y), schema)


# --------------------------------------------------------------------------- plans and registry
def test_edge_expands_to_every_device_format_and_quantizes_them():
    plan = plan_formats(["pmml", "edge", "onnx"])
    assert plan.formats == ("pmml", "onnx", "tflite", "coreml") and plan.edge
    assert plan.quantize == {"onnx", "tflite", "coreml"}  # "always quantize for edge", where honest
    assert plan_formats("onnx", quantize=True) == plan_formats(["ONNX"], quantize=True)
    assert not plan_formats(("onnx",)).quantize


@pytest.mark.parametrize("formats, message", [
    (["onnx", "savedmodel"], r"unknown export format\(s\) 'savedmodel'; choose from onnx, pmml, "
                             r"tflite, coreml, edge"),
    ([], "no export format given"),
])
def test_unknown_formats_are_refused_with_the_choices(formats, message):
    with pytest.raises(ConfigurationError, match=message):
        plan_formats(formats)


def test_a_registered_format_whose_module_has_not_landed_is_unsupported(linear, monkeypatch):
    monkeypatch.setitem(FORMATS, "holo", ExporterEntry(
        "holo", "Hologram", "tasks.export.holo:HoloExporter", device=True,
        pending="the Hologram exporter is not installed"))
    exporter = load_exporter("holo")
    assert isinstance(exporter, PendingExporter) and exporter.device
    capability = exporter.check(linear)
    assert not capability.supported and capability.reason == "the Hologram exporter is not installed"
    assert "holo" in plan_formats("edge").formats


def test_tflite_and_coreml_are_device_formats_served_by_their_own_exporters(linear):
    from tasks.export.coreml import CoreMLExporter
    from tasks.export.tflite import TFLiteExporter

    for fmt, cls in (("tflite", TFLiteExporter), ("coreml", CoreMLExporter)):
        assert FORMATS[fmt].device and fmt in plan_formats("edge").formats
        exporter = load_exporter(fmt)
        assert type(exporter) is cls, f"{fmt} resolved to {type(exporter).__name__}"
        assert exporter.check(linear).supported, exporter.check(linear).reason


def test_importing_the_export_flow_imports_no_converter():
    """Converters load inside the exporter that needs them: importing the export flow, its tasks
    and every exporter imports none of them (they take seconds)."""
    import subprocess

    heavy = ["skl2onnx", "onnxruntime", "sklearn2pmml", "jpmml_evaluator", "py4j", "tensorflow",
             "coremltools", "ai_edge_litert"]
    code = ("import sys, flows.export, tasks.export.steps, tasks.export.base\n"
            "from tasks.export.base import load_exporter, FORMATS\n"
            "[load_exporter(f) for f in FORMATS]\n"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


class PickleExporter(Exporter):
    """A format written in a test: the plug-in point works without touching the framework."""

    format = "pickle"
    title = "Pickle"
    device = True
    suffix = ".pkl"
    skew = 0.0  # added to probabilities by the runner (a broken converter)

    def convert(self, subject, workdir):
        path = workdir / f"{subject.basename}{self.suffix}"
        path.write_bytes(pickle.dumps(subject.pipeline))
        return Conversion(files=[path], precision="float64", inputs=[{"name": "raw columns"}])

    def quantize(self, subject, conversion, workdir):  # a lossy variant: 0.2 off
        path = workdir / f"{subject.basename}-int8{self.suffix}"
        path.write_bytes(conversion.model_file.read_bytes())
        return Conversion(files=[path], precision="int8", quantization="fake int8")

    def runner(self, subject, conversion):
        return PickleRunner(conversion.model_file, 0.2 if conversion.precision == "int8" else self.skew)


class SkewedPickleExporter(PickleExporter):
    skew = 1e-3


class PickleRunner(Runner):
    runtime = "pickle"

    def __init__(self, path: Path, skew: float):
        self.model = pickle.loads(path.read_bytes())
        self.skew = skew

    def prepare(self, X):
        return X

    def run(self, native):
        proba = self.model.predict_proba(native) + self.skew
        return Prediction(scores=proba, labels=self.model.predict(native))


def test_a_plugged_in_exporter_goes_through_the_gate_and_a_failing_file_is_not_published(
        linear, churn, tmp_path, monkeypatch):
    _, _, X_test, _ = churn
    monkeypatch.setitem(FORMATS, "pickle", ExporterEntry(
        "pickle", "Pickle", f"{__name__}:PickleExporter", device=True, pending=""))
    assert "pickle" in plan_formats("edge").formats  # a device format joins "edge"
    reference = sklearn_reference(linear, X_test, latency_rows=30)

    good = export_format("pickle", linear, X_test, reference, tmp_path, latency_rows=30)
    r = good.result
    assert (r.status, r.max_abs_diff, r.changed_labels, r.parity_rows) == ("ok", 0.0, 0, len(X_test))
    assert r.sha256 == sha256_file(Path(r.path)) and r.files[0].path == "pickle/unit-v1.pkl"
    assert r.latency_p50_us > 0 and r.sklearn_p50_us > 0 and r.rows_per_s > 0

    lossy = export_format("pickle", linear, X_test, reference, tmp_path / "q", quantize=True,
                          latency_rows=30).result
    assert lossy.status == "ok" and lossy.precision == "float64" and lossy.max_abs_diff == 0.0
    assert lossy.quantization.startswith("fake int8 refused: max |diff| 0.2 > 0.05")
    assert lossy.quantization.endswith("float64 published")
    assert [p.name for p in (tmp_path / "q" / "pickle").iterdir()] == ["unit-v1.pkl"]

    bad = export_format("pickle", linear, X_test, reference, tmp_path / "bad",
                        exporter=SkewedPickleExporter(), latency_rows=30).result
    assert bad.status == "failed" and "parity gate failed: max |diff| 0.001 > 1e-05" in bad.reason
    assert "not published" in bad.reason and bad.path is None and bad.sha256 is None
    assert Path(bad.rejected_path).is_file()
    assert not list((tmp_path / "bad" / "pickle").iterdir())  # nothing left to publish


# --------------------------------------------------------------------------- capability checks
def native_categorical_hgb(X, y, schema):
    pre = ColumnTransformer([("cat", OrdinalEncoder(handle_unknown="use_encoded_value",
                                                    unknown_value=-1, encoded_missing_value=-2),
                              schema.categorical), ("num", "passthrough", schema.numeric)],
                            verbose_feature_names_out=False)
    model = HistGradientBoostingClassifier(max_iter=20, categorical_features=list(
        range(len(schema.categorical))), random_state=0)
    return Pipeline([("preprocess", pre), ("model", model)]).fit(X, y)


def test_capability_checks_refuse_before_converting_and_say_why(churn):
    from tasks.export.onnx import OnnxExporter
    from tasks.export.pmml import PmmlExporter

    X, y, _, schema = churn
    onnx, pmml = OnnxExporter(), PmmlExporter()
    hgb = subject_of(native_categorical_hgb(X, y, schema), schema)
    refused = onnx.check(hgb)
    assert not refused.supported and "native categorical features" in refused.reason
    assert "sklearn-onnx#1051" in refused.reason and "categorical_features=None" in refused.reason

    knn = subject_of(build_pipeline(schema, "linear", {}, 0), schema)
    knn.pipeline.steps[-1] = ("model", KNeighborsClassifier())
    knn.pipeline.fit(X, y)
    for exporter in (onnx, pmml):
        cap = exporter.check(knn)
        assert not cap.supported and "does not support the estimator KNeighborsClassifier" in cap.reason

    numeric = schema.numeric
    odd = subject_of(Pipeline([("kernel", Nystroem(n_components=5)),
                               ("model", LogisticRegression(max_iter=30))]).fit(X[numeric].fillna(0), y),
                     infer_schema(pd.concat([X[numeric], y], axis=1), "churn", "binary"))
    assert "preprocessing step 'kernel' (Nystroem)" in pmml.check(odd).reason

    bare = subject_of(LogisticRegression().fit(X[numeric].fillna(0), y), schema)
    assert "needs a scikit-learn Pipeline" in onnx.check(bare).reason

    clash = subject_of(build_pipeline(schema, "linear", {}, 0).fit(X, y), schema)
    clash.schema = infer_schema(pd.concat([X, y], axis=1), "churn", "binary")
    clash.schema.categories["contract"] = ["", *clash.schema.categories["contract"]]
    assert "empty-string category" in onnx.check(clash).reason


# --------------------------------------------------------------------------- parity gate
def test_parity_counts_differences_and_changed_labels_against_the_bound():
    ref = Prediction(scores=np.array([[0.9, 0.1], [0.4, 0.6], [0.5000004, 0.4999996]]),
                     labels=np.array(["a", "b", "a"]))
    same = compare("binary", ref, Prediction(ref.scores + 2e-7, ref.labels.copy()), BOUNDS["float32"])
    assert same.passed and same.changed_labels == 0 and same.max_abs_diff == pytest.approx(2e-7)
    flipped = Prediction(scores=np.array([[0.9, 0.1], [0.4, 0.6], [0.4999996, 0.5000004]]),
                         labels=np.array(["a", "b", "b"]))
    gate = compare("binary", ref, flipped, BOUNDS["float32"])
    assert not gate.passed and gate.changed_labels == 1  # 8e-7 apart, but a label moved
    assert "1 of 3 labels changed (allowed 0)" in gate.explanation
    assert compare("binary", ref, flipped, BOUNDS["int8"]).max_changed_labels == 0


def test_a_label_differing_only_where_scikit_learn_ties_is_reported_not_counted():
    # scikit-learn's float64 sum broke an exact 30/30 vote by rounding (second class); float32
    # answers the first: the same tie, not a disagreement. A real margin still counts.
    ref = Prediction(scores=np.array([[0.9, 0.1], [0.5, 0.5000000000000001]]),
                     labels=np.array(["a", "b"]))
    got = Prediction(scores=np.array([[0.9, 0.1], [0.5, 0.49999997]]), labels=np.array(["a", "a"]))
    gate = compare("binary", ref, got, BOUNDS["float32"], ["a", "b"])
    assert gate.passed and gate.changed_labels == 0 and gate.tied_labels == 1
    assert "1 rows where scikit-learn's probabilities tie" in gate.explanation
    unknown = Prediction(scores=got.scores, labels=np.array(["a", "c"]))  # no such class: counts
    assert compare("binary", ref, unknown, BOUNDS["float32"], ["a", "b"]).changed_labels == 1


def test_regression_bounds_scale_with_the_prediction_and_nan_never_passes():
    ref = Prediction(scores=np.array([5000.0, 20.0, 0.5]))
    close = Prediction(scores=np.array([5000.0 + 0.03, 20.0, 0.5]))  # float32 spacing at 5,000: 5e-4
    gate = compare("regression", ref, close, bound_for("float32"))
    assert gate.passed and gate.tolerance == pytest.approx(0.05) and gate.changed_labels is None
    assert not compare("regression", ref, Prediction(scores=ref.scores + 0.1), BOUNDS["float32"]).passed
    nan = compare("regression", ref, Prediction(scores=np.array([5000.0, np.nan, 0.5])),
                  BOUNDS["float32"])
    assert not nan.passed and nan.max_abs_diff is None and "NaN" in nan.explanation
    shape = compare("binary", Prediction(np.ones((3, 2))), Prediction(np.ones((3, 3))), BOUNDS["float32"])
    assert not shape.passed and "shape" in shape.explanation


def test_latency_reports_percentiles_and_throughput():
    lat = measure(lambda x: sum(range(200)), list(range(50)), None, batch_rows=1000)
    assert 0 < lat.p50_us <= lat.p99_us and lat.single_rows == 50 and lat.rows_per_s > 0


# --------------------------------------------------------------------------- ONNX specifics
def test_onnx_matches_sklearn_on_unseen_and_missing_categories(linear, churn, tmp_path):
    from tasks.export.onnx import OnnxExporter

    _, _, X_test, schema = churn
    rows = X_test.iloc[:40].copy()
    rows.loc[:9, "contract"] = "Four-year"  # never seen in training
    rows.loc[10:19, "payment_method"] = np.nan
    rows.loc[20:24, "total_charges"] = np.nan
    exporter = OnnxExporter()
    runner = exporter.runner(linear, exporter.convert(linear, tmp_path))
    got = runner.predict(rows)
    want = linear.pipeline.predict_proba(rows)
    assert np.abs(got.scores - want).max() < 1e-5
    assert list(got.labels) == list(linear.pipeline.predict(rows))


def tied_votes() -> tuple[pd.DataFrame, pd.Series, object]:
    """Rows whose every feature value is seen as often with "no" as with "yes" (a = 0, 1), so
    every tree's leaf votes 0.5/0.5 there, and rows (a = 2) that are all "yes"."""
    frame = pd.DataFrame({"a": [0.0, 0.0, 1.0, 1.0] * 6 + [2.0] * 6,
                          "y": ["no", "yes", "yes", "no"] * 6 + ["yes"] * 6})
    schema = infer_schema(frame, "y", "binary")
    return prepare_features(frame, schema), frame["y"], schema


def test_onnx_forest_on_tied_votes_passes_the_gate_and_reports_the_ties(tmp_path):
    # float32 sums of 10 leaf weights of 0.05 are not 0.5: ONNX answers "yes" where
    # scikit-learn's exact float64 tie answers "no" (tests/test_export_matrix.py's refit
    # ExtraTrees hit one such row among 400)
    X, y, schema = tied_votes()
    forest = subject_of(build_pipeline(schema, "extra_trees", {"n_estimators": 10}, 0).fit(X, y),
                        schema)
    want = forest.pipeline.predict_proba(X)
    assert (want[:24] == 0.5).all() and (forest.pipeline.predict(X)[:24] == "no").all()
    outcome = export_format("onnx", forest, X, sklearn_reference(forest, X, with_latency=False),
                            tmp_path, latency_rows=5)
    r = outcome.result
    assert r.status == "ok" and r.changed_labels == 0 and r.max_abs_diff <= 1e-5
    runner = onnx_runner(forest, tmp_path / "again")
    got = runner.predict(X)
    assert (got.labels[:24] == "yes").all() and (got.labels[24:] == "yes").all()


def test_onnx_tree_thresholds_keep_scikit_learns_side_when_the_midpoint_rounds_up(tmp_path):
    # two adjacent float32 values whose float64 midpoint (scikit-learn's threshold) rounds UP to
    # the larger in float32: a float32 threshold rounded to nearest would send the larger value
    # left; scikit-learn compares float32(x) <= the float64 threshold and sends it right
    lo = np.nextafter(np.float32(1000.0), np.float32(np.inf))
    hi = np.nextafter(lo, np.float32(np.inf))
    assert np.float32(float(lo) / 2 + float(hi) / 2) == hi
    frame = pd.DataFrame({"x": [float(lo)] * 10 + [float(hi)] * 10, "y": ["a"] * 10 + ["b"] * 10})
    schema = infer_schema(frame, "y", "binary")
    X = prepare_features(frame, schema)
    forest = subject_of(build_pipeline(schema, "random_forest", {"n_estimators": 3,
                                                                 "max_features": 1.0}, 0)
                        .fit(X, frame["y"]), schema)
    got = onnx_runner(forest, tmp_path).predict(X)
    assert list(got.labels) == list(forest.pipeline.predict(X)) == ["a"] * 10 + ["b"] * 10


def onnx_runner(subject, workdir: Path):
    from tasks.export.onnx import OnnxExporter

    workdir.mkdir(parents=True, exist_ok=True)
    exporter = OnnxExporter()
    return exporter.runner(subject, exporter.convert(subject, workdir))


def test_quantization_applies_to_matmul_graphs_only_and_never_silently(churn, tmp_path):
    from tasks.export.onnx import OnnxExporter

    X, y, X_test, schema = churn
    forest = subject_of(build_pipeline(schema, "random_forest", {"n_estimators": 10,
                                                                 "max_depth": 4}, 0).fit(X, y), schema)
    reference = sklearn_reference(forest, X_test, with_latency=False)
    trees = export_format("onnx", forest, X_test, reference, tmp_path / "rf", quantize=True,
                          latency_rows=20).result
    assert trees.status == "ok" and trees.precision == "float32"
    assert trees.quantization.startswith("not applicable") and "TreeEnsembleClassifier" in trees.quantization

    mlp_pipe = build_pipeline(schema, "linear", {}, 0)
    mlp_pipe.steps[-1] = ("model", MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=60,
                                                 early_stopping=True, random_state=0))
    mlp = subject_of(mlp_pipe.fit(X, y), schema)
    reference = sklearn_reference(mlp, X_test, with_latency=False)
    exporter = OnnxExporter()
    (tmp_path / "probe").mkdir()
    float_file = exporter.convert(mlp, tmp_path / "probe")
    quantized = exporter.quantize(mlp, float_file, tmp_path / "probe")
    assert quantized.precision == "int8"
    assert quantized.model_file.stat().st_size < float_file.model_file.stat().st_size / 1.8

    result = export_format("onnx", mlp, X_test, reference, tmp_path / "mlp", quantize=True,
                           latency_rows=20).result
    print("MLP quantization:", result.precision, result.quantization)
    assert result.status == "ok" and result.quantization.startswith("dynamic int8")
    if result.precision == "int8":  # kept: within the documented int8 bound
        assert result.max_abs_diff <= BOUNDS["int8"].max_abs_diff and "within bounds" in result.quantization
    else:  # refused: the report says why and the float32 file went out
        assert result.precision == "float32" and "refused" in result.quantization
        assert "float32 published" in result.quantization and result.max_abs_diff <= 1e-5


# --------------------------------------------------------------------------- PMML specifics
def test_without_java_pmml_fails_with_the_fix(linear, churn, tmp_path, monkeypatch):
    _, _, X_test, _ = churn
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing called java here
    monkeypatch.delenv("JAVA_HOME", raising=False)
    reference = sklearn_reference(linear, X_test, with_latency=False)
    r = export_format("pmml", linear, X_test, reference, tmp_path / "out").result
    assert r.status == "failed" and "Java not found" in r.reason
    assert "install Java 11 or newer" in r.reason and "JAVA_HOME" in r.reason


def test_a_converter_failure_is_a_result_with_the_converters_words(churn, tmp_path):
    from tasks.export.pmml import PmmlExporter, converter_error

    X, y, _, schema = churn
    odd = subject_of(Pipeline([("kernel", Nystroem(n_components=5)),
                               ("model", LogisticRegression(max_iter=30))])
                     .fit(X[schema.numeric].fillna(0), y), schema)
    with pytest.raises(Exception, match="not a supported Transformer or Estimator"):
        PmmlExporter().convert(odd, tmp_path)  # bypassing the check: Java's own message
    expired = converter_error("SEVERE: The SkLearn2PMML package has expired", None)
    assert "upgrade sklearn2pmml" in expired


# --------------------------------------------------------------------------- ONNX specifics
def test_onnx_feeds_columns_whose_names_skl2onnx_sanitises(tmp_path):
    from sklearn.datasets import load_iris

    frame = load_iris(as_frame=True).frame  # columns like "sepal length (cm)"
    schema = infer_schema(frame, "target", "multiclass")
    X = prepare_features(frame, schema)
    subject = subject_of(build_pipeline(schema, "linear", {"C": 1.0}, 0).fit(X, frame["target"]),
                         schema)
    reference = sklearn_reference(subject, X, with_latency=False)
    outcome = export_format("onnx", subject, X, reference, tmp_path, latency_rows=20)
    r = outcome.result
    assert r.status == "ok", r.reason
    assert r.max_abs_diff <= 1e-5 and r.changed_labels == 0
    inputs = outcome.conversion.inputs
    assert [i["column"] for i in inputs] == list(X.columns)
    assert inputs[0]["name"] == "sepal_length__cm_"  # what a caller feeds the ONNX session
