"""Every family train_model produces × every export format, on tables with one kind of column.

A table without string columns (or without numeric ones) leaves one branch of the training
pipeline's ColumnTransformer without columns; every format must still carry the model. Each model
is trained once for the module through train_model (real Prefect, embedded MLflow) on a few
hundred churn rows, then exported to onnx, pmml, tflite and coreml through export_model, and each
file must pass its parity gate on all the table's rows, missing values included.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.export import export_model
from flows.training import train_model
from tasks.demo_data import churn_frame

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

FORMATS = ["onnx", "pmml", "tflite", "coreml"]
FAMILIES = ["linear", "random_forest", "extra_trees", "hist_gradient_boosting"]
ROWS = 400
# name: (table, target, family): binary churn for every family on both tables, and a regressor
CASES = {
    **{f"numeric_{f}": ("numeric", "churn", f) for f in FAMILIES},
    **{f"categorical_{f}": ("categorical", "churn", f) for f in FAMILIES},
    "numeric_charges_hgb": ("numeric", "monthly_charges", "hist_gradient_boosting"),
}


@dataclass
class Trained:
    name: str
    task: str
    frame: pd.DataFrame  # the rows it was trained on, target included


def tables() -> dict[str, pd.DataFrame]:
    """Churn rows split by kind of column (both keep `churn` and `monthly_charges` as targets),
    with missing values in one column of each, so every imputer has work to do."""
    churn = churn_frame().sample(ROWS, random_state=21).reset_index(drop=True)
    targets = ["churn", "monthly_charges"]
    features = churn.drop(columns=targets)
    numeric = [c for c in features.columns if pd.api.types.is_numeric_dtype(features[c])]
    categorical = [c for c in features.columns if c not in numeric]
    out = {"numeric": churn[numeric + targets].copy(), "categorical": churn[categorical + targets].copy()}
    out["numeric"].loc[::25, "tenure"] = np.nan
    out["categorical"].loc[::25, "payment_method"] = np.nan
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Trained]:
    """One state folder for the module; each case trained once (tiny budget, one family)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MLOPS_HOME", str(tmp_path_factory.mktemp("export-matrix-state")))
    frames = tables()
    trained = {}
    try:
        for name, (table, target, family) in CASES.items():
            other = "monthly_charges" if target == "churn" else "churn"
            frame = frames[table].drop(columns=[other])
            result = train_model(frame, target, name, candidates=[family], time_budget_s=3,
                                 max_trials=1)
            assert result.family == family and result.aliases == ["champion"]
            trained[name] = Trained(name, result.task, frame)
        yield trained
    finally:
        patch.undo()


@pytest.mark.parametrize("name", list(CASES))
def test_every_family_exports_to_every_format_within_its_parity_gate(models, name):
    m = models[name]
    table = CASES[name][0]
    report = export_model(name, "champion", formats=FORMATS, sample_data=m.frame)

    manifest = json.loads(Path(report.manifest_path).read_text())
    kinds = {c["kind"] for c in manifest["input_schema"]["columns"]}
    assert kinds == {table}, kinds  # the model's inputs are of one kind only
    assert [r.format for r in report.formats] == FORMATS
    not_ok = {r.format: f"{r.status}: {r.reason}" for r in report.formats if r.status != "ok"}
    assert not not_ok, not_ok
    for r in report.formats:
        parity = manifest["formats"][r.format]["parity"]
        assert parity["passed"] and r.parity_rows == ROWS, r.format
        assert Path(r.path).is_file() and r.sha256 == manifest["formats"][r.format]["files"][0]["sha256"]
        assert r.precision in ("float32", "float64")  # quantize=False: the full-precision bound
        if m.task == "regression":  # the bound scales with the prediction (charges up to ~120)
            assert r.changed_labels is None
            assert r.max_abs_diff <= parity["tolerance"] <= 1e-5 * 200, r.format
        else:
            assert r.changed_labels == 0, r.format
            assert r.max_abs_diff <= 1e-5, r.format
