"""Serving -> drift -> retraining as one loop, and the /metrics figures read from MLflow.

Real Prefect API, the embedded MLflow store, real check_drift / evaluate_production /
retrain_model runs; the collectors (api/metric_sources.py) are scraped with prometheus_client's
own text exposition, as /metrics serves them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api.metric_sources import mlflow_collectors
from flows.drift import check_drift, drifted_batch, evaluate_production
from flows.retraining import retrain_model, retraining_history
from flows.training import train_model
from tasks.demo_data import churn_frame
from tasks.errors import DataError
from tasks.metric_sources import read_monitoring_snapshot
from tasks.registry import mlflow_client
from tasks.served_traffic import ServedTrafficSampler

from tests.budgets import ONE_LINEAR_TRIAL
from tests.servers import free_port

CLS, REG = "loop_churn", "loop_charges"


@dataclass
class Loop:
    folder: Path
    evaluation: Path
    drifted: Path
    labelled: Path
    frame: pd.DataFrame  # evaluation rows


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loop")
    patch = pytest.MonkeyPatch()
    patch.setenv("MLOPS_HOME", str(folder / "state"))
    try:
        rows = churn_frame().sample(1000, random_state=5).reset_index(drop=True)
        train, evaluation = rows.iloc[:500], rows.iloc[500:].reset_index(drop=True)
        paths = {n: folder / f"{n}.csv" for n in ("train", "evaluation", "drifted", "labelled")}
        train.to_csv(paths["train"], index=False)
        evaluation.to_csv(paths["evaluation"], index=False)
        drifted_batch(evaluation).to_csv(paths["drifted"], index=False)
        rows.to_csv(paths["labelled"], index=False)
        train_model(str(paths["train"]), "churn", CLS, **ONE_LINEAR_TRIAL)
        train_model(str(paths["train"]), "monthly_charges", REG, task="regression", **ONE_LINEAR_TRIAL)
        yield Loop(folder, paths["evaluation"], paths["drifted"], paths["labelled"], evaluation)
    finally:
        patch.undo()


def scrape(collectors, wait: bool = True) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from the text exposition; `wait` first lets a
    background read of MLflow in progress finish."""
    if wait:
        for c in collectors:
            c.cache.wait_idle()
    registry = CollectorRegistry()
    for c in collectors:
        registry.register(c)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def drift_runs() -> int:
    client = mlflow_client()
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids, "tags.`mlops.kind` = 'drift-check'"))


def test_check_drift_runs_on_served_traffic(loop):
    """Rows answered by the service, sampled at rate 1, give the same drift report as the same rows
    passed as a file; the report names the served reference."""
    drifted = pd.read_csv(loop.drifted)
    features = drifted.drop(columns=["churn"])
    with ServedTrafficSampler(1.0, flush_seconds=60) as sampler:
        for start in range(0, len(features), 50):  # batches as the service answers them
            sampler.offer(CLS, 1, features.iloc[start:start + 50])

    served = check_drift(CLS, f"served:{CLS}:24h")
    from_file = check_drift(CLS, str(loop.drifted))

    assert served.data_ref == f"served:{CLS}:24h" and served.n_current == len(features)
    assert served.drifted and served.score == pytest.approx(from_file.score)
    assert served.drifted_features == from_file.drifted_features


def test_an_empty_served_window_is_refused_before_anything_is_recorded(loop):
    before = drift_runs()
    with pytest.raises(DataError, match=f"no served rows of model '{REG}'"):
        check_drift(REG, f"served:{REG}:1h")
    assert drift_runs() == before


def test_gauges_and_counter_equal_what_the_flows_recorded(loop):
    retrained = retrain_model(CLS, str(loop.labelled), "churn", reason="test", time_budget_s=3,
                              max_trials=1)
    drift = check_drift(CLS, str(loop.evaluation))            # the champion after retraining
    quality = evaluate_production(CLS, str(loop.evaluation), "churn")
    regression = evaluate_production(REG, str(loop.evaluation), "monthly_charges")

    values = scrape(mlflow_collectors(ttl_s=600))

    cls = (("model_name", CLS), ("version", str(drift.version)))
    assert values[("model_drift_score", cls)] == pytest.approx(drift.score)
    assert values[("model_accuracy", cls)] == pytest.approx(quality.metrics["accuracy"])
    reg = (("metric", regression.metric), ("model_name", REG), ("version", "1"))
    assert regression.metric == "rmse"
    assert values[("model_score", reg)] == pytest.approx(regression.metrics["rmse"])
    assert ("model_accuracy", (("model_name", REG), ("version", "1"))) not in values
    assert ("model_drift_score", (("model_name", REG), ("version", "1"))) not in values

    history = retraining_history(CLS)
    assert [r.decision for r in history] == [retrained.decision]
    assert values[("retraining_runs_total",
                   (("decision", retrained.decision), ("model_name", CLS)))] == 1.0
    assert values[("mlops_metrics_source_up", ())] == 1.0

    # champions whose newest run is not among the newest runs of all models are searched alone
    full = read_monitoring_snapshot()
    assert read_monitoring_snapshot(page_size=1).models == full.models
    assert {m.model_name for m in full.models} == {CLS, REG}


def test_a_new_check_shows_after_the_cache_ttl(loop):
    ttl = 8.0  # longer than one check_drift here (1-3 s), so the next check lands inside it
    first = check_drift(CLS, str(loop.evaluation))
    collectors = mlflow_collectors(ttl_s=ttl)  # the first read starts now, in the background
    cache = collectors[0].cache
    key = ("model_drift_score", (("model_name", CLS), ("version", str(first.version))))
    assert scrape(collectors)[key] == pytest.approx(first.score)

    later = check_drift(CLS, str(loop.drifted))
    assert later.score != pytest.approx(first.score)
    assert cache.age() < ttl, "check_drift took longer than the TTL: the test proves nothing"
    assert scrape(collectors, wait=False)[key] == pytest.approx(first.score)  # cached
    time.sleep(max(0.0, ttl - cache.age()) + 0.05)
    stale = scrape(collectors, wait=False)  # stale: starts a refresh, answers the cached figure
    assert stale[key] == pytest.approx(first.score)
    assert scrape(collectors)[key] == pytest.approx(later.score)
    assert cache.refreshes == 2


def test_a_scrape_never_waits_for_mlflow(loop):
    """A slow MLflow (a reader taking 2 s) delays the figures, never the scrape: the first
    scrape answers at once without them, the next ones once the read is done."""
    def slow():
        time.sleep(2)
        return read_monitoring_snapshot()

    collectors = mlflow_collectors(ttl_s=60, reader=slow)
    started = time.monotonic()
    first = scrape(collectors, wait=False)
    assert time.monotonic() - started < 1.0
    assert not any(k[0].startswith(("model_", "retraining_", "mlops_")) for k in first)
    values = scrape(collectors)
    assert values[("mlops_metrics_source_up", ())] == 1.0 and collectors[0].cache.refreshes == 1
    direct = read_monitoring_snapshot()
    assert {k[1] for k in values if k[0] == "model_accuracy"} == {
        (("model_name", m.model_name), ("version", str(m.version)))
        for m in direct.models if m.accuracy is not None} != set()


def test_unreachable_mlflow_keeps_the_last_figures_and_says_so(loop, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    dead = MlflowClient(f"http://127.0.0.1:{free_port()}")
    clients = [mlflow_client(), dead]
    collectors = mlflow_collectors(ttl_s=0.01, reader=lambda: read_monitoring_snapshot(clients[0]))
    cache = collectors[0].cache
    good = scrape(collectors)
    assert good[("mlops_metrics_source_up", ())] == 1.0

    clients[0] = dead  # MLflow goes away
    time.sleep(0.02)
    scrape(collectors)  # starts a refresh, which fails
    time.sleep(0.02)
    after = scrape(collectors)  # the scrape still answers: old figures, up = 0
    assert after[("mlops_metrics_source_up", ())] == 0.0
    assert "ConnectionError" in cache.last_error or "Max retries" in cache.last_error
    figures = {k: v for k, v in good.items() if k[0].startswith(("model_", "retraining_"))}
    assert figures and all(after[k] == v for k, v in figures.items())

    never = mlflow_collectors(ttl_s=60, reader=lambda: read_monitoring_snapshot(dead))
    values = scrape(never)
    assert values[("mlops_metrics_source_up", ())] == 0.0
    assert not any(k[0].startswith(("model_", "retraining_")) for k in values)
