"""TensorFlow Lite export of scikit-learn pipelines, run with LiteRT.

The graph is written by `tasks.export.tflite_graph` (pure: numpy + the flatbuffer schema that ships
with `ai-edge-litert`); this module is the exporter the framework loads: capability check,
conversion with a self-check, weight quantization chosen by the parity bounds, and a runner on
`ai_edge_litert.interpreter.Interpreter` (the deprecated `tf.lite.Interpreter` is not used).
TensorFlow itself is not needed: neither to write the file nor to run it.

Input contract (in the manifest's `inputs`, and embedded in the file as metadata `mlops.contract`):

* `numeric` float64 [N, n_numeric]: the raw values, NaN = missing. The graph imputes (median, or
  the pipeline's imputer statistic) and rounds exactly where scikit-learn does: linear models and
  scikit-learn's trees work in float32 (thresholds rounded toward −inf, so no row changes side);
  HistGradientBoosting compares float64 through int64 order keys (TFLite has no float64
  comparison kernels), so inputs that differ only beyond float32 precision still split correctly.
* `categorical` int32 [N, n_categorical]: each value's position in its column's `vocabulary`;
  a missing value is the column's `missing_code` (where scikit-learn's imputer sends it); any
  code outside the vocabulary (−1) is an unseen category → all-zero one-hot, as
  handle_unknown="ignore". No strings cross the interpreter boundary.
* Outputs: classifiers `probabilities` float32 [N, n_classes] (manifest class order) and `label`
  int32 [N] (index into the classes, scikit-learn's tie rule); regressors `prediction` float32 [N].

Quantization touches weights only (linear coefficients, tree leaf values): float16, or int8
(symmetric, dequantized once at load — TFLite's dynamic-range scheme for constant weights).
Thresholds, feature indices, child links, path matrices and one-hot codes are never quantized:
they are float32/int32/int64 by construction (int8 on comparison tensors flipped 39 of 143
labels in an early probe). Candidates are tried smallest first against the parity
bound of their precision; a variant that is not smaller than float32 (linear models: a few hundred
bytes of weights) is not offered, and when none passes, float32 is published and the report says
why.
"""
from __future__ import annotations

import json
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.export.base import (Capability, Conversion, ExportError, Exporter, ExportSubject,
                               Prediction, Runner)
from tasks.export.capability import check_pipeline, final_estimator

DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # a device file larger than this is refused before converting
QUANTIZATIONS = ("int8", "float16")  # tried in this order (smallest first)
PROBE_ROWS = 64
ESTIMATORS = {
    "LogisticRegression", "LinearRegression", "Ridge", "Lasso", "ElasticNet",
    "RandomForestClassifier", "RandomForestRegressor", "ExtraTreesClassifier",
    "ExtraTreesRegressor", "DecisionTreeClassifier", "DecisionTreeRegressor",
    "GradientBoostingClassifier", "GradientBoostingRegressor",
    "HistGradientBoostingClassifier", "HistGradientBoostingRegressor",
}
CONTRACT_TEXT = (
    "numeric: float64 [N, n] raw values in `columns` order, NaN = missing (imputed in the graph); "
    "categorical: int32 [N, m], code = position of the value in the column's `vocabulary`, "
    "`missing_code` for a missing value, -1 (any code outside the vocabulary) for an unseen "
    "category (all-zero one-hot, as scikit-learn's handle_unknown='ignore')")


class TFLiteExporter(Exporter):
    format = "tflite"
    title = "TensorFlow Lite"
    device = True
    suffix = ".tflite"

    def __init__(self) -> None:
        self.strategy: str | None = None  # None = chosen by shape
        self.quantization = "auto"  # auto | float16 | int8
        self.max_bytes = DEFAULT_MAX_BYTES
        self._plans: dict[int, Any] = {}
        self._gate_sample: pd.DataFrame | None = None  # rows the parity gate ran (see quantize)

    def configure(self, settings: dict[str, Any]) -> None:
        strategy = settings.get("tflite_strategy") or "auto"
        self.strategy = None if strategy == "auto" else str(strategy)
        self.quantization = str(settings.get("tflite_quantization") or "auto")
        self.max_bytes = int(settings.get("tflite_max_bytes") or DEFAULT_MAX_BYTES)

    # ------------------------------------------------------------------ check
    def check(self, subject: ExportSubject) -> Capability:
        base = check_pipeline(subject, self.title, ESTIMATORS, native_categoricals_why=(
            "is not carried: the TFLite graph takes one-hot encoded categoricals"))
        if not base.supported:
            return base
        try:
            plan = self._plan(subject)
        except ExportError as exc:
            return Capability.no(str(exc))
        if plan.estimate_bytes > self.max_bytes:
            return Capability.no(
                f"the {plan.strategy} graph of this model would be about "
                f"{plan.estimate_bytes / 2**20:,.0f} MB ({plan.model.n_nodes:,} tree nodes), over "
                f"the {self.max_bytes / 2**20:,.0f} MB device limit (ExportSettings "
                "tflite_max_bytes); train shallower or fewer trees for the device")
        return Capability.yes()

    def environment(self) -> Capability:
        import importlib.util

        missing = [m for m in ("ai_edge_litert", "flatbuffers") if importlib.util.find_spec(m) is None]
        if missing:
            return Capability.no(f"{', '.join(missing)} not installed; pip install ai-edge-litert "
                                 "(see requirements.txt)")
        return Capability.yes()

    def _plan(self, subject: ExportSubject) -> "Plan":
        key = id(subject.pipeline)
        if key not in self._plans:
            self._plans[key] = Plan.of(subject, self.strategy)
        return self._plans[key]

    # ------------------------------------------------------------------ convert
    def convert(self, subject: ExportSubject, workdir: Path) -> Conversion:
        plan = self._plan(subject)
        plan.self_check(subject)
        return self._write(subject, plan, "float32", workdir / f"{subject.basename}{self.suffix}")

    def _write(self, subject: ExportSubject, plan: "Plan", precision: str, path: Path) -> Conversion:
        built = plan.build(subject, precision)
        path.write_bytes(built.content)
        details = {
            "strategy": built.strategy, "strategy_reason": built.why,
            "ops": built.ops, **built.shape,
            "exact_tensors": built.tensors["never_quantized"],
            "weight_tensors": built.tensors["weights"],
            "signature": "serving_default",
            "embedded_metadata": ["mlops.contract", "min_runtime_version"],
            "writer": "tasks.export.tflite_graph (flatbuffer written directly; no TensorFlow)",
        }
        return Conversion(files=[path], precision=precision, inputs=plan.inputs(),
                          outputs=plan.outputs(subject), details=details,
                          notes=[f"TFLite {built.strategy}: {built.why}"])

    # ------------------------------------------------------------------ quantize
    def quantize(self, subject: ExportSubject, conversion: Conversion,
                 workdir: Path) -> Conversion | str:
        """The smallest weight quantization within its parity bound, or why there is none.

        The framework gates only the variant returned here, so this method gates the candidates
        itself on the rows the framework's gate just ran (remembered by the runner) and returns
        the first that passes; the framework then gates it again."""
        from tasks.export.core import sklearn_predict
        from tasks.export.parity import bound_for, compare

        plan = self._plan(subject)
        wanted = QUANTIZATIONS if self.quantization == "auto" else (self.quantization,)
        unknown = [q for q in wanted if q not in QUANTIZATIONS]
        if unknown:
            return f"not applied: unknown tflite_quantization {unknown[0]!r} (auto, float16, int8)"
        float_size = conversion.model_file.stat().st_size
        sample = self._gate_sample
        reference = sklearn_predict(subject, sample) if sample is not None else None
        tried = []
        for precision in wanted:
            path = workdir / f"{subject.basename}-{precision}{self.suffix}"
            candidate = self._write(subject, plan, precision, path)
            size = path.stat().st_size
            if size >= float_size:
                path.unlink()
                tried.append(f"{precision} would not be smaller ({size:,} >= {float_size:,} bytes: "
                             f"{_weight_note(candidate)})")
                continue
            if reference is not None:
                runner = TFLiteRunner(path, plan, subject)
                try:
                    parity = compare(subject.task, reference, runner.predict(sample),
                                     bound_for(precision), subject.classes)
                finally:
                    runner.close()
                if not parity.passed:
                    path.unlink()
                    tried.append(f"{precision} refused: {parity.explanation} (bound {parity.bound})")
                    continue
            candidate.quantization = (
                f"{_describe(precision)}: {float_size:,} -> {size:,} bytes "
                f"({(size - float_size) / float_size:+.0%}); comparison tensors exact"
                + (f"; tried first: {'; '.join(tried)}" if tried else ""))
            candidate.details = {**candidate.details, "float32_size_bytes": float_size,
                                 "quantization_tried": tried}
            return candidate
        return "not applied: " + "; ".join(tried) + "; float32 published"

    # ------------------------------------------------------------------ run
    def runner(self, subject: ExportSubject, conversion: Conversion) -> Runner:
        return TFLiteRunner(conversion.model_file, self._plan(subject), subject,
                            on_predict=self._remember)

    def _remember(self, X: pd.DataFrame) -> None:
        self._gate_sample = X

    def library_versions(self) -> dict[str, str]:
        found = {}
        for name in ("ai-edge-litert", "flatbuffers", "numpy"):
            try:
                found[name] = version(name)
            except PackageNotFoundError:
                pass
        return found


# --------------------------------------------------------------------------- plan
class Plan:
    """What the converter read from one pipeline: layout, model, strategy, size estimate."""

    def __init__(self, layout, model, strategy: str, why: str, estimate_bytes: int,
                 forced: str | None):
        self.layout, self.model = layout, model
        self.strategy, self.why, self.estimate_bytes = strategy, why, estimate_bytes
        self.forced = forced

    @classmethod
    def of(cls, subject: ExportSubject, forced: str | None) -> "Plan":
        from tasks.export import tflite_graph as tg

        try:
            layout = tg.layout_of(subject.pipeline, subject.schema.numeric)
            model = tg.model_of(final_estimator(subject.pipeline), layout.n_features)
            if isinstance(model, tg.LinearModel):
                return cls(layout, model, "dense", "linear model folded into one dense layer",
                           8 * model.coef.size + 16 * 1024, forced)
            shape = tg.shape_of(model)
            strategy, why = tg.choose_strategy(shape, forced)
            size = shape.gemm_bytes() if strategy == "gemm" else shape.gather_bytes()
            return cls(layout, model, strategy, why, size + 16 * 1024, forced)
        except tg.Unsupported as exc:
            raise ExportError(f"TensorFlow Lite export does not support {exc}") from exc
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise ExportError("TensorFlow Lite export could not read this pipeline "
                              f"({type(exc).__name__}: {exc})") from exc

    def build(self, subject: ExportSubject, precision: str):
        from tasks.export import tflite_graph as tg

        contract = {"contract_version": tg.CONTRACT_VERSION, "model_name": subject.model_name,
                    "version": subject.version, "task": subject.task,
                    "inputs": self.inputs(), "outputs": self.outputs(subject),
                    "precision": precision}
        try:
            return tg.build(self.layout, self.model, precision, self.forced, subject.classes,
                            contract, f"{subject.model_name} v{subject.version} (mlops-flows; "
                            "input contract in metadata mlops.contract)")
        except tg.Unsupported as exc:
            raise ExportError(f"TensorFlow Lite export does not support {exc}") from exc

    def inputs(self) -> list[dict]:
        found = []
        if self.layout.numeric:
            found.append({
                "name": "numeric", "type": "float64", "shape": [None, len(self.layout.numeric)],
                "missing": "NaN",
                "columns": [{"index": i, "name": c.name,
                             "imputed_with": c.fill if c.fill is not None else "not imputed"}
                            for i, c in enumerate(self.layout.numeric)]})
        if self.layout.categorical:
            found.append({
                "name": "categorical", "type": "int32",
                "shape": [None, len(self.layout.categorical)],
                "encoding": "position of the value in the column's vocabulary",
                "unseen_code": -1,
                "columns": [{"index": i, "name": c.name, "vocabulary": c.vocabulary,
                             "missing_code": c.missing_code,
                             "missing_becomes": c.fill if c.fill is not None else "unseen (all-zero)",
                             "unseen": "all-zero one-hot" if c.handle_unknown != "error" else
                             "all-zero one-hot (scikit-learn would raise: handle_unknown='error')"}
                            for i, c in enumerate(self.layout.categorical)]})
        return found

    def outputs(self, subject: ExportSubject) -> list[dict]:
        if subject.is_classifier:
            return [{"name": "probabilities", "type": "float32",
                     "shape": [None, len(subject.classes)],
                     "classes": [_plain(c) for c in subject.classes]},
                    {"name": "label", "type": "int32", "shape": [None],
                     "meaning": "index into classes (scikit-learn's predict)"}]
        return [{"name": "prediction", "type": "float32", "shape": [None]}]

    def self_check(self, subject: ExportSubject) -> None:
        """The layout reproduces the ColumnTransformer on synthetic rows with missing values and
        unseen categories (paths a holdout sample may never take); raises ExportError if not."""
        probe = synthetic_rows(subject, self.layout, PROBE_ROWS)
        pre = subject.pipeline.steps[0][1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown categories are the point
            expected = pre.transform(probe)
        expected = np.asarray(expected.toarray() if hasattr(expected, "toarray") else expected,
                              dtype=np.float64)
        num, codes = self.layout.encode(probe)
        got = self.layout.transformed(num, codes)
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-9, atol=1e-12,
                                                          equal_nan=True):
            worst = (float(np.nanmax(np.abs(got - expected))) if got.shape == expected.shape
                     else f"shape {got.shape} vs {expected.shape}")
            raise ExportError("TensorFlow Lite conversion self-check failed: the converter's "
                              f"reading of the preprocessing differs from scikit-learn ({worst}) "
                              "on synthetic rows; please report this pipeline")


def synthetic_rows(subject: ExportSubject, layout, n: int, seed: int = 0) -> pd.DataFrame:
    """Rows of the raw columns: numeric around the imputation value (some NaN), categorical
    from the vocabulary, plus missing values and one unseen category."""
    rng = np.random.default_rng(seed)
    frame = {}
    for col in subject.schema.columns:
        frame[col] = np.zeros(n)
    for col in layout.numeric:
        centre = 0.0 if col.fill is None else float(col.fill)
        values = centre + rng.normal(0, abs(centre) + 1.0, n)
        if col.fill is not None:
            values[rng.random(n) < 0.15] = np.nan
        frame[col.name] = values
    for col in layout.categorical:
        known = [v for v in col.vocabulary if v is not None] or ["?"]
        values = np.asarray(rng.choice(known, n), dtype=object)
        values[rng.random(n) < 0.15] = np.nan
        if col.handle_unknown != "error":
            values[rng.random(n) < 0.1] = "__unseen__"
        frame[col.name] = values
    return pd.DataFrame(frame)[subject.schema.columns]


# --------------------------------------------------------------------------- runner
class TFLiteRunner(Runner):
    """ai_edge_litert's Interpreter, 1 thread, default delegates (XNNPACK where it applies)."""

    def __init__(self, path: Path, plan: Plan, subject: ExportSubject, on_predict=None):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=1)
        self.layout = plan.layout
        self.classes = np.asarray(subject.classes, dtype=object)
        self.classifier = subject.is_classifier
        self.inputs = {d["name"]: d["index"] for d in self.interpreter.get_input_details()}
        self.outputs = {d["name"]: d["index"] for d in self.interpreter.get_output_details()}
        self.on_predict = on_predict
        self.rows: int | None = None
        self.runtime = (f"ai-edge-litert {_version('ai-edge-litert')} (LiteRT Interpreter, CPU, "
                        "1 thread, default delegates)")

    def prepare(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return self.layout.encode(X)

    def predict(self, X: pd.DataFrame) -> Prediction:
        if self.on_predict is not None:
            self.on_predict(X)
        return super().predict(X)

    def run(self, native: tuple[np.ndarray, np.ndarray]) -> Prediction:
        num, codes = native
        it = self.interpreter
        n = num.shape[0] if self.layout.numeric else codes.shape[0]
        feeds = {"numeric": num, "categorical": codes}
        if n != self.rows:
            for name, idx in self.inputs.items():
                it.resize_tensor_input(idx, feeds[name].shape, strict=False)
            it.allocate_tensors()
            self.rows = n
        for name, idx in self.inputs.items():
            it.set_tensor(idx, feeds[name])
        it.invoke()
        if self.classifier:
            labels = self.classes[it.get_tensor(self.outputs["label"])]
            return Prediction(scores=it.get_tensor(self.outputs["probabilities"]), labels=labels)
        return Prediction(scores=it.get_tensor(self.outputs["prediction"]))

    def close(self) -> None:
        self.interpreter = None


# --------------------------------------------------------------------------- helpers
def read_contract(path: Path) -> dict:
    """The contract embedded in a .tflite file (metadata `mlops.contract`)."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAs(Path(path).read_bytes(), 0)
    for i in range(model.MetadataLength()):
        md = model.Metadata(i)
        if md.Name() == b"mlops.contract":
            return json.loads(model.Buffers(md.Buffer()).DataAsNumpy().tobytes())
    raise ExportError(f"{path} carries no mlops.contract metadata")


def _describe(precision: str) -> str:
    return {"float16": "float16 weights (leaf values / coefficients), dequantized once at load",
            "int8": "int8 weights (symmetric; leaf values / coefficients), dequantized once at "
                    "load"}[precision]


def _weight_note(conversion: Conversion) -> str:
    kinds = conversion.details.get("weight_tensors", [])
    return "weights are a small part of the file" if kinds else "no weight tensors"


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"
