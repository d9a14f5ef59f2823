"""Online serving through the real app in-process: /predict and the V2 paths answer from the
ONNX export (the MLflow model until it exists), schema-checked, with version and arm; A/B
routing agrees with score_batch; answered rows are logged; outcomes; hot reload; /metrics."""
from __future__ import annotations

import re
import time

import numpy as np
import pandas as pd
import pytest

from flows.ab_testing import ab_test_results, score_batch
from flows.export import export_model
from flows.registry import promote_model
from flows.training import train_model
from tasks.ab_tasks import load_scorer
from tasks.demo_data import churn_frame
from tasks.routing import assign_arms
from tests.api_support import BASE, api_world, assert_error
from tests.budgets import ONE_LINEAR_TRIAL

MODEL = "churn_serve"
FEATURES = ["tenure", "monthly_charges", "total_charges", "contract", "internet_service",
            "payment_method", "senior_citizen", "paperless_billing"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_template_db):
    with api_world(tmp_path_factory, mlflow_template_db, "serving") as world:
        churn = churn_frame().sample(1600, random_state=3).reset_index(drop=True)
        data = churn[[*FEATURES, "churn"]]
        train_model(data.iloc[:700], "churn", MODEL, **ONE_LINEAR_TRIAL)
        export_model(MODEL, 1, formats=["onnx"])
        train_model(data.iloc[700:1400], "churn", MODEL, promote="never", **ONE_LINEAR_TRIAL)
        world.rows = data.iloc[1400:].drop(columns="churn").reset_index(drop=True)
        wait_ready(world)
        yield world


def wait_ready(world, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while world.client.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "the champion never loaded"
        time.sleep(0.1)


def records(frame: pd.DataFrame) -> list[dict]:
    """Rows as a JSON client sends them (NaN -> null)."""
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
            for r in frame.to_dict("records")]


def predict(world, body: dict, scope: str = "read"):
    return world.client.post(f"{BASE}/models/{MODEL}/predict", json=body,
                             headers=world.auth(scope))


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- predict
def test_predict_answers_from_onnx_as_scikit_learn_would(world):
    rows = world.rows.iloc[:50]
    r = predict(world, {"rows": records(rows)})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"]
    body = r.json()
    assert body["model_name"] == MODEL and len(body["predictions"]) == 50
    first = body["predictions"][0]
    assert (first["version"], first["arm"], first["id"]) == (1, "champion", None)
    assert set(first["probabilities"]) == {"No", "Yes"}
    pipeline = load_scorer(MODEL, 1).model
    expected = pipeline.predict_proba(rows.astype({c: object for c in rows.select_dtypes(
        "object")}))[:, list(pipeline.classes_).index("Yes")]
    got = np.array([p["probabilities"]["Yes"] for p in body["predictions"]])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert [p["prediction"] for p in body["predictions"]] == list(pipeline.predict(rows))
    meta = world.client.get(f"/v2/models/{MODEL}", headers=world.auth("read")).json()
    assert meta["parameters"]["backend"] == "onnx" and meta["versions"] == ["1"]


def test_predict_schema_checks(world):
    row = records(world.rows.iloc[:1])[0]
    no_tenure = {k: v for k, v in row.items() if k != "tenure"}
    assert_error(predict(world, {"rows": [row, no_tenure]}), 422, field="rows[1].tenure",
                 contains="lacks column 'tenure'")
    assert_error(predict(world, {"rows": [{**row, "monthly_charges": "lots"}]}), 422,
                 field="rows[0].monthly_charges", contains="must be a number")
    assert_error(predict(world, {"rows": [{**row, "contract": {"a": 1}}]}), 422,
                 field="rows[0].contract")
    assert_error(predict(world, {"rows": []}), 422, field="rows")
    assert_error(predict(world, {"ids": [1]}), 422, field="rows")
    assert_error(predict(world, {"rows": [row], "ids": [1, 2]}), 422, field="ids")
    assert_error(predict(world, {"rows": [row], "ids": [1.5]}), 422, field="ids[0]")
    bad_json = world.client.post(f"{BASE}/models/{MODEL}/predict", content=b"{rows",
                                 headers={**world.auth("read"), "content-type": "application/json"})
    assert_error(bad_json, 422, contains="not valid JSON")
    # an unknown category is ignored as in training; extra columns are ignored
    odd = {**row, "contract": "Decade-long", "shoe_size": 44}
    r = predict(world, {"rows": [odd]})
    assert r.status_code == 200, r.text
    pipeline = load_scorer(MODEL, 1).model
    frame = pd.DataFrame([{**row, "contract": "Decade-long"}])[FEATURES]
    assert abs(r.json()["predictions"][0]["probabilities"]["Yes"]
               - pipeline.predict_proba(frame)[0, list(pipeline.classes_).index("Yes")]) < 1e-4
    # size caps: rows per request (a setting) and bytes
    limit = world.client.app.state.settings.max_predict_rows
    assert_error(predict(world, {"rows": [row] * (limit + 1)}), 413, "RequestTooLarge",
                 contains=f"limit per request is {limit}")
    big = world.client.post(f"{BASE}/models/{MODEL}/predict", content=b" " * 2_000_000,
                            headers=world.auth("read"))
    assert_error(big, 413, "RequestTooLarge")
    # auth, unknown model
    assert_error(world.client.post(f"{BASE}/models/{MODEL}/predict", json={"rows": [row]}), 401)
    r = world.client.post(f"{BASE}/models/no_such_model/predict", json={"rows": [row]},
                          headers=world.auth("read"))
    assert_error(r, 404, "ModelNotFoundError")
    assert_error(world.client.post(f"{BASE}/models/bad name/predict", json={"rows": [row]},
                                   headers=world.auth("read")), 422, "InvalidModelNameError")


# --------------------------------------------------------------------------- V2
def test_open_inference_protocol(world):
    assert world.client.get("/v2/health/live").json() == {"live": True}
    assert world.client.get("/v2/health/ready").json() == {"ready": True}
    assert world.client.get("/health").status_code == 200
    rows = world.rows.iloc[:5]
    meta = world.client.get(f"/v2/models/{MODEL}", headers=world.auth("read")).json()
    names = [i["name"] for i in meta["inputs"]]
    assert sorted(names) == sorted(FEATURES)
    assert {o["name"] for o in meta["outputs"]} == {"predict", "predict_proba"}
    types = {i["name"]: i["datatype"] for i in meta["inputs"]}
    inputs = [{"name": c, "shape": [5], "datatype": types[c],
               "data": [None if pd.isna(v) else v for v in rows[c].tolist()]} for c in names]
    r = world.client.post(f"/v2/models/{MODEL}/infer", json={"id": "req-1", "inputs": inputs},
                          headers=world.auth("read"))
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "req-1" and r.json()["model_version"] == "1"
    ours = predict(world, {"rows": records(rows)}).json()["predictions"]
    assert out["predict"]["data"] == [p["prediction"] for p in ours]
    proba = np.array(out["predict_proba"]["data"]).reshape(out["predict_proba"]["shape"])
    classes = meta["parameters"]["classes"]
    np.testing.assert_allclose(proba[:, classes.index("Yes")],
                               [p["probabilities"]["Yes"] for p in ours], atol=1e-9)
    same = world.client.post(f"/v2/models/{MODEL}/versions/1/infer", json={"inputs": inputs},
                             headers=world.auth("read"))
    assert same.json()["outputs"] == r.json()["outputs"]
    ready = world.client.get(f"/v2/models/{MODEL}/versions/1/ready", headers=world.auth("read"))
    assert ready.json()["ready"] is True
    # errors: a missing input, one tensor for a model with categoricals, an unknown version
    r = world.client.post(f"/v2/models/{MODEL}/infer", json={"inputs": inputs[1:]},
                          headers=world.auth("read"))
    assert_error(r, 422, field=f"inputs.{names[0]}")
    odd = {"inputs": [{**inputs[0], "shape": [1, "a"]}]}
    assert_error(world.client.post(f"/v2/models/{MODEL}/infer", json=odd,
                                   headers=world.auth("read")), 422, field="inputs[0].shape")
    tensor = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0] * 8}]}
    assert_error(world.client.post(f"/v2/models/{MODEL}/infer", json=tensor,
                                   headers=world.auth("read")), 422, contains="categorical")
    assert_error(world.client.get(f"/v2/models/{MODEL}/versions/9", headers=world.auth("read")),
                 404, "VersionNotFoundError")
    assert_error(world.client.get(f"/v2/models/{MODEL}"), 401)


# --------------------------------------------------------------------------- fallback, reload
def test_alias_move_is_served_within_seconds_mlflow_until_the_export_exists(world):
    """v2 has no export: promoted, the MLflow model answers it (and V2 metadata says so); once
    exported, the ONNX session takes over; both within 5 s, no restart."""
    row = records(world.rows.iloc[:3])
    moved = time.monotonic()
    promote_model(MODEL, 2, "champion", reason="serving test")
    wait_for(lambda: predict(world, {"rows": row}).json()["predictions"][0]["version"] == 2,
             5, "v2 answers")
    assert time.monotonic() - moved < 5
    meta = world.client.get(f"/v2/models/{MODEL}", headers=world.auth("read")).json()
    assert meta["parameters"]["backend"] == "mlflow", meta
    assert "no ONNX export" in meta["parameters"]["reason"]
    by_mlflow = predict(world, {"rows": row}).json()["predictions"]
    export_model(MODEL, 2, formats=["onnx"])
    wait_for(lambda: world.client.get(f"/v2/models/{MODEL}", headers=world.auth("read"))
             .json()["parameters"]["backend"] == "onnx", 5, "the export answers")
    by_onnx = predict(world, {"rows": row}).json()["predictions"]
    for a, b in zip(by_mlflow, by_onnx):
        assert a["prediction"] == b["prediction"] and a["version"] == b["version"] == 2
        assert abs(a["probabilities"]["Yes"] - b["probabilities"]["Yes"]) < 1e-4


# --------------------------------------------------------------------------- A/B
@pytest.fixture(scope="module")
def ab_test(world):
    r = world.post("/ab-tests/create", {"model_name": MODEL, "champion_version": 2,
                                        "challenger_version": 1, "traffic_split": 0.3})
    assert r.status_code == 201, r.text
    test = r.json()
    row = records(world.rows.iloc[:1])
    wait_for(lambda: predict(world, {"rows": row}).status_code == 422, 5, "the test is routed")
    return test


def test_live_routing_agrees_with_score_batch_and_every_row_is_logged(world, ab_test, tmp_path):
    ids = [f"user-{i}" for i in range(10_000)]
    assert_error(predict(world, {"rows": records(world.rows.iloc[:1])}), 422, field="ids",
                 contains="A/B test")
    base = records(world.rows.iloc[:200])
    arms, versions = [], []
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        r = predict(world, {"rows": [base[i % 200] for i in range(len(chunk))], "ids": chunk})
        assert r.status_code == 200, r.text
        arms += [p["arm"] for p in r.json()["predictions"]]
        versions += [p["version"] for p in r.json()["predictions"]]
        assert [p["id"] for p in r.json()["predictions"]] == chunk
    from tasks.ab import open_store

    seed = open_store().get_test(ab_test["test_id"]).seed  # the test's routing seed
    assert arms == assign_arms(seed, ids, 0.3).tolist()
    assert {(a, v) for a, v in zip(arms, versions)} == {("champion", 2), ("challenger", 1)}
    world.client.app.state.prediction_log.flush()
    # the same ids scored by score_batch (a replayed batch) get the same arms
    frame = pd.DataFrame([base[i % 200] for i in range(len(ids))])
    frame["user_id"] = ids
    out = tmp_path / "scored.parquet"
    score_batch(MODEL, frame, "user_id", output=str(out))
    batch = pd.read_parquet(out)
    assert batch["arm"].tolist() == arms
    # logged: every answered row (here 10,000 online + 10,000 replayed), each id routed once
    results = ab_test_results(ab_test["test_id"])
    routed = results.arms["champion"].routed + results.arms["challenger"].routed
    assert routed == 10_000
    from tasks.ab import open_store, predictions_table
    import sqlalchemy as sa

    with open_store().engine.connect() as conn:
        logged = conn.execute(sa.select(sa.func.count()).select_from(predictions_table)).scalar()
    assert logged == 20_000


def test_outcomes_have_record_outcomes_semantics(world, ab_test):
    test_id = ab_test["test_id"]
    r = predict(world, {"rows": records(world.rows.iloc[:3]), "ids": ["o-1", "o-2", "o-3"]})
    assert r.status_code == 200
    world.client.app.state.prediction_log.flush()
    url = f"/ab-tests/{test_id}/outcomes"
    first = world.post(url, {"outcomes": [{"id": "o-1", "outcome": 1}, {"id": "o-2", "outcome": 0},
                                          {"id": "never-seen", "outcome": 1}]})
    assert first.status_code == 200, first.text
    assert (first.json()["recorded"], first.json()["unknown_keys"]) == (2, 1)
    again = world.post(url, {"outcomes": [{"id": "o-1", "outcome": 1},
                                          {"id": "o-2", "outcome": 1}]}).json()
    assert (again["recorded"], again["duplicates"], again["conflicting"]) == (0, 1, 1)
    assert_error(world.post(url, {"outcomes": [{"id": "o-3", "outcome": 1}]}, scope="read"), 403)


# --------------------------------------------------------------------------- metrics
def scrape(world) -> str:
    r = world.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def sample(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_metrics_count_answered_rows_and_time_inference(world, ab_test):
    before = scrape(world)
    ids = [f"m-{i}" for i in range(40)]
    r = predict(world, {"rows": records(world.rows.iloc[:40]), "ids": ids})
    arms = [p["arm"] for p in r.json()["predictions"]]
    after = scrape(world)
    for arm, version in (("champion", 2), ("challenger", 1)):
        grew = (sample(after, "model_predictions_total", model_name=MODEL, arm=arm)
                - sample(before, "model_predictions_total", model_name=MODEL, arm=arm))
        assert grew == arms.count(arm), arm
        assert sample(after, "model_predictions_total", model_name=MODEL, arm=arm,
                      version=str(version)) > 0
    calls = (sample(after, "model_inference_time_seconds_count", model_name=MODEL)
             - sample(before, "model_inference_time_seconds_count", model_name=MODEL))
    assert calls == 2  # one model call per arm
    assert 'le="5e-05"' in after  # buckets resolve sub-millisecond inference
