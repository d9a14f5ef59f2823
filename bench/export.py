"""Export benchmark: every family train_model produces × every registered format.

    .venv/bin/python bench/export.py                 # binary churn, 3 families (about 1-2 minutes)
    .venv/bin/python bench/export.py --regression    # also regressors on monthly_charges
    .venv/bin/python bench/export.py --rows 500      # single-row calls timed per runtime

Each family is fitted with its first candidate's parameters (forests with train_model's final
trees, `final_params`) on 5,000 rows of the bundled churn data; the parity sample is the other
2,043 rows. Every format goes through the same code as export_model (tasks/export/core.py:
capability check, conversion, parity gate, latency), and scikit-learn is timed on the same rows in
the same run: single-row p50/p99 over `--rows` one-row calls with inputs prepared beforehand,
batch throughput over the whole sample. Latency is wall time on this machine: run it on an idle
one (the ratio column is what to compare).
ONNX runs in onnxruntime with one thread; PMML in JPMML-Evaluator through py4j (the round trip
is included). Goal (issue 4): ONNX single-row at least 20x faster than scikit-learn.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.demo_data import churn_frame  # noqa: E402
from tasks.export.base import FORMATS, ExportSubject  # noqa: E402
from tasks.export.core import export_format, sklearn_reference  # noqa: E402
from tasks.export.report import _size  # noqa: E402
from tasks.training_search import (FAMILIES, build_pipeline, starting_candidates, infer_schema,  # noqa: E402
                                   final_params, prepare_features)

TRAIN_ROWS = 5000
GOAL = 20.0


def subjects(task: str, target: str):
    frame = churn_frame().sample(frac=1.0, random_state=0).reset_index(drop=True)
    schema = infer_schema(frame, target, task)
    X = prepare_features(frame, schema)
    y = frame[target]
    params = {c.family: c.params for c in starting_candidates(task)}
    for family in FAMILIES:
        pipeline = build_pipeline(schema, family, final_params(family, params[family]), 0)
        pipeline.fit(X.iloc[:TRAIN_ROWS], y.iloc[:TRAIN_ROWS])
        yield family, ExportSubject(model_name=f"bench-{family}", version=1, pipeline=pipeline,
                                    schema=schema), X.iloc[TRAIN_ROWS:].reset_index(drop=True)


def fmt(x, spec):
    return "" if x is None else format(x, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=300, help="single-row calls timed per runtime")
    parser.add_argument("--regression", action="store_true", help="also regressors")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated formats")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    tasks = [("binary", "churn")] + ([("regression", "monthly_charges")] if args.regression else [])

    header = (f"{'task':<10} {'family':<23} {'format':<7} {'status':<11} {'size':>9} "
              f"{'max|diff|':>9} {'labels':>6} {'p50 us':>8} {'p99 us':>8} {'rows/s':>10} "
              f"{'sk p50':>8} {'sk rows/s':>10} {'x p50':>6} {'x batch':>7}")
    print(header)
    print("-" * len(header))
    misses = []
    with tempfile.TemporaryDirectory() as tmp:
        for task, target in tasks:
            for family, subject, sample in subjects(task, target):
                reference = sklearn_reference(subject, sample, latency_rows=args.rows)
                for name in formats:
                    r = export_format(name, subject, sample, reference, Path(tmp) / family / task,
                                      latency_rows=args.rows).result
                    batch_ratio = (r.rows_per_s / r.sklearn_rows_per_s
                                   if r.rows_per_s and r.sklearn_rows_per_s else None)
                    print(f"{task:<10} {family:<23} {name:<7} {r.status:<11} {_size(r.size_bytes):>9} "
                          f"{fmt(r.max_abs_diff, '.1e'):>9} {fmt(r.changed_labels, 'd'):>6} "
                          f"{fmt(r.latency_p50_us, ',.0f'):>8} {fmt(r.latency_p99_us, ',.0f'):>8} "
                          f"{fmt(r.rows_per_s, ',.0f'):>10} {fmt(r.sklearn_p50_us, ',.0f'):>8} "
                          f"{fmt(r.sklearn_rows_per_s, ',.0f'):>10} {fmt(r.speedup_p50, '.0f'):>6} "
                          f"{fmt(batch_ratio, '.1f'):>7}"
                          + (f"  {r.reason[:70]}" if r.status != "ok" else ""), flush=True)
                    if name == "onnx" and (r.status != "ok" or (r.speedup_p50 or 0) < GOAL):
                        misses.append(f"{task}/{family}")
    print()
    print(f"parity rows: {len(sample)}; ratios: scikit-learn time / format time (same rows, same run)")
    print(f"goal ONNX single-row >= {GOAL:.0f}x scikit-learn: "
          + ("met for every family" if not misses else f"MISSED for {', '.join(misses)}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
