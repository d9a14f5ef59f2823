"""run_subflow against a real Prefect server of its own that the tests stop and restart.

The module's server is a `prefect server start` subprocess (tests/servers.py PrivatePrefectServer),
not the session's shared test API: these tests take it away. The flows run in this process with
PREFECT_API_URL pointed at it.
"""
from __future__ import annotations

import threading
import time
from typing import Iterator

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.settings import PREFECT_API_URL, temporary_settings

import tasks.prefect_api as prefect_api
from tasks.prefect_api import PrefectApiUnavailableError, run_subflow
from tests.servers import PrivatePrefectServer, free_port, log_tail


@pytest.fixture(scope="module")
def server() -> Iterator[PrivatePrefectServer]:
    started = PrivatePrefectServer().start()
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def on_server(server) -> Iterator[PrivatePrefectServer]:
    """The test's flows talk to the private server (which is up when the test starts)."""
    server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.url}):
        yield server


def flow_runs_of(name: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))


def test_a_subflow_called_while_the_server_restarts_runs_once_when_it_is_back(on_server):
    ran_at: list[float] = []

    @flow(name="f5-tiny-child")
    def child(x: int) -> int:
        ran_at.append(time.monotonic())
        return x + 1

    go, outcome = threading.Event(), {}

    @flow(name="f5-parent")
    def parent() -> int:
        go.wait(60)
        return run_subflow(child, 41)

    def run_parent() -> None:
        # settings live in context variables, which a new thread does not inherit
        with temporary_settings(updates={PREFECT_API_URL: on_server.url}):
            try:
                outcome["result"] = parent()
            except BaseException as exc:  # reported by the test below
                outcome["error"] = exc

    caller = threading.Thread(target=run_parent)
    caller.start()
    time.sleep(2)  # the parent's run exists and it waits inside its body
    on_server.stop()
    stopped_at = time.monotonic()
    go.set()  # the subflow is called now, against a server that is down
    time.sleep(4)
    on_server.start()
    back_at = time.monotonic()
    caller.join(timeout=120)

    assert not caller.is_alive(), "the parent flow did not end within 120 s of the restart"
    assert "error" not in outcome, f"{outcome['error']!r}\n{log_tail(on_server.log)}"
    assert outcome["result"] == 42
    assert len(ran_at) == 1 and ran_at[0] >= back_at, (ran_at, stopped_at, back_at)
    runs = flow_runs_of("f5-tiny-child")
    assert len(runs) == 1 and runs[0].state.is_completed(), runs
    parents = flow_runs_of("f5-parent")
    assert len(parents) == 1 and parents[0].state.is_completed(), parents
    print(f"subflow ran {ran_at[0] - stopped_at:.1f} s after the server stopped "
          f"({ran_at[0] - back_at:.1f} s after it answered again)")


def test_an_error_from_the_subflow_body_is_raised_not_retried(on_server):
    ran: list[int] = []
    dead = f"http://127.0.0.1:{free_port()}/"  # nothing listens there

    @flow(name="f5-failing-child")
    def child() -> None:
        ran.append(1)
        httpx.get(dead)  # the same error type as a refused API, but from the body's own work

    @flow(name="f5-failing-parent")
    def parent() -> None:
        run_subflow(child)

    with pytest.raises(httpx.ConnectError):
        parent()
    assert ran == [1]
    runs = flow_runs_of("f5-failing-child")
    assert len(runs) == 1 and runs[0].state.is_failed(), runs


def test_an_api_that_stays_away_ends_in_an_error_that_says_what_to_do(on_server, monkeypatch):
    ran: list[int] = []

    @flow(name="f5-never-started")
    def child() -> None:
        ran.append(1)

    monkeypatch.setattr(prefect_api, "API_WAIT_S", 4.0)
    on_server.stop()
    started = time.monotonic()
    with pytest.raises(PrefectApiUnavailableError) as raised:
        run_subflow(child)
    waited = time.monotonic() - started
    message = str(raised.value)
    assert on_server.url in message and "f5-never-started" in message, message
    assert "nothing of it ran" in message and "make up" in message, message
    assert isinstance(raised.value.__cause__, httpx.ConnectError)
    assert ran == [] and 4 <= waited < 20, waited
