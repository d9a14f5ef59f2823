"""Fault: the worker and its flow-run process are killed (SIGKILL) in the middle of a retraining.

A stack of its own (it kills its worker): deployments/up.sh on free ports. What a production owner
relies on afterwards: the run is marked Crashed (flow-run heartbeats + the automation up.sh
creates), the model's retraining slot frees within its lease (RetrainingPolicy.slot_lease_s), the
champion did not move, `make up` run right after the kill brings a worker back (without resetting
the crash detection), and a rerun succeeds with exactly one new version; the registry audit is
clean. The same stack's Prefect server is also restarted under a
running retraining (fault 5): the run ends Completed or Crashed, its slot frees, one version.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pytest
from mlflow import MlflowClient

from blocks.retraining_policy import document_name
from tasks.registry import model_slug
from tasks.retraining import slot_name
from tests.e2e.conftest import ROOT, UP_TIMEOUT_S, Stack, _script, running_stack
from tests.e2e.test_retraining import artifact, flow_run, run_logs, save_policy
from tests.e2e.test_stack import aliases, api, assert_completed

pytestmark = pytest.mark.e2e

MODEL = "e2e_killed"
LEASE_S = 60                     # Prefect's minimum lease
HEARTBEAT_S = 30                 # Prefect's minimum heartbeat; Crashed after 3 missed
CRASHED_WITHIN_S = 180           # the promise


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("e2e-killed"),
                       MLOPS_HEARTBEAT_SECONDS=str(HEARTBEAT_S)) as s:
        yield s


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from tasks.demo_data import churn_frame

    folder = tmp_path_factory.mktemp("e2e-killed-data")
    frame = churn_frame().drop_duplicates().sample(frac=1.0, random_state=3).reset_index(drop=True)
    parts = {"old": frame.iloc[:300], "labelled": frame.iloc[:800],
             "grown": frame.iloc[:1400]}  # rows no version has seen, for the second test
    paths = {}
    for name, part in parts.items():
        paths[name] = folder / f"{name}.csv"
        part.to_csv(paths[name], index=False)
    return paths


@pytest.fixture(scope="module")
def champion(own_stack, data) -> int:
    """MODEL v1, champion, through the deployment; the model's RetrainingPolicy document."""
    assert_completed(own_stack, own_stack.run_deployment("train-model/default", {
        "data": str(data["old"]), "target": "churn", "model_name": MODEL, "time_budget_s": 4,
        "max_trials": 2}))
    assert aliases(own_stack, MODEL) == {"champion": 1}
    save_policy(own_stack, document_name(MODEL), training_data=str(data["labelled"]),
                target="churn", slot_lease_s=LEASE_S)
    return 1


def slot(stack: Stack) -> dict | None:
    limits = api(stack, "/v2/concurrency_limits/filter", {})
    return next((c for c in limits if c["name"] == slot_name(MODEL)), None)


def wait_for(what: str, check, timeout_s: float, every_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)


def versions(stack: Stack) -> list[int]:
    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    return sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))


def test_a_killed_worker_crashes_the_run_frees_the_slot_and_a_rerun_makes_one_version(
        own_stack, data, champion):
    stack = own_stack
    assert versions(stack) == [champion]

    # A long retraining (a 120 s search) started without waiting for it.
    started = stack.prefect("deployment", "run", "retrain-model/default",
                            "--param", f"model_name={MODEL}", "--param", f"data={data['labelled']}",
                            "--param", "target=churn", "--param", "time_budget_s=120")
    assert started.returncode == 0, stack.explain(started)
    run_id = started.stdout.split("UUID:")[1].split()[0]
    wait_for("the retraining holds its slot",
             lambda: (slot(stack) or {}).get("active_slots") == 1, 180)
    running = wait_for("the run is Running with its process id",
                       lambda: (lambda r: r if r["state_type"] == "RUNNING"
                                and r.get("infrastructure_pid") else None)(flow_run(stack, run_id)),
                       60)
    time.sleep(3)  # well inside the search: trials are running

    # SIGKILL the worker and the flow run's own process: neither can report anything.
    worker_pid = int((stack.stack_dir / "pids" / "worker.pid").read_text().split()[0])
    run_pid = int(str(running["infrastructure_pid"]).rsplit(":", 1)[-1])
    killed_at = time.monotonic()
    for pid in (run_pid, worker_pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(worker_pid, signal.SIGKILL)  # anything else the worker started
    except ProcessLookupError:
        pass

    # `make up` at once, as an operator would: the dead worker is started anew while the server is
    # still waiting for the killed run's heartbeats. Re-applying the configuration must not
    # reset that wait (the crash automation keeps its trigger), or the run stays Running forever.
    restart = subprocess.Popen(["bash", str(ROOT / "deployments" / "up.sh")], cwd=ROOT,
                               env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        crashed = wait_for("the killed run is marked Crashed",
                           lambda: (lambda r: r if r["state_type"] == "CRASHED" else None)(
                               flow_run(stack, run_id)), CRASHED_WITHIN_S, every_s=2)
        crashed_after = time.monotonic() - killed_at
        assert "heartbeat" in (crashed["state"]["message"] or ""), crashed["state"]
        wait_for("the model's retraining slot frees", lambda: (slot(stack) or {}).get(
            "active_slots") == 0, LEASE_S + 60, every_s=2)
        freed_after = time.monotonic() - killed_at
        assert aliases(stack, MODEL) == {"champion": champion} and versions(stack) == [champion]
    finally:  # never leave up.sh running into the teardown's down.sh
        restarted, _ = restart.communicate(timeout=UP_TIMEOUT_S)
    # the worker `make up` started takes the rerun
    assert restart.returncode == 0, restarted
    rerun = stack.run_deployment("retrain-model/default", {
        "model_name": MODEL, "data": str(data["labelled"]), "target": "churn",
        "time_budget_s": 30, "max_trials": 4})
    assert_completed(stack, rerun)
    assert versions(stack) == [1, 2]  # exactly one version from the rerun, none from the crash
    assert aliases(stack, MODEL).get("champion") in (1, 2)

    audit = stack.run_deployment("audit-registry/default", {"model_name": MODEL})
    assert_completed(stack, audit)
    found = artifact(stack, f"audit-{model_slug(MODEL)}")
    assert found and found["description"].endswith("registry audit clean"), found
    print(f"killed -> Crashed {crashed_after:.0f} s; slot free {freed_after:.0f} s after the kill")


def test_a_prefect_server_restart_during_a_run_ends_it_once_without_a_duplicate_version(
        own_stack, data, champion):
    """Fault 5: the Prefect server stops (SIGTERM to its process group) while a retraining runs
    on the worker and comes back with `make up` 10 s later. The run ends Completed (its clients
    ride through the outage; a subflow refused while the API is away waits for it,
    tasks/prefect_api.py) or Crashed (the heartbeat automation) -- never Failed, never stuck
    Running. The model's slot frees afterwards (up.sh keeps the leases in files, so a restart does
    not forget the lease of a taken slot), no version is registered twice and the audit is
    clean."""
    stack = own_stack
    before = versions(stack)
    champion_before = aliases(stack, MODEL)["champion"]
    started = stack.prefect("deployment", "run", "retrain-model/default",
                            "--param", f"model_name={MODEL}", "--param", f"data={data['grown']}",
                            "--param", "target=churn", "--param", "time_budget_s=40",
                            "--param", "max_trials=6")
    assert started.returncode == 0, stack.explain(started)
    run_id = started.stdout.split("UUID:")[1].split()[0]
    wait_for("the retraining holds its slot",
             lambda: (slot(stack) or {}).get("active_slots") == 1, 180)

    server_pid = int((stack.stack_dir / "pids" / "prefect-server.pid").read_text().split()[0])
    stopped_at, stopped_wall = time.monotonic(), time.time()
    os.killpg(server_pid, signal.SIGTERM)
    wait_for("the Prefect server is down", lambda: _down(server_pid), 60)
    time.sleep(10)
    up_started = time.monotonic() - stopped_at
    up = _script("up.sh", stack.env, UP_TIMEOUT_S)
    assert up.returncode == 0, up.stdout + up.stderr
    up_after = time.monotonic() - stopped_at
    answers = re.search(r"Prefect server answers at \S+ \((\d+) s\)", up.stdout)
    api_back = up_started + int(answers.group(1)) if answers else float("nan")

    final = wait_for("the run reaches a final state",
                     lambda: (lambda r: r if r["state_type"] in {"COMPLETED", "CRASHED", "FAILED"}
                              else None)(flow_run(stack, run_id)), 300, every_s=3)
    ended = final.get("end_time")
    ended_after = (datetime.fromisoformat(ended).timestamp() - stopped_wall) if ended else None
    logs = run_logs(stack, run_id)
    explained = (f"{final['state']['message']}\n--- run log\n{logs[-4000:]}\n"
                 f"--- worker log\n{stack.log_tail(lines=80)}")
    assert final["state_type"] in {"COMPLETED", "CRASHED"}, explained
    wait_for("the model's retraining slot frees", lambda: (slot(stack) or {}).get(
        "active_slots") == 0, LEASE_S + 60, every_s=2)
    freed_after = time.monotonic() - stopped_at
    after = versions(stack)
    assert after[:len(before)] == before, (before, after)
    if final["state_type"] == "COMPLETED":
        assert len(after) == len(before) + 1, (before, after)  # exactly one new version
    else:  # Crashed: at most the one version it registered, and a rerun takes the slot
        assert len(after) - len(before) <= 1, (before, after)
        if len(after) == len(before):  # nothing registered: nothing promoted either
            assert aliases(stack, MODEL)["champion"] == champion_before
        rerun = stack.run_deployment("retrain-model/default", {
            "model_name": MODEL, "data": str(data["grown"]), "target": "churn",
            "time_budget_s": 30, "max_trials": 4})
        assert_completed(stack, rerun)
        assert len(versions(stack)) == len(after) + 1, (after, versions(stack))
        after = versions(stack)
    audit = stack.run_deployment("audit-registry/default", {"model_name": MODEL})
    assert_completed(stack, audit)
    found = artifact(stack, f"audit-{model_slug(MODEL)}")
    assert found and found["description"].endswith("registry audit clean"), found
    waited = "answers again" in logs  # run_subflow waited for the API (tasks/prefect_api.py)
    print(f"Prefect server stopped mid-run: API back after {api_back:.0f} s, make up done after "
          f"{up_after:.0f} s; run {final['state_type']} (ended "
          f"{ended_after or float('nan'):.0f} s after the stop; subflow waited for the API: "
          f"{waited}); slot free after {freed_after:.0f} s; versions {before} -> {after}")


def _down(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False
