"""Prometheus metrics of the service and the `/metrics` route (exposition format).

Hot-path metrics, counted where predictions are answered:

- `model_predictions_total{model_name,version,arm}`: rows answered (counter; `arm` is
  champion or challenger, `pinned` for V2 calls that name a version);
- `model_inference_time_seconds{model_name,version}`: time of one model call (a request's
  rows of one version), histogram with buckets from 50 µs.

Several uvicorn workers: prometheus-client's multiprocess mode. `python -m api` points
`PROMETHEUS_MULTIPROC_DIR` at an empty folder (wiped at every start) before the workers start;
each worker writes its counts there and `/metrics` sums every worker's files, so counts add up
whichever worker answers the scrape. Without that variable (one process, tests in-process) the
default registry is used.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from fastapi import APIRouter, Request, Response

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25,
           0.5, 1.0, 2.5)


def prepare_multiprocess_dir(path: str | Path) -> Path:
    """Wipe and create the multiprocess folder and point PROMETHEUS_MULTIPROC_DIR at it (call
    before any worker imports prometheus_client: counts of an earlier run must not survive)."""
    path = Path(path).resolve()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


class HotPathMetrics:
    """The two hot-path metrics, with their label children cached (a dict lookup per call)."""

    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.predictions = Counter(
            "model_predictions", "Rows answered, by model, version and A/B arm.",
            ["model_name", "version", "arm"])
        self.inference = Histogram(
            "model_inference_time_seconds",
            "Time of one model call (the rows of one request answered by one version).",
            ["model_name", "version"], buckets=BUCKETS)
        self._counters: dict[tuple, object] = {}
        self._timers: dict[tuple, object] = {}

    def answered(self, model_name: str, version: int, arm: str, rows: int, seconds: float) -> None:
        key = (model_name, version, arm)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.predictions.labels(model_name, str(version), arm)
        counter.inc(rows)
        timer = self._timers.get(key[:2])
        if timer is None:
            timer = self._timers[key[:2]] = self.inference.labels(model_name, str(version))
        timer.observe(seconds)


_METRICS: HotPathMetrics | None = None


def hot_path_metrics() -> HotPathMetrics:
    """The process's metrics (created once: prometheus-client refuses a name registered twice)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = HotPathMetrics()
    return _METRICS


def scrape_registry(figures=()):
    """What `/metrics` exposes: the hot-path counter and histogram (every worker's files in
    multiprocess mode, else this process's default registry) and `figures`, the collectors of the
    MLflow-sourced gauges (api/metric_sources.py), built once per worker and read from their
    cache here."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        registry.register(_Everything(REGISTRY))
    for collector in figures:
        registry.register(collector)
    return registry


class _Everything:
    """The process's default registry as one collector of a per-scrape registry."""

    def __init__(self, registry) -> None:
        self.registry = registry

    def collect(self):
        return self.registry.collect()


router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=True, response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus exposition format (no key unless `APISettings.metrics_requires_key`)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if request.app.state.settings.metrics_requires_key:
        from api.deps import authorize

        authorize(request, "read")
    return Response(generate_latest(scrape_registry(request.app.state.metric_figures)),
                    media_type=CONTENT_TYPE_LATEST)
