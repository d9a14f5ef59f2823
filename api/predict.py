"""Online predictions: `POST /api/v1/mlops/models/{name}/predict`.

The hot path: the key check, the body parsed once (orjson), rows checked column by column
against the schema (tasks/serving.py, no model object per row), the model's current route
(champion, or both arms of an active A/B test, with the sticky hash of score_batch), one warm
ONNX session call per arm, the answered rows queued for the A/B prediction log
(tasks/prediction_log.py), the hot-path metrics counted.
"""
from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from api.deps import authorize, working_on
from api.errors import ERROR_RESPONSES, APIError, error_response
from tasks.registry import validate_model_name
from tasks.serving import (MLFLOW, InputError, RowLimitError, answer_rows, check_ids,
                           check_rows)

router = APIRouter(tags=["serving"], responses=ERROR_RESPONSES)

REQUEST_SCHEMA = {
    "content": {"application/json": {"schema": {
        "type": "object", "required": ["rows"],
        "properties": {
            "rows": {"type": "array", "items": {"type": "object"},
                     "description": "Records {column: value} with the model's columns (extra "
                                    "columns are ignored)."},
            "ids": {"type": "array", "items": {"type": ["string", "integer"]},
                    "description": "One entity id per row; required while an A/B test of the "
                                   "model is active (routing is sticky by id)."}}},
        "example": {"rows": [{"tenure": 12, "monthly_charges": 70.5, "contract": "monthly"}],
                    "ids": ["customer-42"]}}}}
ANSWER_SCHEMA = {200: {"description": "One prediction per row, in order", "content": {
    "application/json": {"example": {"model_name": "customer_churn", "predictions": [
        {"id": "customer-42", "prediction": 1, "probabilities": {"0": 0.31, "1": 0.69},
         "version": 3, "arm": "champion"}]}}}}}


def read_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"the request body is not valid JSON ({exc})") from None


def input_error(exc: InputError) -> Response:
    status = 413 if isinstance(exc, RowLimitError) else 422
    kind = "RequestTooLarge" if status == 413 else "ValidationError"
    return error_response(status, kind, str(exc), exc.field)


@router.post("/models/{name}/predict", openapi_extra={"requestBody": REQUEST_SCHEMA},
             responses=ANSWER_SCHEMA)
async def predict(name: str, request: Request) -> Response:
    """Predict rows with the model's champion, or with the arm of an active A/B test each id is
    routed to (ids required then); every answered row of a test is logged for it."""
    return await answer_predict(name, request)


async def answer_predict(name: str, request: Request) -> Response:
    """The answer of the predict route (also called by PredictFastLane without FastAPI's
    routing and dependency resolution)."""
    authorize(request, "read")
    state = request.app.state
    validate_model_name(name)
    working_on(name)
    try:
        body = read_json(await request.body())
        if type(body) is not dict:
            raise InputError("the body must be an object {\"rows\": [...], \"ids\": [...]}")
        route = state.serving.routes.get(name) or await run_in_threadpool(
            state.serving.route, name)
        numeric, categorical = route.columns
        columns = check_rows(body.get("rows"), numeric, categorical,
                             state.settings.max_predict_rows)
        n = len(body["rows"])
        keys = check_ids(body.get("ids"), n, required=route.ab is not None)
    except InputError as exc:
        return input_error(exc)
    if any(v.backend == MLFLOW for v in route.versions()):  # scikit-learn: off the event loop
        parts = await run_in_threadpool(answer_rows, route, columns, keys)
    else:  # one onnxruntime call per arm, well under a millisecond for a row: inline
        parts = answer_rows(route, columns, keys)

    rows: list[Any] = [None] * n
    ids = body.get("ids") or [None] * n
    for part in parts:
        answer, version, arm = part.answer, part.loaded.version, part.arm
        positions = part.rows if part.rows is not None else range(n)
        proba = answer.probabilities.tolist() if answer.probabilities is not None else None
        labels = [str(c) for c in answer.classes]
        for j, i in enumerate(positions):
            row = {"id": ids[i], "prediction": answer.predictions[j], "version": version,
                   "arm": arm}
            if proba is not None:
                row["probabilities"] = dict(zip(labels, proba[j]))
            rows[i] = row
        state.metrics.answered(name, version, arm, len(answer.predictions), part.seconds)
        if route.ab is not None:
            chosen = [keys[i] for i in positions]
            state.prediction_log.add(route.ab.test, chosen,
                                     [1 if arm == "challenger" else 0] * len(chosen),
                                     answer.predictions, answer.scores())
        if state.served_observers:
            # the checked columns as {column: [values]}: building a DataFrame here would cost
            # 1.7-3.5 ms a request; the sampler builds one only for the rows it keeps
            answered = _part_columns(columns, part.rows)
            for observer in state.served_observers:
                observer(name, version, answered)
    return Response(orjson.dumps({"model_name": name, "predictions": rows}),
                    media_type="application/json")


def _part_columns(columns: dict[str, list], rows) -> dict[str, list]:
    if rows is None:
        return columns
    return {c: [v[i] for i in rows] for c, v in columns.items()}


PREDICT_PREFIX = "/api/v1/mlops/models/"
PREDICT_SUFFIX = "/predict"


class PredictFastLane:
    """Pure ASGI middleware: `POST /api/v1/mlops/models/{name}/predict` straight to
    `answer_predict`, skipping FastAPI's route matching and dependency resolution (about a
    third of the time of a single-row prediction, measured with cProfile). The route stays
    declared for OpenAPI; the answers, errors and headers are the same (RequestContextMiddleware
    around this one adds the request id and the body limit and shapes raised errors)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path.startswith(PREDICT_PREFIX) and path.endswith(PREDICT_SUFFIX):
                name = path[len(PREDICT_PREFIX):-len(PREDICT_SUFFIX)]
                if name and "/" not in name:
                    try:
                        response = await answer_predict(name, Request(scope, receive))
                    except APIError as exc:
                        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
                        response = error_response(exc.status, exc.type, exc.message, exc.field,
                                                  headers)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
