"""Retraining routes: check, trigger (long work), schedule, history."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from api.auth import KeyRecord
from api.deps import Accepted, accepted, as_json, audited, require, working_on
from api.errors import ERROR_RESPONSES, APIError
from blocks.retraining_policy import resolve_retraining_policy
from flows.retraining import retrain_model, schedule_retraining_check, should_retrain
from tasks.registry import get_registered_model, mlflow_client, validate_model_name
from tasks.retraining import check_slot_free, read_history
from tasks.retraining_rules import RetrainDecision, RetrainResult
from tasks.schedules import ScheduleInfo

router = APIRouter(prefix="/retraining", tags=["retraining"], responses=ERROR_RESPONSES)


class CheckRequest(BaseModel):
    model_name: str = Field(examples=["customer_churn"])
    data: str | None = Field(None, description="Labelled rows; empty: the RetrainingPolicy's.")
    target: str | None = None


class TriggerRequest(BaseModel):
    data: str | None = Field(None, description="Labelled rows (csv/parquet path, folder or "
                                               "s3:// URI); empty: the RetrainingPolicy's.")
    target: str | None = Field(None, description="Empty: the RetrainingPolicy's.")
    reason: str = "manual"
    time_budget_s: float | None = Field(None, gt=0, le=86_400)


class ScheduleRequest(BaseModel):
    model_name: str = Field(examples=["customer_churn"])
    cron: str = Field("0 2 * * *", examples=["0 2 * * *"])
    timezone: str = "UTC"
    active: bool = True


@router.post("/check", response_model=RetrainDecision)
def check(body: CheckRequest, key: KeyRecord = Depends(require("write"))):
    """Whether the champion should be retrained now, why, and every signal."""
    working_on(body.model_name)
    if body.data and not body.target:
        raise APIError(422, "ValidationError", "target is required with data", "target")
    with audited(key):
        return as_json(should_retrain(body.model_name, body.data, body.target))


@router.post("/trigger/{name}", response_model=Accepted, status_code=202)
def trigger(name: str, request: Request, response: Response, body: TriggerRequest | None = None,
            key: KeyRecord = Depends(require("write"))):
    """Retrain now (long work): a challenger gated against the champion on unseen rows."""
    body = body or TriggerRequest()
    working_on(name)
    validate_model_name(name)
    data, target = body.data, body.target
    if not data or not target:
        policy_data, policy_target = resolve_retraining_policy(name).labelled_data(name)
        data, target = data or policy_data, target or policy_target
    check_slot_free(name)
    params = {"model_name": name, "data": data, "target": target, "reason": body.reason,
              "trigger": "manual"}
    if body.time_budget_s is not None:
        params["time_budget_s"] = body.time_budget_s
    return accepted(request, response, retrain_model, params, key)


@router.post("/schedule", response_model=ScheduleInfo)
def schedule(body: ScheduleRequest, key: KeyRecord = Depends(require("admin"))):
    """Add or update the model's schedule of the `retraining-check/default` deployment."""
    working_on(body.model_name)
    with audited(key):
        return as_json(schedule_retraining_check(body.model_name, body.cron, body.timezone,
                                                 body.active))


@router.get("/history", response_model=list[RetrainResult])
def history(model_name: str = Query(examples=["customer_churn"]),
            limit: int = Query(100, ge=1, le=1000), key: KeyRecord = Depends(require("read"))):
    """Every retraining of the model, newest first (a read: no run)."""
    working_on(model_name)
    get_registered_model(mlflow_client(), model_name)
    return as_json(read_history(model_name, limit))
