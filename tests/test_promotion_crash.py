"""Crash-safe promotion: a process killed (SIGKILL, by its own PID) after moving `champion` and
before verifying it leaves its intent recorded; the audit reports it and the model's next
retraining undoes the unverified promotion before doing anything else."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from prefect.settings import PREFECT_API_URL

from flows.registry import audit_registry, register_model
from flows.retraining import retrain_model
from tasks.registry import alias_map, mlflow_client, read_alias_history
from tasks.retraining import read_promotion_intent
from tests.conftest import ROOT
from tests.test_registry import log_tiny_model
from tests.test_retraining_flows import base, model, save_policy  # noqa: F401 (fixtures)

PROMOTE_THEN_HANG = textwrap.dedent("""
    import sys, time
    from prefect import flow
    from prefect.transactions import transaction
    from tasks.retraining import promote_champion

    @flow(name="promotion-killed-before-verification")
    def promote_then_hang(model_name: str, version: int):
        with transaction():
            promote_champion(model_name, version, "fault test: the worker dies before verifying")
            print("PROMOTED", flush=True)
            time.sleep(600)  # verification would come here; the test kills the process first

    promote_then_hang(sys.argv[1], int(sys.argv[2]))
""")


def promote_and_kill(tmp_path: Path, model_name: str, version: int) -> None:
    script = tmp_path / "promote_then_hang.py"
    script.write_text(PROMOTE_THEN_HANG)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(script), model_name, str(version)], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        seen = []
        for line in process.stdout:  # bounded: the script prints PROMOTED or exits
            seen.append(line)
            if line.strip() == "PROMOTED" or time.monotonic() > deadline:
                break
        assert seen and seen[-1].strip() == "PROMOTED", "".join(seen[-30:])
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def test_a_promotion_killed_before_verification_is_undone_by_the_next_retraining(
        base, model, tmp_path):  # noqa: F811
    unverified = register_model(model, run_id=log_tiny_model()).version
    promote_and_kill(tmp_path, model, unverified)

    client = mlflow_client()
    assert alias_map(client, model)["champion"] == unverified
    assert read_promotion_intent(client, model)["to"] == unverified
    found = [(f.check, f.version) for f in audit_registry(model).findings]
    assert found == [("promotion-interrupted", unverified)]

    save_policy(model)
    result = retrain_model(model, base.labelled(model), "churn", reason="after the crash")

    assert result.champion_version == 1  # the retraining compared against the restored champion
    assert read_promotion_intent(client, model) is None
    moves = read_alias_history(client, model)
    killed = max(i for i, m in enumerate(moves)
                 if m["alias"] == "champion" and m["to"] == unverified)
    undo = moves[killed + 1]
    assert (undo["alias"], undo["from"], undo["to"], undo["kind"]) == (
        "champion", unverified, 1, "rollback")
    assert "interrupted before its verification" in undo["reason"]
    assert audit_registry(model).ok
