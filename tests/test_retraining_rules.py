"""The retraining decisions as plain functions: signals, the gate, unseen rows, the gate slice."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from tasks.retraining import hours_since_last
from tasks.retraining_rules import (RetrainDecision, RetrainResult, age_signal, cooldown_signal,
                                    decide, drift_signal, gate_split, gate_verdict, metric_floor,
                                    metric_signal, rows_signal, schema_differences, unseen_mask)


def signals(drift=0.1, metric=0.85, age=3.0, rows=500, hours=None):
    return [drift_signal(drift, 0.3, "newest check"),
            metric_signal("roc_auc", metric, 0.8, "unseen rows"),
            age_signal(age, 30),
            rows_signal(rows, 200, "by row fingerprint"),
            cooldown_signal(hours, 24)]


def test_no_trigger_no_retraining_and_every_signal_is_named():
    go, reasons = decide(signals(), has_labelled_data=True)
    assert go is False
    assert "no trigger fired" in reasons[0]
    for text in ("drift score 0.1 <= drift_threshold 0.3", "roc_auc 0.85", "within the floor 0.8",
                 "champion age 3.0 days <= max_model_age_days 30"):
        assert text in reasons[0], reasons


@pytest.mark.parametrize("kwargs, expected", [
    ({"drift": 0.45}, "drift score 0.45 > drift_threshold 0.3"),
    ({"metric": 0.71}, "roc_auc 0.71 on unseen labelled rows is worse than the floor 0.8"),
    ({"age": 45.0}, "champion age 45.0 days > max_model_age_days 30"),
])
def test_each_trigger_alone_asks_for_a_retraining(kwargs, expected):
    go, reasons = decide(signals(**kwargs), has_labelled_data=True)
    assert go is True
    assert reasons == [expected]


def test_triggers_together_are_all_given_as_reasons():
    go, reasons = decide(signals(drift=0.6, metric=0.7, age=40), has_labelled_data=True)
    assert go is True and len(reasons) == 3


@pytest.mark.parametrize("kwargs, blocked", [
    ({"rows": 50}, "blocked: 50 new labelled rows < min_new_rows 200"),
    ({"hours": 2.0}, "blocked: last retraining 2.0 h ago < cooldown_hours 24"),
])
def test_requirements_hold_a_fired_trigger(kwargs, blocked):
    go, reasons = decide(signals(drift=0.9, **kwargs), has_labelled_data=True)
    assert go is False
    assert reasons[0].startswith("drift score 0.9")
    assert blocked in reasons


def test_without_labelled_data_there_is_no_retraining_and_it_says_what_to_configure():
    sig = signals(drift=0.9)
    sig[3] = rows_signal(None, 200, "no labelled data")
    go, reasons = decide(sig, has_labelled_data=False)
    assert go is False
    assert any("set training_data and target in the RetrainingPolicy" in r for r in reasons)


def test_cooldown_passes_after_its_hours_and_when_nothing_ran_before():
    assert cooldown_signal(None, 24).fired and cooldown_signal(25.0, 24).fired
    assert not cooldown_signal(23.9, 24).fired


def test_hours_since_last_skips_failed_retrainings():
    now = datetime(2026, 11, 26, 12, tzinfo=timezone.utc)

    def r(decision, hours):
        return RetrainResult(model_name="m", trigger="event", reason="", champion_version=1,
                             decision=decision, started_at=now - timedelta(hours=hours))

    assert hours_since_last([r("failed", 1), r("not_promoted", 5)], now) == pytest.approx(5)
    assert hours_since_last([r("failed", 1)], now) is None


def test_the_decision_unpacks_as_the_seed_tuple_and_still_dumps_every_field():
    decision = RetrainDecision(should_retrain=True, reasons=["a", "b"], signals=signals(drift=0.5))
    should, reason, metrics = decision
    assert should is True and reason == "a; b"
    assert metrics["drift_score"] == 0.5 and metrics["new_labelled_rows"] == 500
    assert dict(decision)["reasons"] == ["a", "b"]  # what Prefect reads results with
    assert set(decision.model_dump()) >= {"should_retrain", "reasons", "signals"}


def test_metric_floor_follows_the_metric_direction():
    assert metric_floor("roc_auc", 0.8, None, 0.1) == pytest.approx(0.72)
    assert metric_floor("rmse", 50.0, None, 0.1) == pytest.approx(55.0)
    assert metric_floor("rmse", 50.0, 60.0, 0.1) == 60.0
    # rmse 58 is worse than a ceiling of 55: fires; 52 does not
    assert metric_signal("rmse", 58.0, 55.0, "").fired
    assert not metric_signal("rmse", 52.0, 55.0, "").fired


# --------------------------------------------------------------------------- the gate
CHAMPION = {"roc_auc": 0.80, "accuracy": 0.78}


@pytest.mark.parametrize("challenger, margin, floor, promote, why", [
    ({"roc_auc": 0.83, "accuracy": 0.8}, 0.01, None, True, "beats the champion's 0.8000 by 0.0300"),
    ({"roc_auc": 0.80, "accuracy": 0.8}, 0.0, None, False, "is equal to the champion's"),
    ({"roc_auc": 0.79, "accuracy": 0.8}, 0.0, None, False, "is worse than the champion's"),
    ({"roc_auc": 0.805, "accuracy": 0.8}, 0.01, None, False, "less than promotion_margin 0.0100"),
    ({"roc_auc": 0.83, "accuracy": 0.8}, 0.0, 0.85, False, "worse than the policy floor 0.8500"),
    ({"roc_auc": 0.83, "accuracy": float("nan")}, 0.0, None, False, "accuracy is not finite"),
])
def test_gate_promotes_only_a_clearly_better_sane_challenger(challenger, margin, floor, promote, why):
    verdict = gate_verdict("roc_auc", CHAMPION, challenger, margin, floor, [])
    assert verdict.promote is promote
    assert why in verdict.why


def test_gate_for_a_lower_is_better_metric():
    assert gate_verdict("rmse", {"rmse": 50.0}, {"rmse": 45.0}, 1.0, None, []).promote
    verdict = gate_verdict("rmse", {"rmse": 50.0}, {"rmse": 55.0}, 0.0, None, [])
    assert not verdict.promote and verdict.improvement == pytest.approx(-5.0)


def test_gate_refuses_a_challenger_with_another_input_schema():
    a = {"target": "y", "task": "binary", "numeric": ["x1", "x2"], "categorical": ["c"]}
    b = {"target": "y", "task": "binary", "numeric": ["x1"], "categorical": ["c", "x2", "d"]}
    diffs = schema_differences(a, b)
    assert diffs == ["new columns: d", "column 'x2' is categorical (was numeric)"]
    verdict = gate_verdict("roc_auc", CHAMPION, {"roc_auc": 0.99, "accuracy": 0.9}, 0, None, diffs)
    assert not verdict.promote and "input schema differs" in verdict.why
    assert schema_differences(a, {**a, "numeric": ["x1"]}) == ["missing columns: x2"]


# --------------------------------------------------------------------------- unseen rows, gate slice
def test_unseen_rows_by_fingerprint_then_by_count_then_all():
    prints = np.array([5, 1, 9, 7], dtype=np.uint64)
    mask, how = unseen_mask(prints, np.array([1, 7], dtype=np.uint64), 2)
    assert mask.tolist() == [True, False, True, False] and how == "by row fingerprint"
    mask, how = unseen_mask(prints, None, 3)
    assert mask.tolist() == [False, False, False, True] and "after the first 3" in how
    mask, _ = unseen_mask(prints, None, None)
    assert mask.all()


def test_gate_slice_comes_from_unseen_rows_only_stratified_and_never_all_of_them():
    rng = np.random.default_rng(0)
    unseen = np.zeros(1000, dtype=bool)
    unseen[400:] = True
    labels = pd.Series(rng.choice(["yes", "no"], size=1000, p=[0.2, 0.8]))
    gate = gate_split(unseen, labels, 0.5)
    assert not gate[:400].any()
    assert gate.sum() == pytest.approx(300, abs=2)
    share_yes = (labels[gate] == "yes").mean()
    assert share_yes == pytest.approx((labels[unseen] == "yes").mean(), abs=0.01)
    assert (gate_split(unseen, labels, 0.5) == gate).all()  # seeded: the same slice again
    tiny = np.array([True, True])
    assert gate_split(tiny, None, 0.99).sum() == 1  # the challenger keeps at least one new row
