"""The mlops-flows REST service: `uvicorn api.app:create_app --factory` (make serve).

Routes validate input, call a flow or task, and shape the answer; the answers are the flows'
result models as JSON. Everything under /api/v1/mlops needs an API key (`python -m api.keys`);
/health does not. OpenAPI: /docs (Swagger UI), /redoc, /openapi.json.
"""
from __future__ import annotations

import gc
import logging
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel

from api import ab_tests, exports, metrics, predict, registry, retraining, runs, v2
from api.auth import KeyCache
from api.deps import BASE
from api.errors import RequestContextMiddleware, install_error_handlers
from api.launch import Launcher
from api.logs import configure_logging
from blocks.api_settings import APISettings, resolve_api_settings

ROUTERS = (registry.router, predict.router, ab_tests.router, exports.router, retraining.router,
           runs.router)
logger = logging.getLogger("api")
# How long a thread that wants the GIL waits before the holder must hand it over (Python's
# default: 5 ms). The prediction-log writer, the served-traffic writer and the serving refresh run
# in threads of each worker; with the default, every time the event loop gave up the GIL to one of
# them it waited up to 5 ms to get it back, several times per request (the p99 of bench/serving.py
# was 34 ms with a p50 of 3 ms). 0.5 ms bounds that wait for a few per cent more GIL hand-overs.
GIL_SWITCH_INTERVAL_S = 0.0005


class Health(BaseModel):
    status: str = "ok"


def create_app(settings: APISettings | None = None) -> FastAPI:
    """The application, configured by `settings` (default: the saved `APISettings` block, else
    the embedded defaults)."""
    configure_logging()
    settings = settings or _in_a_thread(resolve_api_settings)
    app = FastAPI(
        title="mlops-flows",
        version="1",
        description="Model lifecycle over HTTP: registry, A/B tests, exports and retraining. "
                    "Send `Authorization: Bearer <key>` (create a key with "
                    "`python -m api.keys create NAME --scope write`). Long work answers 202 "
                    "with a flow run to follow at `GET /api/v1/mlops/runs/{flow_run_id}`. "
                    "Online predictions: `POST /api/v1/mlops/models/{name}/predict` and the "
                    "Open Inference Protocol under /v2; Prometheus metrics at /metrics.",
        lifespan=_serving_lifespan)
    app.state.settings = settings
    app.state.metrics = metrics.hot_path_metrics()
    app.state.serving = None  # set at start-up (_serving_lifespan)
    app.state.prediction_log = None
    # called with (model_name, version, {column: [values]}) for every answered part of a
    # prediction: the served-traffic sampler is added at start-up (_serving_lifespan)
    app.state.served_observers = []
    app.state.metric_figures = []  # the MLflow-sourced /metrics collectors, built at start-up
    app.state.keys = KeyCache(settings.keys_path(), ttl=settings.key_cache_seconds)
    app.state.launcher = Launcher()
    for router in ROUTERS:
        app.include_router(router, prefix=BASE)
    app.include_router(v2.router)
    app.include_router(v2.health_router)
    app.include_router(metrics.router)
    app.state.body_fields = _body_fields(app)
    install_error_handlers(app)
    # innermost: predictions skip FastAPI's routing (CORS and the request context stay around)
    app.add_middleware(predict.PredictFastLane)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Location", "ETag"])
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes,
                       access_log=settings.access_log)

    @app.get("/health", response_model=Health, tags=["health"])
    async def health() -> Health:
        """Liveness: the service answers (no key needed)."""
        return Health()

    logger.info("mlops-flows API ready under %s (OpenAPI at /docs), keys in %s", BASE,
                settings.keys_path())
    return app


@asynccontextmanager
async def _serving_lifespan(app: FastAPI):
    """Start: the serving cache (champions loaded in the background; /v2/health/ready says when),
    the prediction log's writer, the served-traffic sampler and the MLflow-sourced /metrics
    figures (first read in the background). Graceful stop: write every buffered prediction row
    and every sampled served row."""
    from api.metric_sources import mlflow_collectors
    from tasks.ab import open_store
    from tasks.prediction_log import PredictionLog
    from tasks.served_traffic import sampler_from_policy
    from tasks.serving import ServingCache, champion_models, wanted_reader

    settings = app.state.settings

    def build():
        store = open_store()
        return (ServingCache(wanted_reader(store.url), poll_seconds=settings.serving_poll_seconds),
                PredictionLog(store, flush_seconds=settings.prediction_log_flush_seconds),
                sampler_from_policy(url=store.url), mlflow_collectors())

    serving, log, sampler, figures = await run_in_threadpool(build)
    app.state.serving, app.state.prediction_log = serving, log
    app.state.served_observers.append(sampler.offer)
    app.state.metric_figures = figures
    log.start()
    serving.start(champion_models)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(switch_interval, GIL_SWITCH_INTERVAL_S))
    # Everything imported and built so far (MLflow, onnxruntime, pandas, Prefect: ~300k objects)
    # lives as long as the worker: out of the collector's reach, a full collection no longer
    # walks it (about 150 ms with the event loop stopped, measured here).
    gc.freeze()
    try:
        yield
    finally:
        sys.setswitchinterval(switch_interval)
        gc.unfreeze()
        serving.stop()
        written = await run_in_threadpool(log.close)
        logger.info("stopped: %d buffered prediction rows written (%d in all, %d not logged)",
                    written, log.logged, log.dropped)
        app.state.served_observers.remove(sampler.offer)
        await run_in_threadpool(sampler.close)


def _in_a_thread(fn):
    """Call a sync Prefect function from here even when an event loop runs in this thread (uvicorn
    calls the factory inside its loop, where Prefect's sync calls would return coroutines)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


def _body_fields(app: FastAPI) -> set[str]:
    """Names of every request body field (to name the field of a flow's 422 message)."""
    names: set[str] = set()
    for module in (registry, ab_tests, exports, retraining):
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, BaseModel)
                    and obj.__name__.endswith("Request")):
                names |= set(obj.model_fields)
    return names
