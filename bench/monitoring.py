"""Monitoring on the serving side: what /metrics' MLflow figures and the served-traffic sampler cost.

Everything in one run on a temporary folder (an MLflow SQLite store, the SQLite A/B store), so
the ratios compare figures measured under the same machine load:

1. /metrics figures (api/metric_sources.py) with `--models` registered models, each with a
   champion, `--checks` drift checks, 3 production evaluations and 2 retraining runs recorded the
   way the flows record them (same tags and metrics):
   * a read of MLflow (`read_monitoring_snapshot`) -- what one refresh costs -- against its
     worst case, a search of its own per champion (none among the newest runs of all models);
   * a cached scrape (`generate_latest` on a registry with the collectors) -- what every scrape
     costs between refreshes -- against the reference: the same number of samples from plain
     in-process prometheus-client Gauges and a Counter.
2. The served-traffic sampler (tasks/served_traffic.py):
   * `offer` of one row at a 10 % rate (the request path, writer idle), against a bare no-op
     method call; the same row as a `{column: [values]}` dict, against building a DataFrame of
     it first (what a route would otherwise do on every request);
   * `offer` of a 100-row batch at 10 %;
   * writing sampled rows (`flush`) to SQLite per row, against `ABStore.log_predictions` (the A/B
     prediction log's batched write in the same database) per row;
   * reading them back (`load_served`) per row.

    .venv/bin/python bench/monitoring.py [--models 20] [--checks 5] [--rows 10000]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def populate(client, models: int, checks: int) -> None:
    """Registered models with a champion and the runs the flows record for them."""
    from mlflow.entities import Metric

    experiment = client.create_experiment("bench-monitoring")
    now = int(time.time() * 1000)

    def run(tags: dict, metrics: dict, at: int) -> None:
        r = client.create_run(experiment, start_time=at, tags=tags)
        client.log_batch(r.info.run_id, metrics=[Metric(k, v, at, 0) for k, v in metrics.items()])
        client.set_terminated(r.info.run_id, "FINISHED")

    for i in range(models):
        name = f"bench_model_{i:03d}"
        client.create_registered_model(name)
        client.create_model_version(name, source=f"/tmp/bench/{name}",
                                    tags={"mlops.metric": "roc_auc"})
        client.set_registered_model_alias(name, "champion", 1)
        base = {"mlops.model_name": name, "mlops.model_version": "1"}
        for k in range(checks):
            run({**base, "mlops.kind": "drift-check"}, {"drift_score": 0.1 * k}, now - 1000 * k)
        for k in range(3):
            run({**base, "mlops.kind": "production-evaluation"},
                {"production_accuracy": 0.8 + 0.01 * k}, now - 1000 * k)
        for decision in ("promoted", "not_promoted"):
            run({"mlops.kind": "retraining", "mlops.model_name": name, "mlops.decision": decision},
                {"promoted": 1.0}, now)


def bench_metrics(models: int, checks: int, folder: Path) -> list[tuple[str, float, str, float]]:
    from mlflow.tracking import MlflowClient
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    from api.metric_sources import mlflow_collectors
    from tasks.metric_sources import read_monitoring_snapshot

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    populate(client, models, checks)
    snapshot = read_monitoring_snapshot(client)
    assert len(snapshot.models) == models and snapshot.models[0].accuracy == 0.8

    read = median_s(lambda: read_monitoring_snapshot(client), 5)
    # worst case: no champion among the newest runs, every champion searched alone
    alone = median_s(lambda: read_monitoring_snapshot(client, workers=1, page_size=1), 5)

    registry = CollectorRegistry()
    for c in mlflow_collectors(ttl_s=3600, reader=lambda: read_monitoring_snapshot(client)):
        registry.register(c)
        c.cache.wait_idle()  # the first read (started in the background) is done
    assert b"model_accuracy{" in generate_latest(registry)
    cached = median_s(lambda: generate_latest(registry), 200)

    plain = CollectorRegistry()
    drift = Gauge("model_drift_score", "d", ["model_name", "version"], registry=plain)
    accuracy = Gauge("model_accuracy", "a", ["model_name", "version"], registry=plain)
    runs = Counter("retraining_runs", "r", ["model_name", "decision"], registry=plain)
    for m in snapshot.models:
        drift.labels(m.model_name, "1").set(m.drift_score)
        accuracy.labels(m.model_name, "1").set(m.accuracy)
        for decision in ("promoted", "not_promoted"):
            runs.labels(m.model_name, decision).inc()
    reference = median_s(lambda: generate_latest(plain), 200)
    return [
        (f"refresh: read MLflow, {models} models", read, "vs a search per champion",
         read / alone),
        (f"reference: a search per champion, {models} models", alone, "", 0.0),
        ("cached scrape (every scrape between refreshes)", cached,
         "vs in-process gauges", cached / reference),
        ("reference: same samples from in-process gauges", reference, "", 0.0),
    ]


def bench_sampler(rows: int, folder: Path) -> list[tuple[str, float, str, float]]:
    import numpy as np
    import pandas as pd

    from tasks.ab import ABStore
    from tasks.demo_data import churn_frame
    from tasks.served_traffic import ServedTrafficSampler, load_served

    url = f"sqlite:///{folder / 'ab.db'}"
    frame = churn_frame().drop(columns=["churn"])
    frame = frame.sample(rows, replace=True, random_state=0).reset_index(drop=True)
    one, hundred = frame.iloc[:1], frame.iloc[:100]

    class Bare:
        def offer(self, model_name, version, rows):
            return None

    bare = Bare()
    calls = 20_000
    # the writer stays idle while offer is timed: its cost (JSON + INSERT, in the same process)
    # is measured on its own below, per row written
    sampler = ServedTrafficSampler(0.1, url=url, flush_rows=10**7, flush_seconds=3600,
                                   max_buffer_rows=10**7, seed=1)

    def per_call(target, arg, n=calls):
        def go():
            for _ in range(n):
                target.offer("bench", 1, arg)
        return median_s(go, 5) / n

    offer_bare = per_call(bare, one)
    offer_one = per_call(sampler, one)
    columns = {c: one[c].tolist() for c in one.columns}  # what the service holds after checking
    offer_columns = per_call(sampler, columns)

    class BuildFrame:  # a DataFrame built on the request path for every answered request
        def offer(self, model_name, version, rows):
            sampler.offer(model_name, version, pd.DataFrame(rows))

    offer_built = per_call(BuildFrame(), columns, n=2000)
    offer_batch = per_call(sampler, hundred, n=2000)
    sampler.close()

    writer = ServedTrafficSampler(1.0, url=url, flush_rows=10 * rows, flush_seconds=3600,
                                  max_buffer_rows=10 * rows)
    write_times = []
    for _ in range(3):
        writer.offer("bench_write", 1, frame)
        t = time.perf_counter()
        writer.flush()
        write_times.append(time.perf_counter() - t)
    writer.close()
    write_row = statistics.median(write_times) / rows

    store = ABStore(url)
    log_times = []
    for k in range(3):
        test = store.create_test(
            model_name=f"bench{k}", champion_version=1, challenger_version=2, traffic_split=0.5,
            metric_type="conversion", higher_is_better=True, min_samples_per_arm=10,
            min_duration_days=0, alpha=0.05, power=0.8, srm_threshold=0.001,
            sequential_tuning=1000, test_id=f"bench{k}-20261130-00000{k}")
        keys = [f"k{i}" for i in range(rows)]
        arms = list(np.arange(rows) % 2)
        now = int(time.time() * 1000)
        t = time.perf_counter()
        store.log_predictions(test, keys, arms, ["Yes"] * rows, [0.5] * rows, [now] * rows)
        log_times.append(time.perf_counter() - t)
    log_row = statistics.median(log_times) / rows

    from datetime import datetime, timedelta, timezone
    since = datetime.now(timezone.utc) - timedelta(hours=1)
    read_row = median_s(lambda: load_served("bench_write", since, url=url), 3) / (3 * rows)
    return [
        ("offer 1 row at 10 % (request path)", offer_one, "vs bare method call",
         offer_one / offer_bare),
        ("reference: bare method call", offer_bare, "", 0.0),
        ("offer 1 row as {column: [values]} at 10 %", offer_columns, "vs DataFrame built first",
         offer_columns / offer_built),
        ("reference: pd.DataFrame(columns) then offer", offer_built, "", 0.0),
        ("offer a 100-row batch at 10 %", offer_batch, "vs 1 row", offer_batch / offer_one),
        (f"write sampled rows (flush {rows:,}), per row", write_row,
         "vs A/B log_predictions per row", write_row / log_row),
        (f"reference: ABStore.log_predictions ({rows:,}), per row", log_row, "", 0.0),
        (f"read back (load_served {3 * rows:,}), per row", read_row, "", 0.0),
    ]


def fmt(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:9.2f} ms"
    return f"{seconds * 1e6:9.2f} us"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--checks", type=int, default=5)
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        table = bench_metrics(args.models, args.checks, folder) + bench_sampler(args.rows, folder)
    print(f"\n{'measure':<58} {'median':>12}   ratio")
    for name, seconds, against, ratio in table:
        print(f"{name:<58} {fmt(seconds):>12}   " + (f"{ratio:6.2f}x {against}" if against else ""))


if __name__ == "__main__":
    main()
