"""How fast a drift event starts the retraining check, against starting it by hand.

On a real stack (deployments/up.sh on free ports in a temporary folder, the same code path as
`make up`; deployments/down.sh at the end, also on failure or Ctrl-C) the script trains a champion
for a fresh model through `train-model/default`, saves its RetrainingPolicy, then alternates N
times (after one warm-up of each, not counted):

* event path: it emits `mlops.model.drift-detected` on resource `mlops.model.<model>` itself,
  with tasks/events.py's emit_model_event (exactly what check_drift sends when a batch drifted,
  with a synthetic payload), from a short-lived Python process. Emitting directly isolates the
  trigger: no check_drift run precedes it. t0 = the event's `occurred`. The deployment trigger of
  `retraining-check/default` (prefect.yaml) must create the flow run; the worker runs it.
* direct path (the reference, same run, same stack): POST /deployments/{id}/create_flow_run of
  `retraining-check/default` (what `prefect deployment run` calls), t0 = just before the request.

For each run: t0 -> flow run created (server clock), -> Running (the run's start_time: the worker
picked it up, started a process and the flow began), -> Completed (end_time). Both paths run the
same check: the policy's labelled data are the champion's own training rows, so should_retrain
decides "no retraining" (no new rows) every time -- the completion times are those of a check that
decides not to retrain, not of a retraining. Goal: median event -> Running <= 15 s.

    .venv/bin/python bench/retraining.py [--runs 5] [--timeout 180]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.e2e.conftest import Stack, running_stack  # noqa: E402

MODEL = "bench_retrain"
DEPLOYMENT = "retraining-check/default"
GOAL_S = 15.0
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
POLL_S = 0.2

# Run as a user's script against the stack's API (the bench process itself stays off it).
SAVE_POLICY = """
import json, sys
from blocks import RetrainingPolicy
RetrainingPolicy(**json.loads(sys.argv[1])).save(sys.argv[2], overwrite=True)
"""
EMIT = """
import json, sys
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
import tasks.events

sent = []
def keep(*args, **kwargs):  # emit_model_event's own call, and the Event it made
    sent.append(emit_event(*args, **kwargs))
    return sent[-1]
tasks.events.emit_event = keep
tasks.events.emit_model_event(sys.argv[1], "mlops.model.drift-detected", {
    "version": 1, "score": 0.84, "threshold": 0.3, "drifted_features": ["contract", "tenure"],
    "data_ref": "bench (synthetic payload)", "run_id": None})
EventsWorker.drain_all(timeout=30)  # sent over the websocket before the process ends
print(json.dumps({"id": str(sent[0].id), "occurred": sent[0].occurred.isoformat()}))
"""


def py(stack: Stack, code: str, *args: str, timeout: float = 120) -> str:
    env = stack.env | {"PREFECT_API_URL": stack.prefect_api, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"helper process failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return proc.stdout


def api(stack: Stack, method: str, path: str, body: dict | None = None):
    """One API call; 429/502/503 (the server's "retry me", e.g. SQLite busy) are retried with
    backoff, as Prefect's own client does."""
    for attempt in range(6):
        response = httpx.request(method, f"{stack.prefect_api}{path}", json=body, timeout=30)
        if response.status_code not in (429, 502, 503):
            break
        time.sleep(min(0.25 * 2 ** attempt, 4))
    if response.is_error:
        raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:2000]}")
    return response.json()


def ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def checks(stack: Stack, trigger: str) -> list[dict]:
    runs = api(stack, "POST", "/flow_runs/filter", {
        "flows": {"name": {"any_": ["retraining-check"]}},
        "sort": "EXPECTED_START_TIME_DESC", "limit": 50})
    return [r for r in runs if r["parameters"].get("model_name") == MODEL
            and r["parameters"].get("trigger") == trigger]


def wait_final(stack: Stack, find, timeout: float, what: str) -> dict:
    """Poll until FIND() returns a run in a terminal state; bounded by TIMEOUT."""
    deadline = time.monotonic() + timeout
    run = None
    while time.monotonic() < deadline:
        run = find()
        if run is not None and run["state_type"] in TERMINAL:
            return run
        time.sleep(POLL_S)
    state = "no flow run" if run is None else f"flow run {run['id']} still {run['state_name']}"
    raise TimeoutError(f"{what}: {state} after {timeout:.0f}s\n--- worker.log\n{stack.log_tail()}")


def latencies(run: dict, t0: datetime, what: str, stack: Stack) -> dict[str, float]:
    if run["state_type"] != "COMPLETED":
        raise RuntimeError(f"{what}: flow run {run['id']} ended {run['state_name']}: "
                           f"{run['state']['message']}\n{stack.log_tail()}")
    return {"created": (ts(run["created"]) - t0).total_seconds(),
            "running": (ts(run["start_time"]) - t0).total_seconds(),
            "completed": (ts(run["end_time"]) - t0).total_seconds()}


def event_path(stack: Stack, seen: set[str], timeout: float) -> dict[str, float]:
    sent = json.loads(py(stack, EMIT, MODEL).strip().splitlines()[-1])
    occurred = ts(sent["occurred"])

    def find():
        new = [r for r in checks(stack, "event") if r["id"] not in seen]
        return new[-1] if new else None  # the oldest unseen one: this event's

    run = wait_final(stack, find, timeout, f"event {sent['id']} -> triggered retraining-check")
    seen.add(run["id"])
    if ts(run["created"]) < occurred:
        raise RuntimeError(f"flow run {run['id']} was created before the event it should answer")
    return latencies(run, occurred, "triggered retraining-check", stack)


def direct_path(stack: Stack, deployment_id: str, timeout: float) -> dict[str, float]:
    t0 = datetime.now(timezone.utc)
    created = api(stack, "POST", f"/deployments/{deployment_id}/create_flow_run",
                  {"parameters": {"model_name": MODEL, "trigger": "manual"}})
    run = wait_final(stack, lambda: api(stack, "GET", f"/flow_runs/{created['id']}"), timeout,
                     "direct retraining-check")
    return latencies(run, t0, "direct retraining-check", stack)


def prepare(stack: Stack, folder: Path) -> str:
    """A champion trained through the deployment; its policy's data = its own training rows."""
    from tasks.demo_data import churn_frame

    data = folder / "bench_churn.csv"
    churn_frame().sample(n=300, random_state=1).to_csv(data, index=False)
    proc = stack.run_deployment("train-model/default", {
        "data": str(data), "target": "churn", "model_name": MODEL, "time_budget_s": 4})
    if proc.returncode != 0 or "finished successfully in 'Completed'" not in proc.stdout:
        raise RuntimeError(f"training the champion failed:\n{stack.explain(proc)}")
    py(stack, SAVE_POLICY, json.dumps({
        "training_data": str(data), "target": "churn", "cooldown_hours": 0, "min_new_rows": 50,
        "time_budget_s": 4}), MODEL.replace("_", "-"))
    flows = {f["id"]: f["name"] for f in api(stack, "POST", "/flows/filter", {})}
    for d in api(stack, "POST", "/deployments/filter", {}):
        if f"{flows.get(d['flow_id'])}/{d['name']}" == DEPLOYMENT:
            return d["id"]
    raise RuntimeError(f"deployment {DEPLOYMENT} not found on the stack")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="measured runs per path (default 5)")
    parser.add_argument("--timeout", type=float, default=180,
                        help="seconds one run may take from t0 to a terminal state")
    args = parser.parse_args()

    results: dict[str, list[dict[str, float]]] = {"event": [], "direct": []}
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="bench-retraining-")
    try:
        with running_stack(Path(tmp)) as stack:
            print(f"stack up in {stack.up_seconds:.0f} s ({stack.prefect_api})", flush=True)
            deployment_id = prepare(stack, Path(tmp))
            seen = {r["id"] for r in checks(stack, "event")}
            warm = (event_path(stack, seen, args.timeout), direct_path(stack, deployment_id,
                                                                       args.timeout))
            print(f"warm-up (not counted): event -> Running {warm[0]['running']:.2f} s, direct "
                  f"-> Running {warm[1]['running']:.2f} s", flush=True)
            for i in range(args.runs):
                results["event"].append(event_path(stack, seen, args.timeout))
                results["direct"].append(direct_path(stack, deployment_id, args.timeout))
                print(f"run {i + 1}/{args.runs}: event -> Running "
                      f"{results['event'][-1]['running']:.2f} s, direct -> Running "
                      f"{results['direct'][-1]['running']:.2f} s", flush=True)
            decision = api(stack, "POST", "/artifacts/filter", {
                "artifacts": {"key": {"any_": [f"retraining-check-{MODEL.replace('_', '-')}"]}},
                "sort": "CREATED_DESC", "limit": 1})
    except BaseException:
        print(f"failed; the stack folder (logs, databases) is kept: {tmp}/stack", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    total = time.monotonic() - started

    def med(path: str, key: str) -> float:
        return statistics.median(r[key] for r in results[path])

    rows = [("event -> flow run created (trigger)", "event", "created"),
            ("event -> Running", "event", "running"),
            ("event -> Completed", "event", "completed"),
            ("direct: create_flow_run -> created", "direct", "created"),
            ("direct: create_flow_run -> Running", "direct", "running"),
            ("direct: create_flow_run -> Completed", "direct", "completed")]
    print(f"\n{'retraining-check/default, ' + str(args.runs) + ' runs per path':<40}"
          f"{'median s':>9}{'min':>7}{'max':>7}  runs")
    for label, path, key in rows:
        values = [r[key] for r in results[path]]
        print(f"{label:<40}{med(path, key):>9.2f}{min(values):>7.2f}{max(values):>7.2f}  "
              f"{' '.join(f'{v:.2f}' for v in values)}")
    print(f"{'ratio event / direct, -> Running':<40}"
          f"{med('event', 'running') / med('direct', 'running'):>9.3f}")
    print(f"{'ratio event / direct, -> Completed':<40}"
          f"{med('event', 'completed') / med('direct', 'completed'):>9.3f}")
    print(f"{'trigger overhead (median difference)':<40}"
          f"{med('event', 'running') - med('direct', 'running'):>9.2f}")
    verdict = "met" if med("event", "running") <= GOAL_S else "NOT met"
    print(f"goal: the event starts retraining within {GOAL_S:.0f} s (median event -> Running): "
          f"{med('event', 'running'):.2f} s, {verdict}.")
    print("event: mlops.model.drift-detected emitted directly (emit_model_event, synthetic "
          "payload), t0 = its `occurred`; direct: POST /deployments/{id}/create_flow_run, t0 = "
          "before the request. Completed = a check that decides 'no retraining' (the policy's "
          f"data are the champion's own rows): {decision[0]['description'] if decision else '?'}. "
          f"Whole bench {total:.0f} s incl. stack up/down.")


if __name__ == "__main__":
    main()
