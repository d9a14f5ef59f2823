"""Shared fixtures: one real Prefect API for the whole session, a fresh state folder per test."""
from __future__ import annotations

import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import pytest
from prefect.testing.utilities import prefect_test_harness

ROOT = Path(__file__).resolve().parents[1]  # the checkout


# end-to-end files that start a stack of their own (the others share one SQLite stack)
OWN_STACK_FILES = ("tests/e2e/test_postgres_stack.py", "tests/e2e/test_fault_worker_killed.py")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs `-n 2 --dist loadfile`: one test file per worker at a time, so module
    fixtures (trained models) are built once. Every end-to-end file counts as one file here: they
    share one stack (package scope), which a second worker would start again, and go first (the
    longest unit; xdist would order it by its number of tests). (xdist's own
    `loadgroup` cannot do this under pytest 9: it renames node ids, which pytest 9 no longer
    lets a plugin do.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class OneStackScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            if scope.startswith("tests/e2e/") and scope not in OWN_STACK_FILES:
                return "tests/e2e"
            return scope

        def _assign_work_unit(self, node) -> None:
            # end-to-end units are the longest (a stack to start): first, not last by test count
            for scope in ("tests/e2e", *OWN_STACK_FILES):
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return OneStackScheduling(config, log)


@pytest.fixture(scope="session")
def prefect_results(tmp_path_factory) -> Path:
    """Where the session's flow and task results go (the training, retraining and export flows
    persist theirs): a folder of the session, not the user's ~/.prefect/storage, which Prefect
    would otherwise fill with about a thousand files a run (prefect_api sets it in this process
    and in the environment of subprocesses)."""
    return tmp_path_factory.mktemp("prefect-results")


@pytest.fixture(scope="session")
def loopback_ca_bundle(tmp_path_factory) -> Path:
    """A CA bundle of one certificate for the session's Prefect clients. Every PrefectClient builds
    an SSL context from its CA bundle, certifi's ~150 certificates by default, whether or not the
    API speaks TLS: about 50 ms each with OpenSSL 3 on a 2-core machine, a tenth of the CPU of a
    test file that runs flows. The session's APIs are plain HTTP on loopback, so no certificate is
    ever checked (prefect_api sets it in this process and in the environment of subprocesses; the
    end-to-end stacks run with a user's environment and keep Prefect's default)."""
    import certifi

    bundle = Path(certifi.where()).read_text()
    end = "-----END CERTIFICATE-----"
    first = bundle[bundle.index("-----BEGIN CERTIFICATE-----"):bundle.index(end) + len(end)]
    path = tmp_path_factory.mktemp("ca") / "one-certificate.pem"
    path.write_text(first + "\n")
    return path


@pytest.fixture(scope="session", autouse=True)
def prefect_api(prefect_results, loopback_ca_bundle):
    """A real (embedded) Prefect API server shared by the whole session (about 5 s to start)."""
    from prefect.settings import (PREFECT_API_SSL_CERT_FILE, PREFECT_LOCAL_STORAGE_PATH,
                                  temporary_settings)

    from flows.local_runs import local_run_settings

    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(prefect_results)
    os.environ["PREFECT_API_SSL_CERT_FILE"] = str(loopback_ca_bundle)
    with prefect_test_harness(server_startup_timeout=60), local_run_settings(), \
            temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: prefect_results,
                                        PREFECT_API_SSL_CERT_FILE: str(loopback_ca_bundle)}):
        yield


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """The suite writes nothing into the checkout. MLflow's Default experiment keeps its artifacts
    in ./mlruns of the working folder (the project root here, git-ignored, so it goes unseen): a
    test logging a model of its own uses an experiment with a location under its state folder."""
    mlruns = ROOT / "mlruns"
    there_before = mlruns.exists()
    yield
    assert there_before or not mlruns.exists(), (
        f"the tests wrote MLflow artifacts into {mlruns}: a run went to MLflow's Default "
        "experiment; start it in resolve_mlflow_config().ensure_experiment() (or an experiment "
        "with an artifact location under tmp_path) instead")


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory):
    """An MLflow SQLite store with every migration applied, made once: a fresh store costs ~1.5 s
    of migrations, and most tests want one."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def state_dir(tmp_path, monkeypatch, mlflow_template_db):
    """A fresh embedded state folder (MLflow SQLite store, artifacts, SQL store) for one test."""
    home = tmp_path / "state"
    home.mkdir()
    shutil.copyfile(mlflow_template_db, home / "mlflow.db")
    monkeypatch.setenv("MLOPS_HOME", str(home))
    return home


def postgres_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """A new, empty PostgreSQL database (skips where none answers), as a bare postgresql:// URL
    (the stores must pick the installed driver); dropped afterwards, open connections or not.
    Created and dropped by deployments/stack.py, as `make up` does."""
    import subprocess
    import sys
    import uuid

    require_postgres()
    url = f"postgresql://postgres@127.0.0.1:5432/{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    stack = [sys.executable, str(ROOT / "deployments" / "stack.py")]
    made = subprocess.run([*stack, "ensure-db", url], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    try:
        yield url
    finally:
        subprocess.run([*stack, "drop-db", url], capture_output=True, text=True, timeout=60)


def require_postgres():
    """Skip with a reason where no PostgreSQL answers; CI sets MLOPS_REQUIRE_POSTGRES=1 to fail."""
    if postgres_available():
        return
    if os.environ.get("MLOPS_REQUIRE_POSTGRES") == "1":
        pytest.fail("PostgreSQL does not answer at 127.0.0.1:5432 but MLOPS_REQUIRE_POSTGRES=1")
    pytest.skip("no PostgreSQL answers at 127.0.0.1:5432 (start one to run this test)")
