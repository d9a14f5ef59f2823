"""Property-based fuzzing of every route from the OpenAPI schema (schemathesis): whatever the
input, no 500, and every answer has a documented status, content type and body schema."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from api.app import create_app
from api.auth import KeyFile
from blocks.api_settings import APISettings

EXAMPLES_PER_ROUTE = 12


@schemathesis.check
def not_an_undocumented_server_error(ctx, response, case):
    """A 503 the route documents (a readiness probe while champions load) is an answer; any
    other 5xx is a failure."""
    if response.status_code == 503 and "503" in case.operation.definition.raw.get("responses", {}):
        return None
    return checks.not_a_server_error(ctx, response, case)


CHECKS = [not_an_undocumented_server_error, checks.status_code_conformance,
          checks.content_type_conformance, checks.response_schema_conformance]

# The schema is read when the module is collected, so the app exists then (its keys in a
# temporary folder); the state folder it works on is the module fixture's.
_KEYS = KeyFile(Path(tempfile.mkdtemp(prefix="api-fuzz-keys-")) / "keys.json")
ADMIN_KEY = _KEYS.create("fuzz", ["admin"])[0]
APP = create_app(APISettings(keys_file=str(_KEYS.path), key_cache_seconds=0.3))
# The schema comes from the app object, not over ASGI: loading it with `from_asgi` would run the
# app's start-up (serving cache, sampler, /metrics figures) at collection time, before the test
# state and the Prefect API exist, in every xdist worker at once on one default store.
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP  # the calls go to the app in process, as with from_asgi
schema.location = "/openapi.json"


@pytest.fixture(scope="module", autouse=True)
def state(tmp_path_factory, mlflow_template_db):
    home = tmp_path_factory.mktemp("api-fuzz") / "state"
    home.mkdir()
    shutil.copyfile(mlflow_template_db, home / "mlflow.db")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLOPS_HOME", str(home))
    try:
        yield home
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        mp.undo()
        shutil.rmtree(_KEYS.path.parent, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_error_and_answers_match_the_schema(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_KEY}"}, checks=CHECKS)
