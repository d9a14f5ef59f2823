"""Export routes: start an export (long work) and download a published file."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from api.auth import KeyRecord
from api.deps import Accepted, accepted, require, working_on
from api.errors import ERROR_RESPONSES, APIError
from blocks.mlflow_config import state_dir
from flows.export import export_model
from tasks.export.base import ExportError
from tasks.export.core import sha256_file
from tasks.export.steps import fetch_export
from tasks.registry import NAME_PATTERN, mlflow_client, resolve_version, validate_model_name

router = APIRouter(prefix="/models/export", tags=["export"], responses=ERROR_RESPONSES)
FormatName = Literal["onnx", "pmml", "tflite", "coreml", "edge"]
VERSION_OR_ALIAS = r"^(\d{1,9}|[A-Za-z][A-Za-z0-9_\-]{0,63})$"


class ExportRequest(BaseModel):
    model_name: str = Field(examples=["customer_churn"])
    version: int | str = Field("champion", examples=[2])
    format: FormatName | None = Field(None, description="One format (or `formats`).")
    formats: list[FormatName] | None = Field(None, min_length=1)
    quantize: bool = False
    sample_data: str | None = Field(None, description="Rows for the parity gate (path or URI); "
                                                      "empty: the version's holdout.")


@router.post("", response_model=Accepted, status_code=202)
def export(body: ExportRequest, request: Request, response: Response,
           key: KeyRecord = Depends(require("write"))):
    """Export a version to onnx, pmml, tflite, coreml or edge (long work), each file checked
    against scikit-learn before it is published."""
    working_on(body.model_name, body.version)
    if body.format and body.formats:
        raise APIError(422, "ValidationError", "pass format or formats, not both", "formats")
    formats = body.formats or [body.format or "onnx"]
    resolve_version(mlflow_client(), validate_model_name(body.model_name), body.version)
    params = {"model_name": body.model_name, "version": body.version, "formats": formats,
              "quantize": body.quantize}
    if body.sample_data:
        params["sample_data"] = body.sample_data
    return accepted(request, response, export_model, params, key)


@router.get("/{name}/{version}/download", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}},
                             "description": "The exported file"},
                       304: {"description": "Not modified"}})
def download(name: str, version: str, request: Request,
             format: FormatName = Query("onnx", description="edge: the zip bundle"),
             key: KeyRecord = Depends(require("read"))):
    """A published export of a version (verified against its manifest's sha256): the file,
    its `ETag` (the sha256) and a `Content-Disposition` name."""
    if not NAME_PATTERN.match(name) or not re.match(VERSION_OR_ALIAS, version):
        raise APIError(404, "NotFound", f"no export of {name!r} version {version!r}")
    working_on(name, version)
    store = (state_dir() / "downloads").resolve()
    try:
        path = Path(fetch_export(name, version, format)).resolve()
    except ExportError as exc:  # never exported, or not to this format
        raise APIError(404, "ExportNotFound", str(exc)) from None
    if not path.is_relative_to(store) or not path.is_file():
        raise APIError(404, "NotFound", f"no export of {name!r} version {version!r}")
    etag = f'"{sha256_file(path)}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return FileResponse(path, filename=path.name, media_type="application/octet-stream",
                        headers={"ETag": etag}, content_disposition_type="attachment")
