"""Long work's status: the state of a flow run from Prefect, its result once Completed, its
error once Failed."""
from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel

from api.auth import KeyRecord
from api.deps import require
from api.errors import ERROR_RESPONSES, APIError, ErrorDetail

router = APIRouter(prefix="/runs", tags=["runs"], responses=ERROR_RESPONSES)


class RunStatus(BaseModel):
    flow_run_id: str
    state: str
    state_type: str
    name: str | None = None
    flow_name: str | None = None
    deployment_id: str | None = None
    result: Any = None
    error: ErrorDetail | None = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@router.get("/{flow_run_id}", response_model=RunStatus)
def run_status(flow_run_id: str, request: Request, key: KeyRecord = Depends(require("read"))):
    """A flow run started by long work (or any flow run): state, result, error."""
    try:
        run_uuid = UUID(flow_run_id)
    except ValueError:
        raise APIError(404, "FlowRunNotFound", f"{flow_run_id!r} is not a flow run id") from None
    with get_client(sync_client=True) as client:
        try:
            flow_run = client.read_flow_run(run_uuid)
        except ObjectNotFound:
            raise APIError(404, "FlowRunNotFound", f"no flow run {flow_run_id}") from None
        flow_name = None
        try:
            flow_name = client.read_flow(flow_run.flow_id).name
        except ObjectNotFound:
            pass
    state = flow_run.state
    kind = state.type.value if state else "PENDING"
    status = RunStatus(flow_run_id=flow_run_id, state=state.name if state else "Pending",
                       state_type=kind, name=flow_run.name, flow_name=flow_name,
                       deployment_id=str(flow_run.deployment_id) if flow_run.deployment_id
                       else None)
    kept = request.app.state.launcher.outcome(flow_run_id)
    if kind == "COMPLETED":
        if kept is not None and kept.done and kept.error is None:
            status.result = _jsonable(kept.value)
        elif state is not None:
            try:
                status.result = _jsonable(state.result(raise_on_failure=False))
            except Exception as exc:  # result not persisted where this service can read it
                status.error = ErrorDetail(type="ResultUnavailable", message=str(exc)[:500])
    elif kind in ("FAILED", "CRASHED", "CANCELLED"):
        if kept is not None and kept.error is not None:
            status.error = ErrorDetail(type=type(kept.error).__name__, message=str(kept.error))
        else:
            status.error = ErrorDetail(type=f"FlowRun{kind.title()}",
                                       message=(state.message if state else None) or kind.lower())
    return status
