"""REST API: a backend that does not answer is a 503 naming it (MLflow, the A/B database), never
a 500; the service answers again once it is back."""
from __future__ import annotations

import pytest

from blocks.ab_policy import ABPolicy
from blocks.mlflow_config import DEFAULT_DOCUMENT, MLflowConfig
from tasks.ab import ABStore
from tests.api_support import assert_error, api_world
from tests.servers import free_port


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_template_db):
    with api_world(tmp_path_factory, mlflow_template_db, "api-backends") as world:
        yield world


def test_mlflow_down_is_503_naming_mlflow(world, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    MLflowConfig(tracking_uri=f"http://127.0.0.1:{free_port()}").save(DEFAULT_DOCUMENT,
                                                                       overwrite=True)
    try:
        error = assert_error(world.get("/models/customer_churn/versions"), 503,
                             "MLflowUnavailable")
        assert "MLflow does not answer" in error["message"]
    finally:
        MLflowConfig.delete(DEFAULT_DOCUMENT)
    assert_error(world.get("/models/customer_churn/versions"), 404, "ModelNotFoundError")


def test_the_ab_database_down_is_503(world, monkeypatch):
    # nothing listens on the port: the store's first open waits 1 s for it, not the default 30 s
    monkeypatch.setattr(ABStore, "unavailable_seconds", 1.0)
    ABPolicy(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/ab").save(
        DEFAULT_DOCUMENT, overwrite=True)
    try:
        error = assert_error(world.get("/ab-tests/active"), 503)
        assert "A/B store" in error["message"] and "127.0.0.1" in error["message"]
    finally:
        ABPolicy.delete(DEFAULT_DOCUMENT)
    assert world.get("/ab-tests/active").status_code == 200
