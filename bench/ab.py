"""A/B results on a big log: the store's running sums versus loading the log with pandas.

For each backend (SQLite in a temporary folder; PostgreSQL too when one answers at
127.0.0.1:5432, in a scratch database dropped afterwards) the script:

1. creates a test through the store and fills its log with `--rows` predictions (default 10M),
   each with an outcome: one ``ab_units`` row (key, arm, outcome) and one ``ab_predictions`` row
   per key, generated inside the database (INSERT ... SELECT over a generated series) because
   pushing 10M rows through Python would dominate the run; the routing share is 20 %, the rates
   10 % (champion) and 11 % (challenger);
2. rebuilds the per-arm running sums from the log once (``ABStore.rebuild_arm_stats``, the same
   aggregation as ``ABStore.recount``) -- the write path keeps them current in normal use;
3. times, in the same run and on the same rows:
   * ``ab_test_results`` statistics (``read_results``: the store's running sums -> every number
     of ABResults) -- the call the issue's goal (<= 2 s on SQLite) is about,
   * the whole ``ab_test_results`` flow (Prefect run, artifacts, the MLflow plot) on a temporary
     Prefect API and MLflow store,
   * ``ABStore.recount(predictions=False)``: one SQL aggregation of routed keys, n, sum and sum
     of squares per arm over the covering index ``ab_units_covering`` (the alternative to running
     sums, docs/architecture.md "SQL aggregation"),
   * pandas: ``read_sql`` of the log (predictions and outcomes), then the same numbers;
   and checks that all of them agree before printing the table.

Bounded: `--rows` sets the size (the pandas load is the slow part: about 2-4 s per million rows
here); `--max-pandas-rows` (default 10M) caps the pandas side; `--backends sqlite` skips
PostgreSQL.

    .venv/bin/python bench/ab.py [--rows 10000000] [--backends sqlite,postgres]
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import logging  # noqa: E402

import pandas as pd  # noqa: E402

logging.getLogger("mlflow").setLevel(logging.WARNING)

from tasks import ab  # noqa: E402
from tasks.ab import ABStore, ArmTotals, dispose_engines  # noqa: E402
from tasks.ab_tasks import analyse  # noqa: E402

SPLIT = 0.2
RATES = {0: 0.10, 1: 0.11}  # champion, challenger
# arms and outcomes from integer hashes of the row number, computed inside the database:
# arm = 1 when (i * 2654435761) mod 1000003 < SPLIT * 1000003; outcome = 1 when
# (i * 40503 + 12345) mod 999983 < rate * 999983.
ARM_SQL = f"CASE WHEN (i * 2654435761) % 1000003 < {int(SPLIT * 1000003)} THEN 1 ELSE 0 END"


def outcome_sql(arm_expr: str) -> str:
    return (f"CASE WHEN (i * 40503 + 12345) % 999983 < (CASE WHEN {arm_expr} = 1 THEN "
            f"{int(RATES[1] * 999983)} ELSE {int(RATES[0] * 999983)} END) THEN 1.0 ELSE 0.0 END")


def postgres_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


def populate(store: ABStore, test_pk: int, rows: int, chunk: int = 1_000_000) -> float:
    """Fill the log inside the database; returns seconds."""
    started = time.perf_counter()
    t0 = 1_790_000_000_000
    for lo in range(0, rows, chunk):
        hi = min(rows, lo + chunk)
        if store.backend == "sqlite":
            series = (f"WITH RECURSIVE s(i) AS (SELECT {lo} UNION ALL SELECT i + 1 FROM s "
                      f"WHERE i < {hi - 1}) ")
            source = "FROM s"
            key = "'u' || i"
        else:
            series = ""
            source = f"FROM generate_series({lo}::bigint, {hi - 1}::bigint) AS s(i)"
            key = "'u' || i::text"
        statements = [
            f"{series}INSERT INTO ab_units (test_pk, unit_key, arm, first_seen_ms, outcome, "
            f"outcome_ms) SELECT {test_pk}, {key}, {ARM_SQL}, {t0} + i, "
            f"{outcome_sql(ARM_SQL)}, {t0} + i + 60000 {source}",
            f"{series}INSERT INTO ab_predictions (test_pk, unit_key, arm, version, "
            f"predicted_ms, prediction, score) SELECT {test_pk}, {key}, {ARM_SQL}, "
            f"CASE WHEN {ARM_SQL} = 1 THEN 2 ELSE 1 END, {t0} + i, 'No', 0.25 {source}"]
        with store.engine.execution_options(ab_write=True).begin() as conn:
            if store.backend == "postgresql" and conn.exec_driver_sql(
                    "SELECT rolsuper FROM pg_roles WHERE rolname = current_user").scalar():
                # bulk fill (superuser only): skip the per-row foreign-key triggers
                conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
            for statement in statements:
                if store.backend == "postgresql":  # psycopg2 reads % as a parameter marker
                    statement = statement.replace("%", "%%")
                conn.exec_driver_sql(statement)
        print(f"  {store.backend}: {hi:,} rows logged ({time.perf_counter() - started:.0f} s)",
              flush=True)
    if store.backend == "postgresql":
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE ab_units")
            conn.exec_driver_sql("VACUUM ANALYZE ab_predictions")
    return time.perf_counter() - started


def pandas_numbers(store: ABStore, test: ab.TestRecord) -> tuple[dict, float]:
    """Load the log (predictions and outcomes) with pandas and compute the per-arm numbers."""
    started = time.perf_counter()
    raw = store.engine.raw_connection()  # the driver's own connection: pandas' fastest path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pandas prefers SQLAlchemy for psycopg2
            predictions = pd.read_sql(f"SELECT unit_key, arm FROM ab_predictions WHERE test_pk = "
                                      f"{int(test.pk)}", raw.driver_connection)
            units = pd.read_sql(f"SELECT unit_key, arm, outcome FROM ab_units WHERE test_pk = "
                                f"{int(test.pk)}", raw.driver_connection)
    finally:
        raw.close()
    arms = {}
    for code, name in ab.ARM_NAMES.items():
        unit_arm = units[units.arm == code]
        done = unit_arm.outcome.dropna()
        arms[name] = ArmTotals(
            arm=name, version=test.version_of(name),
            routed=int(predictions.loc[predictions.arm == code, "unit_key"].nunique()),
            predictions=int((predictions.arm == code).sum()), n=int(done.size),
            total=float(done.sum()), total_sq=float((done ** 2).sum()))
    results = analyse(test, arms)
    elapsed = time.perf_counter() - started
    del predictions, units
    gc.collect()
    return {"arms": arms, "results": results}, elapsed


def timed(fn, repeats: int = 3):
    best, value = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return value, best


def bench_backend(url: str, rows: int, max_pandas_rows: int, home: Path) -> dict:
    from prefect.testing.utilities import prefect_test_harness

    from flows.ab_testing import ab_test_results
    from tasks.ab_tasks import read_results

    store = ABStore(url)
    test = store.create_test(
        model_name="bench_ab", champion_version=1, challenger_version=2, traffic_split=SPLIT,
        metric_type="conversion", higher_is_better=True, min_samples_per_arm=1000,
        min_duration_days=0, alpha=0.05, power=0.8, srm_threshold=0.001,
        sequential_tuning=10_000, test_id=f"bench-ab-20260101-{uuid.uuid4().hex[:6]}")
    fill_s = populate(store, test.pk, rows)
    _, rebuild_s = timed(lambda: store.rebuild_arm_stats(test), repeats=1)
    recount = store.recount(test)
    _, recount_s = timed(lambda: store.recount(test, predictions=False), repeats=1)
    os.environ["MLOPS_HOME"] = str(home / "state")
    with prefect_test_harness(server_startup_timeout=120):
        from blocks.ab_policy import ABPolicy
        from blocks.mlflow_config import DEFAULT_DOCUMENT

        ABPolicy(database_url=url).save(DEFAULT_DOCUMENT, overwrite=True)
        results, task_s = timed(lambda: read_results.fn(test.test_id))
        _, results_s = timed(lambda: analyse(*store.state(test.test_id)))
        # one-off process/environment costs are not the flow's: the MLflow store's migrations,
        # the experiment, matplotlib's import
        from blocks.mlflow_config import resolve_mlflow_config
        import matplotlib.pyplot  # noqa: F401

        resolve_mlflow_config().ensure_experiment()
        first = time.perf_counter()
        ab_test_results(test.test_id)  # first look: creates the MLflow run, renders the plot
        first_s = time.perf_counter() - first
        flow_results, flow_s = timed(lambda: ab_test_results(test.test_id), repeats=3)
        from flows.local_runs import local_run_settings

        with local_run_settings():  # in-process runs: no heartbeat thread to join at exit
            _, local_s = timed(lambda: ab_test_results(test.test_id), repeats=3)
    pandas = None
    pandas_s = None
    if rows <= max_pandas_rows:
        pandas, pandas_s = pandas_numbers(store, test)
    # every path must give the same numbers
    for name, arm in results.arms.items():
        assert (arm.routed, arm.n, arm.successes, arm.predictions) == (
            recount[name]["routed"], recount[name]["n"], round(recount[name]["total"]),
            recount[name]["predictions"]), (name, arm, recount[name])
        if pandas:
            p = pandas["results"].arms[name]
            assert (p.routed, p.n, p.successes, p.predictions) == (
                arm.routed, arm.n, arm.successes, arm.predictions), (name, p, arm)
    if pandas:
        assert pandas["results"].p_value == results.p_value
        assert pandas["results"].sequential_p_value == results.sequential_p_value
    assert flow_results.p_value == results.p_value and flow_results.plot_uri, flow_results
    return {"backend": store.backend, "rows": rows, "fill_s": fill_s, "rebuild_s": rebuild_s,
            "results_s": results_s, "task_s": task_s, "flow_s": flow_s, "first_s": first_s,
            "local_s": local_s, "recount_s": recount_s,
            "pandas_s": pandas_s, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--max-pandas-rows", type=int, default=10_000_000)
    args = parser.parse_args()
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="ab-bench-") as tmp:
        tmp_path = Path(tmp)
        if "sqlite" in wanted:
            print(f"SQLite: {args.rows:,} predictions with outcomes ...", flush=True)
            rows_out.append(bench_backend(f"sqlite:///{tmp_path / 'ab.db'}", args.rows,
                                          args.max_pandas_rows, tmp_path / "sqlite"))
            size = sum(p.stat().st_size for p in tmp_path.glob("ab.db*"))
            rows_out[-1]["size_mb"] = size / 2**20
            dispose_engines()
        if "postgres" in wanted:
            if not postgres_answers():
                print("PostgreSQL: nothing answers at 127.0.0.1:5432, skipped")
            else:
                import psycopg2
                from psycopg2 import sql

                name = f"mlops_ab_bench_{uuid.uuid4().hex[:8]}"
                admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres",
                                         dbname="postgres")
                admin.autocommit = True
                try:
                    with admin.cursor() as cur:
                        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    print(f"PostgreSQL: {args.rows:,} predictions with outcomes ...", flush=True)
                    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
                    rows_out.append(bench_backend(url, args.rows, args.max_pandas_rows,
                                                  tmp_path / "postgres"))
                    with ab.get_engine(url).connect() as conn:
                        rows_out[-1]["size_mb"] = conn.exec_driver_sql(
                            "SELECT pg_database_size(current_database())").scalar() / 2**20
                finally:
                    dispose_engines()
                    with admin.cursor() as cur:
                        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                                    .format(sql.Identifier(name)))
                    admin.close()
    print()
    print("| backend | logged predictions (with outcomes) | db size | fill (in-db) | "
          "running sums + statistics | read-results task (+ policy block) | ab_test_results "
          "flow, first look (+ MLflow run, plot) | ab_test_results flow, later looks | same, "
          "in-process (no heartbeat) | SQL aggregation (covering index) | pandas: load log "
          "+ same numbers | pandas / flow |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        ratio = f"{r['pandas_s'] / r['flow_s']:,.0f}x" if r["pandas_s"] else "—"
        pandas_cell = f"{r['pandas_s']:.1f} s" if r["pandas_s"] else "skipped"
        print(f"| {r['backend']} | {r['rows']:,} | {r.get('size_mb', 0):,.0f} MB | "
              f"{r['fill_s']:.0f} s | {r['results_s'] * 1000:.1f} ms | {r['task_s'] * 1000:.0f} ms | "
              f"{r['first_s']:.2f} s | {r['flow_s']:.2f} s | {r['local_s']:.2f} s | "
              f"{r['recount_s']:.2f} s | {pandas_cell} | {ratio} |")
    if rows_out:
        res = rows_out[0]["results"]
        a, b = res.arms["champion"], res.arms["challenger"]
        print(f"\nsame numbers on every path: champion {a.successes}/{a.n} ({a.rate:.4%}), "
              f"challenger {b.successes}/{b.n} ({b.rate:.4%}), p = {res.p_value:.3g}, "
              f"sequential p = {res.sequential_p_value:.3g}, SRM p = {res.srm.p_value:.3g}, "
              f"recommendation {res.recommendation}")
        print("goal: ab_test_results <= 2 s on SQLite -> "
              + ("met" if all(max(r["flow_s"], r["first_s"]) <= 2 for r in rows_out
                             if r["backend"] == "sqlite")
                 else "NOT met"))


if __name__ == "__main__":
    main()
