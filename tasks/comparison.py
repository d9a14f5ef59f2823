"""Comparing two registered versions: recorded metrics and parameters, and scores on shared rows."""
from __future__ import annotations

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.data import LoadedData
from tasks.errors import DataError
from tasks.registry import mlflow_client, resolve_version
from tasks.training import load_artifact_json
from tasks.training_search import Schema, evaluate_metrics, prepare_features


class Comparison(BaseModel):
    model_name: str = ""
    version_a: int
    version_b: int
    metrics_a: dict[str, float] = Field(default_factory=dict)
    metrics_b: dict[str, float] = Field(default_factory=dict)
    metric_diff: dict[str, float] = Field(default_factory=dict, description="b − a")
    param_diff: dict[str, dict[str, str | None]] = Field(default_factory=dict)
    scores_on_data: dict[str, dict[str, float]] | None = Field(
        default=None, description="version number → metrics of both versions on the same rows")
    n_rows: int | None = None


def diff_metrics(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in sorted(set(a) & set(b))}


def diff_params(a: dict[str, str], b: dict[str, str]) -> dict[str, dict[str, str | None]]:
    return {k: {"a": a.get(k), "b": b.get(k)} for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


@task(name="compare-recorded", cache_policy=NO_CACHE)
def compare_recorded(model_name: str, version_a: int | str, version_b: int | str) -> Comparison:
    client = mlflow_client()
    mv_a = resolve_version(client, model_name, version_a)
    mv_b = resolve_version(client, model_name, version_b)
    run_a, run_b = client.get_run(mv_a.run_id), client.get_run(mv_b.run_id)
    return Comparison(model_name=model_name, version_a=int(mv_a.version), version_b=int(mv_b.version),
                      metrics_a=run_a.data.metrics, metrics_b=run_b.data.metrics,
                      metric_diff=diff_metrics(run_a.data.metrics, run_b.data.metrics),
                      param_diff=diff_params(run_a.data.params, run_b.data.params))


@task(name="score-version-on-data", cache_policy=NO_CACHE)
def score_version(model_name: str, version: int, loaded: LoadedData) -> dict[str, float]:
    """Every applicable metric of one version on labelled rows, against its recorded target."""
    import mlflow

    client = mlflow_client()
    mv = resolve_version(client, model_name, version)
    schema = Schema.from_dict(load_artifact_json(mv.run_id, "schema.json"))
    frame = loaded.frame
    if frame.empty:
        raise DataError("the comparison data is empty; pass labelled rows")
    if schema.target not in frame.columns:
        raise DataError(f"the comparison data lacks the target column {schema.target!r} that "
                        f"version {version} was trained on; columns: {', '.join(map(str, frame.columns))}")
    X = prepare_features(frame, schema)
    model = mlflow.sklearn.load_model(f"models:/{model_name}/{mv.version}")
    return evaluate_metrics(model, X, frame[schema.target], schema.task)


def scores_table(scores: dict[str, dict[str, float]]) -> list[dict]:
    metrics = sorted({m for s in scores.values() for m in s})
    return [{"metric": m, **{f"v{v}": round(s.get(m, float("nan")), 5) for v, s in scores.items()}}
            for m in metrics]


__all__ = ["Comparison", "compare_recorded", "score_version", "scores_table", "pd"]
