"""Online serving throughput: our /predict vs `mlflow models serve` vs a bare FastAPI route.

On a temporary Prefect API (prefect_test_harness) and an embedded MLflow store, the script
trains two HistGradientBoosting versions of a churn model on an 8-column table, exports both to
ONNX, opens an A/B test between them, then starts, each with 2 uvicorn workers on a free
loopback port:

1. our service (`python -m api --workers 2`): `POST /api/v1/mlops/models/{name}/predict` with
   a distinct id per request (so the A/B test routes and logs every row);
2. `mlflow models serve -m models:/{name}/1 --workers 2 --env-manager local`:
   `POST /invocations` with `dataframe_records`;
3. a bare FastAPI route answering a constant (bench/serving_bare.py): the ceiling for Python
   HTTP on this machine.

Load: `wrk` (Debian package `wrk`), 8 connections, `--duration` seconds per measurement; single
rows, then 100-row batches. The targets are measured in turn, `--rounds` times (interleaved, the
machine is shared and noisy); the table shows medians. After the last round our service is
stopped with SIGTERM and the rows logged to the A/B store are compared with the rows it
answered (its `model_predictions_total`, read from /metrics just before).

`mlflow models serve` runs uvicorn's own multi-worker mode, whose connections keep Nagle's
algorithm on (api/server.py explains; about 40 ms per answer); ours and the bare route run with
api/server.py, which turns it off and sends each answer's head and body in one write. That is
part of the gap, and it is what users of each get.

The machine is shared: the bare route's p99 in the same run says how much of our tail is the
machine's (the report prints both). `--targets ours,bare` leaves mlflow serve out (a quicker
check of our latency).

Ids: by default each request carries a new id, so every answered row also routes a new id into
the A/B store (the routed ids table and its index grow with every row: the store's worst case,
and the default because the goal must hold under it). `--id-pool 100000` draws the ids from
100,000 returning users instead, as a test on a customer base sees. `--store postgres` logs to a
fresh database on the PostgreSQL at 127.0.0.1:5432 (the production stack's store) instead of the
embedded SQLite file.

Goal, in every round (the store grows round after round): our single-row req/s >= 10x mlflow
serve's, p99 <= 10 ms, 0 errors; and rows logged = rows answered.

    .venv/bin/python bench/serving.py [--duration 10] [--rounds 2] [--targets ours,mlflow,bare]
        [--id-pool 0] [--store sqlite|postgres]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("MLOPS_LOG_LEVEL", "WARNING")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "bench_serving"
FEATURES = ["tenure", "monthly_charges", "total_charges", "contract", "internet_service",
            "payment_method", "senior_citizen", "paperless_billing"]
CONNECTIONS = 8
BATCH = 100

# wrk script: one body per request; `{ID}` in the body becomes an id: with POOL = 0 a counter
# unique per request (prefixed by the measurement and the wrk thread, so no id repeats within a
# run), else one of POOL ids `user-<n>` drawn at random (returning users). done() prints the
# totals as JSON.
LUA = r"""
local counter = 0
local prefix = ""
local pool = %POOL%
local threads = 0
local body = [==[%BODY%]==]
function setup(thread)
  threads = threads + 1
  thread:set("prefix", "m%RUN%t" .. threads .. "-")
  thread:set("seed", %RUN% * 1000 + threads)
end
function init(args) math.randomseed(seed) end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
%HEADERS%
local function next_id()
  if pool > 0 then return "user-" .. math.random(1, pool) end
  counter = counter + 1
  return prefix .. counter
end
request = function()
  local b = body:gsub("{ID}", next_id)
  return wrk.format(nil, nil, nil, b)
end
done = function(summary, latency, requests)
  io.write(string.format('\nRESULT {"requests": %d, "non2xx": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "p50": %d, "p99": %d, "seconds": %f}\n',
    summary.requests, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, latency:percentile(50),
    latency:percentile(99), summary.duration / 1e6))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(rows: int = 2000):
    """Two HGB versions (both exported to ONNX), an A/B test between them, an API key."""
    from api.auth import KeyFile
    from blocks.mlflow_config import resolve_mlflow_config, state_dir
    from flows.ab_testing import create_ab_test
    from flows.export import export_model
    from flows.training import train_model
    from tasks.demo_data import churn_frame

    resolve_mlflow_config().apply()
    data = churn_frame().sample(rows, random_state=1)[[*FEATURES, "churn"]]
    half = rows // 2
    for part, promote in ((data.iloc[:half], "auto"), (data.iloc[half:], "never")):
        train_model(part, "churn", MODEL, time_budget_s=8,
                    candidates=["hist_gradient_boosting"], promote=promote, max_trials=4)
    for version in (1, 2):
        export_model(MODEL, version, formats=["onnx"])
    test_id = create_ab_test(MODEL, 1, 2, traffic_split=0.5)
    key = KeyFile(state_dir() / "api" / "keys.json").create("bench", ["read"])[0]
    sample = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
              for r in data.drop(columns="churn").iloc[:BATCH].to_dict("records")]
    return test_id, key, sample


def start(cmd: list[str], env: dict, ready_url: str, log: Path, timeout: float = 180,
          method: str = "GET") -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < 10:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{cmd[:4]} not ready in {timeout} s: {log.read_text()[-2000:]}")
        try:
            ok = httpx.request(method, ready_url, timeout=5).status_code == 200
        except httpx.TransportError:
            ok = False
        streak = streak + 1 if ok else 0
        time.sleep(0.05 if ok else 0.5)
    return proc


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM to the server (uvicorn's supervisor passes it to its workers)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


_RUNS = iter(range(1, 10**6))


def wrk(url: str, body: str, headers: dict[str, str], seconds: float, workdir: Path,
        id_pool: int = 0) -> dict:
    run = next(_RUNS)
    script = workdir / f"wrk-{run}.lua"
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    script.write_text(LUA.replace("%BODY%", body).replace("%HEADERS%", lines)
                      .replace("%POOL%", str(int(id_pool))).replace("%RUN%", str(run)))
    out = subprocess.run(["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{int(seconds)}s", "--timeout", "5s",
                          "-s", str(script), url], capture_output=True, text=True,
                         timeout=seconds + 60)
    match = re.search(r"^RESULT (\{.*\})$", out.stdout, re.M)
    if match is None:
        raise RuntimeError(f"wrk said: {out.stdout[-1500:]} {out.stderr[-1500:]}")
    r = json.loads(match.group(1))
    r["errors"] = r["non2xx"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    r["rps"] = r["requests"] / r["seconds"]
    return r


def bodies(sample: list[dict], n: int) -> dict[str, str]:
    rows = sample[:n]
    return {
        "ours": json.dumps({"rows": rows, "ids": ["{ID}"] * n}),
        "mlflow": json.dumps({"dataframe_records": rows}),
        "bare": json.dumps({"rows": rows}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (medians)")
    parser.add_argument("--targets", default="ours,mlflow,bare",
                        help="comma-separated servers to measure, among ours, mlflow, bare "
                             "(ours is always measured)")
    parser.add_argument("--id-pool", type=int, default=0,
                        help="ids our requests carry: 0 (default) a new id per request, so every "
                             "answered row also routes a new id into the A/B store (its routed "
                             "ids table and index grow with every row: the store's worst case, "
                             "the default, so the goal has to hold under it); N > 0 draws "
                             "ids from N returning users (e.g. 100000: a test on a customer base, "
                             "where ids repeat and the routed ids stop growing)")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite",
                        help="the A/B store the service logs to: the embedded SQLite file "
                             "(default, as installed) or a fresh database on the PostgreSQL at "
                             "127.0.0.1:5432 (user postgres; dropped at the end), as the "
                             "production stack runs")
    args = parser.parse_args()
    if args.id_pool < 0:
        parser.error("--id-pool: 0 (a new id per request) or a positive number of ids")
    targets = ["ours", *[t for t in ("mlflow", "bare") if t in args.targets.split(",")]]
    unknown = set(args.targets.split(",")) - {"ours", "mlflow", "bare"}
    if unknown:
        parser.error(f"--targets: unknown {sorted(unknown)}; choose among ours, mlflow, bare")
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")

    from prefect.testing.utilities import prefect_test_harness

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    os.environ["MLOPS_HOME"] = str(work / "state")
    procs: list[subprocess.Popen] = []
    pg_url = (f"postgresql+psycopg2://postgres@127.0.0.1:5432/serving_bench_{os.getpid()}"
              if args.store == "postgres" else None)
    if pg_url is not None:
        pg_database("ensure-db", pg_url)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            from prefect.settings import PREFECT_API_URL

            if pg_url is not None:
                from blocks.ab_policy import ABPolicy
                from blocks.mlflow_config import DEFAULT_DOCUMENT

                ABPolicy(database_url=pg_url).save(DEFAULT_DOCUMENT, overwrite=True)
            print("setting up: 2 HGB versions, ONNX exports, an A/B test ...", flush=True)
            test_id, key, sample = setup()
            env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
                   # mlflow models serve execs `uvicorn` from PATH: the venv's
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            from blocks.mlflow_config import resolve_mlflow_config

            env["MLFLOW_TRACKING_URI"] = resolve_mlflow_config().tracking_uri
            ports = {name: free_port() for name in ("ours", "mlflow", "bare")}
            urls = {
                "ours": f"http://127.0.0.1:{ports['ours']}/api/v1/mlops/models/{MODEL}/predict",
                "mlflow": f"http://127.0.0.1:{ports['mlflow']}/invocations",
                "bare": f"http://127.0.0.1:{ports['bare']}/predict"}
            headers = {"ours": {"Authorization": f"Bearer {key}"}, "mlflow": {}, "bare": {}}
            print("starting the three servers (2 workers each) ...", flush=True)
            ours = start([sys.executable, "-m", "api", "--port", str(ports["ours"]),
                          "--workers", "2"], env,
                         f"http://127.0.0.1:{ports['ours']}/v2/health/ready", work / "ours.log")
            procs.append(ours)
            if "mlflow" in targets:
                procs.append(start([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                                    f"models:/{MODEL}/1", "--workers", "2", "--env-manager",
                                    "local", "-p", str(ports["mlflow"])], env,
                                   f"http://127.0.0.1:{ports['mlflow']}/ping",
                                   work / "mlflow.log"))
            if "bare" in targets:
                procs.append(start([sys.executable, "bench/serving_bare.py", str(ports["bare"])],
                                   env, f"http://127.0.0.1:{ports['bare']}/predict",
                                   work / "bare.log", method="POST"))
            results: dict[tuple[str, int], list[dict]] = {}
            for rnd in range(args.rounds):
                print(f"round {rnd + 1}: {logged_rows():,} rows in the A/B prediction log",
                      flush=True)
                for n in (1, BATCH):
                    body = bodies(sample, n)
                    for name in targets:
                        if n > 1 and name == "bare":
                            continue  # a constant: batches tell nothing more
                        r = wrk(urls[name], body[name], headers[name], args.duration, work,
                                id_pool=args.id_pool if name == "ours" else 0)
                        results.setdefault((name, n), []).append(r)
                        print(f"round {rnd + 1} {name:6s} rows={n:3d}: {r['rps']:8.0f} req/s "
                              f"p50 {r['p50'] / 1000:6.2f} ms p99 {r['p99'] / 1000:6.2f} ms "
                              f"errors {r['errors']}", flush=True)
            # the service's own count (wrk leaves out the answers in flight when it stops)
            answered = served_rows(f"http://127.0.0.1:{ports['ours']}/metrics")
            code = stop(ours)
            procs.remove(ours)
            logged = logged_rows()
            print(f"\nA/B store: {args.store}; ids: "
                  + (f"a pool of {args.id_pool:,}" if args.id_pool else "a new one per request"))
            report(results, answered, logged, code)
            from tasks.ab import dispose_engines

            dispose_engines()
    finally:
        for p in procs:
            stop(p, timeout=20)
        if pg_url is not None:
            pg_database("drop-db", pg_url)
        shutil.rmtree(work, ignore_errors=True)


def pg_database(action: str, url: str) -> None:
    """`ensure-db` / `drop-db` of a PostgreSQL database, as `make up` does (deployments/stack.py)."""
    done = subprocess.run([sys.executable, str(ROOT / "deployments" / "stack.py"), action, url],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SystemExit(f"{action} {url} failed: {done.stderr.strip()}")


def served_rows(metrics_url: str) -> int:
    """The service's answered rows once the requests wrk left in flight are done (the count
    stays the same over a second)."""
    import httpx

    def read() -> int:
        text = httpx.get(metrics_url, timeout=30).text
        return int(sum(float(m.group(1)) for m in re.finditer(
            r"^model_predictions_total\{[^}]*\} (\S+)$", text, re.M)))

    count = read()
    for _ in range(20):
        time.sleep(1.0)
        now = read()
        if now == count:
            return count
        count = now
    return count


def logged_rows() -> int:
    import sqlalchemy as sa

    from tasks.ab import open_store, predictions_table

    with open_store().engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(predictions_table)).scalar()


def report(results: dict, answered: int, logged: int, exit_code: int) -> None:
    def med(name, n, field):
        return statistics.median(r[field] for r in results[(name, n)])

    print("\nsingle rows, 8 connections, 2 workers each (medians of the rounds)")
    print(f"{'server':38s} {'req/s':>9s} {'p50 ms':>7s} {'p99 ms':>7s} {'errors':>6s} "
          f"{'vs mlflow':>9s}")
    ref = med("mlflow", 1, "rps") if ("mlflow", 1) in results else None
    titles = {"ours": "ours: /predict, A/B test, logging on", "mlflow": "mlflow models serve",
              "bare": "bare FastAPI constant (ceiling)"}
    for name in ("ours", "mlflow", "bare"):
        if (name, 1) not in results:
            continue
        errors = sum(r["errors"] for r in results[(name, 1)])
        versus = f"{med(name, 1, 'rps') / ref:8.1f}x" if ref else f"{'-':>9s}"
        print(f"{titles[name]:38s} {med(name, 1, 'rps'):9.0f} {med(name, 1, 'p50') / 1000:7.2f} "
              f"{med(name, 1, 'p99') / 1000:7.2f} {errors:6d} {versus}")
    print(f"\n{BATCH}-row batches")
    print(f"{'server':38s} {'rows/s':>9s} {'p50 ms':>7s} {'p99 ms':>7s} {'errors':>6s} "
          f"{'vs mlflow':>9s}")
    ref_b = med("mlflow", BATCH, "rps") * BATCH if ref else None
    for name in ("ours", "mlflow"):
        if (name, BATCH) not in results:
            continue
        errors = sum(r["errors"] for r in results[(name, BATCH)])
        rows = med(name, BATCH, "rps") * BATCH
        versus = f"{rows / ref_b:8.1f}x" if ref_b else f"{'-':>9s}"
        print(f"{titles[name]:38s} {rows:9.0f} {med(name, BATCH, 'p50') / 1000:7.2f} "
              f"{med(name, BATCH, 'p99') / 1000:7.2f} {errors:6d} {versus}")
    ratio = med("ours", 1, "rps") / ref if ref else float("nan")
    p99 = med("ours", 1, "p99") / 1000
    if ("bare", 1) in results:
        print(f"\nsingle-row p99 in this run: ours {p99:.2f} ms, bare route "
              f"{med('bare', 1, 'p99') / 1000:.2f} ms (the machine's share of the tail)")
    errors = sum(r["errors"] for (name, _), rs in results.items() if name == "ours" for r in rs)
    print(f"\nrows answered by ours {answered:,}; rows in the A/B prediction log after SIGTERM "
          f"{logged:,} (exit code {exit_code})")
    # the goal holds in every round, not only in the medians: the A/B store grows round after
    # round, and a later round is where a store that slows down with its size shows
    ours = results[("ours", 1)]
    refs = results.get(("mlflow", 1))
    round_ok = []
    print()
    for i, r in enumerate(ours):
        x = r["rps"] / refs[i]["rps"] if refs else float("nan")
        ok = x >= 10 and r["p99"] / 1000 <= 10 and r["errors"] == 0
        round_ok.append(ok)
        print(f"round {i + 1}: ours {r['rps']:,.0f} req/s = {x:.1f}x mlflow serve, p99 "
              f"{r['p99'] / 1000:.2f} ms, {r['errors']} errors: {'met' if ok else 'NOT met'}")
    met = all(round_ok) and errors == 0 and answered == logged
    worst = max(r["p99"] for r in ours) / 1000
    low = min((r["rps"] / refs[i]["rps"] for i, r in enumerate(ours)), default=float("nan")) \
        if refs else float("nan")
    print(f"goal (in every round: >= 10x mlflow req/s, p99 <= 10 ms, 0 errors; logged = "
          f"answered): {'met' if met else 'NOT met'} (median {ratio:.1f}x, p99 {p99:.2f} ms; "
          f"worst round {low:.1f}x, p99 {worst:.2f} ms; {errors} errors)")


if __name__ == "__main__":
    main()
