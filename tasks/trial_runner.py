"""Where train_model's search trials run: threads of the flow run's process (the flow's own task
runner), or a Dask cluster through prefect-dask's DaskTaskRunner when the TrainingSettings block
names a scheduler (blocks/training_settings.py).

The choice is made inside the flow run, from the block, so it holds however train_model is
started (a deployment, a subflow of retrain_model, a Python call). Either way each trial is a
Prefect task run of the flow run. On Dask the trials' data is sent to the cluster once (scatter)
rather than with every trial, and a batch is as wide as the cluster's worker threads.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import TaskRunner

from blocks.training_settings import TrainingSettings
from tasks.errors import ConfigurationError
from tasks.training import TrialData, cpu_workers, evaluate_trial
from tasks.training_search import PlannedTrial, Search


@dataclass
class TrialRunner:
    runner: TaskRunner
    width: int  # trials that run at once: the batch size of the search
    data: Any  # the TrialData, or its Dask future once scattered to the cluster
    where: str

    def submit(self, planned: PlannedTrial, random_state: int,
               deadline: float | None) -> PrefectFuture:
        """One trial as a task run; `deadline` is the flow's time.monotonic() deadline, sent as
        wall-clock time (the trial may run on another machine)."""
        epoch = None if deadline is None else time.time() + (deadline - time.monotonic())
        return self.runner.submit(evaluate_trial, {"planned": planned, "data": self.data,
                                                   "random_state": random_state,
                                                   "deadline_epoch": epoch})

    def run(self, search: Search, random_state: int, deadline: float | None) -> None:
        """Run the search's trials until it has finished, `width` at a time.

        With max_trials, in batches told in trial order: the same trials whatever order they
        finish in. Budget-only, as a rolling window: a new trial starts as soon as one ends, so
        no worker idles while the batch's slowest trial runs (on ames one boosting trial took
        48 s beside trials of 2 s)."""
        if search.max_trials is not None:
            while batch := search.ask(self.width):
                search.tell([f.result() for f in [self.submit(t, random_state, deadline)
                                                   for t in batch]])
            return
        running = [self.submit(t, random_state, deadline) for t in search.ask(self.width)]
        while running:
            done = next(as_completed(running))
            running.remove(done)
            search.tell([done.result()])
            running += [self.submit(t, random_state, deadline)
                        for t in search.ask(self.width - len(running))]


@contextmanager
def trial_runner(settings: TrainingSettings, data: TrialData) -> Iterator[TrialRunner]:
    """Call inside a flow run."""
    if not settings.dask_scheduler_address:
        context = FlowRunContext.get()
        if context is None or context.task_runner is None:
            raise RuntimeError("trial_runner runs inside a flow run")
        yield TrialRunner(context.task_runner, cpu_workers(), data, "threads")
        return
    with dask_runner(settings.dask_scheduler_address, settings.dask_connect_timeout_s) as runner:
        client = runner.client
        width = sum(w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values())
        shared = client.scatter(data, hash=False)
        yield TrialRunner(runner, max(width, 1), shared, f"Dask at {settings.dask_scheduler_address}")


@contextmanager
def dask_runner(address: str, timeout_s: float):
    """A DaskTaskRunner connected to the scheduler at `address` with at least one worker, or a
    ConfigurationError saying what to do, within about `timeout_s`."""
    from prefect_dask import DaskTaskRunner

    where = (f"the Dask scheduler at {address} (TrainingSettings block 'default', "
             "dask_scheduler_address)")
    with DaskTaskRunner(address=address, client_kwargs={"timeout": timeout_s}) as runner:
        try:
            client = runner.client  # connects
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigurationError(
                f"{where} did not answer within {timeout_s:g} s ({exc}); start the scheduler "
                "(`dask scheduler`) and its workers, fix the address, or clear "
                "dask_scheduler_address to run the search on threads") from exc
        try:
            client.wait_for_workers(1, timeout=timeout_s)
        except TimeoutError as exc:
            raise ConfigurationError(
                f"{where} answers but no worker joined it within {timeout_s:g} s; start workers "
                f"with `dask worker {address}` (in an environment with this project installed)"
            ) from exc
        yield runner
