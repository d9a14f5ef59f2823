"""Prometheus collectors for the figures MLflow holds: drift, production quality, retraining runs.

``mlflow_collectors()`` returns collectors to register on the registry /metrics exposes (with
prometheus-client's multiprocess mode, the ``CollectorRegistry`` that holds the
``MultiProcessCollector``). Every scrape reads a cached snapshot (tasks/metric_sources.py reads
it from MLflow) and never waits for MLflow: the first read starts when the collectors are built,
in a background thread; once the snapshot is older than the TTL (the monitoring policy's
``metrics_cache_seconds``) the scrape that notices starts one refresh in the background and
answers with the cached figures at once. A new drift check therefore shows within TTL + one
refresh.

Families (the names of docs/python-api.md and the README's metrics table):

* ``model_drift_score{model_name,version}`` -- gauge: the champion's newest ``check_drift`` score;
* ``model_accuracy{model_name,version}`` -- gauge, classifiers: accuracy of the champion's newest
  ``evaluate_production``;
* ``model_score{model_name,version,metric}`` -- gauge, regressors: the primary metric of that run;
* ``retraining_runs_total{model_name,decision}`` -- counter: retraining runs in MLflow's history;
* ``mlops_metrics_source_up`` (1 when the last read of MLflow succeeded, else 0: the figures
  shown are then the last good ones; absent until the first read has finished) and ``mlops_metrics_source_age_seconds`` (age of the
  figures shown) -- so a broken MLflow is visible rather than silently stale.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tasks.metric_sources import MonitoringSnapshot, read_monitoring_snapshot

log = logging.getLogger(__name__)


class SnapshotCache:
    """The newest snapshot and when it was read; refreshed by one background thread at a time.
    Nothing here waits for MLflow in the caller's thread: /metrics is served from the event loop
    of a service worker, and an MLflow that hangs must not stall the worker's requests."""

    def __init__(self, ttl_s: float, reader: Callable[[], MonitoringSnapshot]) -> None:
        self.ttl_s = float(ttl_s)
        self.reader = reader
        self.snapshot: MonitoringSnapshot | None = None
        self.read_monotonic: float | None = None
        self.up: bool | None = None  # None until the first read has finished
        self.last_error: str | None = None
        self.refreshes = 0
        self._lock = threading.Lock()
        self._refreshing: threading.Thread | None = None

    def refresh(self) -> None:
        """Read MLflow now (in the caller's thread). Errors are logged and kept in `last_error`;
        `up` says whether the figures are current."""
        try:
            snapshot = self.reader()
        except Exception as exc:  # the scrape still answers: up=0 with the last good figures
            self.up, self.last_error = False, f"{type(exc).__name__}: {exc}"
            log.error("/metrics: cannot read drift/accuracy/retraining figures from MLflow: %s; "
                      "serving the figures read %s", self.last_error,
                      "never" if self.read_monotonic is None
                      else f"{time.monotonic() - self.read_monotonic:.0f} s ago")
            return
        with self._lock:
            self.snapshot, self.read_monotonic = snapshot, time.monotonic()
            self.up, self.last_error = True, None
            self.refreshes += 1

    def start_refresh(self) -> None:
        """Start a background refresh unless one is running."""
        with self._lock:
            if self._refreshing is None or not self._refreshing.is_alive():
                self._refreshing = threading.Thread(target=self.refresh, daemon=True,
                                                    name="metrics-mlflow-refresh")
                self._refreshing.start()

    def current(self) -> MonitoringSnapshot | None:
        """The cached snapshot, answered at once (None before the first read has finished). A
        snapshot older than the TTL, or none, starts one background refresh."""
        if self.age() >= self.ttl_s:
            self.start_refresh()
        return self.snapshot

    def age(self) -> float:
        return float("inf") if self.read_monotonic is None else time.monotonic() - self.read_monotonic

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait for a background refresh in progress (tests, graceful shutdown)."""
        thread = self._refreshing
        if thread is not None:
            thread.join(timeout)


class MLflowFiguresCollector(Collector):
    """Shapes a cached :class:`MonitoringSnapshot` into Prometheus metric families."""

    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
        return {
            "drift": GaugeMetricFamily(
                "model_drift_score", "Drift score in [0, 1] of the champion's newest check_drift "
                "(importance-weighted share of drifted features), from MLflow.",
                labels=["model_name", "version"]),
            "accuracy": GaugeMetricFamily(
                "model_accuracy", "Accuracy of a classifier champion on labelled production data "
                "(its newest evaluate_production), from MLflow.",
                labels=["model_name", "version"]),
            "score": GaugeMetricFamily(
                "model_score", "Primary metric of a regressor champion on labelled production "
                "data (its newest evaluate_production), from MLflow.",
                labels=["model_name", "version", "metric"]),
            "retraining": CounterMetricFamily(
                "retraining_runs", "Retraining runs recorded in MLflow, per model and decision.",
                labels=["model_name", "decision"]),
            "up": GaugeMetricFamily(
                "mlops_metrics_source_up", "1 when the last read of MLflow for these figures "
                "succeeded, 0 when it failed (the figures shown are the last good ones)."),
            "age": GaugeMetricFamily(
                "mlops_metrics_source_age_seconds", "Age of the MLflow figures shown."),
        }

    def describe(self) -> Iterable:
        # names only: registering the collector must not read MLflow
        return list(self._families().values())

    def collect(self) -> Iterable:
        snapshot = self.cache.current()
        families = self._families()
        if snapshot is not None:
            for m in snapshot.models:
                labels = [m.model_name, str(m.version)]
                if m.drift_score is not None:
                    families["drift"].add_metric(labels, m.drift_score)
                if m.accuracy is not None:
                    families["accuracy"].add_metric(labels, m.accuracy)
                if m.score is not None:
                    families["score"].add_metric([*labels, m.score_metric], m.score)
            for (model_name, decision), n in sorted(snapshot.retraining_runs.items()):
                families["retraining"].add_metric([model_name, decision], n)
        if self.cache.up is not None:  # absent until the first read has finished
            families["up"].add_metric([], 1.0 if self.cache.up else 0.0)
        age = self.cache.age()
        if age != float("inf"):
            families["age"].add_metric([], age)
        return list(families.values())


def mlflow_collectors(ttl_s: float | None = None,
                      reader: Callable[[], MonitoringSnapshot] | None = None,
                      prefetch: bool = True) -> list[Collector]:
    """Collectors of the MLflow-sourced families, sharing one cache of `ttl_s` seconds (None:
    the monitoring policy's ``metrics_cache_seconds``). `reader` reads a snapshot (default:
    :func:`tasks.metric_sources.read_monitoring_snapshot` on the MLflow configuration in force).
    `prefetch` starts the first read now, in the background, so the figures are there by the
    first scrape (a scrape before that read has finished answers without them).

    Wiring: call it once per service worker (at start-up; the cache lives in the collectors),
    and register the same collectors on the registry each scrape builds::

        FIGURES = mlflow_collectors()           # once per worker process

        def metrics_body() -> bytes:            # GET /metrics
            registry = CollectorRegistry()
            MultiProcessCollector(registry)     # the hot-path counter and histogram
            for collector in FIGURES:
                registry.register(collector)
            return generate_latest(registry)

    Every worker reads MLflow on its own (at most once per TTL), so whichever worker answers a
    scrape shows the same figures; these families are not written to the multiprocess directory.
    """
    if ttl_s is None:
        from blocks.monitoring import resolve_monitoring_policy

        ttl_s = resolve_monitoring_policy().metrics_cache_seconds
    cache = SnapshotCache(ttl_s, reader or read_monitoring_snapshot)
    if prefetch:
        cache.start_refresh()
    return [MLflowFiguresCollector(cache)]
