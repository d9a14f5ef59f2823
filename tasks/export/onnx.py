"""ONNX export with skl2onnx, run with onnxruntime (converters imported inside the methods).

Input contract: one input per raw column, shape [N, 1]: numeric columns float32 (NaN = missing),
categorical columns string ("" = missing; values never seen in training encode as all-zero
one-hot, as scikit-learn's handle_unknown="ignore"). Outputs: classifiers `label` [N] and
`probabilities` [N, n_classes] in the manifest's class order (zipmap off); regressors `variable`
[N, 1]. float32 throughout (measured with skl2onnx here, float64 inputs on tree models gave
differences around 3e-2, or sessions that refuse to load).

skl2onnx converts a string SimpleImputer only when its missing value is a string, while our
pipelines impute NaN; the exported copy therefore imputes "" instead, which is why the input
contract spells missing categoricals as "". The parity gate checks the result against the
original pipeline on the same rows.
"""
from __future__ import annotations

import copy
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.export.base import (Capability, Conversion, ExportError, Exporter, ExportSubject,
                               Prediction, Runner)
from tasks.export.capability import CONVERTER_ESTIMATORS, categorical_imputers, check_pipeline, final_estimator

ESTIMATORS = CONVERTER_ESTIMATORS
TARGET_OPSET = {"": 18, "ai.onnx.ml": 3}
MISSING_CATEGORY = ""  # how a missing categorical value is spelled at the ONNX input
QUANTIZABLE_OPS = ("MatMul", "Gemm")


class OnnxExporter(Exporter):
    format = "onnx"
    title = "ONNX"
    device = True
    suffix = ".onnx"

    def check(self, subject: ExportSubject) -> Capability:
        base = check_pipeline(subject, self.title, ESTIMATORS, native_categoricals_why=(
            "converts to ONNX without error but predicts wrongly (onnx/sklearn-onnx#1051)"))
        if not base.supported:
            return base
        for imputer in categorical_imputers(subject.pipeline, subject.schema.categorical):
            stats = getattr(imputer, "statistics_", None)
            if stats is None or not all(isinstance(s, str) for s in np.asarray(stats, dtype=object)):
                return Capability.no("ONNX export needs categorical imputers that fill a string "
                                     f"(strategy constant or most_frequent); got {imputer!r}")
        clash = [c for c, vocab in subject.schema.categories.items() if MISSING_CATEGORY in vocab]
        if clash:
            return Capability.no(f"categorical columns {clash} have an empty-string category, "
                                 "which the ONNX input contract uses for a missing value")
        return Capability.yes()

    def environment(self) -> Capability:
        import importlib.util

        missing = [m for m in ("skl2onnx", "onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            return Capability.no(f"{', '.join(missing)} not installed; pip install -r requirements.txt")
        return Capability.yes()

    # ------------------------------------------------------------------ convert
    def convert(self, subject: ExportSubject, workdir: Path) -> Conversion:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType, StringTensorType

        schema = subject.schema
        twin = export_twin(subject.pipeline, schema.categorical)
        pre = twin.steps[0][1] if len(twin.steps) > 1 else None
        order = [str(c) for c in getattr(pre, "feature_names_in_", schema.columns)]
        types = [(c, FloatTensorType([None, 1]) if c in schema.numeric else StringTensorType([None, 1]))
                 for c in order]
        options = {id(final_estimator(twin)): {"zipmap": False}} if subject.is_classifier else None
        try:
            model = convert_sklearn(twin, name=subject.basename, initial_types=types,
                                    options=options, target_opset=TARGET_OPSET)
        except Exception as exc:  # skl2onnx raises many types; the result carries the message
            raise ExportError(f"skl2onnx could not convert the pipeline: {type(exc).__name__}: "
                              f"{exc}") from exc
        model.doc_string = (f"{subject.model_name} v{subject.version} exported by mlops-flows; "
                            "inputs: one [N,1] tensor per raw column (float32, NaN = missing; "
                            "string, '' = missing)")
        meta = {"mlops.model_name": subject.model_name, "mlops.version": str(subject.version),
                "mlops.run_id": subject.run_id or "", "mlops.task": subject.task,
                "mlops.classes": json.dumps([_plain(c) for c in subject.classes])}
        for key, value in meta.items():
            prop = model.metadata_props.add()
            prop.key, prop.value = key, value
        path = workdir / f"{subject.basename}{self.suffix}"
        path.write_bytes(model.SerializeToString())
        return Conversion(
            files=[path], precision="float32",
            # skl2onnx sanitises input names ("sepal length (cm)" -> "sepal_length__cm_"): the
            # graph's inputs keep the raw columns' order, so each name maps to its column
            inputs=[{"name": g.name, "column": c, "type": "float32" if c in schema.numeric else "string",
                     "shape": [None, 1], "missing": "NaN" if c in schema.numeric else MISSING_CATEGORY}
                    for g, c in zip(model.graph.input, order)],
            outputs=_outputs(model),
            details={"opset": TARGET_OPSET, "ops": sorted({n.op_type for n in model.graph.node})})

    def quantize(self, subject: ExportSubject, conversion: Conversion,
                 workdir: Path) -> Conversion | str:
        import onnx

        model = onnx.load(str(conversion.model_file))
        weights = {i.name for i in model.graph.initializer}
        matmuls = [n for n in model.graph.node
                   if n.op_type in QUANTIZABLE_OPS and any(i in weights for i in n.input)]
        if not matmuls:
            ops = ", ".join(sorted({n.op_type for n in model.graph.node
                                    if n.op_type.startswith(("Tree", "Linear"))})) or "no MatMul"
            return ("not applicable: onnxruntime dynamic quantization covers MatMul/Gemm weights "
                    f"and this graph has none ({ops}); float32 published")
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = workdir / f"{subject.basename}-int8{self.suffix}"
        quantize_dynamic(str(conversion.model_file), str(out), weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=list(QUANTIZABLE_OPS))
        before, after = conversion.model_file.stat().st_size, out.stat().st_size
        return Conversion(
            files=[out], precision="int8", inputs=conversion.inputs, outputs=conversion.outputs,
            quantization=(f"dynamic int8 (per-channel weights of {len(matmuls)} MatMul/Gemm): "
                          f"{before:,} -> {after:,} bytes"),
            details={**conversion.details, "float32_size_bytes": before})

    # ------------------------------------------------------------------ run
    def runner(self, subject: ExportSubject, conversion: Conversion) -> Runner:
        return OnnxRunner(conversion.model_file, subject)

    def library_versions(self) -> dict[str, str]:
        return _versions("skl2onnx", "onnx", "onnxruntime")


def export_twin(pipeline: Any, categorical: list[str]) -> Any:
    """A copy of the pipeline whose categorical imputers treat "" as missing (see module doc)."""
    twin = copy.deepcopy(pipeline)
    for imputer in categorical_imputers(twin, categorical):
        missing = imputer.missing_values
        if missing is None or (isinstance(missing, float) and np.isnan(missing)):
            imputer.missing_values = MISSING_CATEGORY
    return twin


class OnnxRunner(Runner):
    def __init__(self, path: Path, subject: ExportSubject):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # single-row latency; same as scikit-learn's n_jobs=1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        pre = subject.pipeline.steps[0][1] if len(getattr(subject.pipeline, "steps", [])) > 1 else None
        columns = [str(c) for c in getattr(pre, "feature_names_in_", subject.schema.columns)]
        # graph inputs follow the raw columns' order; their names may be sanitised by skl2onnx
        self.inputs = list(zip((i.name for i in self.session.get_inputs()), columns))
        self.numeric = set(subject.schema.numeric)
        self.classifier = subject.is_classifier
        self.runtime = f"onnxruntime {ort.__version__} (CPU, 1 thread)"

    def prepare(self, X: pd.DataFrame) -> dict[str, np.ndarray]:
        feeds = {}
        for name, column in self.inputs:
            col = X[column]
            if column in self.numeric:
                feeds[name] = col.to_numpy(dtype=np.float32, na_value=np.nan).reshape(-1, 1)
            else:
                values = col.astype(object).where(col.notna(), MISSING_CATEGORY)
                feeds[name] = np.asarray([str(v) for v in values], dtype=object).reshape(-1, 1)
        return feeds

    def run(self, native: dict[str, np.ndarray]) -> Prediction:
        out = self.session.run(None, native)
        if self.classifier:
            return Prediction(scores=np.asarray(out[1]), labels=np.asarray(out[0]).reshape(-1))
        return Prediction(scores=np.asarray(out[0]).reshape(-1))


def _outputs(model) -> list[dict]:
    import onnx

    found = []
    for out in model.graph.output:
        tensor = out.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        kind = ("string" if tensor.elem_type == onnx.TensorProto.STRING
                else onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name)
        found.append({"name": out.name, "type": kind, "shape": dims})
    return found


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _versions(*packages: str) -> dict[str, str]:
    found = {}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
