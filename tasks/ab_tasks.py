"""A/B-test tasks: the result models, scoring and routing, outcome parsing, the analysis of a
test from its running sums, the lift-over-time plot (MLflow) and the Prefect artifacts.

The store is tasks/ab.py (SQL), the statistics tasks/ab_stats.py and the routing hash
tasks/routing.py (both pure). Every task here validates before it writes anything.
"""
from __future__ import annotations

import io
import math
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from blocks.ab_policy import resolve_ab_policy
from blocks.mlflow_config import resolve_mlflow_config, state_dir
from tasks import ab_stats
from tasks.ab import (CHALLENGER_ARM, CHAMPION_ARM, ABStore, ABTestClosedError,
                      ArmTotals, TestRecord, from_ms, now_ms, open_store)
from tasks.data import READABLE, s3_bucket_for, split_s3_uri
from tasks.errors import ConfigurationError, DataError
from tasks.mlflow_links import artifact_link, inline_image, run_link
from tasks.registry import mlflow_client, model_slug, resolve_version
from tasks.routing import is_challenger
from tasks.training import load_artifact_json
from tasks.training_search import Schema, prepare_features

Recommendation = Literal["continue", "promote_challenger", "keep_champion", "invalid"]
MAX_SCORED_VERSIONS = 8  # fitted models kept in memory per process (versions never change)


# --------------------------------------------------------------------------- result models
class ABTestInfo(BaseModel):
    test_id: str
    model_name: str
    status: Literal["active", "concluded"]
    champion_version: int
    challenger_version: int
    traffic_split: float = Field(description="the challenger's share of traffic")
    metric_type: Literal["conversion", "continuous"]
    created_at: datetime
    concluded_at: datetime | None = None
    min_samples_per_arm: int
    min_duration_days: float
    alpha: float
    power: float
    srm_threshold: float
    higher_is_better: bool = True
    routed_champion: int = 0
    routed_challenger: int = 0
    n_champion: int = Field(0, description="champion keys with an outcome")
    n_challenger: int = Field(0, description="challenger keys with an outcome")
    forced: bool = False
    promoted: bool = False
    description: str = ""
    store: str = ""


class ScoreResult(BaseModel):
    model_name: str
    test_id: str | None = Field(description="the active test the rows were routed in; None: "
                                            "no active test, the champion scored every row")
    n_rows: int
    n_champion: int
    n_challenger: int
    output: str = Field(description="where the predictions were written")
    champion_version: int
    challenger_version: int | None = None
    new_keys_champion: int = Field(0, description="keys routed for the first time")
    new_keys_challenger: int = 0


class OutcomeReport(BaseModel):
    recorded: int = Field(description="keys whose outcome was recorded now")
    duplicates: int = Field(description="rows repeating an outcome already recorded (counted once)")
    unknown_keys: int = Field(description="rows whose key was never routed in this test")
    conflicting: int = Field(description="rows rejected: a different value for a key that "
                                         "already has one (or two values in this batch)")
    test_id: str = ""
    n_rows: int = 0
    recorded_champion: int = 0
    recorded_challenger: int = 0


class ArmStats(BaseModel):
    version: int
    routed: int = Field(description="distinct keys routed to this arm")
    n: int = Field(description="distinct keys with an outcome")
    successes: int | None = Field(None, description="conversion tests: outcomes equal to 1")
    rate: float | None = Field(None, description="conversion tests: successes / n")
    mean: float | None = None
    variance: float | None = Field(None, description="per-outcome variance (p(1-p) for "
                                                     "conversions, sample variance otherwise)")
    predictions: int = Field(0, description="predictions logged (a key scored twice counts twice)")


class SRMCheck(BaseModel):
    p_value: float
    mismatch: bool
    chi2: float = 0.0
    threshold: float = 0.001
    expected_challenger_share: float = 0.0
    observed_challenger_share: float | None = None


class SampleSize(BaseModel):
    """Fixed-horizon outcomes per arm to detect the observed effect at the test's alpha and
    power, and how many are still missing. The sequential test needs about 1.6x as many."""

    champion: int
    challenger: int
    total: int
    remaining_champion: int
    remaining_challenger: int
    effect_size: float


class Guardrails(BaseModel):
    min_samples_per_arm: int
    min_samples_met: bool
    min_duration_days: float
    elapsed_days: float
    min_duration_met: bool
    srm_ok: bool
    passed: bool
    failing: list[str] = Field(default_factory=list)


class ABResults(BaseModel):
    test_id: str
    model_name: str
    status: Literal["active", "concluded"]
    arms: dict[str, ArmStats]
    difference: float | None = Field(None, description="challenger − champion")
    relative_lift: float | None = Field(None, description="difference / champion mean")
    ci_low: float | None = Field(None, description="fixed-horizon (1 − alpha) interval of the "
                                                   "difference (valid for one pre-planned look)")
    ci_high: float | None = None
    p_value: float | None = Field(None, description="fixed-horizon: two-proportion z or Welch t")
    sequential_p_value: float | None = Field(None, description="always valid, however often read")
    prob_challenger_better: float | None = None
    srm: SRMCheck
    samples_needed: SampleSize | None = None
    guardrails: Guardrails
    recommendation: Recommendation
    reason: str
    # added fields
    metric_type: Literal["conversion", "continuous"] = "conversion"
    higher_is_better: bool = True
    traffic_split: float = 0.0
    alpha: float = 0.05
    champion_version: int = 0
    challenger_version: int = 0
    cs_low: float | None = Field(None, description="confidence sequence of the difference "
                                                   "(always valid)")
    cs_high: float | None = None
    relative_ci_low: float | None = None
    relative_ci_high: float | None = None
    created_at: datetime | None = None
    computed_at: datetime | None = None
    concluded_at: datetime | None = None
    forced: bool = False
    promoted: bool = False
    conclusion: str | None = None
    mlflow_run_id: str | None = None
    plot_uri: str | None = None


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def info_of(test: TestRecord, arms: dict[str, ArmTotals], store: ABStore | None = None
              ) -> ABTestInfo:
    champ, chal = arms.get("champion"), arms.get("challenger")
    return ABTestInfo(
        test_id=test.test_id, model_name=test.model_name, status=test.status,
        champion_version=test.champion_version, challenger_version=test.challenger_version,
        traffic_split=test.traffic_split, metric_type=test.metric_type,
        created_at=test.created_at, concluded_at=test.concluded_at,
        min_samples_per_arm=test.min_samples_per_arm, min_duration_days=test.min_duration_days,
        alpha=test.alpha, power=test.power, srm_threshold=test.srm_threshold,
        higher_is_better=test.higher_is_better,
        routed_champion=champ.routed if champ else 0, routed_challenger=chal.routed if chal else 0,
        n_champion=champ.n if champ else 0, n_challenger=chal.n if chal else 0,
        forced=test.forced, promoted=test.promoted, description=test.description,
        store=store.describe() if store else "")


# --------------------------------------------------------------------------- analysis (pure)
def arm_sufficient_stats(test: TestRecord, totals: ArmTotals):
    if test.metric_type == "conversion":
        return ab_stats.ConversionStats(totals.n, int(round(totals.total)))
    return ab_stats.ContinuousStats(totals.n, totals.total, max(totals.total_sq, 0.0))


def analyse(test: TestRecord, arms: dict[str, ArmTotals], *, at_ms: int | None = None,
            final: bool = False) -> ABResults:
    """Every number of ABResults from the two arms' running sums (constant time).

    `final=True` is the end of the test (conclusion): with the guardrails met and no significant
    difference, the recommendation becomes keep_champion.
    """
    at = now_ms() if at_ms is None else at_ms
    a, b = arms["champion"], arms["challenger"]
    champ, chal = arm_sufficient_stats(test, a), arm_sufficient_stats(test, b)
    conversion = test.metric_type == "conversion"

    def arm_model(t: ArmTotals, s) -> ArmStats:
        has = t.n >= (1 if conversion else 2)
        mean = _finite(s.mean) if t.n else None
        var = _finite(s.variance) if has else None
        return ArmStats(version=t.version, routed=t.routed, n=t.n,
                        successes=int(round(t.total)) if conversion else None,
                        rate=mean if conversion else None, mean=mean, variance=var,
                        predictions=t.predictions)

    fixed = None
    if (conversion and min(a.n, b.n) >= 1) or (not conversion and min(a.n, b.n) >= 2):
        fixed = ab_stats.compare(champ, chal, alpha=test.alpha)
    seq = ab_stats.sequential_test(champ, chal, alpha=test.alpha, tuning=test.sequential_tuning)
    prob = ab_stats.probability_challenger_better(champ, chal).probability_challenger_better
    if not test.higher_is_better:
        prob = 1.0 - prob
    srm = ab_stats.srm_check(a.routed, b.routed, test.traffic_split, threshold=test.srm_threshold)
    needed = None
    try:
        size = ab_stats.samples_needed(champ, chal, test.traffic_split, alpha=test.alpha,
                                       power=test.power)
        if size.champion_n is not None:
            needed = SampleSize(champion=size.champion_n, challenger=size.challenger_n,
                                total=size.total_n,
                                remaining_champion=max(0, size.champion_n - a.n),
                                remaining_challenger=max(0, size.challenger_n - b.n),
                                effect_size=size.effect_size)
    except ValueError:
        needed = None  # no outcomes yet, or no spread: the effect is undefined
    elapsed = max(0.0, (at - test.created_at_ms) / 86_400_000)
    min_samples_met = min(a.n, b.n) >= test.min_samples_per_arm
    min_duration_met = elapsed >= test.min_duration_days
    failing = []
    if not min_samples_met:
        failing.append(f"min samples: {a.n} champion and {b.n} challenger outcomes, need "
                       f"{test.min_samples_per_arm} per arm")
    if not min_duration_met:
        failing.append(f"min duration: {elapsed:.2f} of {test.min_duration_days:g} days elapsed")
    if srm.mismatch:
        failing.append(f"sample ratio mismatch (chi-square p = {srm.p_value:.2g} < "
                       f"{test.srm_threshold:g})")
    guard = Guardrails(min_samples_per_arm=test.min_samples_per_arm,
                       min_samples_met=min_samples_met, min_duration_days=test.min_duration_days,
                       elapsed_days=round(elapsed, 4), min_duration_met=min_duration_met,
                       srm_ok=not srm.mismatch, passed=not failing, failing=failing)
    rec = ab_stats.recommend(
        champ, chal, traffic_split=test.traffic_split, alpha=test.alpha,
        min_samples_per_arm=test.min_samples_per_arm, min_duration_met=min_duration_met,
        routed_counts=(a.routed, b.routed), srm_threshold=test.srm_threshold,
        higher_is_better=test.higher_is_better, horizon_reached=final,
        tuning=test.sequential_tuning)
    total_routed = a.routed + b.routed
    return ABResults(
        test_id=test.test_id, model_name=test.model_name, status=test.status,
        arms={"champion": arm_model(a, champ), "challenger": arm_model(b, chal)},
        difference=_finite(fixed.difference) if fixed else None,
        relative_lift=_finite(fixed.relative_lift) if fixed else None,
        ci_low=_finite(fixed.ci_low) if fixed else None,
        ci_high=_finite(fixed.ci_high) if fixed else None,
        p_value=_finite(fixed.p_value) if fixed else None,
        sequential_p_value=_finite(seq.p_value),
        prob_challenger_better=_finite(prob),
        srm=SRMCheck(p_value=srm.p_value, mismatch=srm.mismatch, chi2=srm.chi2,
                     threshold=srm.threshold, expected_challenger_share=test.traffic_split,
                     observed_challenger_share=(b.routed / total_routed) if total_routed else None),
        samples_needed=needed, guardrails=guard, recommendation=rec.decision, reason=rec.reason,
        metric_type=test.metric_type, higher_is_better=test.higher_is_better,
        traffic_split=test.traffic_split, alpha=test.alpha,
        champion_version=test.champion_version, challenger_version=test.challenger_version,
        cs_low=_finite(seq.ci_low), cs_high=_finite(seq.ci_high),
        relative_ci_low=_finite(fixed.relative_ci_low) if fixed else None,
        relative_ci_high=_finite(fixed.relative_ci_high) if fixed else None,
        created_at=test.created_at, computed_at=from_ms(at), concluded_at=test.concluded_at,
        forced=test.forced, promoted=test.promoted, conclusion=test.conclusion,
        mlflow_run_id=test.mlflow_run_id)


def challenger_leads(results: ABResults) -> bool:
    """The observed difference favours the challenger (in the test's better direction)."""
    if results.difference is None or results.difference == 0:
        return False
    return results.difference > 0 if results.higher_is_better else results.difference < 0


def series(test: TestRecord, snapshots: list[dict[str, Any]]) -> pd.DataFrame:
    """Difference, relative lift, confidence sequence and sequential p after each outcome batch
    (vectorised over the snapshots)."""
    if not snapshots:
        return pd.DataFrame()
    s = pd.DataFrame(snapshots)
    keep = (s.champion_n >= 1) & (s.challenger_n >= 1)
    if test.metric_type == "continuous":
        keep &= (s.champion_n >= 2) & (s.challenger_n >= 2)
    s = s[keep].reset_index(drop=True)
    if s.empty:
        return s
    if test.metric_type == "conversion":
        champ = ab_stats.ConversionStats(s.champion_n.to_numpy(np.int64),
                                         np.rint(s.champion_total.to_numpy()).astype(np.int64))
        chal = ab_stats.ConversionStats(s.challenger_n.to_numpy(np.int64),
                                        np.rint(s.challenger_total.to_numpy()).astype(np.int64))
    else:
        champ = ab_stats.ContinuousStats(s.champion_n.to_numpy(np.int64),
                                         s.champion_total.to_numpy(float),
                                         np.maximum(s.champion_total_sq.to_numpy(float), 0))
        chal = ab_stats.ContinuousStats(s.challenger_n.to_numpy(np.int64),
                                        s.challenger_total.to_numpy(float),
                                        np.maximum(s.challenger_total_sq.to_numpy(float), 0))
    seq = ab_stats.sequential_test(champ, chal, alpha=test.alpha, tuning=test.sequential_tuning)
    base = np.asarray(champ.mean, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(base != 0, np.asarray(seq.difference, float) / base, np.nan)
    return pd.DataFrame({
        "at": pd.to_datetime(s.at_ms, unit="ms", utc=True), "n_total": seq.n_total,
        "difference": np.asarray(seq.difference, float), "cs_low": np.asarray(seq.ci_low, float),
        "cs_high": np.asarray(seq.ci_high, float), "relative_lift": rel,
        "sequential_p": np.asarray(seq.p_value, float)})


def render_plot(test: TestRecord, frame: pd.DataFrame, path: Path) -> Path:
    """Lift (challenger − champion) with its confidence sequence, and the always-valid p-value,
    over time. Matplotlib is imported here, not at module import (docs/architecture.md, "Fast imports")."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.4]})
    what = "conversion rate" if test.metric_type == "conversion" else "mean outcome"
    if frame.empty:
        top.text(0.5, 0.5, "no outcomes in both arms yet", ha="center", va="center",
                 transform=top.transAxes)
    else:
        x = frame["at"].dt.tz_convert(None)
        low = frame.cs_low.clip(lower=-1e6)
        high = frame.cs_high.clip(upper=1e6)
        top.fill_between(x, low, high, alpha=0.25, color="tab:blue", lw=0,
                         label=f"{1 - test.alpha:.0%} confidence sequence (always valid)")
        style = "o-" if len(frame) <= 60 else "-"
        top.plot(x, frame.difference, style, ms=3, color="tab:blue",
                 label="challenger − champion")
        finite = np.isfinite(low) & np.isfinite(high)
        if finite.any():
            span = float(max(abs(low[finite]).max(), abs(high[finite]).max(),
                             abs(frame.difference).max(), 1e-9))
            top.set_ylim(-1.1 * span, 1.1 * span)
        bottom.plot(x, frame.sequential_p, style, ms=3, color="tab:orange",
                    label="sequential p-value")
        bottom.axhline(test.alpha, color="tab:red", ls="--", lw=1, label=f"alpha {test.alpha:g}")
        bottom.set_yscale("log")
        bottom.set_ylim(max(1e-8, min(test.alpha / 5, float(frame.sequential_p.min()) / 2)), 2)
        bottom.legend(loc="lower left", fontsize=8)
    top.axhline(0, color="black", lw=0.8)
    top.set_ylabel(f"lift in {what}")
    top.set_title(f"A/B test {test.test_id}: {test.model_name} v{test.challenger_version} "
                  f"(challenger) vs v{test.champion_version} (champion)", fontsize=10)
    if not frame.empty:
        top.legend(loc="upper left", fontsize=8)
    bottom.set_ylabel("sequential p")
    bottom.set_xlabel("time of the outcome batch (UTC)")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- scoring
@dataclass
class _Scorer:
    version: int
    model: Any
    schema: Schema


_SCORERS: "OrderedDict[tuple, _Scorer]" = OrderedDict()
_SCORERS_LOCK = threading.Lock()


def load_scorer(model_name: str, version: int) -> _Scorer:
    """The fitted pipeline and input schema of a version (cached: versions are immutable)."""
    import mlflow

    client = mlflow_client()
    mv = resolve_version(client, model_name, version)
    key = (mlflow.get_tracking_uri(), model_name, int(mv.version), mv.run_id, mv.source)
    with _SCORERS_LOCK:
        if key in _SCORERS:
            _SCORERS.move_to_end(key)
            return _SCORERS[key]
    try:
        schema = Schema.from_dict(load_artifact_json(mv.run_id, "schema.json"))
    except Exception as exc:
        raise DataError(
            f"version {mv.version} of {model_name!r} has no stored input schema (mlops/schema.json "
            f"in run {mv.run_id}); A/B tests score versions trained with train_model") from exc
    model = mlflow.sklearn.load_model(f"models:/{model_name}/{mv.version}")
    scorer = _Scorer(int(mv.version), model, schema)
    with _SCORERS_LOCK:
        _SCORERS[key] = scorer
        while len(_SCORERS) > MAX_SCORED_VERSIONS:
            _SCORERS.popitem(last=False)
    return scorer


def entity_keys(frame: pd.DataFrame, id_column: str, what: str = "data") -> list[str]:
    """Entity ids as strings (routing formats keys with str(): integer-valued floats, which pandas
    makes of integer columns with gaps, are turned back into integers first)."""
    if not isinstance(id_column, str) or id_column not in frame.columns:
        raise DataError(f"the {what} has no id column {id_column!r}; columns: "
                        f"{', '.join(map(str, frame.columns))} (pass id_column=<the entity id "
                        "column>, e.g. customer_id)")
    ids = frame[id_column]
    missing = int(ids.isna().sum())
    if missing:
        raise DataError(f"id column {id_column!r} has {missing} missing values; every row needs "
                        "an entity id (routing is by id)")
    if pd.api.types.is_float_dtype(ids):
        values = ids.to_numpy(float)
        if not np.all(np.mod(values, 1) == 0):
            raise DataError(f"id column {id_column!r} holds non-integer numbers (e.g. "
                            f"{values[np.mod(values, 1) != 0][0]!r}); use string or integer ids")
        return [str(int(v)) for v in values]
    if pd.api.types.is_bool_dtype(ids):
        raise DataError(f"id column {id_column!r} is boolean; use string or integer entity ids")
    keys = [str(v) for v in ids.tolist()]
    empty = sum(1 for k in keys if not k.strip())
    if empty:
        raise DataError(f"id column {id_column!r} has {empty} empty ids")
    return keys


def event_times(frame: pd.DataFrame, timestamp_column: str | None, what: str) -> np.ndarray:
    """Milliseconds since the epoch per row: the column's times (naive = UTC), else now."""
    if timestamp_column is None:
        return np.full(len(frame), now_ms(), dtype=np.int64)
    if timestamp_column not in frame.columns:
        raise DataError(f"the {what} has no timestamp column {timestamp_column!r}; columns: "
                        f"{', '.join(map(str, frame.columns))}")
    try:
        parsed = pd.to_datetime(frame[timestamp_column], utc=True, errors="raise", format="mixed")
    except (ValueError, TypeError) as exc:
        raise DataError(f"timestamp column {timestamp_column!r} has values that are not times: "
                        f"{exc}") from exc
    if parsed.isna().any():
        raise DataError(f"timestamp column {timestamp_column!r} has {int(parsed.isna().sum())} "
                        "missing times")
    return parsed.dt.as_unit("ms").astype("int64").to_numpy(np.int64)


def check_output(output: str | None, model_name: str, location: str | None = None) -> str:
    """Where predictions go, checked before anything is written: a csv/parquet path, an s3://
    URI (a saved S3Bucket block for its bucket), or else a new parquet file under `location`
    (the ABPolicy's scores_location: a folder or an s3:// prefix; empty: the state folder)."""
    if output is None or str(output).strip() == "":
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        name = f"{model_slug(model_name)}-{stamp}.parquet"
        where = (location or "").strip()
        if where.startswith("s3://"):
            output = f"{where.rstrip('/')}/{name}"
        else:
            return str((Path(where).expanduser() if where else state_dir() / "ab" / "scores")
                       / name)
    text = str(output)
    suffix = Path(text).suffix.lower()
    if READABLE.get(suffix) is None:
        raise DataError(f"cannot write predictions to {text!r}: unsupported format "
                        f"{suffix or '(no extension)'!r}; use .csv or .parquet")
    if text.startswith("s3://"):
        _s3_block(text)
    return text


def _s3_block(uri: str):
    bucket, key = split_s3_uri(uri)
    return s3_bucket_for(bucket, uri, purpose="write"), key


def write_table(frame: pd.DataFrame, target: str) -> str:
    kind = READABLE[Path(target).suffix.lower()]
    if target.startswith("s3://"):
        block, key = _s3_block(target)
        buffer = io.BytesIO()
        frame.to_csv(buffer, index=False) if kind == "csv" else frame.to_parquet(buffer, index=False)
        block.write_path(key, buffer.getvalue())
        return target
    path = Path(target).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False) if kind == "csv" else frame.to_parquet(path, index=False)
    return str(path)


@dataclass
class Scored:
    """Rows routed and scored, nothing written yet."""

    test: TestRecord | None
    store_url: str | None
    frame: pd.DataFrame  # the output: id, arm, version, prediction, proba_<class>..., timestamp
    keys: list[str]
    arms: np.ndarray  # 0 champion / 1 challenger
    times_ms: np.ndarray
    scores: list[float | None]
    champion_version: int
    challenger_version: int | None
    output: str


def _predict(scorer: _Scorer, X: pd.DataFrame) -> tuple[list, np.ndarray | None, list]:
    """Predictions, probabilities (None for regression) and classes."""
    if scorer.schema.task == "regression":
        return list(scorer.model.predict(X)), None, []
    proba = scorer.model.predict_proba(X)
    classes = list(scorer.model.classes_)
    return [classes[i] for i in proba.argmax(axis=1)], proba, classes


@task(name="route-and-score", cache_policy=NO_CACHE)
def route_and_score(model_name: str, frame: pd.DataFrame, id_column: str,
                    output: str | None = None, timestamp_column: str | None = None) -> Scored:
    """Validate, route every row (active test) and score each arm with its version. No writes."""
    if frame.empty:
        raise DataError("the scoring data is empty (0 rows); pass rows to score")
    keys = entity_keys(frame, id_column, "scoring data")
    times = event_times(frame, timestamp_column, "scoring data")
    policy = resolve_ab_policy()
    target = check_output(output, model_name, policy.scores_location)
    store = open_store(policy.store_url())
    test = store.active_test(model_name)
    client = mlflow_client()
    if test is None:
        champion = int(resolve_version(client, model_name, "champion").version)
        versions = {CHAMPION_ARM: champion}
        arms = np.zeros(len(frame), dtype=np.int8)
    else:
        versions = {CHAMPION_ARM: test.champion_version, CHALLENGER_ARM: test.challenger_version}
        arms = is_challenger(test.seed, keys, test.traffic_split).astype(np.int8)
    scorers = {arm: load_scorer(model_name, v) for arm, v in versions.items()}
    # validate the rows against every version that will see them before predicting anything
    inputs = {arm: prepare_features(frame, s.schema) for arm, s in scorers.items()}
    out = pd.DataFrame({"id": frame[id_column].to_numpy(),
                        "arm": np.where(arms == CHALLENGER_ARM, "challenger", "champion"),
                        "version": np.array([versions[int(a)] for a in arms], dtype=np.int64)},
                       index=frame.index)
    predictions = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    scores = pd.Series(np.nan, index=frame.index, dtype=float)
    proba_cols: dict[str, pd.Series] = {}
    for arm, scorer in scorers.items():
        mask = arms == arm
        if not mask.any():
            continue
        X = inputs[arm].loc[mask]
        pred, proba, classes = _predict(scorer, X)
        predictions.loc[mask] = pred
        if proba is None:
            scores.loc[mask] = np.asarray(pred, float)
        else:
            scores.loc[mask] = proba[:, 1] if proba.shape[1] == 2 else proba.max(axis=1)
            for j, c in enumerate(classes):
                col = proba_cols.setdefault(f"proba_{c}", pd.Series(np.nan, index=frame.index))
                col.loc[mask] = proba[:, j]
    out["prediction"] = predictions.to_numpy()
    for name, col in proba_cols.items():
        out[name] = col.to_numpy()
    if timestamp_column is not None:
        out["timestamp"] = pd.to_datetime(times, unit="ms", utc=True)
    score_list = [None if math.isnan(v) else float(v) for v in scores.tolist()]
    return Scored(test=test, store_url=store.url if test else None,
                  frame=out.reset_index(drop=True), keys=keys, arms=arms, times_ms=times,
                  scores=score_list, champion_version=versions[CHAMPION_ARM],
                  challenger_version=versions.get(CHALLENGER_ARM), output=target)


@task(name="write-and-log-predictions", cache_policy=NO_CACHE)
def write_and_log(scored: Scored, model_name: str) -> ScoreResult:
    """Write the predictions, then log them (one transaction); the file is removed again when
    logging fails, so a failed call leaves nothing behind."""
    written = write_table(scored.frame, scored.output)
    new = {"champion": 0, "challenger": 0}
    if scored.test is not None:
        try:
            new = open_store(scored.store_url).log_predictions(
                scored.test, scored.keys, scored.arms.tolist(),
                [None if p is None else str(p) for p in scored.frame["prediction"].tolist()],
                scored.scores, scored.times_ms.tolist())
        except Exception:
            if not written.startswith("s3://"):
                Path(written).unlink(missing_ok=True)
            raise
    n_chal = int((scored.arms == CHALLENGER_ARM).sum())
    return ScoreResult(model_name=model_name, test_id=scored.test.test_id if scored.test else None,
                       n_rows=len(scored.frame), n_champion=len(scored.frame) - n_chal,
                       n_challenger=n_chal, output=written,
                       champion_version=scored.champion_version,
                       challenger_version=scored.challenger_version,
                       new_keys_champion=new["champion"], new_keys_challenger=new["challenger"])


# --------------------------------------------------------------------------- outcomes
_TRUE = {"1", "true", "1.0"}
_FALSE = {"0", "false", "0.0"}


def outcome_values(frame: pd.DataFrame, column: str, metric_type: str) -> np.ndarray:
    """Outcomes as floats: 0/1 for conversion tests (booleans, 0/1 numbers, "true"/"false",
    "0"/"1"), finite numbers for continuous ones."""
    if column not in frame.columns:
        raise DataError(f"the outcome data has no outcome column {column!r}; columns: "
                        f"{', '.join(map(str, frame.columns))}")
    col = frame[column]
    missing = int(col.isna().sum())
    if missing:
        raise DataError(f"outcome column {column!r} has {missing} missing values; drop rows "
                        "whose outcome is not known yet and record them later")
    if metric_type == "conversion":
        if pd.api.types.is_bool_dtype(col):
            return col.to_numpy(bool).astype(float)
        if pd.api.types.is_numeric_dtype(col):
            values = col.to_numpy(float)
            bad = values[(values != 0) & (values != 1)]
        else:
            text = col.astype(str).str.strip().str.lower()
            ok = text.isin(_TRUE | _FALSE)
            bad = col[~ok].to_numpy()
            values = text.isin(_TRUE).to_numpy(float)
        if len(bad):
            shown = ", ".join(map(repr, pd.unique(pd.Series(bad)).tolist()[:5]))
            raise DataError(
                f"outcome column {column!r} has non-binary values for a conversion test: {shown} "
                f"({len(bad)} rows); record 1 (success) or 0 (no success), true/false also work "
                "(use metric_type='continuous' for numeric outcomes)")
        return values
    if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        converted = pd.to_numeric(col, errors="coerce")
        if converted.isna().any():
            bad = col[converted.isna()].tolist()[:5]
            raise DataError(f"outcome column {column!r} has non-numeric values for a continuous "
                            f"test: {', '.join(map(repr, bad))}")
        col = converted
    values = col.to_numpy(float)
    if not np.all(np.isfinite(values)):
        raise DataError(f"outcome column {column!r} has infinite values; outcomes must be finite")
    return values


@task(name="record-outcome-rows", cache_policy=NO_CACHE)
def record_outcome_rows(test_id: str, frame: pd.DataFrame, id_column: str, outcome_column: str,
                        timestamp_column: str | None = None) -> OutcomeReport:
    store = open_store()
    test = store.get_test(test_id)
    if test.status != "active":
        raise ABTestClosedError(
            f"A/B test {test_id!r} was concluded at {test.concluded_at:%Y-%m-%d %H:%M} UTC: it "
            "takes no more outcomes (they would change its final results)")
    if frame.empty:
        raise DataError("the outcome data is empty (0 rows)")
    keys = entity_keys(frame, id_column, "outcome data")
    values = outcome_values(frame, outcome_column, test.metric_type)
    times = event_times(frame, timestamp_column, "outcome data")
    counts = store.record_outcomes(test, keys, values, times.tolist())
    report = OutcomeReport(recorded=counts.recorded, duplicates=counts.duplicates,
                           unknown_keys=counts.unknown_keys, conflicting=counts.conflicting,
                           test_id=test_id, n_rows=len(frame),
                           recorded_champion=counts.recorded_by_arm["champion"],
                           recorded_challenger=counts.recorded_by_arm["challenger"])
    logger = get_run_logger()
    if report.unknown_keys:
        logger.warning("%d outcome rows name keys never routed in test %s (not recorded)",
                       report.unknown_keys, test_id)
    if report.conflicting:
        logger.warning("%d outcome rows conflict with outcomes already recorded in test %s "
                       "(rejected)", report.conflicting, test_id)
    return report


# --------------------------------------------------------------------------- results
@task(name="log-ab-plot", cache_policy=NO_CACHE)
def log_plot(test_id: str, results: ABResults) -> tuple[str | None, str | None, str | None]:
    """Log the headline numbers to the test's MLflow run (one batch, step = outcomes so far) and,
    when outcomes arrived since the last plot (or the test concluded), render the
    lift/confidence-sequence plot from the snapshots and log it with the results as JSON.
    Returns (run id, plot URI, UI link); a failure here is logged and does not fail the results."""
    from mlflow.entities import Metric, RunTag

    logger = get_run_logger()
    try:
        store = open_store()
        test = store.get_test(test_id)
        snapshots = store.snapshots(test)
        plotted = f"{snapshots[-1]['seq'] if snapshots else 0}/{results.status}"
        config = resolve_mlflow_config()
        client = mlflow_client()
        if test.mlflow_run_id is None:
            run = client.create_run(config.ensure_experiment(), run_name=f"ab-{test_id}", tags={
                "mlops.ab_test_id": test_id, "mlops.model_name": test.model_name,
                "mlops.kind": "ab-test",
                "mlops.champion_version": str(test.champion_version),
                "mlops.challenger_version": str(test.challenger_version)})
            client.set_terminated(run.info.run_id)
            store.set_mlflow_run(test, run.info.run_id)
            run_id = store.get_test(test_id).mlflow_run_id or run.info.run_id
        else:
            run_id = test.mlflow_run_id
        run = client.get_run(run_id)
        step = int(sum(a.n for a in results.arms.values()))
        stamp = now_ms()
        metrics = [Metric(f"ab_{key}", float(value), stamp, step) for key, value in (
            ("difference", results.difference), ("relative_lift", results.relative_lift),
            ("p_value", results.p_value), ("sequential_p_value", results.sequential_p_value),
            ("prob_challenger_better", results.prob_challenger_better),
            ("srm_p_value", results.srm.p_value)) if value is not None]
        uri = artifact_link(run_id, "ab/lift.png")
        if run.data.tags.get("mlops.ab_plotted") == plotted:
            client.log_batch(run_id, metrics=metrics)  # nothing new to draw
        else:
            with tempfile.TemporaryDirectory() as tmp:
                render_plot(test, series(test, snapshots), Path(tmp) / "lift.png")
                (Path(tmp) / "results.json").write_text(results.model_dump_json(indent=1))
                client.log_artifacts(run_id, tmp, artifact_path="ab")
            client.log_batch(run_id, metrics=metrics, tags=[RunTag("mlops.ab_plotted", plotted)])
        return run_id, uri, run_link(run_id, run.info.experiment_id)
    except Exception as exc:  # the plot is a convenience: never lose the results over it
        logger.warning("could not log the A/B plot of %s to MLflow: %s", test_id, exc)
        return None, None, None


def _pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x * 100:+.{digits}f}%"


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "—" if x is None else format(x, fmt)


def results_table(results: ABResults) -> list[dict[str, Any]]:
    rows = []
    for arm, s in results.arms.items():
        rows.append({"arm": arm, "version": s.version, "routed": s.routed, "n": s.n,
                     "successes": s.successes, "rate_or_mean": _finite(s.mean),
                     "variance": s.variance, "predictions": s.predictions})
    return rows


def results_markdown(results: ABResults, link: str | None, plot_uri: str | None) -> str:
    conv = results.metric_type == "conversion"
    lines = [f"## A/B test `{results.test_id}` — {results.model_name}", "",
             f"**{results.recommendation}** — {results.reason}", ""]
    if results.status == "concluded":
        outcome = (f"challenger v{results.challenger_version} promoted to champion"
                   if results.promoted else f"no promotion, champion v{results.champion_version} kept")
        detail = f" ({results.conclusion})" if results.forced else ""
        lines += [f"Concluded {results.concluded_at:%Y-%m-%d %H:%M} UTC"
                  f"{' — **forced** before the guardrails passed' if results.forced else ''}: "
                  f"{outcome}{detail}.", ""]
    stat_columns = "successes | rate" if conv else "mean | variance"
    lines += [f"| arm | version | routed keys | outcomes n | {stat_columns} |",
              "|---|---|---|---|---|---|"]
    for arm, s in results.arms.items():
        tail = (f"{s.successes} | {_num(s.rate)}" if conv else f"{_num(s.mean)} | {_num(s.variance)}")
        lines.append(f"| {arm} | v{s.version} | {s.routed} | {s.n} | {tail} |")
    g = results.guardrails
    lines += ["",
              f"- difference (challenger − champion): {_num(results.difference)}; relative lift "
              f"{_pct(results.relative_lift)} (fixed-horizon {1 - results.alpha:.0%} CI "
              f"[{_num(results.ci_low)}, {_num(results.ci_high)}], p = {_num(results.p_value, '.3g')})",
              f"- always-valid: confidence sequence [{_num(results.cs_low)}, {_num(results.cs_high)}], "
              f"sequential p = {_num(results.sequential_p_value, '.3g')} (valid however often read)",
              f"- P(challenger better) = {_num(results.prob_challenger_better, '.3f')}",
              f"- SRM: challenger share {_num(results.srm.observed_challenger_share, '.4f')} vs split "
              f"{results.traffic_split:g}, chi-square p = {_num(results.srm.p_value, '.3g')}"
              f"{' — **MISMATCH**' if results.srm.mismatch else ''}",
              f"- guardrails: {'passed' if g.passed else 'not met: ' + '; '.join(g.failing)} "
              f"(min {g.min_samples_per_arm} outcomes per arm, min {g.min_duration_days:g} days, "
              f"{g.elapsed_days:.2f} elapsed)"]
    if results.samples_needed:
        s = results.samples_needed
        lines.append(f"- samples needed for the observed effect (fixed horizon, power): "
                     f"{s.champion} champion / {s.challenger} challenger; still missing "
                     f"{s.remaining_champion} / {s.remaining_challenger}")
    if plot_uri:
        target = link or plot_uri
        lines += ["", f"Lift and confidence sequence over time: [lift.png in MLflow run "
                      f"{results.mlflow_run_id}]({target})",
                  *inline_image(plot_uri, "lift and confidence sequence over time")]
    return "\n".join(lines) + "\n"


@task(name="publish-ab-results", cache_policy=NO_CACHE)
def publish_results(results: ABResults, link: str | None = None) -> None:
    """Prefect artifacts `ab-<test_id>`: the arms table, then the markdown summary (the latest
    version of the key), which links the MLflow plot."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = f"ab-{results.test_id}"
    headline = f"{results.model_name}: {results.recommendation} ({results.status})"
    create_table_artifact(key=key, table=results_table(results), description=headline)
    create_markdown_artifact(key=key, markdown=results_markdown(results, link, results.plot_uri),
                             description=headline)


def check_split(traffic_split: Any) -> float:
    from tasks.routing import validate_traffic_split

    try:
        return validate_traffic_split(traffic_split)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


__all__ = [
    "ABResults", "ABTestInfo", "ArmStats", "Guardrails", "OutcomeReport", "SRMCheck",
    "SampleSize", "ScoreResult", "analyse", "challenger_leads", "check_split", "close_test",
    "info_of", "log_plot", "open_test", "publish_results", "read_results", "read_tests",
    "record_outcome_rows", "route_and_score", "save_final_results", "series",
    "validate_new_test", "write_and_log",
]


# --------------------------------------------------------------------------- create / conclude
@dataclass
class NewTest:
    model_name: str
    champion_version: int
    challenger_version: int
    traffic_split: float
    metric_type: str
    higher_is_better: bool
    min_samples_per_arm: int
    min_duration_days: float
    alpha: float
    power: float
    srm_threshold: float
    sequential_tuning: float
    description: str


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ConfigurationError(f"{name} must be a whole number of at least 1, got {value!r}")
    return int(value)


@task(name="validate-ab-test", cache_policy=NO_CACHE)
def validate_new_test(model_name: str, champion_version: int | str | None,
                      challenger_version: int | str | None, traffic_split: float,
                      metric_type: str, min_samples_per_arm: int | None,
                      min_duration_days: float | None, alpha: float | None,
                      higher_is_better: bool, description: str) -> NewTest:
    """Everything create_ab_test checks before it writes: split, rules, versions, one active
    test per model."""
    split = check_split(traffic_split)
    if metric_type not in ("conversion", "continuous"):
        raise ConfigurationError(f"metric_type must be 'conversion' (binary success) or "
                                 f"'continuous' (a number per key), got {metric_type!r}")
    policy = resolve_ab_policy()
    min_samples = _positive_int("min_samples_per_arm", policy.min_samples_per_arm
                                if min_samples_per_arm is None else min_samples_per_arm)
    duration = policy.min_duration_days if min_duration_days is None else min_duration_days
    if not isinstance(duration, (int, float)) or isinstance(duration, bool) \
            or not math.isfinite(duration) or duration < 0:
        raise ConfigurationError(f"min_duration_days must be a number of days >= 0, got "
                                 f"{min_duration_days!r}")
    level = policy.alpha if alpha is None else alpha
    if not isinstance(level, (int, float)) or isinstance(level, bool) or not 0 < level < 1:
        raise ConfigurationError(f"alpha must be strictly between 0 and 1 (e.g. 0.05), got {alpha!r}")
    client = mlflow_client()
    champion = resolve_version(client, model_name, "champion" if champion_version is None
                               else champion_version)
    challenger = resolve_version(client, model_name, "challenger" if challenger_version is None
                                 else challenger_version)
    if int(champion.version) == int(challenger.version):
        raise ConfigurationError(
            f"champion and challenger are the same version (v{champion.version}) of "
            f"{model_name!r}: an A/B test compares two different versions (pass "
            "challenger_version=<another version>, or promote one to challenger first)")
    active = open_store(policy.store_url()).active_test(model_name)
    if active is not None:
        from tasks.ab import ActiveTestExistsError

        raise ActiveTestExistsError(
            f"model {model_name!r} already has an active A/B test {active.test_id!r} "
            f"(v{active.champion_version} vs v{active.challenger_version}); conclude it with "
            "conclude_ab_test first (one active test per model)")
    return NewTest(model_name=model_name, champion_version=int(champion.version),
                   challenger_version=int(challenger.version), traffic_split=split,
                   metric_type=metric_type, higher_is_better=bool(higher_is_better),
                   min_samples_per_arm=min_samples, min_duration_days=float(duration),
                   alpha=float(level), power=policy.power, srm_threshold=policy.srm_threshold,
                   sequential_tuning=policy.sequential_tuning, description=description or "")


@task(name="open-ab-test", cache_policy=NO_CACHE)
def open_test(spec: NewTest) -> TestRecord:
    from tasks.ab import new_test_id

    store = open_store()
    return store.create_test(test_id=new_test_id(model_slug(spec.model_name)),
                             **{k: v for k, v in spec.__dict__.items()})


@task(name="read-ab-results", cache_policy=NO_CACHE)
def read_results(test_id: str, final: bool = False) -> ABResults:
    """The results from the running sums (a concluded test returns its frozen final results)."""
    store = open_store()
    test, arms = store.state(test_id)
    if test.status == "concluded" and test.final_results:
        return ABResults.model_validate(test.final_results)
    return analyse(test, arms, final=final)


@task(name="list-ab-tests", cache_policy=NO_CACHE)
def read_tests(model_name: str | None = None, status: str | None = "active") -> list[ABTestInfo]:
    store = open_store()
    return [info_of(t, store.arm_totals(t), store) for t in store.list_tests(model_name, status)]


@task(name="close-ab-test", cache_policy=NO_CACHE)
def close_test(test_id: str, results: ABResults, *, forced: bool, promote: bool,
               conclusion: str) -> ABResults:
    """Close the test (compare-and-set), then move `champion` through the registry's recorded
    promotion when `promote`; a failed promotion reopens the test, so nothing changes."""
    from tasks.registry import promote as registry_promote

    store = open_store()
    test = store.get_test(test_id)
    final = results.model_copy(update={"status": "concluded", "forced": forced,
                                       "promoted": False, "conclusion": conclusion})
    closed = store.close_test(test, forced=forced, conclusion=conclusion,
                              final_results=final.model_dump(mode="json"))
    final = final.model_copy(update={"concluded_at": closed.concluded_at})
    if promote:
        try:
            client = mlflow_client()
            registry_promote(client, test.model_name, test.challenger_version, "champion",
                             reason=f"A/B test {test_id}: {conclusion}", kind="ab-test")
        except Exception:
            store.reopen_test(test)
            raise
        final = final.model_copy(update={"promoted": True})
    store.update_conclusion(closed, promoted=final.promoted, conclusion=conclusion,
                            final_results=final.model_dump(mode="json"))
    return final


@task(name="save-final-results", cache_policy=NO_CACHE)
def save_final_results(final: ABResults) -> None:
    """Store the final results as returned (with the plot's location) on the closed test."""
    store = open_store()
    test = store.get_test(final.test_id)
    store.update_conclusion(test, promoted=final.promoted, conclusion=final.conclusion or "",
                            final_results=final.model_dump(mode="json"))
