"""A/B-test routes: create, results, conclude, active tests, and outcomes."""
from __future__ import annotations

from typing import Literal

import pandas as pd
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from api.auth import KeyRecord
from api.deps import as_json, audited, require, working_on
from api.errors import ERROR_RESPONSES
from flows.ab_testing import conclude_ab_test, create_ab_test
from tasks.ab import check_test_id
from tasks.ab_tasks import (ABResults, ABTestInfo, OutcomeReport, read_results, read_tests,
                            record_outcome_rows)
from tasks.registry import validate_model_name

router = APIRouter(prefix="/ab-tests", tags=["ab-tests"], responses=ERROR_RESPONSES)
Version = int | str


class CreateRequest(BaseModel):
    model_name: str = Field(examples=["customer_churn"])
    champion_version: Version | None = Field(None, description="Empty: the champion alias.")
    challenger_version: Version | None = Field(None, description="Empty: the challenger alias.")
    traffic_split: float = Field(0.1, description="The challenger's share, 0 < split < 1.")
    metric_type: Literal["conversion", "continuous"] = "conversion"
    min_samples_per_arm: int | None = None
    min_duration_days: float | None = None
    alpha: float | None = None
    higher_is_better: bool = True
    description: str = ""


class ConcludeRequest(BaseModel):
    promote_winner: bool = True
    force: bool = False


class Outcome(BaseModel):
    id: str | int = Field(description="The entity id the prediction was routed by.")
    outcome: float | bool = Field(description="1/0 or true/false (conversion); a number "
                                              "(continuous).")


class OutcomesRequest(BaseModel):
    outcomes: list[Outcome] = Field(min_length=1, max_length=100_000)


@router.post("/create", status_code=201, response_model=ABTestInfo)
def create(body: CreateRequest, key: KeyRecord = Depends(require("write"))):
    """Start an A/B test of two versions (one active test per model)."""
    working_on(body.model_name)
    with audited(key):
        test_id = create_ab_test(**body.model_dump())
    return as_json(next(t for t in read_tests.fn(body.model_name, None) if t.test_id == test_id),
                   201)


@router.get("/active", response_model=list[ABTestInfo])
def active(model_name: str | None = Query(None), key: KeyRecord = Depends(require("read"))):
    """Active tests (of one model, or all), newest first, with routed and outcome counts."""
    if model_name is not None:
        working_on(validate_model_name(model_name))
    return as_json(read_tests.fn(model_name, "active"))


@router.get("/{test_id}/results", response_model=ABResults)
def results(test_id: str, key: KeyRecord = Depends(require("read"))):
    """Per-arm numbers, statistics, SRM, guardrails and a recommendation (a read: no run)."""
    return as_json(read_results.fn(check_test_id(test_id)))


@router.post("/{test_id}/conclude", response_model=ABResults)
def conclude(test_id: str, body: ConcludeRequest | None = None,
             key: KeyRecord = Depends(require("write"))):
    """Close the test; a winning challenger becomes champion (promote_winner)."""
    body = body or ConcludeRequest()
    with audited(key):
        return as_json(conclude_ab_test(check_test_id(test_id), body.promote_winner, body.force))


@router.post("/{test_id}/outcomes", response_model=OutcomeReport)
def outcomes(test_id: str, body: OutcomesRequest, key: KeyRecord = Depends(require("write"))):
    """Record outcomes of routed entities (data plane: a task run, no flow run)."""
    frame = pd.DataFrame({"id": [o.id for o in body.outcomes],
                          "outcome": [o.outcome for o in body.outcomes]})
    return as_json(record_outcome_rows(check_test_id(test_id), frame, "id", "outcome"))
