"""Drift check benchmark: our profile-based check versus Evidently's DataDriftPreset.

    .venv/bin/python bench/drift.py                 # 1M x 1M and 100k x 100k (about 4 minutes)
    .venv/bin/python bench/drift.py --sizes 100000  # quick
    .venv/bin/python bench/drift.py --skip-evidently --sizes 1000000 200000 --repeats 5

Data: a reference and a current table of the same size, 10 numeric columns (normal, skewed,
heavy-tailed, integer-valued with ties, bounded, one with 2 % missing) and 1 categorical column
(8 string categories); the current table has 3 numeric columns and the categorical mix shifted.
Both tools read the same arrays (written once as .npy files).

Measured, each in a fresh process, the two tools in the same run:

* ours, computation: ``compare_to_profile(profile, current)`` + ``model_drift_score`` with the
  profile (a dict) and the current DataFrame already in memory -- what a check costs;
* ours, profile: ``build_profile(reference)`` -- paid once, when a version is registered;
* ours, whole flow call: ``check_drift(model, data)`` on a registered version (profile stored in
  MLflow) with the batch as a DataFrame and as a parquet path: read the profile and the batch,
  compare, log the MLflow run with the report and the plot, Prefect artifacts, event, alert
  (warm: the Prefect server and imports are up). In the same process, interleaved with the calls,
  the computation again, so that the two are compared under the same load: medians of
  ``--repeats`` rounds and their ratio. The calls run with ``local_run_settings()`` (as the main
  job and the tests call flows); the DataFrame call once more with Prefect's defaults, whose
  flow-run heartbeat thread is joined at exit (up to 1 s, whatever the flow did);
* Evidently: ``Report([DataDriftPreset()]).run(current, reference)`` and reading its result, with
  the reference data in memory (Evidently rescans it on every check), in its own virtualenv
  (``.venv-bench``, see bench/requirements-drift.txt: Evidently 0.7.23 needs pandas < 3).

Peak memory: the process's peak resident set during the measured call (VmHWM after resetting it
through /proc/self/clear_refs), and its growth over the resident set just before the call.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
NUMERIC = [f"x{i}" for i in range(10)]
CATEGORICAL = "segment"
CATEGORIES = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"],
                      dtype=object)
EVIDENTLY_TIMEOUT_S = 600


# --------------------------------------------------------------------------- data
def make_table(n: int, drifted: bool, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shift = 1.0 if drifted else 0.0
    cols = {
        "x0": rng.normal(0.15 * shift, 1.0, n),                      # mean shift 0.15 sd
        "x1": rng.lognormal(0.0, 0.6 * (1 + 0.3 * shift), n),        # skewed, wider
        "x2": rng.standard_t(3, n),                                  # heavy tails
        "x3": rng.poisson(3 + 0.5 * shift, n).astype(np.float64),   # integers, ties, shifted
        "x4": rng.uniform(0, 100, n),
        "x5": rng.normal(50, 10, n),
        "x6": rng.gamma(2.0, 2.0, n),
        "x7": rng.integers(0, 5, n).astype(np.float64),              # 5 values
        "x8": rng.beta(2, 5, n),
        "x9": rng.normal(0, 1, n),
    }
    cols["x9"][rng.random(n) < 0.02] = np.nan                        # 2 % missing
    p = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    if drifted:
        p = np.array([0.22, 0.2, 0.15, 0.12, 0.12, 0.09, 0.06, 0.04])
    cols[CATEGORICAL] = rng.choice(len(CATEGORIES), size=n, p=p / p.sum()).astype(np.int8)
    return cols


def write_tables(folder: Path, n: int) -> None:
    for name, drifted, seed in (("reference", False, 1), ("current", True, 2)):
        for col, values in make_table(n, drifted, seed).items():
            np.save(folder / f"{name}.{col}.npy", values)


def read_frame(folder: Path, name: str):
    import pandas as pd

    data = {c: np.load(folder / f"{name}.{c}.npy") for c in NUMERIC}
    data[CATEGORICAL] = CATEGORIES[np.load(folder / f"{name}.{CATEGORICAL}.npy")]
    return pd.DataFrame(data)


# --------------------------------------------------------------------------- memory
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn):
    """(seconds, result, peak RSS bytes, peak growth over the RSS before) of one call."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = _status("VmRSS:")
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    peak = _status("VmHWM:")
    return seconds, result, peak, max(0, peak - before)


# --------------------------------------------------------------------------- workers
def worker_evidently(folder: Path) -> dict:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    reference, current = read_frame(folder, "reference"), read_frame(folder, "current")
    definition = DataDefinition(numerical_columns=NUMERIC, categorical_columns=[CATEGORICAL])

    def run():
        snapshot = Report([DataDriftPreset()]).run(
            Dataset.from_pandas(current, data_definition=definition),
            Dataset.from_pandas(reference, data_definition=definition))
        return snapshot.dict()

    seconds, result, peak, extra = measure(run)
    drifted = []
    for metric in result["metrics"]:
        name = metric.get("metric_name", "")
        if name.startswith("ValueDrift(") and isinstance(metric.get("value"), (int, float)):
            threshold = metric["config"].get("threshold")
            column = metric["config"]["column"]
            method = metric["config"].get("method", "")
            value = float(metric["value"])
            # p-value methods drift below the threshold, distances above it
            is_p = "p_value" in method or "test" in method.lower()
            if (value < threshold) if is_p else (value >= threshold):
                drifted.append(column)
    return {"seconds": seconds, "peak": peak, "extra": extra, "drifted": sorted(drifted)}


def worker_ours(folder: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from tasks.drift_metrics import build_profile, compare_to_profile, model_drift_score

    reference = read_frame(folder, "reference")
    kinds = {**{c: "numeric" for c in NUMERIC}, CATEGORICAL: "categorical"}
    p_seconds, profile, p_peak, p_extra = measure(
        lambda frame=reference: build_profile(frame, kinds))
    del reference
    current = read_frame(folder, "current")
    min_effect = {"numeric": 0.1, "categorical": 0.035}  # the MonitoringPolicy defaults

    def check():
        stats = compare_to_profile(profile, current, 0.05, min_effect=min_effect)
        return stats, model_drift_score(stats)

    check()  # warm (first-call imports)
    runs = [measure(check) for _ in range(3)]
    seconds = sorted(r[0] for r in runs)[1]
    stats, score = runs[0][1]
    return {"seconds": seconds, "peak": max(r[2] for r in runs), "extra": max(r[3] for r in runs),
            "profile_seconds": p_seconds, "profile_peak": p_peak, "profile_extra": p_extra,
            "profile_bytes": len(json.dumps(profile)), "score": score,
            "drifted": sorted(s.name for s in stats if s.drifted)}


def worker_flow(folder: Path, repeats: int = 5) -> dict:
    """check_drift end to end on a registered version whose profile is stored in MLflow."""
    home = Path(tempfile.mkdtemp(prefix="drift-bench-"))
    os.environ["MLOPS_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    sys.path.insert(0, str(ROOT))
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        return _flow_calls(folder, home, repeats)


def _flow_calls(folder: Path, home: Path, repeats: int) -> dict:
    import statistics

    import mlflow
    from sklearn.dummy import DummyClassifier

    from flows.drift import check_drift
    from flows.local_runs import local_run_settings
    from flows.registry import register_model
    from tasks.drift_metrics import build_profile, compare_to_profile, model_drift_score
    from tasks.registry import mlflow_client

    reference = read_frame(folder, "reference")
    kinds = {**{c: "numeric" for c in NUMERIC}, CATEGORICAL: "categorical"}
    profile = build_profile(reference, kinds)
    schema = {"target": "y", "task": "binary", "numeric": NUMERIC, "categorical": [CATEGORICAL],
              "categories": {CATEGORICAL: list(CATEGORIES)}, "classes": [0, 1]}
    importances = {c: 1.0 / len(kinds) for c in kinds}
    small = reference.iloc[:100]
    del reference
    mlflow_client()
    with mlflow.start_run() as run:
        mlflow.log_dict(profile, "mlops/profile.json")
        mlflow.log_dict(importances, "mlops/feature_importances.json")
        mlflow.log_dict(schema, "mlops/schema.json")
        model = DummyClassifier().fit(small[NUMERIC].fillna(0), np.arange(100) % 2)
        mlflow.sklearn.log_model(model, name="model", pip_requirements=["scikit-learn"])
    version = register_model("bench_drift", run_id=run.info.run_id).version

    current = read_frame(folder, "current")
    path = home / "current.parquet"
    current.to_parquet(path, index=False)
    min_effect = {"numeric": 0.1, "categorical": 0.035}  # the MonitoringPolicy defaults

    def computation():
        return model_drift_score(compare_to_profile(profile, current, 0.05, min_effect=min_effect))

    def call(data):
        return lambda: check_drift("bench_drift", data, version=version)

    with local_run_settings():
        check_drift("bench_drift", current.iloc[:1000], version=version)  # warm: imports, server
        computation()
    runs: dict[str, list] = {"computation": [], "frame": [], "path": [], "frame_defaults": []}
    for _ in range(repeats):
        with local_run_settings():
            runs["computation"].append(measure(computation))
            runs["frame"].append(measure(call(current)))
            runs["path"].append(measure(call(str(path))))
        runs["frame_defaults"].append(measure(call(current)))
    out = {}
    for label, measured in runs.items():
        seconds = [m[0] for m in measured]
        out[label] = {"seconds": statistics.median(seconds), "all": seconds,
                      "peak": max(m[2] for m in measured), "extra": max(m[3] for m in measured)}
        if label != "computation":
            report = measured[0][1]
            out[label].update(score=report.score, drifted=sorted(report.drifted_features))
    return out


WORKERS = {"evidently": worker_evidently, "ours": worker_ours, "flow": worker_flow}


def run_worker(kind: str, folder: Path, python: Path, timeout: float, *extra: str) -> dict:
    env = {**os.environ, "DO_NOT_TRACK": "1", "PYTHONPATH": ""}
    started = time.perf_counter()
    try:
        done = subprocess.run([str(python), __file__, "--worker", kind, str(folder), *extra],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1][:200]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------- table
def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def secs(s: float) -> str:
    return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:,.0f}×" if a and b else "—"


def table(size: int, ours: dict, flow: dict, evid: dict) -> list[str]:
    label = f"{size // 1000:,}k × {size // 1000:,}k" if size < 1_000_000 else \
        f"{size / 1e6:g}M × {size / 1e6:g}M"
    ev_s = evid.get("seconds")
    ev_peak = evid.get("peak")
    rows = [f"### {label} rows, 10 numeric + 1 categorical", "",
            "| measurement | ours | Evidently DataDriftPreset | Evidently / ours |",
            "|---|---|---|---|"]
    ev_cell = (f"{secs(ev_s)}, peak {mb(ev_peak)} (+{mb(evid['extra'])})" if ev_s
               else evid.get("error", "skipped"))
    rows.append(f"| computation (profile + data in memory) | {secs(ours['seconds'])}, peak "
                f"{mb(ours['peak'])} (+{mb(ours['extra'])}) | {ev_cell} | time "
                f"{ratio(ev_s, ours['seconds'])}, memory {ratio(ev_peak, ours['peak'])} |")
    f = flow.get("frame")
    if f:
        rows.append(f"| whole check_drift call, batch as DataFrame (below) | {secs(f['seconds'])}, "
                    f"peak {mb(f['peak'])} (+{mb(f['extra'])}) | — | time "
                    f"{ratio(ev_s, f['seconds'])} |")
    rows.append(f"| profile the reference (once, at registration) | "
                f"{secs(ours['profile_seconds'])}, +{mb(ours['profile_extra'])}; profile "
                f"{ours['profile_bytes'] / 1024:,.0f} KiB of JSON | (rescans the reference on "
                "every check) | — |")
    rows += ["", f"drifted features — ours: {', '.join(ours['drifted']) or 'none'} "
                 f"(score {ours['score']:.2f}); Evidently: "
                 f"{', '.join(evid.get('drifted', [])) or evid.get('error', 'skipped')}", ""]
    return rows + whole_call_table(flow)


WHOLE_CALLS = (
    ("computation", "computation: compare_to_profile + model_drift_score, in memory"),
    ("frame", "whole check_drift call, batch as DataFrame"),
    ("path", "whole check_drift call, batch as parquet path"),
    ("frame_defaults", "whole call, DataFrame, Prefect defaults (heartbeat joined at exit)"),
)


def whole_call_table(flow: dict) -> list[str]:
    """The whole call beside its computation, measured in the same process, interleaved."""
    if "error" in flow:
        return [f"whole check_drift call: {flow['error']}", ""]
    if not flow:
        return []
    base = flow["computation"]["seconds"]
    n = len(flow["computation"]["all"])
    rows = [f"whole call versus computation, same process, medians of {n} rounds "
            "(a round: the computation, then each call once):", "",
            "| measurement | median | rounds | ÷ computation | peak memory |",
            "|---|---|---|---|---|"]
    for key, what in WHOLE_CALLS:
        f = flow[key]
        rows.append(f"| {what} | {secs(f['seconds'])} | "
                    f"{' '.join(f'{x:.2f}' for x in f['all'])} | {f['seconds'] / base:.2f}× | "
                    f"{mb(f['peak'])} (+{mb(f['extra'])}) |")
    return rows + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 100_000])
    parser.add_argument("--skip-evidently", action="store_true")
    parser.add_argument("--skip-flow", action="store_true")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of computation + whole calls in the flow worker (medians)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "drift.md")
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("folder", nargs="?", type=Path)
    args = parser.parse_args()
    if args.worker:
        extra = {"repeats": args.repeats} if args.worker == "flow" else {}
        print(json.dumps(WORKERS[args.worker](args.folder, **extra)))
        return

    if not args.skip_evidently and not BENCH_PYTHON.exists():
        sys.exit(f"{BENCH_PYTHON} not found: python3 -m venv .venv-bench && "
                 ".venv-bench/bin/pip install -r bench/requirements-drift.txt "
                 "(or pass --skip-evidently)")
    lines = ["## Drift check benchmark", "",
             f"machine: {os.cpu_count()} CPUs; each worker in a fresh process; ours = median of "
             f"3 warm runs, Evidently = 1 run, flow calls = medians of {args.repeats} warm "
             "rounds.", ""]
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="drift-bench-data-") as tmp:
            folder = Path(tmp)
            write_tables(folder, size)
            print(f"[{size:,} rows] ours ...", file=sys.stderr, flush=True)
            ours = run_worker("ours", folder, Path(sys.executable), 600)
            if "error" in ours:
                sys.exit(f"our check failed: {ours['error']}")
            flow: dict = {}
            if not args.skip_flow:
                print(f"[{size:,} rows] check_drift flow ...", file=sys.stderr, flush=True)
                flow = run_worker("flow", folder, Path(sys.executable), 900,
                                  "--repeats", str(args.repeats))
            evid: dict = {"error": "skipped (--skip-evidently)"}
            if not args.skip_evidently:
                print(f"[{size:,} rows] Evidently ...", file=sys.stderr, flush=True)
                evid = run_worker("evidently", folder, BENCH_PYTHON, EVIDENTLY_TIMEOUT_S)
        lines += table(size, ours, flow, evid)
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"\n(written to {args.out})", file=sys.stderr)


if __name__ == "__main__":
    main()
