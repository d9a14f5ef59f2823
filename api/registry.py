"""Registry routes: register (or train), promote, list versions, compare, roll back."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from api.auth import KeyRecord
from api.deps import Accepted, accepted, as_json, audited, require, working_on
from api.errors import ERROR_RESPONSES, APIError
from flows.registry import compare_versions, promote_model, register_model, rollback_model
from flows.training import train_model
from tasks.comparison import Comparison, compare_recorded
from tasks.registry import VersionInfo, find_unregistered_model, read_versions, validate_model_name

router = APIRouter(tags=["registry"], responses=ERROR_RESPONSES)
Version = int | str
Stage = Literal["champion", "challenger", "Production", "Staging"]


class RegisterRequest(BaseModel):
    model_name: str = Field(examples=["customer_churn"])
    description: str = ""
    metrics: dict[str, float] | None = None
    tags: dict[str, str] | None = None
    run_id: str | None = Field(None, description="An MLflow run whose `model` to register.")
    model_uri: str | None = Field(None, description="e.g. runs:/<run_id>/model or models:/m-<id>")
    data: str | None = Field(None, description="Labelled rows to train on (csv/parquet path or "
                                               "s3:// URI, read by the service or the worker).")
    target: str | None = Field(None, description="Column to predict (with data).")
    time_budget_s: float | None = Field(None, gt=0, le=86_400, description="With data.")
    candidates: list[Literal["linear", "random_forest", "extra_trees",
                             "hist_gradient_boosting"]] | None = Field(
        None, description="With data: the model families to search (default: all).")
    max_trials: int | None = Field(None, ge=1, le=10_000, description=(
        "With data: stop after this many trials (same data and random_state: same result); "
        "default: the search runs until its share of time_budget_s is spent."))

    def check_sources(self) -> None:
        given = [n for n in ("run_id", "model_uri", "data") if getattr(self, n)]
        if len(given) > 1:
            raise APIError(422, "ValidationError", f"pass one of run_id, model_uri or data, not "
                           f"{' and '.join(given)}", given[-1])
        if self.data and not self.target:
            raise APIError(422, "ValidationError",
                           "target is required with data (the column to predict)", "target")


class PromoteRequest(BaseModel):
    model_name: str = Field(examples=["customer_churn"])
    version: Version = Field(description="A version number or an alias.", examples=[2])
    stage: Stage = "champion"
    reason: str = ""


class RollbackRequest(BaseModel):
    version: Version | None = Field(None, description="Empty: the previous champion.")
    reason: str = ""


@router.post("/models/register", response_model=VersionInfo | Accepted,
             responses={202: {"model": Accepted, "description": "Training started"}})
def register(body: RegisterRequest, request: Request, response: Response,
             key: KeyRecord = Depends(require("write"))):
    """Register a logged model as a new version: `run_id`, `model_uri`, or nothing (the newest
    finished run that logged a model for this name and is not registered yet). With `data` and
    `target` it trains the best model instead and registers it (202, long work)."""
    working_on(body.model_name)
    body.check_sources()
    if body.data:
        params = {"data": body.data, "target": body.target, "model_name": body.model_name}
        if body.time_budget_s is not None:
            params["time_budget_s"] = body.time_budget_s
        if body.candidates:
            params["candidates"] = body.candidates
        if body.max_trials is not None:
            params["max_trials"] = body.max_trials
        validate_model_name(body.model_name)
        return accepted(request, response, train_model, params, key)
    model_uri, run_id = body.model_uri, body.run_id
    if not model_uri and not run_id:
        model_uri, run_id = find_unregistered_model.fn(body.model_name)
    with audited(key):
        return as_json(register_model(body.model_name, model_uri=model_uri, run_id=run_id,
                                      description=body.description, metrics=body.metrics,
                                      tags=body.tags))


@router.post("/models/promote", response_model=VersionInfo)
def promote(body: PromoteRequest, key: KeyRecord = Depends(require("write"))):
    """Point `champion` (Production) or `challenger` (Staging) at a version; recorded."""
    working_on(body.model_name, body.version)
    with audited(key):
        return as_json(promote_model(body.model_name, body.version, body.stage, body.reason))


@router.get("/models/{name}/versions", response_model=list[VersionInfo])
def versions(name: str, key: KeyRecord = Depends(require("read"))):
    """Every version, newest first, with aliases, semver, metrics and tags."""
    working_on(name)
    return as_json(read_versions.fn(name))


@router.get("/models/{name}/compare", response_model=Comparison | Accepted,
            responses={202: {"model": Accepted, "description": "Scoring on data started"}})
def compare(name: str, request: Request, response: Response,
            version_a: str = Query(examples=["1"]), version_b: str = Query(examples=["2"]),
            data: str | None = Query(None, description="Labelled rows: both versions are scored "
                                                       "on them (202, long work)."),
            key: KeyRecord = Depends(require("read"))):
    """Recorded metric and parameter differences (b − a); with `data`, scores on the same rows."""
    working_on(name)
    if data:
        validate_model_name(name)
        return accepted(request, response, compare_versions,
                        {"model_name": name, "version_a": version_a, "version_b": version_b,
                         "data": data}, key)
    return as_json(compare_recorded.fn(name, version_a, version_b))


@router.post("/models/{name}/rollback", response_model=VersionInfo)
def rollback(name: str, body: RollbackRequest | None = None,
             key: KeyRecord = Depends(require("write"))):
    """Make the previous champion (or `version`) champion again."""
    body = body or RollbackRequest()
    working_on(name, body.version)
    with audited(key):
        return as_json(rollback_model(name, body.version, body.reason))
