"""What Prefect adds to the lifecycle: the same work as plain task functions (`.fn`) and as flows.

The work is made deterministic (a time budget no candidate reaches, fixed seeds), so both modes
train, log, register, compare, promote and roll back the same models. Modes alternate, each rep
in a fresh state folder; medians and the ratio are printed. Goal: Prefect adds <= 15 %.

    .venv/bin/python bench/overhead.py [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging  # noqa: E402

logging.getLogger("mlflow").setLevel(logging.WARNING)

from flows.local_runs import local_run_settings  # noqa: E402
from flows.registry import compare_versions, promote_model, rollback_model  # noqa: E402
from flows.training import initial_alias, train_model  # noqa: E402
from tasks import comparison, registry, training  # noqa: E402
from tasks.demo_data import TARGET, write_churn_batches  # noqa: E402

MAX_TRIALS = 8  # both modes run the same trials
MODEL = "bench_churn"


def plain_train(path: Path, promote: str) -> int:
    """train_model's recipe with every task called as a plain function."""
    loaded = training.load_data.fn(str(path))
    data = training.prepare_training_data.fn(loaded, TARGET, "auto", None, 0)
    width = training.cpu_workers()
    search = training.start_search(data, None, 0, MAX_TRIALS, None, width)
    trial_data = data.for_trials()
    with ThreadPoolExecutor(max_workers=width) as pool:
        while batch := search.ask():
            search.tell(list(pool.map(lambda t: training.evaluate_trial.fn(t, trial_data, 0, None),
                                      batch)))
    summary = training.summarize_search(search, None)
    choice = training.choose_family.fn(data, search.ranked(), 0)
    rows = [training.trial_row(r, choice) for r in search.ranked()]
    logged = training.refit_and_log.fn(data, choice.chosen, MODEL, 0, rows, summary)
    version = registry.register_version.fn(MODEL, logged.model_uri, logged.run_id, "bench", {},
                                            {}, logged.input_schema)
    alias = initial_alias(promote, "champion" in registry.alias_map(registry.mlflow_client(), MODEL))
    if alias:
        registry.promote_alias.fn(MODEL, version.version, alias)
    return version.version


def plain_lifecycle(paths: dict[str, Path]) -> None:
    v1 = plain_train(paths["early"], "always")
    v2 = plain_train(paths["grown"], "auto")
    comparison.compare_recorded.fn(MODEL, v1, v2)
    loaded = training.load_data.fn(str(paths["evaluation"]))
    for v in (v1, v2):
        comparison.score_version.fn(MODEL, v, loaded)
    registry.promote_alias.fn(MODEL, v2, "champion")
    registry.promote_alias.fn(MODEL, registry.find_previous_champion.fn(MODEL), "champion",
                              kind="rollback")


def prefect_lifecycle(paths: dict[str, Path]) -> None:
    v1 = train_model(str(paths["early"]), TARGET, MODEL, max_trials=MAX_TRIALS, promote="always").version
    v2 = train_model(str(paths["grown"]), TARGET, MODEL, max_trials=MAX_TRIALS).version
    compare_versions(MODEL, v1, v2, data=str(paths["evaluation"]))
    promote_model(MODEL, v2, "champion")
    rollback_model(MODEL)


def timed(mode, paths) -> float:
    with tempfile.TemporaryDirectory() as home:
        os.environ["MLOPS_HOME"] = home
        start = time.perf_counter()
        mode(paths)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    with tempfile.TemporaryDirectory() as data_dir, prefect_test_harness(server_startup_timeout=60):
        paths = write_churn_batches(Path(data_dir))
        timed(prefect_lifecycle, paths)  # warm-up: imports, first API calls
        runs: dict[str, list[float]] = {"plain": [], "default": [], "local": []}
        for _ in range(args.reps):
            runs["plain"].append(timed(plain_lifecycle, paths))
            runs["default"].append(timed(prefect_lifecycle, paths))
            with local_run_settings():
                runs["local"].append(timed(prefect_lifecycle, paths))
    base = statistics.median(runs["plain"])
    labels = {"plain": "tasks as plain functions (.fn)",
              "default": "flows, Prefect defaults",
              "local": "flows, local_run_settings()"}
    print(f"\n{'mode':<34}{'median s':>9}{'ratio':>8}  runs")
    for key, label in labels.items():
        med = statistics.median(runs[key])
        print(f"{label:<34}{med:>9.2f}{med / base:>8.3f}  {' '.join(f'{x:.2f}' for x in runs[key])}")
    print("goal: Prefect adds <= 15 % (ratio <= 1.150). local_run_settings() switches off the "
          "flow-run heartbeat thread, which costs up to 1 s at the end of every flow run.")


if __name__ == "__main__":
    main()
