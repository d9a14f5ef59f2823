"""The serving pieces without the service: row checks, the route cache's refresh (what a request
sees while a version loads or fails to), and the buffered prediction log on a real SQLite A/B
store."""
from __future__ import annotations

import math
import threading

import pytest
import sqlalchemy as sa

from tasks.ab import ABStore, new_test_id, units_table
from tasks.prediction_log import PredictionLog
from tasks.serving import (Answer, InputError, LoadedVersion, RowLimitError, ServingCache, Wanted,
                           check_ids, check_rows)

NUM, CAT = ["age", "income"], ["plan"]


# --------------------------------------------------------------------------- rows
def test_rows_become_columns_with_missing_values_and_text_categories():
    cols = check_rows([{"age": 3, "income": None, "plan": "gold", "extra": [1]},
                       {"age": 4.5, "income": True, "plan": 7}], NUM, CAT, 10)
    assert cols["age"] == [3, 4.5]
    assert math.isnan(cols["income"][0]) and cols["income"][1] == 1.0
    assert cols["plan"] == ["gold", "7"]  # categories are compared as text, as in training
    assert "extra" not in cols


@pytest.mark.parametrize("rows, field, words", [
    ([{"income": 1, "plan": "a"}], "rows[0].age", "lacks column 'age'"),
    ([{"age": "3", "income": 1, "plan": "a"}], "rows[0].age", "must be a number"),
    ([{"age": 3, "income": 1, "plan": ["a"]}], "rows[0].plan", "must be a string"),
    ([{"age": 3, "income": 1, "plan": "a"}, 5], "rows[1]", "must be a record"),
    ([], "rows", "non-empty list"),
    ({"age": 3}, "rows", "non-empty list"),
])
def test_bad_rows_name_the_row_and_column(rows, field, words):
    with pytest.raises(InputError, match=words) as err:
        check_rows(rows, NUM, CAT, 10)
    assert err.value.field == field


def test_too_many_rows_is_its_own_error():
    with pytest.raises(RowLimitError, match="limit per request is 2"):
        check_rows([{"age": 1, "income": 1, "plan": "a"}] * 3, NUM, CAT, 2)


def test_ids():
    assert check_ids(["a", 7], 2, required=True) == ["a", "7"]
    assert check_ids(None, 2, required=False) is None
    for ids, field in ((None, "ids"), (["a"], "ids"), ([1.0, 2], "ids[0]"), (["", "b"], "ids[0]"),
                       (["a", True], "ids[1]")):
        with pytest.raises(InputError) as err:
            check_ids(ids, 2, required=True)
        assert err.value.field == field


# --------------------------------------------------------------------------- the route cache
class Constant:
    def __init__(self, value):
        self.value = value

    def predict(self, columns):
        return Answer([self.value] * len(columns["age"]), None, [])


def version(name: str, n: int, backend: str = "onnx") -> LoadedVersion:
    return LoadedVersion(name, n, NUM, CAT, "regression", [], backend, Constant(float(n)))


def test_refresh_switches_only_once_the_new_version_is_loaded_and_keeps_serving_on_failure():
    wanted = {"m": Wanted(1)}
    gate = threading.Event()
    broken = set()

    def loader(name, n):
        if n == 2:
            gate.wait(5)  # a slow load of the new version
        if n in broken:
            raise OSError(f"artifact of v{n} unreadable")
        return version(name, n)

    cache = ServingCache(lambda name: wanted[name], loader=loader,
                         has_export=lambda name, n: False)
    assert cache.route("m").champion.version == 1
    wanted["m"] = Wanted(2)
    refreshing = threading.Thread(target=cache.refresh)
    refreshing.start()
    # while v2 loads, requests still see v1 (never a missing or half-built route)
    assert cache.routes["m"].champion.version == 1
    gate.set()
    refreshing.join(5)
    assert cache.routes["m"].champion.version == 2
    broken.add(3)
    wanted["m"] = Wanted(3)
    assert cache.refresh() == []
    assert cache.routes["m"].champion.version == 2 and cache.refresh_errors == 1


def test_a_version_answered_by_mlflow_moves_to_onnx_once_exported():
    exported = set()
    cache = ServingCache(lambda name: Wanted(1),
                         loader=lambda name, n: version(name, n, "onnx" if n in exported
                                                        else "mlflow"),
                         has_export=lambda name, n: n in exported)
    assert cache.route("m").champion.backend == "mlflow"
    assert cache.refresh() == []
    exported.add(1)
    assert cache.refresh() == ["m"] and cache.routes["m"].champion.backend == "onnx"


# --------------------------------------------------------------------------- the log
@pytest.fixture
def store(tmp_path):
    return ABStore(f"sqlite:///{tmp_path / 'ab.db'}")


def open_test(store: ABStore):
    return store.create_test(
        model_name="m", champion_version=1, challenger_version=2, traffic_split=0.5,
        metric_type="conversion", higher_is_better=True, min_samples_per_arm=10,
        min_duration_days=0, alpha=0.05, power=0.8, srm_threshold=0.001, sequential_tuning=1.0,
        test_id=new_test_id("m"))


def test_buffered_rows_are_written_in_batches_and_on_close(store):
    test = open_test(store)
    log = PredictionLog(store, flush_seconds=60, flush_rows=10)
    log.start()
    for i in range(25):  # 25 requests, nothing written per request
        log.add(test, [f"k{i}"], [i % 2], ["1"], [0.7])
    log.close()  # writes what the background writer had not written yet
    assert (log.logged, log.dropped) == (25, 0)
    assert store.row_counts()["ab_predictions"] == 25
    totals = store.arm_totals(test)
    assert sum(t.routed for t in totals.values()) == 25


def test_returning_ids_are_routed_once_and_keep_their_first_arm(store):
    """A pool of returning users, with a routed-ids memory smaller than the pool: every answer
    is logged, each id routed once, to the arm of its first answer."""
    test = open_test(store)
    log = PredictionLog(store, flush_seconds=60, routed_keys=30)
    pool = [f"user-{i}" for i in range(100)]
    first_arm = {k: i % 2 for i, k in enumerate(pool)}
    for visit in range(4):
        keys = pool[visit * 10:] + pool[:visit * 10]  # the memory keeps only the latest 30
        # a later visit claims the other arm: the store keeps the first one
        arms = [first_arm[k] if visit == 0 else 1 - first_arm[k] for k in keys]
        log.add(test, keys, arms, ["1"] * len(keys), [0.5] * len(keys))
        assert log.flush() == len(pool)
    totals = store.arm_totals(test)
    assert sum(t.routed for t in totals.values()) == len(pool)
    assert sum(t.predictions for t in totals.values()) == 4 * len(pool)
    assert store.row_counts()["ab_predictions"] == 4 * len(pool)
    with store.engine.connect() as conn:
        stored = dict(conn.execute(sa.select(units_table.c.unit_key, units_table.c.arm)
                                   .where(units_table.c.test_pk == test.pk)).all())
    assert stored == first_arm


def test_rows_of_a_concluded_test_are_counted_as_dropped_not_lost_silently(store, caplog):
    test = open_test(store)
    log = PredictionLog(store)
    log.add(test, ["a", "b"], [0, 1], ["1", "0"], [0.9, 0.1])
    store.close_test(test, forced=True, conclusion="stopped", final_results={})
    assert log.flush() == 0
    assert (log.logged, log.dropped) == (0, 2)
    assert "2 answered rows of A/B test" in caplog.text


# --------------------------------------------------------------------------- access log
@pytest.mark.parametrize("enabled", [False, True])
def test_access_lines_only_when_the_setting_asks(tmp_path, caplog, enabled):
    """One `api.access` line per request (method, path, status, ms) with access_log on; none by
    default (on the prediction path the line cost more than the model call)."""
    import logging

    from fastapi.testclient import TestClient

    from api.app import create_app
    from blocks.api_settings import APISettings

    settings = APISettings(keys_file=str(tmp_path / "keys.json"), access_log=enabled)
    assert APISettings().access_log is False
    client = TestClient(create_app(settings))  # no lifespan: /health needs no model
    with caplog.at_level(logging.INFO, logger="api.access"):
        assert client.get("/health").status_code == 200
        assert client.get("/nowhere").status_code == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "api.access"]
    if enabled:
        assert len(lines) == 2 and lines[0].startswith("GET /health 200 ")
        assert lines[1].startswith("GET /nowhere 404 ")
    else:
        assert lines == []
