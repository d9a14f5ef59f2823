"""Calling a subflow so that a Prefect server restart does not fail the run that calls it.

A subflow call first asks the Prefect API for two records: a task run in the parent that tracks
the subflow, and the subflow's own flow run. Prefect 3.9 creates the tracking task run with a
fresh client, and its client retries a refused connection only once it has connected
(prefect/client/base.py), so a subflow called while the server restarts fails at once with
`httpx.ConnectError` and takes the parent run down with it -- although nothing of the subflow
ran. `run_subflow` calls the subflow again once the API answers, but only when the refusal came
from creating the subflow's run (`FlowRunEngine.create_flow_run` in prefect/flow_engine.py): an
error raised once the subflow's body had started (`FlowRunEngine.call_flow_fn`) is re-raised
as it is, because calling again would repeat its work (a second model version, say).

A retry leaves at most a Pending tracking task run behind in the parent (its subflow run was
never created); the subflow itself runs once.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, ParamSpec, TypeVar

import httpx

from tasks.errors import MlopsError

__all__ = ["API_WAIT_S", "PrefectApiUnavailableError", "creation_refused", "run_subflow"]

P = ParamSpec("P")
R = TypeVar("R")

API_WAIT_S = 180.0   # how long a refused subflow waits for the API; a server restart takes 10-60 s
POLL_S = 2.0
# A refused or timed-out connection never reached the server: nothing was created, a retry is safe.
UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout)
ENGINE_FILE = os.path.join("prefect", "flow_engine.py")
CREATION_FRAME = "create_flow_run"   # FlowRunEngine.create_flow_run: no subflow run yet
BODY_FRAME = "call_flow_fn"          # FlowRunEngine.call_flow_fn: the subflow's body started

_log = logging.getLogger(__name__)


class PrefectApiUnavailableError(MlopsError, RuntimeError):
    """The Prefect API stayed unreachable while a subflow's run was being created."""


def _engine_frames(exc: BaseException) -> set[str]:
    """Names of the Prefect flow-engine functions the exception passed through."""
    names, tb = set(), exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename.endswith(ENGINE_FILE):
            names.add(code.co_name)
        tb = tb.tb_next
    return names


def creation_refused(exc: BaseException) -> bool:
    """Whether EXC is the API refusing the creation of a subflow's run (nothing of it ran)."""
    if not isinstance(exc, UNREACHABLE):
        return False
    frames = _engine_frames(exc)
    return CREATION_FRAME in frames and BODY_FRAME not in frames


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or "(no PREFECT_API_URL: a temporary local server)"


def _api_answers() -> bool:
    """One health check with a client of its own: the run's client would retry for a minute."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}):
        with get_client(sync_client=True, httpx_settings={"timeout": 5}) as client:
            return client.api_healthcheck() is None


def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return _log


def run_subflow(flow_fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Call the subflow FLOW_FN(*ARGS, **KWARGS); if the Prefect API refused to create its run,
    wait for the API (up to API_WAIT_S seconds from the first refusal) and call it again.

    Any other error, and any error once the subflow's body has started, is raised as it is.

    Raises:
        PrefectApiUnavailableError: The API did not answer within API_WAIT_S seconds; nothing
            of the subflow ran.
    """
    name = getattr(flow_fn, "name", getattr(flow_fn, "__name__", repr(flow_fn)))
    first_refusal: float | None = None
    while True:
        try:
            return flow_fn(*args, **kwargs)
        except UNREACHABLE as exc:
            if not creation_refused(exc):
                raise
            first_refusal = time.monotonic() if first_refusal is None else first_refusal
            _wait_for_api(name, exc, first_refusal)


def _wait_for_api(name: str, exc: Exception, first_refusal: float) -> None:
    """Return once the API answers; raise PrefectApiUnavailableError at API_WAIT_S."""
    deadline = first_refusal + API_WAIT_S
    _logger().warning("subflow %s not started: the Prefect API at %s refused (%s); waiting up "
                      "to %.0f s for it", name, _api_url(), exc,
                      max(0.0, deadline - time.monotonic()))
    # checked before the first health check too: an API that answers but keeps refusing the
    # subflow must not hold the run forever
    while time.monotonic() < deadline:
        if _api_answers():
            _logger().info("the Prefect API answers again after %.0f s: starting %s again",
                           time.monotonic() - first_refusal, name)
            return
        time.sleep(POLL_S)
    raise PrefectApiUnavailableError(
        f"the Prefect API at {_api_url()} did not answer for "
        f"{time.monotonic() - first_refusal:.0f} s, so subflow {name!r} could not be started "
        f"(nothing of it ran; last error: {exc}). Bring the Prefect server back (`make up` "
        "restarts a stopped one) or point PREFECT_API_URL at a running one, then run this flow "
        "again") from exc
