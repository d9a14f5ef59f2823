"""TensorFlow Lite rows of the export benchmark (issue 5): every candidate train_model can pick
(both grid entries of each family, so the deep forest is included), on bundled data: churn
(binary, 10 categorical columns), iris (multiclass), diabetes (regression).

For each model: the float32 .tflite through the framework's gate (tasks.export.core.export_format:
capability check, conversion, parity, latency in LiteRT), its size next to the ONNX file of the
same model, the strategy the converter chose, and the quantized variant export_model(quantize=True)
publishes (or why none). scikit-learn is timed on the same rows in the same run: single-row
p50 over `--rows` one-row calls with inputs prepared beforehand, batch throughput over the whole
sample. Latency is wall time on this machine: run it on an idle one.

    .venv/bin/python bench/export_tflite.py              # writes bench/out/export_tflite.md
    .venv/bin/python bench/export_tflite.py --quick      # first candidate per family only
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from sklearn.datasets import load_diabetes, load_iris  # noqa: E402

from tasks.demo_data import churn_frame  # noqa: E402
from tasks.export.base import ExportSubject  # noqa: E402
from tasks.export.core import export_format, sklearn_reference  # noqa: E402
from tasks.export.report import _size  # noqa: E402
from tasks.training_search import (build_pipeline, starting_candidates, infer_schema,  # noqa: E402
                                   final_params, prepare_features)

OUT = Path(__file__).resolve().parent / "out"
CHURN_TRAIN_ROWS = 5000  # as bench/export.py: the parity sample is the other 2,043 rows


def datasets():
    churn = churn_frame().sample(frac=1.0, random_state=0).reset_index(drop=True)
    yield "churn", churn, "churn", "binary", CHURN_TRAIN_ROWS
    iris = load_iris(as_frame=True).frame.rename(columns={"target": "species"})
    yield "iris", iris.sample(frac=1.0, random_state=0).reset_index(drop=True), "species", \
        "multiclass", 100
    diabetes = load_diabetes(as_frame=True).frame
    yield "diabetes", diabetes.sample(frac=1.0, random_state=0).reset_index(drop=True), \
        "target", "regression", 300


def g(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=300, help="single-row calls timed per runtime")
    parser.add_argument("--quick", action="store_true", help="first candidate of each family only")
    parser.add_argument("--out", default=str(OUT / "export_tflite.md"))
    args = parser.parse_args()

    header = ("| data | candidate | strategy | trees / nodes / depth | TFLite | ONNX | ratio | "
              "max abs diff | labels | p50 us | p99 us | rows/s | sklearn p50 us | sklearn rows/s | "
              "x p50 | x batch | quantized (edge) | q size | q max abs diff | q labels |")
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    print(header, flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for data, frame, target, task, cut in datasets():
            schema = infer_schema(frame, target, task)
            X = prepare_features(frame, schema)
            y = frame[target]
            sample = X.iloc[cut:].reset_index(drop=True)
            grid = starting_candidates(task)
            if args.quick:
                grid = [c for i, c in enumerate(grid) if c.family not in {d.family for d in grid[:i]}]
            for candidate in grid:
                pipeline = build_pipeline(schema, candidate.family,
                                          final_params(candidate.family, candidate.params), 0)
                pipeline.fit(X.iloc[:cut], y.iloc[:cut])
                subject = ExportSubject(model_name=f"bench-{candidate.family}", version=1,
                                        pipeline=pipeline, schema=schema)
                reference = sklearn_reference(subject, sample, latency_rows=args.rows)
                work = Path(tmp) / data / candidate.label
                onnx = export_format("onnx", subject, sample, reference, work / "onnx",
                                     latency_rows=args.rows).result
                plain = export_format("tflite", subject, sample, reference, work / "f32",
                                      latency_rows=args.rows)
                r = plain.result
                q = export_format("tflite", subject, sample, reference, work / "q", quantize=True,
                                  latency_rows=args.rows).result
                d = plain.conversion.details if plain.conversion else {}
                shape = (f"{d['trees']} / {d['nodes']:,} / {d['depth']}" if "trees" in d else "")
                ratio = (r.size_bytes / onnx.size_bytes
                         if r.size_bytes and onnx.size_bytes else None)
                batch = (r.rows_per_s / r.sklearn_rows_per_s
                         if r.rows_per_s and r.sklearn_rows_per_s else None)
                quant = (q.precision if q.precision != "float32" else "none: " +
                         q.quantization.split(";")[0].replace("not applied: ", ""))
                row = (f"| {data} | {candidate.label} | {d.get('strategy', r.reason[:40])} | "
                       f"{shape} | {_size(r.size_bytes)} | {_size(onnx.size_bytes)} | "
                       f"{g(ratio, '.2f')} | {g(r.max_abs_diff, '.1e')} | "
                       f"{g(r.changed_labels, 'd')} | {g(r.latency_p50_us, ',.1f')} | "
                       f"{g(r.latency_p99_us, ',.1f')} | {g(r.rows_per_s, ',.0f')} | "
                       f"{g(r.sklearn_p50_us, ',.0f')} | {g(r.sklearn_rows_per_s, ',.0f')} | "
                       f"{g(r.speedup_p50, ',.0f')} | {g(batch, ',.1f')} | {quant} | "
                       f"{_size(q.size_bytes) if q.precision != 'float32' else ''} | "
                       f"{g(q.max_abs_diff, '.1e') if q.precision != 'float32' else ''} | "
                       f"{g(q.changed_labels, 'd') if q.precision != 'float32' else ''} |")
                print(row, flush=True)
                lines.append(row)
    note = (f"\nparity rows: churn {7043 - CHURN_TRAIN_ROWS:,} (held out), iris 50, diabetes 142 "
            "(held out); regression |diff| in target units (bound 1e-5 x max |prediction|). "
            "x p50 / x batch: scikit-learn time / LiteRT time on the same rows in the same run. "
            "ratio: TFLite bytes / ONNX bytes. LiteRT: ai_edge_litert Interpreter, 1 thread, "
            f"default delegates. Took {time.monotonic() - started:.0f} s.\n")
    print(note)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("# TensorFlow Lite export benchmark\n\n" + "\n".join(lines) + "\n" + note)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
