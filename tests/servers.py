"""Helpers for tests that run real servers as subprocesses (MLflow, moto's S3 server, …)."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def log_tail(path: Path, n: int = 40) -> str:
    """The last lines of a server's log, for a failure message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop_process_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the server's own process group (servers fork workers), then SIGKILL."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
