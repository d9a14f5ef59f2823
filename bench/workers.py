"""Many retraining checks across many models on one and on two process workers.

On a real stack (deployments/up.sh on free ports in a temporary folder, Prefect server and MLflow
on PostgreSQL when one answers at 127.0.0.1:5432, else SQLite; deployments/down.sh at the end, also
on failure or Ctrl-C) the script measures, for each worker count W in --workers:

1. prepare (once): --models models (`bench_workers_<i>`) each get a champion from `train_model`
   (small search: --max-trials) on the same 600 churn rows. Before each phase the `default`
   RetrainingPolicy names a file with --new-rows more rows than the phase before (rows no
   version has seen), cooldown 0 and a maximum model age of ~9 s: the first check of every model
   retrains, a later one finds no new rows unless its model's challenger was not promoted (as a
   nightly retraining of every model would).
2. load: the stack's own worker is stopped and W process workers are started on
   `ml-retraining-queue`, each running at most --limit flow runs at a time (a worker stands for a
   machine with that many slots). --runs flow runs of `retraining-check/default` are created at
   once, round-robin over the models (so each model gets 2-3 checks queued together).
3. verdict: every run ends; a model's checks never retrain it twice at once (a second one is
   refused by the model's slot and ends Failed with RetrainingInProgressError, by design); every
   registered version is either the champion or a challenger that a retraining record names
   (no duplicate or orphan version); `audit_registry` is clean for every model.

Prints per W: wall time from the first run created to the last one finished, runs by outcome,
the median duration of a finished run and of a retraining (from the retraining records), and the
speed-up of W=2 over W=1 measured in the same run. The per-step costs (train, retraining check) feed the README's
capacity section.

    .venv/bin/python bench/workers.py [--models 20] [--runs 50] [--workers 1,2] [--limit 1]
                                      [--setting KEY=VALUE ...]   # extra up.sh settings
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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

from bench.retraining import api, py  # noqa: E402
from tests.conftest import postgres_available  # noqa: E402
from tests.e2e.conftest import Stack, running_stack  # noqa: E402

DEPLOYMENT = "retraining-check/default"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
REFUSED = "another retraining of"  # RetrainingInProgressError's message

TRAIN_CHAMPIONS = """
import json, sys, time
from flows.training import train_model
names, data, max_trials = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
took = []
for name in names:
    t0 = time.perf_counter()
    train_model(data, "churn", name, max_trials=max_trials, time_budget_s=30)
    took.append(time.perf_counter() - t0)
print(json.dumps(took))
"""
SAVE_POLICY = """
import json, sys
from blocks import RetrainingPolicy
RetrainingPolicy(**json.loads(sys.argv[1])).save("default", overwrite=True)
"""
VERIFY = """
import json, sys
from datetime import datetime
from mlflow import MlflowClient
from blocks import resolve_mlflow_config
from flows.registry import audit_registry
from tasks.retraining import load_history
resolve_mlflow_config().apply()
client = MlflowClient()
out = {}
since = datetime.fromisoformat(sys.argv[2])
for name in json.loads(sys.argv[1]):
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    history = load_history(name)
    recent = [h for h in history if h.started_at and h.started_at >= since]
    report = audit_registry(name)
    out[name] = {"versions": versions,
                 "challengers": [h.challenger_version for h in history if h.challenger_version],
                 "retrainings": len(recent),
                 "retraining_s": [h.duration_s for h in recent if h.duration_s],
                 "champion": report.aliases.get("champion"),
                 "audit_ok": report.ok,
                 "findings": [f.message for f in report.findings]}
print(json.dumps(out))
"""


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def deployment_id(stack: Stack, full_name: str) -> str:
    flows = {f["id"]: f["name"] for f in api(stack, "POST", "/flows/filter", {})}
    for d in api(stack, "POST", "/deployments/filter", {}):
        if f"{flows.get(d['flow_id'])}/{d['name']}" == full_name:
            return d["id"]
    raise RuntimeError(f"deployment {full_name} not found on the stack")


def worker_env(stack: Stack) -> dict[str, str]:
    """What up.sh gives its worker: the stack's Prefect home and API, the project importable."""
    home = stack.stack_dir / "prefect"
    return stack.env | {"PREFECT_API_URL": stack.prefect_api, "PREFECT_HOME": str(home),
                        "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
                        "PYTHONPATH": str(ROOT), "PREFECT_WORKER_QUERY_SECONDS": "1",
                        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}


def stop_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)


def start_workers(stack: Stack, count: int, limit: int, tag: str) -> list[subprocess.Popen]:
    procs = []
    for i in range(count):
        log = open(stack.stack_dir / "logs" / f"bench-worker-{tag}-{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "mlops",
             "--work-queue", "ml-retraining-queue", "--type", "process", "--limit", str(limit),
             "--name", f"bench-worker-{tag}-{i}"],
            cwd=ROOT, env=worker_env(stack), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))
    return procs


def stop_stack_worker(stack: Stack) -> None:
    pidfile = stack.stack_dir / "pids" / "worker.pid"
    if pidfile.exists():
        stop_group(int(pidfile.read_text().split()[0]))


def wait_all(stack: Stack, ids: list[str], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        runs = api(stack, "POST", "/flow_runs/filter",
                   {"flow_runs": {"id": {"any_": ids}}, "limit": len(ids)})
        if len(runs) == len(ids) and all(r["state_type"] in TERMINAL for r in runs):
            return runs
        if time.monotonic() > deadline:
            left = [r for r in runs if r["state_type"] not in TERMINAL]
            raise TimeoutError(f"{len(left)} of {len(ids)} runs not finished after {timeout:.0f}s")
        time.sleep(1)


def outcome(run: dict) -> str:
    if run["state_type"] == "COMPLETED":
        return "completed"
    if run["state_type"] == "FAILED" and REFUSED in (run["state"].get("message") or ""):
        return "refused (slot busy)"
    return run["state_type"].lower()


def train_champions(stack: Stack, tmp: Path, names: list[str], args) -> list[float]:
    t0 = time.monotonic()
    trained = json.loads(py(stack, TRAIN_CHAMPIONS, json.dumps(names), str(tmp / "base.csv"),
                            str(args.max_trials), timeout=60 * args.models).strip().splitlines()[-1])
    print(f"{len(names)} champions trained in {time.monotonic() - t0:.0f} s "
          f"(median {statistics.median(trained):.1f} s each)", flush=True)
    return trained


def save_policy(stack: Stack, data: Path, args) -> None:
    py(stack, SAVE_POLICY, json.dumps({
        "training_data": str(data), "target": "churn", "cooldown_hours": 0, "min_new_rows": 50,
        "max_trials": args.max_trials, "time_budget_s": 30,
        "max_model_age_days": args.max_age_days}))


def phase(stack: Stack, names: list[str], workers: int, args) -> dict:
    procs = start_workers(stack, workers, args.limit, str(workers))
    try:
        time.sleep(5)  # workers register and poll
        dep = deployment_id(stack, DEPLOYMENT)
        started = time.monotonic()
        since = datetime.now(timezone.utc).isoformat()
        ids = [api(stack, "POST", f"/deployments/{dep}/create_flow_run",
                   {"parameters": {"model_name": names[i % len(names)], "trigger": "manual"}})["id"]
               for i in range(args.runs)]
        runs = wait_all(stack, ids, args.timeout)
        wall = time.monotonic() - started
    finally:
        for p in procs:
            stop_group(p.pid)
    verify = json.loads(py(stack, VERIFY, json.dumps(names), since,
                           timeout=30 * args.models).strip().splitlines()[-1])
    outcomes: dict[str, int] = {}
    for r in runs:
        outcomes[outcome(r)] = outcomes.get(outcome(r), 0) + 1
    problems = []
    for name, v in verify.items():
        known = {1, *v["challengers"]}
        extra = sorted(set(v["versions"]) - known)
        if extra:
            problems.append(f"{name}: versions {extra} that no retraining record names")
        if len(v["challengers"]) != len(set(v["challengers"])):
            problems.append(f"{name}: a challenger version recorded twice {v['challengers']}")
        if not v["audit_ok"]:
            problems.append(f"{name}: audit {v['findings']}")
    unexpected = {k: n for k, n in outcomes.items() if k not in ("completed", "refused (slot busy)")}
    if unexpected:
        problems.append(f"runs ended {unexpected}: " + "; ".join(
            f"{r['id']}: {r['state'].get('message')}" for r in runs
            if outcome(r) in unexpected)[:2000])
    completed_s = [(ts(r["end_time"]) - ts(r["start_time"])).total_seconds() for r in runs
                   if r["state_type"] == "COMPLETED" and r["start_time"] and r["end_time"]]
    retraining_s = [d for v in verify.values() for d in v["retraining_s"]]
    return {"workers": workers, "wall": wall, "outcomes": outcomes, "completed_s": completed_s,
            "retraining_s": retraining_s, "retrainings": sum(v["retrainings"] for v in verify.values()),
            "versions": sum(len(v["versions"]) for v in verify.values()), "problems": problems}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--workers", default="1,2", help="worker counts to measure (default 1,2)")
    parser.add_argument("--limit", type=int, default=1,
                        help="flow runs one worker runs at a time (default 1)")
    parser.add_argument("--max-trials", type=int, default=3)
    parser.add_argument("--new-rows", type=int, default=200)
    parser.add_argument("--max-age-days", type=float, default=1e-4,
                        help="the policy's max_model_age_days: the trigger that fires (default "
                             "1e-4 days, ~9 s: every champion is old enough, like a nightly "
                             "retraining of every model)")
    parser.add_argument("--timeout", type=float, default=3600, help="bound of one load phase (s)")
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for deployments/up.sh (repeatable)")
    args = parser.parse_args()
    # SIGTERM (timeout, kill) ends like Ctrl-C: the stack is stopped and the databases dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = [int(w) for w in args.workers.split(",")]
    settings = dict(s.split("=", 1) for s in args.setting)
    databases = []
    if postgres_available() and not {"PREFECT_DATABASE_URL", "MLFLOW_BACKEND_STORE_URI"} & set(settings):
        base = f"postgres@127.0.0.1:5432/bench_workers_{os.getpid()}"
        databases = [f"postgresql+asyncpg://{base}_prefect", f"postgresql://{base}_mlflow"]
        settings |= {"PREFECT_DATABASE_URL": databases[0], "MLFLOW_BACKEND_STORE_URI": databases[1]}

    from tasks.demo_data import churn_frame

    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    frame = churn_frame().sample(frac=1.0, random_state=3)
    frame.iloc[:600].to_csv(tmp / "base.csv", index=False)
    for k in range(len(counts)):
        frame.iloc[:600 + (k + 1) * args.new_rows].to_csv(tmp / f"labelled-{k}.csv", index=False)
    results = []
    started = time.monotonic()
    try:
        with running_stack(tmp, **settings) as stack:
            backend = "PostgreSQL" if databases or "PREFECT_DATABASE_URL" in settings else "SQLite"
            print(f"stack up in {stack.up_seconds:.0f} s ({backend}; {stack.prefect_api})", flush=True)
            stop_stack_worker(stack)
            names = [f"bench_workers_{i:02d}" for i in range(args.models)]
            trained = train_champions(stack, tmp, names, args)
            for k, w in enumerate(counts):
                # Each phase's labelled data hold --new-rows rows no version has seen yet.
                save_policy(stack, tmp / f"labelled-{k}.csv", args)
                results.append(phase(stack, names, w, args))
                r = results[-1]
                print(f"[W={w}] {args.runs} runs in {r['wall']:.0f} s: {r['outcomes']}; "
                      f"{r['retrainings']} retrainings, problems: {r['problems'] or 'none'}",
                      flush=True)
    except BaseException:
        print(f"failed; the stack folder (logs, databases) is kept: {tmp}/stack", file=sys.stderr)
        raise
    finally:
        for url in databases:
            subprocess.run([sys.executable, str(ROOT / "deployments" / "stack.py"), "drop-db", url],
                           capture_output=True, text=True, timeout=60)
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{args.runs} retraining-check runs over {args.models} models, each worker "
          f"--limit {args.limit}, max_trials {args.max_trials} (2 cores)")
    print(f"{'workers':>7}{'wall s':>9}{'runs/min':>10}{'retrained':>10}{'refused':>9}"
          f"{'other':>7}{'versions':>9}{'run s':>8}{'retrain s':>10}  audit / duplicates")
    for r in results:
        completed = r["outcomes"].get("completed", 0)
        refused = r["outcomes"].get("refused (slot busy)", 0)
        other = args.runs - completed - refused
        med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
        print(f"{r['workers']:>7}{r['wall']:>9.0f}{args.runs / r['wall'] * 60:>10.1f}"
              f"{r['retrainings']:>10}{refused:>9}{other:>7}{r['versions']:>9}"
              f"{med(r['completed_s']):>8.1f}{med(r['retraining_s']):>10.1f}  "
              f"{'clean' if not r['problems'] else 'PROBLEMS'}")
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            print(f"speed-up W={r['workers']} over W={base['workers']}: "
                  f"{base['wall'] / r['wall']:.2f}x (same run, same stack)")
    print(f"champion training (train_model, max_trials {args.max_trials}, 600 rows): median "
          f"{statistics.median(trained):.1f} s. Whole bench "
          f"{time.monotonic() - started:.0f} s incl. stack up/down.")
    if any(r["problems"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
