"""The serving path in its real shape: `python -m api --workers 2` (uvicorn subprocess) under
load. An alias move is served within 5 s (by both workers within 10 s) with no failed request;
/metrics counts add up across both workers; after SIGTERM, every row answered during the A/B test
is in the prediction log."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from api.auth import KeyFile
from flows.ab_testing import create_ab_test
from flows.export import export_model
from flows.registry import promote_model
from flows.training import train_model
from tasks.ab import open_store, predictions_table
from tasks.demo_data import churn_frame
from tests.budgets import ONE_LINEAR_TRIAL
from tests.conftest import ROOT
from tests.servers import free_port

TESTED, MOVED = "serve_ab", "serve_move"
FEATURES = ["tenure", "monthly_charges", "contract", "internet_service", "senior_citizen"]
LOAD_SECONDS = 8.0
MOVE_AT = 1.5
# Each worker polls and loads the new version on its own. Both switched within 5 s when this test
# ran alone (tests/test_serving.py holds the 5 s goal in process), but next to the suite's other
# stack tests on 2 slow cores the second worker once still answered v1 at 5 s: here the bound for
# "every answer is v2" is 10 s; the first v2 answer must still come within 5 s.
ALL_SWITCHED_S = 10.0
RECONNECT_S = 1.0  # each load thread opens a new connection this often (Load.run)


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_template_db):
    import shutil

    import mlflow

    from blocks.mlflow_config import resolve_mlflow_config

    home = tmp_path_factory.mktemp("serving-workers") / "state"
    home.mkdir()
    shutil.copyfile(mlflow_template_db, home / "mlflow.db")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLOPS_HOME", str(home))
    resolve_mlflow_config().apply()
    try:
        data = churn_frame().sample(900, random_state=5)[[*FEATURES, "churn"]]
        for name in (TESTED, MOVED):
            train_model(data.iloc[:400], "churn", name, **ONE_LINEAR_TRIAL)
            train_model(data.iloc[400:800], "churn", name, promote="never", **ONE_LINEAR_TRIAL)
            for version in (1, 2):
                export_model(name, version, formats=["onnx"])
        test_id = create_ab_test(TESTED, 1, 2, traffic_split=0.5)
        key = KeyFile(home / "api" / "keys.json").create("load", ["read"])[0]
        rows = [{k: v for k, v in r.items()} for r in data.iloc[800:].drop(columns="churn")
                .to_dict("records")]
        yield home, key, test_id, rows
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        mp.undo()


def start_api(home: Path, port: int) -> subprocess.Popen:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "MLOPS_HOME": str(home), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "MLOPS_LOG_LEVEL": "WARNING"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.Popen([sys.executable, "-m", "api", "--port", str(port), "--workers", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Ready answers from both workers: several ready answers in a row."""
    deadline = time.monotonic() + timeout
    streak = 0
    while streak < 20:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "the service never got ready"
        try:
            ok = httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            ok = False
        streak = streak + 1 if ok else 0
        time.sleep(0.05 if ok else 0.3)


class Load:
    """Threads sending single rows until `stop`; every answer recorded (time, status, body)."""

    def __init__(self, url: str, key: str, rows: list[dict]):
        self.url, self.key, self.rows = url, key, rows
        self.stop = threading.Event()
        self.answers: dict[str, list] = {TESTED: [], MOVED: []}
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def run(self, model: str, worker: int) -> None:
        """A new connection every RECONNECT_S: the kernel gives each new connection to a worker
        that is accepting, so a worker that came up a moment after the other still gets traffic
        (on one keep-alive connection per thread, the first four connections decided which
        workers ever answered, and on a busy machine once all went to one)."""
        headers = {"Authorization": f"Bearer {self.key}"}
        i = 0
        while not self.stop.is_set():
            with httpx.Client(base_url=self.url, headers=headers, timeout=10) as client:
                reconnect_at = time.monotonic() + RECONNECT_S
                while not self.stop.is_set() and time.monotonic() < reconnect_at:
                    body = {"rows": [self.rows[i % len(self.rows)]]}
                    if model == TESTED:
                        body["ids"] = [f"w{worker}-{i}"]
                    try:
                        r = client.post(f"/api/v1/mlops/models/{model}/predict", json=body)
                    except httpx.HTTPError as exc:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                        continue
                    finally:
                        i += 1
                    if r.status_code != 200:
                        self.errors.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    with self.lock:
                        self.answers[model].append((time.monotonic(),
                                                    r.json()["predictions"][0]))


def counted(text: str, model: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(
        rf'^model_predictions_total\{{[^}}]*model_name="{model}"[^}}]*\}} (\S+)$', text, re.M))


def test_two_workers_under_load_reload_count_and_flush(world):
    home, key, test_id, rows = world
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_api(home, port)
    try:
        wait_ready(url, proc)
        load = Load(url, key, rows)
        threads = [threading.Thread(target=load.run, args=(m, w))
                   for w, m in enumerate((TESTED, TESTED, MOVED, MOVED))]
        started = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(MOVE_AT)
        promote_model(MOVED, 2, "champion", reason="hot reload under load")
        moved = time.monotonic()
        # the load goes on for LOAD_SECONDS in all, and past the bound after the move (a
        # promotion can take seconds on a busy machine)
        time.sleep(max(LOAD_SECONDS - (moved - started), ALL_SWITCHED_S + 2.0))
        load.stop.set()
        for t in threads:
            t.join(timeout=30)

        assert load.errors == []
        # the move: v1 before it, v2 within 5 s of it, then v2 only, never anything else
        answers = load.answers[MOVED]
        assert {a["version"] for t, a in answers if t < moved - 0.5} == {1}
        first_v2 = min(t for t, a in answers if a["version"] == 2)
        assert first_v2 - moved < 5
        assert {a["version"] for t, a in answers if t > moved + ALL_SWITCHED_S} == {2}
        # A/B arms both answered, with their versions
        tested = load.answers[TESTED]
        assert {(a["arm"], a["version"]) for _, a in tested} == {("champion", 1),
                                                                 ("challenger", 2)}
        # /metrics sums both workers, whichever answers the scrape
        pids = {p.name.split("_")[-1] for p in (home / "api" / "prometheus").glob("counter_*.db")}
        assert len(pids) == 2, pids
        for _ in range(4):
            text = httpx.get(f"{url}/metrics", timeout=10).text
            assert counted(text, TESTED) == len(tested)
            assert counted(text, MOVED) == len(answers)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out[-3000:]
    # graceful stop: every answered row of the test is in the log
    with open_store().engine.connect() as conn:
        logged = conn.execute(sa.select(sa.func.count()).select_from(predictions_table)).scalar()
    assert logged == len(load.answers[TESTED]) > 100
