"""REST API overhead: the same operations over HTTP and as direct Python calls, in one run.

On a temporary Prefect API (prefect_test_harness) and an embedded MLflow store, the script
registers two small versions of a model, opens an A/B test, starts the REST service in its own
process (`python -m api`, as `make serve` runs it) on a free loopback port and times, interleaved
so both sides see the same machine load:

* `GET models/{name}/versions` vs `read_versions.fn(name)` (what the route calls),
* `GET ab-tests/{id}/results` vs `read_results.fn(test_id)`,
* `POST models/promote` vs `promote_model(...)` (a flow run either way: the audit trail).

It prints p50/p99 of each side and the difference of the medians; the goal is reads adding at
most 5 ms at p50 over the direct call.

    .venv/bin/python bench/api.py [--n 200] [--n-promote 30]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("MLOPS_LOG_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def setup(model: str) -> tuple[str, int, int]:
    import mlflow
    from sklearn.linear_model import LogisticRegression

    from blocks.mlflow_config import resolve_mlflow_config
    from flows.ab_testing import create_ab_test
    from flows.registry import register_model

    config = resolve_mlflow_config()
    experiment = config.ensure_experiment()
    versions = []
    for c in (1.0, 2.0):
        fitted = LogisticRegression(C=c).fit([[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1])
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.sklearn.log_model(fitted, name="model", pip_requirements=["scikit-learn"])
        versions.append(register_model(model, run_id=run.info.run_id).version)
    test_id = create_ab_test(model, versions[0], versions[1], traffic_split=0.2)
    return test_id, versions[0], versions[1]


def serve(port: int) -> subprocess.Popen:
    """`python -m api` in its own process (as `make serve` runs it), on this run's Prefect API."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen([sys.executable, "-m", "api", "--port", str(port)], env=env,
                            cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the API did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="calls per read operation and side")
    parser.add_argument("--n-promote", type=int, default=30, help="promotions per side")
    args = parser.parse_args()

    import httpx
    from prefect.testing.utilities import prefect_test_harness

    home = Path(tempfile.mkdtemp(prefix="bench-api-"))
    os.environ["MLOPS_HOME"] = str(home / "state")
    try:
        with prefect_test_harness(server_startup_timeout=120):
            from api.auth import KeyFile
            from blocks.api_settings import APISettings
            from flows.local_runs import local_run_settings
            from flows.registry import promote_model
            from tasks.ab_tasks import read_results
            from tasks.registry import read_versions

            model = "bench_api"
            with local_run_settings():
                test_id, v1, v2 = setup(model)
                keys = KeyFile(home / "keys.json")
                key = keys.create("bench", ["admin"])[0]
                APISettings(keys_file=str(keys.path)).save("default", overwrite=True)
                port = free_port()
                server = serve(port)
                base = f"http://127.0.0.1:{port}/api/v1/mlops"
                client = httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=60)
                flip = iter(range(10**9))

                def http_promote():
                    r = client.post(f"{base}/models/promote", json={
                        "model_name": model, "version": v1 if next(flip) % 2 else v2,
                        "stage": "challenger"})
                    assert r.status_code == 200, r.text

                def direct_promote():
                    promote_model(model, v1 if next(flip) % 2 else v2, "challenger")

                def http_get(path):
                    def call():
                        r = client.get(base + path)
                        assert r.status_code == 200, r.text
                    return call

                cases = [
                    ("GET models/{name}/versions", http_get(f"/models/{model}/versions"),
                     lambda: read_versions.fn(model), args.n),
                    ("GET ab-tests/{id}/results", http_get(f"/ab-tests/{test_id}/results"),
                     lambda: read_results.fn(test_id), args.n),
                    ("POST models/promote", http_promote, direct_promote, args.n_promote),
                ]
                rows = []
                for label, over_http, direct, n in cases:
                    over_http(), direct()  # warm-up (imports, connections, caches)
                    http_ms, direct_ms = [], []
                    for _ in range(n):  # interleaved: both sides see the same load
                        http_ms += timed(over_http, 1)
                        direct_ms += timed(direct, 1)
                    rows.append((label, n, statistics.median(http_ms), percentile(http_ms, 0.99),
                                 statistics.median(direct_ms), percentile(direct_ms, 0.99)))
                client.close()
                server.terminate()
                server.wait(timeout=30)
    finally:
        shutil.rmtree(home, ignore_errors=True)

    print(f"\nREST API overhead ({os.cpu_count()} cores, `python -m api` process, loopback HTTP, "
          "same run, interleaved)\n")
    print(f"{'operation':<28} {'n':>4}  {'HTTP p50':>9} {'HTTP p99':>9}  {'direct p50':>10} "
          f"{'direct p99':>10}  {'p50 added':>9}")
    for label, n, hp50, hp99, dp50, dp99 in rows:
        print(f"{label:<28} {n:>4}  {hp50:>7.2f}ms {hp99:>7.2f}ms  {dp50:>8.2f}ms {dp99:>8.2f}ms"
              f"  {hp50 - dp50:>+7.2f}ms")
    print("\ngoal: reads add <= 5 ms at p50 over the direct call")


if __name__ == "__main__":
    main()
