"""Long work (training, export, retraining, comparison on data) without holding the request.

When the Prefect API in use has the flow's prefect.yaml deployment (`<flow name>/default`, what
`make up` deploys), the work is a run of that deployment (`run_deployment(..., timeout=0)`): a
worker runs it and persists its result (the flows set `persist_result=True`; the stack's
service and worker share PREFECT_HOME, so `State.result()` reads it here). Without that deployment
(embedded mode) the flow runs in a background thread of this service. Its flow run is as real as
a worker's (states in Prefect, logs, artifacts); the return value is also kept in memory, keyed
by flow run id, so `runs/{id}` answers at once even where results are not persisted. Either way
the caller gets the flow run id, and `GET runs/{id}` reads the state from Prefect.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from prefect import Flow, tags
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from flows.local_runs import local_run_settings

DEPLOYMENT_CACHE_S = 30.0
START_TIMEOUT_S = 60.0
KEEP_RESULTS = 256


@dataclass
class Launched:
    flow_run_id: str
    state: str
    deployment: str | None  # None: run in this service's background thread


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None
    done: bool = False


class Launcher:
    def __init__(self) -> None:
        self._deployments: dict[str, tuple[bool, float]] = {}
        self._outcomes: OrderedDict[str, Outcome] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ deployments
    def deployment_exists(self, name: str) -> bool:
        hit = self._deployments.get(name)
        if hit and time.monotonic() - hit[1] < DEPLOYMENT_CACHE_S:
            return hit[0]
        with get_client(sync_client=True) as client:
            try:
                client.read_deployment_by_name(name)
                exists = True
            except ObjectNotFound:
                exists = False
        self._deployments[name] = (exists, time.monotonic())
        return exists

    # ------------------------------------------------------------------ launching
    def launch(self, flow: Flow, parameters: dict[str, Any], who: str) -> Launched:
        name = f"{flow.name}/default"
        run_tags = ["api", f"api-key:{who}"]
        if self.deployment_exists(name):
            flow_run = run_deployment(name, parameters=parameters, timeout=0, tags=run_tags,
                                      as_subflow=False)
            state = flow_run.state.name if flow_run.state else "Scheduled"
            return Launched(str(flow_run.id), state, name)
        return self._in_thread(flow, parameters, run_tags)

    def _in_thread(self, flow: Flow, parameters: dict[str, Any], run_tags: list[str]) -> Launched:
        started = threading.Event()
        box: dict[str, Any] = {}

        def on_state(_flow, flow_run, state) -> None:
            box.setdefault("id", str(flow_run.id))
            box["state"] = state.name
            started.set()

        hooked = flow.with_options(on_running=[on_state], on_failure=[on_state],
                                   on_crashed=[on_state])

        def work() -> None:
            outcome = Outcome()
            try:
                with local_run_settings(), tags(*run_tags):
                    outcome.value = hooked(**parameters)
            except BaseException as exc:  # kept for runs/{id}; the flow run says Failed
                outcome.error = exc
                box.setdefault("error", exc)
            finally:
                outcome.done = True
                if "id" in box:
                    self._keep(box["id"], outcome)
                started.set()

        with self._lock:
            threading.Thread(target=work, name=f"mlops-{flow.name}", daemon=True).start()
        if not started.wait(START_TIMEOUT_S):
            raise TimeoutError(f"the {flow.name} flow run did not start within "
                               f"{START_TIMEOUT_S:.0f} s")
        if "id" not in box:  # refused before a flow run existed (e.g. invalid parameters)
            raise box["error"]
        self._keep(box["id"], self._outcomes.get(box["id"]) or Outcome())
        return Launched(box["id"], box.get("state", "Running"), None)

    def _keep(self, flow_run_id: str, outcome: Outcome) -> None:
        with self._lock:
            existing = self._outcomes.get(flow_run_id)
            if existing is not None and existing is not outcome and not outcome.done:
                return  # the thread finished first: keep its outcome
            self._outcomes[flow_run_id] = outcome
            self._outcomes.move_to_end(flow_run_id)
            while len(self._outcomes) > KEEP_RESULTS:
                self._outcomes.popitem(last=False)

    def outcome(self, flow_run_id: str) -> Outcome | None:
        return self._outcomes.get(flow_run_id)
