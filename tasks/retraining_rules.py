"""Retraining decisions without Prefect: the signals of `should_retrain`, the champion/challenger
gate, input-schema differences, and the gate slice. Plain functions, tested directly and reused
by flows/retraining.py.
"""
from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Iterator, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from tasks.training_search import greater_is_better

Trigger = Literal["schedule", "event", "manual"]
Decision = Literal["promoted", "not_promoted", "held_ab_test", "rejected_by_approver",
                   "approval_timed_out", "failed"]
NO_LABELLED_DATA = ("no labelled data to retrain on: set training_data and target in the "
                    "RetrainingPolicy or pass data and target")


class Signal(BaseModel):
    """One thing should_retrain looked at, beside its threshold."""

    name: str
    role: Literal["trigger", "requirement"] = Field(
        description="trigger: any one firing asks for a retraining; requirement: each must hold")
    value: float | None = None
    threshold: float | None = None
    evaluated: bool = Field(description="False when the value could not be measured")
    fired: bool = Field(description="trigger: it asks for retraining; requirement: it holds")
    detail: str = ""


class RetrainDecision(BaseModel):
    """The result of should_retrain. Also unpacks as a tuple, for callers written against the
    first interface: ``should, reason, metrics = should_retrain("my_model")``."""

    should_retrain: bool
    reasons: list[str] = Field(default_factory=list)
    signals: list[Signal] = Field(default_factory=list)
    model_name: str = ""
    champion_version: int | None = None
    checked_at: datetime | None = None

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    @property
    def metrics(self) -> dict[str, float | None]:
        return {s.name: s.value for s in self.signals}

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # `(should_retrain, reason, metrics)`; model_dump() still gives every field
        return iter((self.should_retrain, self.reason, self.metrics))

    # dict(decision) goes through keys()/__getitem__ (the mapping protocol) rather than
    # __iter__: Prefect reads pydantic results with dict(model), which must still see the fields.
    def keys(self) -> list[str]:
        return list(self.__dict__)

    def __getitem__(self, key: str) -> Any:
        return self.__dict__[key]


class RetrainResult(BaseModel):
    """One retraining (the fields up to `decision` are the public contract; later ones extra)."""

    model_name: str
    trigger: Trigger
    reason: str
    champion_version: int | None = Field(description="the champion the challenger was gated against")
    challenger_version: int | None = None
    champion_score: float | None = Field(None, description="primary metric on the gate rows")
    challenger_score: float | None = None
    promoted: bool = False
    decision: Decision
    why: str = Field("", description="the gate's verdict in words")
    metric: str | None = None
    margin: float | None = None
    gate_rows: int | None = None
    gate_sha256: str | None = None
    champion_metrics: dict[str, float] = Field(default_factory=dict)
    challenger_metrics: dict[str, float] = Field(default_factory=dict)
    champion_after: int | None = Field(None, description="who holds `champion` afterwards")
    run_id: str | None = Field(None, description="the MLflow run holding this record")
    started_at: datetime | None = None
    duration_s: float | None = None
    approved_by: str | None = None


# --------------------------------------------------------------------------- signals
def better_by(metric: str, value: float, reference: float) -> float:
    """How much better `value` is than `reference` in `metric`'s better direction."""
    return value - reference if greater_is_better(metric) else reference - value


def metric_floor(metric: str, holdout: float | None, min_production_metric: float | None,
                 max_relative_degradation: float) -> float | None:
    """The policy floor, else the holdout value worsened by the monitoring policy's share."""
    if min_production_metric is not None:
        return float(min_production_metric)
    if holdout is None or not math.isfinite(holdout):
        return None
    step = abs(holdout) * max_relative_degradation
    return holdout - step if greater_is_better(metric) else holdout + step


def drift_signal(score: float | None, threshold: float, detail: str,
                 name: str = "drift_score") -> Signal:
    """drift_score: the newest recorded check_drift; data_drift_score: the rows given now."""
    fired = score is not None and score > threshold
    return Signal(name=name, role="trigger", value=score, threshold=threshold,
                  evaluated=score is not None, fired=fired, detail=detail)


def metric_signal(metric: str, value: float | None, floor: float | None, detail: str) -> Signal:
    evaluated = value is not None and floor is not None
    fired = evaluated and better_by(metric, value, floor) < 0
    return Signal(name=f"production_{metric}", role="trigger", value=value, threshold=floor,
                  evaluated=evaluated, fired=fired, detail=detail)


def age_signal(age_days: float, max_age_days: float | None) -> Signal:
    return Signal(name="model_age_days", role="trigger", value=round(age_days, 3),
                  threshold=max_age_days, evaluated=max_age_days is not None,
                  fired=max_age_days is not None and age_days > max_age_days)


def rows_signal(new_rows: int | None, min_new_rows: int, detail: str) -> Signal:
    return Signal(name="new_labelled_rows", role="requirement",
                  value=None if new_rows is None else float(new_rows), threshold=float(min_new_rows),
                  evaluated=new_rows is not None,
                  fired=new_rows is not None and new_rows >= min_new_rows, detail=detail)


def cooldown_signal(hours_since: float | None, cooldown_hours: float) -> Signal:
    return Signal(name="hours_since_last_retraining", role="requirement",
                  value=None if hours_since is None else round(hours_since, 3),
                  threshold=cooldown_hours, evaluated=True,
                  fired=hours_since is None or hours_since >= cooldown_hours,
                  detail="no earlier retraining" if hours_since is None else "")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def sentence(s: Signal) -> str:
    """What a signal says, with its value and threshold."""
    if not s.evaluated:
        return f"{s.name} not evaluated ({s.detail or 'no data'})"
    if s.name == "drift_score":
        rel = ">" if s.fired else "<="
        return f"drift score {_fmt(s.value)} {rel} drift_threshold {_fmt(s.threshold)}"
    if s.name == "data_drift_score":
        rel = ">" if s.fired else "<="
        return (f"data drift score {_fmt(s.value)} {rel} drift_threshold {_fmt(s.threshold)} "
                f"({s.detail})")
    if s.name.startswith("production_"):
        rel = "worse than" if s.fired else "within"
        return f"{s.name[len('production_'):]} {_fmt(s.value)} on unseen labelled rows is {rel} " \
               f"the floor {_fmt(s.threshold)}"
    if s.name == "model_age_days":
        rel = ">" if s.fired else "<="
        return f"champion age {s.value:.1f} days {rel} max_model_age_days {_fmt(s.threshold)}"
    if s.name == "new_labelled_rows":
        rel = ">=" if s.fired else "<"
        return f"{int(s.value)} new labelled rows {rel} min_new_rows {int(s.threshold)}"
    if s.name == "hours_since_last_retraining":
        if s.value is None:
            return "no earlier retraining (cooldown does not apply)"
        rel = ">=" if s.fired else "<"
        return f"last retraining {s.value:.1f} h ago {rel} cooldown_hours {_fmt(s.threshold)}"
    return f"{s.name} {_fmt(s.value)} (threshold {_fmt(s.threshold)})"


def decide(signals: list[Signal], has_labelled_data: bool,
           no_data: str | None = None) -> tuple[bool, list[str]]:
    """Retrain when a trigger fired and every requirement holds; the reasons say which (every
    trigger that fired). `no_data`: what to say, without labelled data, about configuring it."""
    fired = [s for s in signals if s.role == "trigger" and s.fired]
    unmet = [s for s in signals if s.role == "requirement" and not s.fired]
    if not has_labelled_data:
        unmet_text = [no_data or NO_LABELLED_DATA]
    else:
        unmet_text = [("blocked: " + sentence(s)) for s in unmet]
    if not fired:
        quiet = [sentence(s) for s in signals if s.role == "trigger"]
        return False, ["no trigger fired: " + "; ".join(quiet)] + unmet_text
    reasons = [sentence(s) for s in fired]
    if unmet_text:
        return False, reasons + unmet_text
    return True, reasons


# --------------------------------------------------------------------------- data and the gate
def schema_differences(expected: dict, got: dict) -> list[str]:
    """How the input schema of `got` differs from `expected` (columns, kinds, task, target)."""
    diffs = []
    for key in ("target", "task"):
        if expected.get(key) != got.get(key):
            diffs.append(f"{key}: {expected.get(key)!r} -> {got.get(key)!r}")
    exp_kind = {c: "numeric" for c in expected.get("numeric", [])} | \
        {c: "categorical" for c in expected.get("categorical", [])}
    got_kind = {c: "numeric" for c in got.get("numeric", [])} | \
        {c: "categorical" for c in got.get("categorical", [])}
    missing = [c for c in exp_kind if c not in got_kind]
    extra = [c for c in got_kind if c not in exp_kind]
    if missing:
        diffs.append(f"missing columns: {', '.join(missing)}")
    if extra:
        diffs.append(f"new columns: {', '.join(extra)}")
    for c in exp_kind:
        if c in got_kind and got_kind[c] != exp_kind[c]:
            diffs.append(f"column {c!r} is {got_kind[c]} (was {exp_kind[c]})")
    return diffs


def unseen_mask(fingerprints: np.ndarray, seen: np.ndarray | None, seen_count: int | None
                ) -> tuple[np.ndarray, str]:
    """Which rows the champion has not seen: by fingerprint when it stored them, else the rows
    beyond the count it was trained on (an append-only table), else all (said in the note)."""
    n = len(fingerprints)
    if seen is not None:
        return ~np.isin(fingerprints, seen), "by row fingerprint"
    if seen_count is not None:
        mask = np.zeros(n, dtype=bool)
        mask[min(seen_count, n):] = True
        return mask, f"rows after the first {seen_count} (the champion stores no fingerprints)"
    return np.ones(n, dtype=bool), "every row (the champion stores neither fingerprints nor a row count)"


def gate_split(unseen: np.ndarray, labels: pd.Series | None, share: float, seed: int = 0
               ) -> np.ndarray:
    """Boolean mask of the gate slice: `share` of the unseen rows, stratified by label when every
    class has two unseen rows, never fewer than one row and never all of them."""
    index = np.flatnonzero(unseen)
    rng = np.random.default_rng(seed)
    gate = np.zeros(len(unseen), dtype=bool)
    if len(index) < 2:
        return gate
    if labels is not None:
        values = labels.to_numpy()[index]
        groups = [index[values == v] for v in pd.unique(values)]
        if all(len(g) >= 2 for g in groups):
            for g in groups:
                take = min(len(g) - 1, max(1, int(round(len(g) * share))))
                gate[rng.choice(g, size=take, replace=False)] = True
            return gate
    take = min(len(index) - 1, max(1, int(round(len(index) * share))))
    gate[rng.choice(index, size=take, replace=False)] = True
    return gate


class GateVerdict(BaseModel):
    promote: bool
    why: str
    improvement: float | None = None


def gate_verdict(metric: str, champion: dict[str, float], challenger: dict[str, float],
                 margin: float, floor: float | None, schema_diffs: list[str]) -> GateVerdict:
    """Promote only a challenger with the champion's input schema, finite metrics, the primary
    metric not worse than the floor, and better than the champion by more than nothing and at
    least `margin` -- both measured on the same gate rows."""
    if schema_diffs:
        return GateVerdict(promote=False, why="the challenger's input schema differs: "
                           + "; ".join(schema_diffs))
    bad = [k for k, v in challenger.items() if v is None or not math.isfinite(v)]
    if metric not in challenger or metric not in champion:
        return GateVerdict(promote=False, why=f"{metric} missing from the gate scores")
    if bad:
        return GateVerdict(promote=False, why=f"the challenger's {', '.join(bad)} is not finite")
    ch, ca = challenger[metric], champion[metric]
    gain = better_by(metric, ch, ca)
    if floor is not None and better_by(metric, ch, floor) < 0:
        return GateVerdict(promote=False, improvement=gain,
                           why=f"challenger {metric} {ch:.4f} is worse than the policy floor "
                               f"{floor:.4f}")
    if gain <= 0:
        word = "equal to" if gain == 0 else "worse than"
        return GateVerdict(promote=False, improvement=gain,
                           why=f"challenger {metric} {ch:.4f} is {word} the champion's {ca:.4f}")
    if gain < margin:
        return GateVerdict(promote=False, improvement=gain,
                           why=f"challenger {metric} {ch:.4f} beats the champion's {ca:.4f} by "
                               f"{gain:.4f}, less than promotion_margin {margin:.4f}")
    return GateVerdict(promote=True, improvement=gain,
                       why=f"challenger {metric} {ch:.4f} beats the champion's {ca:.4f} by "
                           f"{gain:.4f} (promotion_margin {margin:.4f})")
