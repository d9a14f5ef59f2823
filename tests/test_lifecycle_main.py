"""The main job as a user starts it (`python -m flows.lifecycle`, what `make demo` runs): embedded
defaults whatever Prefect profile is active, a line per chapter and the summary on the terminal,
the libraries' own output in the log file the summary names."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from flows.lifecycle import library_output_to
from tests.conftest import ROOT
from tests.servers import free_port



def test_the_demo_uses_embedded_defaults_and_keeps_library_chatter_in_its_log(tmp_path):
    """After `make up` the stack's profile is active; after a reboot it points at a server that
    is gone. The demo neither writes into the stack nor fails for it: here the active API
    address answers nothing, and the demo runs on its own state folder."""
    home = tmp_path / "state"
    env = {**os.environ, "MLOPS_HOME": str(home),
           "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",  # nobody listens there
           "PREFECT_LOGGING_LEVEL": "INFO"}
    done = subprocess.run([sys.executable, "-m", "flows.lifecycle", "--until", "train",
                           "--budget", "2",
                           "--max-trials", "2"], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.splitlines()
    assert out[0].startswith(f"mlops-flows lifecycle on embedded defaults in {home}")
    assert "[1/8] data" in out[1] and any(line.startswith("[2/8] train") for line in out)
    assert any("train     v1" in line and "-> champion" in line for line in out)
    assert any(line.startswith("mlops-flows lifecycle summary") for line in out)
    # nothing but the story: no MLflow prints, no Prefect log lines, nothing on stderr
    chatter = [line for line in out if "Registered model" in line or "Created version" in line
               or " | INFO " in line or "Stopping temporary server" in line]
    assert chatter == [] and done.stderr == ""
    log = Path(out[-1].split("library output: ")[1])
    assert log.parent == home / "logs" and "Created version '1'" in log.read_text()
    # the versions are in the embedded store under MLOPS_HOME
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    assert sorted(int(v.version) for v in client.search_model_versions("name='customer_churn'")) == [1, 2]
    assert (home / "prefect").is_dir()


def test_native_writes_to_the_file_descriptors_reach_the_log_not_the_terminal(tmp_path):
    """TensorFlow, oneDNN and absl write their start-up lines from C++ to fd 2."""
    log = tmp_path / "logs" / "demo.log"
    reader, writer = os.pipe()
    saved = os.dup(1)
    os.dup2(writer, 1)  # the "terminal" of this test
    try:
        with library_output_to(log) as terminal:
            os.write(2, b"oneDNN custom operations are on\n")
            os.write(1, b"Created version '1'\n")
            print("a chapter line", file=terminal, flush=True)
    finally:
        os.dup2(saved, 1)
        os.close(writer)
    shown = os.read(reader, 10_000).decode()
    assert shown == "a chapter line\n"
    assert log.read_text() == "oneDNN custom operations are on\nCreated version '1'\n"
