"""Helpers of the REST API tests: an app on a module's own state folder, keys, polling runs."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import KeyFile
from blocks.api_settings import APISettings
from blocks.mlflow_config import resolve_mlflow_config

BASE = "/api/v1/mlops"


@dataclass
class World:
    home: Path
    client: TestClient
    keys: dict[str, str]
    keys_file: KeyFile

    def auth(self, scope: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[scope]}"}

    def get(self, path: str, scope: str = "read", headers: dict | None = None, **kw):
        return self.client.get(BASE + path, headers={**self.auth(scope), **(headers or {})}, **kw)

    def post(self, path: str, body: dict | None = None, scope: str = "write", **kw):
        return self.client.post(BASE + path, json=body, headers=self.auth(scope), **kw)

    def wait(self, accepted, timeout: float = 180) -> dict:
        """Poll the run of a 202 answer until it is final; its last status."""
        assert accepted.status_code == 202, accepted.text
        location = accepted.headers["location"]
        assert location == accepted.json()["status_url"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.client.get(location, headers=self.auth("read"))
            assert status.status_code == 200, status.text
            body = status.json()
            if body["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                if body["state_type"] == "COMPLETED" and body["result"] is None:
                    pass  # the thread may not have handed its value over yet
                else:
                    return body
            if time.monotonic() > deadline:
                raise AssertionError(f"run not final after {timeout} s: {body}")
            time.sleep(0.3)


def use_experiment(name: str) -> None:
    """Make `name` the active MLflow experiment, artifacts in the state folder (not ./mlruns)."""
    config = resolve_mlflow_config()
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=f"{config.artifact_location}/{name}")
    mlflow.set_experiment(name)


@contextmanager
def api_world(tmp_path_factory, template_db: Path, name: str, **settings: object) -> Iterator[World]:
    """MLOPS_HOME on a fresh state folder, three keys, the app (APISettings fields: SETTINGS) and
    its client; undone after."""
    home = tmp_path_factory.mktemp(name)
    state = home / "state"
    state.mkdir()
    shutil.copyfile(template_db, state / "mlflow.db")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLOPS_HOME", str(state))
    resolve_mlflow_config().apply()  # the tests' own mlflow calls go to the same store
    keys_file = KeyFile(home / "keys.json")
    keys = {scope: keys_file.create(f"test-{scope}", [scope])[0]
            for scope in ("read", "write", "admin")}
    app_settings = APISettings(keys_file=str(keys_file.path), key_cache_seconds=0.3, **settings)
    try:
        with TestClient(create_app(app_settings), raise_server_exceptions=False) as client:
            yield World(home=home, client=client, keys=keys, keys_file=keys_file)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        mp.undo()


def assert_error(response, status: int, type_: str | None = None, field: str | None = None,
                 contains: str | None = None) -> dict:
    """The one error shape, with the status, type, field and message part asked for."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message", "field"}, body
    if type_:
        assert body["error"]["type"] == type_, body
    if field:
        assert body["error"]["field"] == field, body
    if contains:
        assert contains in body["error"]["message"], body
    assert response.headers.get("x-request-id")
    return body["error"]
