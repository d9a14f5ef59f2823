"""train_model's search on a Dask cluster (TrainingSettings.dask_scheduler_address): a real
LocalCluster of two worker processes on loopback, against the real Prefect API and MLflow store."""
from __future__ import annotations

import os
import time

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from blocks.training_settings import DEFAULT_DOCUMENT, TrainingSettings
from flows.training import train_model
from tasks.demo_data import churn_frame
from tasks.errors import ConfigurationError
from tasks.registry import mlflow_client
from tests.servers import free_port

# two batches of two trials on the cheaper families: enough for both workers to take trials
SEARCH = dict(max_trials=4, random_state=7, time_budget_s=60,
              candidates=["linear", "random_forest"])


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  host="127.0.0.1", dashboard_address=None) as local:
        yield local


@pytest.fixture
def settings():
    """Save the `default` TrainingSettings for one test; deleted afterwards."""
    def save(**fields):
        TrainingSettings(**fields).save(DEFAULT_DOCUMENT, overwrite=True)
    yield save
    try:
        TrainingSettings.delete(DEFAULT_DOCUMENT)
    except ValueError:
        pass


@pytest.fixture(scope="module")
def churn():
    return churn_frame().sample(800, random_state=1).reset_index(drop=True)


def trial_task_runs(flow_run_id):
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [r for r in runs if r.name.startswith("trial-")]


def test_trials_run_on_the_dask_workers_and_find_what_threads_find(state_dir, churn, cluster,
                                                                   settings):
    settings(dask_scheduler_address=cluster.scheduler_address)
    state = train_model(churn, "churn", "on_dask", **SEARCH, return_state=True)
    on_dask = state.result()
    workers = set(cluster.scheduler_info["workers"])

    # every trial ran on a worker of the cluster, and the history says which
    where = [row["worker"] for row in on_dask.leaderboard]
    assert len(where) == 4 and set(where) <= workers, (where, workers)
    assert len(set(where)) == 2  # both workers took trials (batches of two, one thread each)
    # each trial is a task run of the flow run, completed (what the Prefect UI shows)
    runs = trial_task_runs(state.state_details.flow_run_id)
    assert len(runs) == 4 and all(r.state.is_completed() for r in runs)

    # the same search on threads (two at a time, as the cluster's two worker threads) picks the
    # same trials, the same scores, the same winner
    TrainingSettings.delete(DEFAULT_DOCUMENT)
    on_threads = train_model(churn, "churn", "on_threads", **SEARCH)
    assert all(row["worker"].endswith(f"pid {os.getpid()}") for row in on_threads.leaderboard)

    def key(result):
        return [(r["trial"], r["candidate"], r["status"], r["roc_auc"], r["folds"])
                for r in result.leaderboard]

    assert key(on_dask) == key(on_threads)
    assert (on_dask.family, on_dask.cv_score, on_dask.score) == (
        on_threads.family, on_threads.cv_score, on_threads.score)


def test_a_scheduler_that_does_not_answer_fails_the_training_fast_and_says_what_to_do(
        state_dir, churn, settings):
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    settings(dask_scheduler_address=address, dask_connect_timeout_s=2)
    started = time.monotonic()
    with pytest.raises(ConfigurationError) as caught:
        train_model(churn, "churn", "no_cluster", **SEARCH)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert f"Dask scheduler at {address}" in message and "did not answer within 2 s" in message
    assert "dask_scheduler_address" in message and "`dask scheduler`" in message
    assert elapsed < 20, elapsed  # the connect timeout, not distributed's default 30 s or a hang
    assert mlflow_client().search_registered_models() == []  # nothing trained, nothing registered
