"""How `make up` and `make down` know their own processes (deployments/stack.py pid-state): by the
start recorded next to each pid, so a pid the system has given to another program since is left
alone, and a wall-clock step does not make the stack's own services look like strangers."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

STACK = [sys.executable, str(ROOT / "deployments" / "stack.py")]


def stack(*args: str) -> str:
    done = subprocess.run([*STACK, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def down(stack_dir: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLOPS_"))}
    env.update(MLOPS_STACK_DIR=str(stack_dir), MLOPS_PYTHON=sys.executable,
               MLOPS_STOP_TIMEOUT="5")
    done = subprocess.run(["bash", str(ROOT / "deployments" / "down.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def gone(pid: int, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # reap it if it is our child (a zombie still answers kill 0)
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


@pytest.fixture
def pids(tmp_path) -> Path:
    (tmp_path / "pids").mkdir()
    (tmp_path / "logs").mkdir()
    return tmp_path / "pids"


def test_a_spawned_service_is_ours_until_it_exits(pids):
    pidfile = pids / "api.pid"
    pid = int(stack("spawn", str(pids.parent / "logs" / "api.log"), str(pidfile), "--",
                    "sleep", "60"))
    try:
        assert pidfile.read_text().split()[0] == str(pid)
        assert stack("pid-state", str(pidfile)) == "ours"
        # a record written by an earlier version (`ps -o lstart=`) is still recognised
        lstart = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True,
                                text=True).stdout.strip()
        pidfile.write_text(f"{pid} {lstart}\n")
        assert stack("pid-state", str(pidfile)) == "ours"
    finally:
        os.killpg(pid, 9)
    assert gone(pid)
    assert stack("pid-state", str(pidfile)) == "gone"
    pidfile.write_text("not a pid\n")
    assert stack("pid-state", str(pidfile)) == "gone"


def test_down_stops_its_own_services_and_leaves_a_reused_pid_alone(pids):
    ours = int(stack("spawn", str(pids.parent / "logs" / "worker.log"), str(pids / "worker.pid"),
                     "--", "sleep", "60"))
    # The API's pid now names another program (this test's own process): its start differs.
    (pids / "api.pid").write_text(f"{os.getpid()} boot+1\n")
    assert stack("pid-state", str(pids / "api.pid")) == "other"

    said = down(pids.parent)
    assert "api: pid" in said and "belongs to another program now; nothing to stop" in said, said
    assert "worker stopped" in said, said
    assert gone(ours), "down.sh left the worker running"
    assert list(pids.iterdir()) == []  # nothing left to stop by mistake later
