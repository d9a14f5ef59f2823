"""The search's extremes still export: for each family, the corner of its search space that makes
the biggest model (deepest, widest forests; boosting with the most leaves and the fastest rate;
an L1 linear model with balanced classes), fitted with train_model's pipeline on churn rows with
missing values, must pass every format's parity gate (onnx, pmml, tflite, coreml).

The winners of a search are points inside these ranges (tasks/training_search.py bounds them:
MAX_TREES, MAX_DEPTH, MAX_LEAF_NODES), so a gate that holds here holds for them too.
"""
from __future__ import annotations

import numpy as np
import pytest

from tasks.demo_data import churn_frame
from tasks.export.base import ExportSubject
from tasks.export.core import export_format, sklearn_reference
from tasks.training_search import (MAX_DEPTH, MAX_LEAF_NODES, MAX_TREES, build_pipeline,
                                   infer_schema, prepare_features)

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning",
                                        "ignore:Found unknown categories:UserWarning")

FORMATS = ["onnx", "pmml", "tflite", "coreml"]
ROWS, CHECK_ROWS = 500, 100
EXTREMES = {
    "linear": {"C": 100.0, "penalty": "l1", "class_weight": "balanced"},
    "random_forest": {"n_estimators": MAX_TREES, "max_depth": MAX_DEPTH, "min_samples_leaf": 1,
                      "max_features": 1.0, "class_weight": "balanced_subsample"},
    "extra_trees": {"n_estimators": MAX_TREES, "max_depth": MAX_DEPTH, "min_samples_leaf": 1,
                    "max_features": 1.0, "class_weight": "balanced"},
    "hist_gradient_boosting": {"learning_rate": 0.3, "max_leaf_nodes": MAX_LEAF_NODES,
                               "min_samples_leaf": 2, "l2_regularization": 1e-6,
                               "max_features": 1.0, "validation_fraction": 0.1,
                               "class_weight": "balanced"},
}


@pytest.fixture(scope="module")
def churn():
    frame = churn_frame().sample(ROWS + CHECK_ROWS, random_state=8).reset_index(drop=True)
    frame.loc[::30, "tenure"] = np.nan
    frame.loc[::40, "payment_method"] = np.nan
    schema = infer_schema(frame, "churn", "binary")
    X = prepare_features(frame, schema)
    return schema, X.iloc[:ROWS], frame["churn"].iloc[:ROWS], X.iloc[ROWS:].reset_index(drop=True)


@pytest.mark.parametrize("family", list(EXTREMES))
def test_the_largest_model_of_each_search_space_passes_every_parity_gate(churn, family, tmp_path):
    schema, X, y, check = churn
    pipeline = build_pipeline(schema, family, EXTREMES[family], 0).fit(X, y)
    subject = ExportSubject(model_name=f"extreme_{family}", version=1, pipeline=pipeline,
                            schema=schema, family=family)
    reference = sklearn_reference(subject, check, with_latency=False)
    failed = {}
    for fmt in FORMATS:
        r = export_format(fmt, subject, check, reference, tmp_path, latency_rows=5).result
        if r.status != "ok":
            failed[fmt] = f"{r.status}: {r.reason}"
            continue
        assert r.changed_labels == 0 and r.max_abs_diff <= 1e-5, (fmt, r.max_abs_diff)
    assert not failed, failed
