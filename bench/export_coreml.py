"""Core ML rows of the export benchmark: size and parity of every family train_model produces,
at train_model's own sizes (the first candidate of each family's grid), on bundled data.

Parity is what the framework's gate measures (tasks.export.core.export_format): the saved
.mlmodel evaluated by tasks.export.coreml_eval against scikit-learn on held-out rows (with a few
missing values and unseen categories added). No latency: Core ML does not run on Linux. For
tree models the table also says how many parity rows would move if the device compared in
float32 instead of the double Core ML uses for these specs.

    .venv/bin/python bench/export_coreml.py            # writes bench/out/export_coreml.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.datasets import load_diabetes, load_iris  # noqa: E402

from tasks.demo_data import churn_frame  # noqa: E402
from tasks.export.base import ExportSubject  # noqa: E402
from tasks.export.core import export_format, sklearn_reference  # noqa: E402
from tasks.training_search import (FAMILIES, build_pipeline, starting_candidates, infer_schema,  # noqa: E402
                                   final_params, prepare_features)

OUT = Path(__file__).resolve().parent / "out"


def datasets() -> dict[str, tuple[pd.DataFrame, str, str]]:
    iris = load_iris(as_frame=True).frame.rename(columns={"target": "species"})
    diabetes = load_diabetes(as_frame=True, scaled=False).frame
    diabetes["sex"] = diabetes["sex"].map({1.0: "one", 2.0: "two"})
    return {"churn (binary, 19 columns, 10 categorical)": (churn_frame(), "churn", "binary"),
            "iris (3 classes, numeric)": (iris, "species", "multiclass"),
            "diabetes (regression, 1 categorical)": (diabetes, "target", "regression")}


def run(max_rows: int) -> list[dict]:
    rows = []
    for label, (frame, target, task) in datasets().items():
        frame = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
        schema = infer_schema(frame, target, task)
        X = prepare_features(frame, schema)
        cut = int(len(X) * 0.8)
        check = X.iloc[cut:cut + max_rows].reset_index(drop=True).copy()
        check.loc[0:4, schema.numeric[0]] = np.nan
        for c in schema.categorical:
            check.loc[5:6, c] = np.nan
            check.loc[7:8, c] = "never-seen"
        first: dict[str, dict] = {}
        for candidate in starting_candidates(task):  # the search's first trial of each family
            first.setdefault(candidate.family, candidate.params)
        for family in FAMILIES:
            pipe = build_pipeline(schema, family, final_params(family, first[family]), 0)
            started = time.perf_counter()
            pipe.fit(X.iloc[:cut], frame[target].iloc[:cut])
            fit_s = time.perf_counter() - started
            subject = ExportSubject(f"bench_{target}", 1, pipe, schema, run_id="bench", family=family)
            reference = sklearn_reference(subject, check, with_latency=False)
            with tempfile.TemporaryDirectory() as tmp:
                outcome = export_format("coreml", subject, check, reference, Path(tmp))
            r = outcome.result
            details = outcome.conversion.details if outcome.conversion else {}
            other = next((v for k, v in details.get("tree_precision", {}).items()
                          if k.startswith("if_device_compared_in")), None)
            rows.append({
                "dataset": label, "family": family, "estimator": details.get("estimator", ""),
                "status": r.status, "reason": r.reason, "size_bytes": r.size_bytes,
                "max_abs_diff": r.max_abs_diff, "changed_labels": r.changed_labels,
                "parity_rows": r.parity_rows, "bound": r.parity_bound,
                "tree_precision": details.get("tree_precision", {}).get("device"),
                "if_float32": other, "fit_s": round(fit_s, 2), "export_s": r.duration_s,
            })
            print(json.dumps(rows[-1], default=str), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["## Core ML export benchmark", "",
             f"machine: {os.cpu_count()} CPUs; models at train_model's sizes (first candidate of "
             "each family); parity on held-out rows with missing values and unseen categories "
             "added, evaluated by tasks.export.coreml_eval (Core ML does not run on Linux: "
             "on-device check pending, no latency).", "",
             "| dataset | family | spec | size | max abs diff | changed labels | rows | trees compare in | "
             "if float32 instead | export s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        other = r["if_float32"]
        moved = "" if not other else (f"{other['rows_changed']} rows move"
                                      + (f", {other['labels_changed']} labels"
                                         if other.get("labels_changed") is not None else ""))
        size = "" if r["size_bytes"] is None else f"{r['size_bytes'] / 1024:,.1f} KiB"
        diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        labels = "" if r["changed_labels"] is None else r["changed_labels"]
        spec = r["estimator"].split(" → ")[-1].split(",")[0] if r["estimator"] else r["reason"]
        lines.append(f"| {r['dataset']} | {r['family']} | {spec} | {size} | {diff} | {labels} | "
                     f"{r['parity_rows']} | {r['tree_precision'] or '—'} | {moved or '—'} | "
                     f"{r['export_s']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-rows", type=int, default=5000, help="parity rows per dataset")
    args = parser.parse_args()
    rows = run(args.max_rows)
    OUT.mkdir(exist_ok=True)
    (OUT / "export_coreml.md").write_text(markdown(rows))
    (OUT / "export_coreml.json").write_text(json.dumps(rows, indent=1, default=str))
    print(markdown(rows))


if __name__ == "__main__":
    main()
