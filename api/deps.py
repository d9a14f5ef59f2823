"""What routes share: the key check with scopes, the caller's name, long-work answers."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prefect import Flow, tags
from pydantic import BaseModel, Field

from api.auth import KeyRecord, grants
from api.errors import APIError
from flows.local_runs import local_run_settings
from tasks.log_fields import model_name_var, version_var

BASE = "/api/v1/mlops"
bearer = HTTPBearer(auto_error=False, description="An API key: `python -m api.keys create`")


def authorize(request: Request, scope: str, token: str | None = None) -> KeyRecord:
    """The key of the request's `Authorization: Bearer` header if it grants `scope` (401 without
    or with a wrong key, 403 without the scope). A plain function: the prediction routes call it
    without FastAPI's dependency machinery."""
    if token is None:
        header = request.headers.get("authorization")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                token = None
    if not token:
        raise APIError(401, "Unauthorized", "no API key: send 'Authorization: Bearer <key>' "
                       "(create one with `python -m api.keys create NAME`)")
    record = request.app.state.keys.lookup(token.strip())
    if record is None:
        raise APIError(401, "Unauthorized", "the API key is wrong or was revoked")
    if not grants(record.scopes, scope):
        raise APIError(403, "Forbidden", f"the key {record.name!r} has scopes "
                       f"{record.scopes}; this route needs {scope!r}")
    request.state.key = record
    return record


def require(scope: str) -> Callable[..., KeyRecord]:
    """A dependency admitting keys that grant `scope` (401 without or with a wrong key, 403
    without the scope)."""

    async def check(request: Request,  # async: no thread hop (the lookup never blocks long)
                    credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
                    ) -> KeyRecord:
        if credentials is None or credentials.scheme.lower() != "bearer":
            return authorize(request, scope, "")
        return authorize(request, scope, credentials.credentials)

    check.__name__ = f"require_{scope}"
    return check


def as_json(value: BaseModel | list[BaseModel], status_code: int = 200) -> Response:
    """A result model (or a list of them) as the answer's JSON, serialized once by pydantic-core:
    the route's `response_model` documents the same schema without FastAPI validating and
    re-serializing the flow's own result a second time."""
    if isinstance(value, BaseModel):
        body = value.model_dump_json()
    else:
        body = "[" + ",".join(v.model_dump_json() for v in value) + "]"
    return Response(body, status_code=status_code, media_type="application/json")


@contextmanager
def audited(key: KeyRecord) -> Iterator[None]:
    """Around a write's in-process flow run: tags saying who asked (the key's name, shown in the
    Prefect UI), and no flow-run heartbeat (it serves only worker-run deployments and costs up
    to 1 s at the end of every in-process flow run)."""
    with local_run_settings(), tags("api", f"api-key:{key.name}"):
        yield


def working_on(model_name: str | None, version: Any = None) -> None:
    """Name the model (and version) this request works on in its log lines."""
    if model_name is not None:
        model_name_var.set(model_name)
    if version is not None:
        version_var.set(str(version))


class Accepted(BaseModel):
    """The answer to long work: a flow run to follow at `status_url`."""

    flow_run_id: str
    state: str
    deployment: str | None = Field(None, description="The deployment that runs it; null: run "
                                                      "by this service (no such deployment on "
                                                      "its Prefect API)")
    status_url: str


def accepted(request: Request, response: Response, flow: Flow, parameters: dict[str, Any],
             key: KeyRecord) -> Accepted:
    """Start `flow` (its deployment, or a background thread) and answer 202 with its run."""
    launched = request.app.state.launcher.launch(flow, parameters, key.name)
    url = f"{BASE}/runs/{launched.flow_run_id}"
    response.status_code = 202
    response.headers["Location"] = url
    return Accepted(flow_run_id=launched.flow_run_id, state=launched.state,
                    deployment=launched.deployment, status_url=url)
