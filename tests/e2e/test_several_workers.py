"""Several process workers on `ml-retraining-queue` (the shared SQLite stack, tests/e2e/conftest.py,
plus a second worker this test starts the way deployments/up.sh starts its own).

What a production owner relies on: a flow run is executed by exactly one worker; one model's
retraining never runs twice at once (its strict concurrency limit `mlops-retraining-<model>`,
tasks/retraining.py `retraining_slot`): a second retraining of the model while the first holds
the slot is refused and registers nothing; another model's retraining runs at the same time (no
deployment-wide or pool-wide limit serialises them).
"""
from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pytest
from mlflow import MlflowClient

from tasks.retraining import slot_name
from tests.e2e.conftest import ROOT, Stack
from tests.e2e.test_retraining import flow_run, run_logs
from tests.e2e.test_stack import aliases, api
from tests.servers import stop_process_group

pytestmark = pytest.mark.e2e

SLOW, FAST = "e2e_workers_a", "e2e_workers_b"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def start_run(stack: Stack, deployment: str, **params) -> str:
    """`prefect deployment run` without --watch: the flow run's id."""
    args = ["deployment", "run", deployment]
    for key, value in params.items():
        args += ["--param", f"{key}={value}"]
    proc = stack.prefect(*args)
    assert proc.returncode == 0 and "UUID:" in proc.stdout, stack.explain(proc)
    run_id = proc.stdout.split("UUID:")[1].split()[0]
    stack.runs.append(run_id)
    return run_id


def wait_final(stack: Stack, run_ids: list[str], timeout_s: float = 300) -> dict[str, dict]:
    deadline, final = time.monotonic() + timeout_s, {}
    while len(final) < len(run_ids):
        for run_id in run_ids:
            if run_id not in final:
                run = flow_run(stack, run_id)
                if run["state_type"] in TERMINAL:
                    final[run_id] = run
        if time.monotonic() > deadline:
            pytest.fail(f"runs not final within {timeout_s:.0f} s: "
                        f"{sorted(set(run_ids) - set(final))}\n{stack.log_tail()}")
        time.sleep(1)
    return final


def versions(stack: Stack, model: str) -> list[int]:
    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    return sorted(int(v.version) for v in client.search_model_versions(f"name='{model}'"))


def interval(run: dict) -> tuple[float, float]:
    return (datetime.fromisoformat(run["start_time"]).timestamp(),
            datetime.fromisoformat(run["end_time"]).timestamp())


@pytest.fixture(scope="module")
def second_worker(stack, tmp_path_factory) -> Iterator[Path]:
    """A second process worker on the same pool and queue, started like up.sh starts its own
    (from the project root, the profile up.sh activated gives the API)."""
    log = tmp_path_factory.mktemp("second-worker") / "worker-2.log"
    with open(log, "w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "mlops",
             "--work-queue", "ml-retraining-queue", "--type", "process", "--name", "mlops-worker-2"],
            # the heartbeat setting up.sh gives its worker: without it a run longer than three
            # heartbeats is marked Crashed by up.sh's automation although it is healthy (found
            # by this test: the 2-minute retraining was Crashed at 90 s)
            cwd=ROOT, env=stack.env | {"PREFECT_WORKER_QUERY_SECONDS": "1",
                                       "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
                                       "PREFECT_LOGGING_LEVEL": "INFO"}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(w["name"] == "mlops-worker-2" and w["status"] == "ONLINE"
                      for w in api(stack, "/work_pools/mlops/workers/filter", {})):
            assert worker.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "worker 2 not online in 120 s\n" + log.read_text()
            time.sleep(1)
        yield log
    finally:
        stop_process_group(worker)


@pytest.fixture(scope="module")
def data(churn_csv, tmp_path_factory) -> dict[str, Path]:
    """`old`: the champions' 300 rows; `labelled`: all 800 (500 rows no champion has seen)."""
    import pandas as pd

    frame = pd.read_csv(churn_csv)
    folder = tmp_path_factory.mktemp("several-workers-data")
    paths = {"old": folder / "old.csv", "labelled": folder / "labelled.csv"}
    frame.iloc[:300].to_csv(paths["old"], index=False)
    frame.to_csv(paths["labelled"], index=False)
    return paths


@pytest.fixture(scope="module")
def champions(stack, data, second_worker) -> None:
    """v1 champion of both models, trained at the same time through the deployment."""
    runs = [start_run(stack, "train-model/default", data=str(data["old"]), target="churn",
                      model_name=model, time_budget_s=4, max_trials=2) for model in (SLOW, FAST)]
    final = wait_final(stack, runs)
    assert all(r["state_type"] == "COMPLETED" for r in final.values()), (
        [(r["name"], r["state"]["message"]) for r in final.values()], stack.log_tail())
    assert aliases(stack, SLOW) == aliases(stack, FAST) == {"champion": 1}


def test_one_model_never_retrains_twice_at_once_and_two_models_retrain_in_parallel(
        stack, data, second_worker, champions):
    # A long retraining of SLOW, holding its slot ...
    slow = start_run(stack, "retrain-model/default", model_name=SLOW, data=str(data["labelled"]),
                     target="churn", time_budget_s=20, max_trials=60)
    deadline = time.monotonic() + 180
    while not any(c["name"] == slot_name(SLOW) and c["active_slots"] == 1
                  for c in api(stack, "/v2/concurrency_limits/filter", {})):
        assert flow_run(stack, slow)["state_type"] not in TERMINAL, run_logs(stack, slow)
        assert time.monotonic() < deadline, "the retraining never took its slot"
        time.sleep(0.5)
    # ... then a second retraining of SLOW and one of FAST, submitted together.
    again = start_run(stack, "retrain-model/default", model_name=SLOW, data=str(data["labelled"]),
                      target="churn", time_budget_s=4, max_trials=2)
    fast = start_run(stack, "retrain-model/default", model_name=FAST, data=str(data["labelled"]),
                     target="churn", time_budget_s=4, max_trials=2)
    final = wait_final(stack, [slow, again, fast], timeout_s=420)
    states = {name: final[run]["state_type"] for name, run in
              (("slow", slow), ("again", again), ("fast", fast))}
    assert states == {"slow": "COMPLETED", "again": "FAILED", "fast": "COMPLETED"}, (
        states, run_logs(stack, again)[-2000:])
    assert f"another retraining of '{SLOW}' is running" in (
        final[again]["state"]["message"] or "") + run_logs(stack, again)

    # no duplicate version: one per completed retraining, none from the refused one
    assert versions(stack, SLOW) == [1, 2] and versions(stack, FAST) == [1, 2]
    (s0, s1), (f0, f1), (a0, a1) = (interval(final[r]) for r in (slow, fast, again))
    assert f0 < s1 and s0 < f1, "the two models' retrainings did not overlap: serialised?"
    assert s0 < a1 and a0 < s1  # the refusal came while the first one ran

    # each run executed by exactly one of the two workers (both may try to submit it: the
    # server lets one through and the other logs an aborted submission)
    logs = {"worker-1": (stack.stack_dir / "logs" / "worker.log").read_text(errors="replace"),
            "worker-2": second_worker.read_text(errors="replace")}
    ran_by = {name: [w for w, text in logs.items()
                     if f"submitting flow run '{run}'" in text
                     and f"Aborted submission of flow run '{run}'" not in text]
              for name, run in (("slow", slow), ("again", again), ("fast", fast))}
    assert all(len(w) == 1 for w in ran_by.values()), ran_by
    print(f"slow {s1 - s0:.0f} s, fast {f1 - f0:.0f} s, overlap {min(s1, f1) - max(s0, f0):.0f} s, "
          f"refused after {a1 - a0:.0f} s; workers: {ran_by}")
