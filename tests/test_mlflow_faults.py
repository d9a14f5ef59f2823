"""Fault: the MLflow server goes away in the middle of train_model's registration.

A real `mlflow server` (SQLite backend, proxied artifacts) behind a watching TCP proxy
(tests/servers.py): when the proxy sees the request the test names, it SIGKILLs (or SIGSTOPs)
the server's process group by PID before passing the request on, so the server stops at an exact
point of the registration. The server is then restarted on the same store and port (or resumed),
the registry audited, and the training retried."""
from __future__ import annotations

import os
import signal
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from blocks.mlflow_config import DEFAULT_DOCUMENT, MLflowConfig
from flows.registry import audit_registry
from flows.training import train_model
from tasks.demo_data import churn_frame
from tasks.errors import RegistryError
from tasks.registry import REGISTRATION_TAG
from tests.budgets import ONE_LINEAR_TRIAL
from tests.servers import WatchingProxy, free_port, stop_process_group
from tests.test_mlflow_server import start_mlflow_server


class Server:
    """One MLflow server on a fixed port and store, which the test can kill and start again."""

    def __init__(self, workdir):
        self.workdir, self.port = workdir, free_port()
        self.proxy = WatchingProxy(self.port)
        self.process = None
        self.start()

    def start(self):
        self.process = start_mlflow_server(f"sqlite:///{self.workdir / 'mlflow.db'}", "sqlite",
                                           self.workdir, port=self.port,
                                           also_allowed=(f"127.0.0.1:{self.proxy.port}",)).process

    def kill(self):
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def pause(self):
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self):
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self):
        stop_process_group(self.process)
        self.proxy.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-faults"))
    yield srv
    srv.stop()


@pytest.fixture
def proxied(server, state_dir, monkeypatch):
    """The flows pointed at the server through the proxy, with MLflow's client bounded: one try
    per request (its default retries a refused connection 7 times with backoff, for minutes)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    proxy = server.proxy
    MLflowConfig(tracking_uri=proxy.url).save(DEFAULT_DOCUMENT, overwrite=True)
    try:
        yield proxy
    finally:
        proxy.on_request = lambda line: None
        MLflowConfig.delete(DEFAULT_DOCUMENT)
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)


CREATE = "POST /api/2.0/mlflow/model-versions/create"


def stop_when(server: Server, fault: str):
    """on_request for the proxy: stop the server right before the request `fault` names.
    kill-after-create: SIGKILL at the first request after the version was created;
    kill-before-alias: SIGKILL before the alias move; pause-at-create: SIGSTOP before the request
    creating the version, which the server then handles only once resumed -- after the client
    gave up on it."""
    state = {"created": False, "done": False}

    def on_request(line: str) -> None:
        if state["done"]:
            return
        if fault == "kill-after-create":
            hit = state["created"]
        elif fault == "kill-before-alias":
            hit = line.startswith("POST /api/2.0/mlflow/registered-models/alias")
        else:
            hit = line.startswith(CREATE)
        state["created"] |= line.startswith(CREATE)
        if hit:
            state["done"] = True
            server.pause() if fault.startswith("pause") else server.kill()

    return on_request


@pytest.mark.parametrize("fault", ["kill-after-create", "kill-before-alias", "pause-at-create"])
def test_mlflow_stopped_mid_registration_leaves_no_alias_and_the_retry_registers_one_version(
        server, proxied, fault):
    name = f"fault_{fault.replace('-', '_')}"
    frame = churn_frame().iloc[:600]
    proxied.on_request = stop_when(server, fault)
    started = time.monotonic()
    try:
        with pytest.raises(RegistryError) as caught:
            train_model(frame, "churn", name, **ONE_LINEAR_TRIAL)
    finally:
        if fault.startswith("pause"):
            server.resume()
    failed_after = time.monotonic() - started
    message = str(caught.value)
    assert f"MLflow at {proxied.url} failed while registering a version of {name!r}" in message
    assert "No alias was moved" in message and "run the training again" in message
    assert failed_after < 120, failed_after

    client = MlflowClient(tracking_uri=proxied.url, registry_uri=proxied.url)
    if fault.startswith("kill"):
        assert server.process.poll() is not None  # the fault happened: the server is dead
        server.start()  # the same store, the same port
        (left,) = client.search_model_versions(f"name='{name}'")  # created before the kill
    else:
        # resumed, the server works through the requests queued while it was stopped; whether it
        # still creates the version its client gave up on is up to the server (here it did not)
        time.sleep(3)
    left = client.search_model_versions(f"name='{name}'")
    assert len(left) == (0 if fault.startswith("pause") else 1)
    assert client.get_registered_model(name).aliases == {}  # no alias moved
    # a version that was created is marked unfinished, not passed off as done
    assert all(mv.tags[REGISTRATION_TAG] == "pending" for mv in left)
    report = audit_registry(name)
    assert [(f.check, f.version) for f in report.findings] == [
        ("registration-incomplete", int(mv.version)) for mv in left]

    retried = train_model(frame, "churn", name, **ONE_LINEAR_TRIAL)
    versions = client.search_model_versions(f"name='{name}'")
    assert [int(mv.version) for mv in versions] == [retried.version]  # exactly one version
    assert retried.version not in [int(mv.version) for mv in left]
    assert retried.aliases == ["champion"]
    assert client.get_registered_model(name).aliases == {"champion": str(retried.version)}
    assert REGISTRATION_TAG not in versions[0].tags and versions[0].description
    report = audit_registry(name)
    assert report.ok, report.findings
