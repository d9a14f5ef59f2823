"""The Open Inference Protocol (KServe V2 REST) beside our own paths, so clients written for
KServe, Triton or MLServer work unchanged.

- `GET /v2/health/live`, `GET /v2/health/ready` (no key; ready: every champion loaded, else 503);
- `GET /v2/models/{name}[/versions/{v}]`: metadata, inputs (name, datatype, shape) and outputs,
  and in `parameters.backend` which backend answers (`onnx` or `mlflow`, with the reason);
- `GET /v2/models/{name}[/versions/{v}]/ready`;
- `POST /v2/models/{name}[/versions/{v}]/infer`: tabular input as one input per column
  (`name` = column, `shape` [N], datatype FP32/FP64/INT64/BOOL/BYTES) or one FP32/FP64 tensor
  [N, n_features] in the order of the metadata's inputs; outputs `predict` and (classifiers)
  `predict_proba` [N, n_classes] in the order of `parameters.classes`.

Without `/versions/{v}` the champion answers (A/B routing needs entity ids: use
`POST /api/v1/mlops/models/{name}/predict`). Errors have the service's one error body.
"""
from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from api.deps import authorize, working_on
from api.errors import ERROR_RESPONSES
from api.predict import input_error, read_json
from tasks.registry import validate_model_name
from tasks.serving import MLFLOW, ONNX, InputError, LoadedVersion, check_rows
from tasks.errors import VersionNotFoundError

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], responses=ERROR_RESPONSES)
health_router = APIRouter(prefix="/v2/health", tags=["health"])

def _json(value: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status, media_type="application/json")


@health_router.get("/live")
async def live() -> Response:
    """The server is up."""
    return _json({"live": True})


READY_ANSWERS = {
    200: {"description": "every champion is loaded: `{\"ready\": true}`"},
    503: {"description": "still loading a champion: `{\"ready\": false}`"},
}


@health_router.get("/ready", responses=READY_ANSWERS)
async def ready(request: Request) -> Response:
    """True (200) once the champion of every model that has one is loaded; 503 before."""
    ok = request.app.state.serving.ready
    return _json({"ready": ok}, 200 if ok else 503)


async def _loaded(request: Request, name: str, version: str | None) -> LoadedVersion:
    authorize(request, "read")
    validate_model_name(name)
    working_on(name, version)
    serving = request.app.state.serving
    if version is None:
        route = serving.routes.get(name) or await run_in_threadpool(serving.route, name)
        return route.champion
    try:
        number = int(version)
    except ValueError:
        raise VersionNotFoundError(f"version {version!r} of {name!r} is not a number; V2 paths "
                                   "take version numbers (/v2/models/{name} serves the "
                                   "champion)") from None
    for v in (serving.routes.get(name).versions() if name in serving.routes else []):
        if v.version == number:
            return v
    return await run_in_threadpool(serving.version, name, number)


def _metadata(loaded: LoadedVersion) -> dict:
    inputs = [{"name": c, "datatype": "FP64", "shape": [-1]} for c in loaded.numeric]
    inputs += [{"name": c, "datatype": "BYTES", "shape": [-1]} for c in loaded.categorical]
    outputs = [{"name": "predict", "datatype": _label_type(loaded), "shape": [-1]}]
    if loaded.classes:
        outputs.append({"name": "predict_proba", "datatype": "FP64",
                        "shape": [-1, len(loaded.classes)]})
    return {"name": loaded.model_name, "versions": [str(loaded.version)],
            "platform": "onnxruntime_onnx" if loaded.backend == ONNX else "mlflow_sklearn",
            "inputs": inputs, "outputs": outputs,
            "parameters": {"backend": loaded.backend, "reason": loaded.reason or None,
                           "task": loaded.task, "classes": loaded.classes}}


def _label_type(loaded: LoadedVersion) -> str:
    if not loaded.classes:
        return "FP64"
    return "INT64" if all(isinstance(c, int) and not isinstance(c, bool)
                          for c in loaded.classes) else "BYTES"


@router.get("/models/{name}")
async def metadata(name: str, request: Request) -> Response:
    """The champion's metadata; `parameters.backend` says whether ONNX or MLflow answers."""
    return _json(_metadata(await _loaded(request, name, None)))


@router.get("/models/{name}/versions/{version}")
async def version_metadata(name: str, version: str, request: Request) -> Response:
    """A version's metadata."""
    return _json(_metadata(await _loaded(request, name, version)))


@router.get("/models/{name}/ready")
async def model_ready(name: str, request: Request) -> Response:
    loaded = await _loaded(request, name, None)
    return _json({"name": name, "ready": True, "version": str(loaded.version)})


@router.get("/models/{name}/versions/{version}/ready")
async def version_ready(name: str, version: str, request: Request) -> Response:
    loaded = await _loaded(request, name, version)
    return _json({"name": name, "ready": True, "version": str(loaded.version)})


@router.post("/models/{name}/infer")
async def infer(name: str, request: Request) -> Response:
    """Predict with the champion."""
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer")
async def version_infer(name: str, version: str, request: Request) -> Response:
    """Predict with a version."""
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    loaded = await _loaded(request, name, version)
    state = request.app.state
    try:
        body = read_json(await request.body())
        rows = v2_rows(body, loaded)
        columns = check_rows(rows, loaded.numeric, loaded.categorical,
                             state.settings.max_predict_rows)
    except InputError as exc:
        return input_error(exc)
    import time

    began = time.perf_counter()
    if loaded.backend == MLFLOW:
        answer = await run_in_threadpool(loaded.predict, columns)
    else:
        answer = loaded.predict(columns)
    state.metrics.answered(name, loaded.version, "champion" if version is None else "pinned",
                           len(rows), time.perf_counter() - began)
    n = len(rows)
    outputs = [{"name": "predict", "datatype": _label_type(loaded), "shape": [n],
                "data": answer.predictions}]
    if answer.probabilities is not None:
        outputs.append({"name": "predict_proba", "datatype": "FP64",
                        "shape": [n, len(answer.classes)],
                        "data": answer.probabilities.reshape(-1).tolist()})
    result = {"model_name": name, "model_version": str(loaded.version), "outputs": outputs,
              "parameters": {"backend": loaded.backend}}
    if isinstance(body.get("id"), str):
        result["id"] = body["id"]
    return _json(result)


def v2_rows(body: Any, loaded: LoadedVersion) -> list[dict]:
    """Rows (records) from a V2 inference request: one input per column, or one [N, n_features]
    numeric tensor in the metadata's input order."""
    if type(body) is not dict or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise InputError("a V2 inference request is an object with a non-empty `inputs` list "
                         "(one input per column, or one [N, n_features] tensor)", "inputs")
    inputs = body["inputs"]
    for i, tensor in enumerate(inputs):
        if type(tensor) is not dict or not isinstance(tensor.get("name"), str) \
                or not isinstance(tensor.get("shape"), list) or "data" not in tensor:
            raise InputError(f"inputs[{i}] needs name, shape, datatype and data", f"inputs[{i}]")
        if not all(type(d) is int and d >= 0 for d in tensor["shape"]):
            raise InputError(f"inputs[{i}].shape must be a list of non-negative integers, got "
                             f"{tensor['shape']!r}", f"inputs[{i}].shape")
    columns = loaded.columns
    if len(inputs) == 1 and len(inputs[0]["shape"]) == 2 and \
            inputs[0]["name"] not in columns:
        tensor = inputs[0]
        n, width = tensor["shape"]
        if loaded.categorical:
            raise InputError(f"{name_of(loaded)} has categorical columns "
                             f"({', '.join(loaded.categorical)}): send one input per column "
                             "(BYTES for categoricals), not one numeric tensor", "inputs[0]")
        if width != len(columns):
            raise InputError(f"inputs[0] has shape [{n}, {width}]; {name_of(loaded)} takes "
                             f"{len(columns)} features in this order: {', '.join(columns)}",
                             "inputs[0].shape")
        data = _flat(tensor["data"])
        if len(data) != n * width:
            raise InputError(f"inputs[0] has {len(data)} values for shape [{n}, {width}]",
                             "inputs[0].data")
        return [dict(zip(columns, data[r * width:(r + 1) * width])) for r in range(n)]
    by_name = {t["name"]: _flat(t["data"]) for t in inputs}
    lengths = {len(v) for name, v in by_name.items() if name in columns}
    if len(lengths) > 1:
        raise InputError(f"the inputs have different lengths ({sorted(lengths)}); one value "
                         "per row in each", "inputs")
    n = lengths.pop() if lengths else 0
    present = [c for c in columns if c in by_name]
    missing = [c for c in columns if c not in by_name]
    if missing:
        raise InputError(f"inputs lack column {missing[0]!r} ({name_of(loaded)} takes one "
                         f"input per column: {', '.join(columns)})", f"inputs.{missing[0]}")
    return [{c: by_name[c][r] for c in present} for r in range(n)]


def name_of(loaded: LoadedVersion) -> str:
    return f"{loaded.model_name} v{loaded.version}"


def _flat(data: Any) -> list:
    if not isinstance(data, list):
        raise InputError("input data must be a list (row-major)", "inputs")
    if data and isinstance(data[0], list):
        return [x for row in data for x in (row if isinstance(row, list) else [row])]
    return data
