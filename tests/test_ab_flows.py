"""A/B-testing flows (flows/ab_testing.py) against a real Prefect API, a real MLflow registry with
two trained churn models, and the SQL store on SQLite (the default) and on PostgreSQL.

Module layout, for speed: the two versions are trained once per module (module-scoped MLflow on
SQLite, pointed at by a saved `default` MLflowConfig, so per-test state folders do not hide it);
each test gets a fresh A/B store (its own state folder, or the session's PostgreSQL database
emptied after the test) and the aliases reset to champion = v1, challenger = v2.
"""
from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from prefect.artifacts import Artifact
from scipy import stats
from statsmodels.stats.proportion import proportions_ztest

from blocks.ab_policy import ABPolicy
from blocks.mlflow_config import DEFAULT_DOCUMENT, MLflowConfig
from flows import ab_testing
from flows.ab_testing import (ab_test_analysis, ab_test_results, conclude_ab_test, create_ab_test,
                              list_active_ab_tests, record_outcomes, score_batch)
from flows.local_runs import local_run_settings
from flows.registry import register_model
from flows.training import train_model
from tasks.ab import (ABTestClosedError, ABTestNotFoundError, ABTestNotReadyError,
                      ActiveTestExistsError, dispose_engines, open_store)
from tasks.demo_data import churn_frame
from tasks.errors import (ConfigurationError, DataError, InvalidModelNameError,
                          ModelNotFoundError, RegistryError, VersionNotFoundError)
from tasks.registry import alias_map, mlflow_client, move_alias, read_alias_history
from tasks.routing import assign_arms

from tests.budgets import ONE_LINEAR_TRIAL
from tests.test_ab_store import shared_postgres_url

MODEL, OTHER = "churn_ab", "churn_ab_other"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def in_process_runs():
    """In-process flow runs without heartbeats (flows/local_runs.py: up to 1 s saved per flow
    run; these tests make ~150 of them)."""
    with local_run_settings():
        yield


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two trained versions of MODEL (and two of OTHER, registered from the same runs)."""
    home = tmp_path_factory.mktemp("ab-registry")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLOPS_HOME", str(home / "state"))
    db = home / "mlflow.db"
    MLflowConfig(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}",
                 artifact_location=(home / "mlartifacts").as_uri()).save(DEFAULT_DOCUMENT,
                                                                          overwrite=True)
    try:
        churn = churn_frame().sample(2200, random_state=5).reset_index(drop=True)
        v1 = train_model(churn.iloc[:600], "churn", MODEL, **ONE_LINEAR_TRIAL)
        v2 = train_model(churn.iloc[:1500], "churn", MODEL, **ONE_LINEAR_TRIAL)
        register_model(OTHER, run_id=v1.run_id)
        register_model(OTHER, run_id=v2.run_id)
        yield {"v1": v1.version, "v2": v2.version, "home": home}
    finally:
        MLflowConfig.delete(DEFAULT_DOCUMENT)
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
        mp.undo()


def reset_aliases(versions: dict) -> None:
    client = mlflow_client()
    for name in (MODEL, OTHER):
        move_alias(client, name, "champion", versions["v1"], "test reset", "test")
        move_alias(client, name, "challenger", versions["v2"], "test reset", "test")


@pytest.fixture
def models(registry):
    reset_aliases(registry)
    return registry


def test_scored_batches_without_an_output_go_where_the_policy_says(state_dir, models, traffic,
                                                                      tmp_path):
    default = score_batch(MODEL, traffic.head(50), "customer_id")
    assert Path(default.output).parent == state_dir.resolve() / "ab" / "scores"
    shared = tmp_path / "shared-scores"
    ABPolicy(scores_location=str(shared)).save(DEFAULT_DOCUMENT, overwrite=True)
    try:
        placed = score_batch(MODEL, traffic.head(50), "customer_id")
    finally:
        ABPolicy.delete(DEFAULT_DOCUMENT)
    assert Path(placed.output).parent == shared
    assert pd.read_parquet(placed.output).equals(pd.read_parquet(default.output))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request, state_dir, models):
    """The flows pointed at a fresh store: SQLite in the test's state folder (no block saved),
    or the session's PostgreSQL database through a saved `default` ABPolicy."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    url = shared_postgres_url(request)
    ABPolicy(database_url=url).save(DEFAULT_DOCUMENT, overwrite=True)
    try:
        yield "postgres"
    finally:
        ABPolicy.delete(DEFAULT_DOCUMENT)
        store = open_store(url)
        with store.engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE ab_tests, ab_arm_stats, ab_units, ab_predictions, "
                                 "ab_snapshots")


@pytest.fixture(scope="module")
def traffic():
    """Scoring rows: churn customers with an id column (no target)."""
    frame = churn_frame().sample(3000, random_state=9).reset_index(drop=True)
    frame.insert(0, "customer_id", [f"cust-{i:05d}" for i in range(len(frame))])
    return frame.drop(columns=["churn"])


def outcomes_for(output: str, p_champion: float, p_challenger: float, seed: int = 0) -> pd.DataFrame:
    """Conversions per scored key with exactly the given rate in each arm (routing depends on
    the random test id, so sampled outcomes would make the verdicts flaky)."""
    scored = pd.read_parquet(output).drop_duplicates("id").reset_index(drop=True)
    rng = np.random.default_rng(seed)
    converted = np.zeros(len(scored), dtype=int)
    for arm, rate in (("champion", p_champion), ("challenger", p_challenger)):
        rows = rng.permutation(np.flatnonzero(scored.arm.to_numpy() == arm))
        converted[rows[:int(round(rate * len(rows)))]] = 1
    return pd.DataFrame({"customer_id": scored["id"].to_numpy(), "converted": converted})


def history(name: str = MODEL) -> list[dict]:
    return read_alias_history(mlflow_client(), name)


# --------------------------------------------------------------------------- create / list
def test_create_defaults_to_the_alias_holders_and_the_policy(state_dir, models):
    test_id = create_ab_test(MODEL)
    assert test_id.startswith("churn-ab-") and test_id == test_id.lower()
    [info] = list_active_ab_tests(MODEL)
    assert (info.test_id, info.champion_version, info.challenger_version) == (
        test_id, models["v1"], models["v2"])
    assert (info.traffic_split, info.metric_type, info.min_samples_per_arm,
            info.min_duration_days, info.alpha, info.power) == (0.1, "conversion", 1000, 7, 0.05, 0.8)
    assert list_active_ab_tests(OTHER) == [] and len(list_active_ab_tests()) == 1
    other = create_ab_test(OTHER, champion_version=2, challenger_version=1, traffic_split=0.05,
                           min_samples_per_arm=50, min_duration_days=0.5, alpha=0.01)
    assert {t.test_id for t in list_active_ab_tests()} == {test_id, other}
    artifact = Artifact.get(f"ab-{test_id}")
    assert artifact is not None and artifact.type == "markdown"
    assert "continue" in artifact.data and "| champion | v1 |" in artifact.data


# --------------------------------------------------------------------------- routing / scoring
def test_score_batch_routes_sticky_by_id_and_logs_every_prediction(state_dir, models, traffic):
    test_id = create_ab_test(MODEL, traffic_split=0.3)
    result = score_batch(MODEL, traffic, "customer_id")
    assert (result.test_id, result.n_rows) == (test_id, 3000)
    # the share matches the split (binomial sd ~25 rows) and equals the pure routing function
    assert abs(result.n_challenger - 900) < 100
    out = pd.read_parquet(result.output)
    assert list(out.columns) == ["id", "arm", "version", "prediction", "proba_No", "proba_Yes"]
    # the routing seed is the model's test count in the store, not the random test id
    seed = open_store().get_test(test_id).seed
    assert seed == f"{MODEL}#1"
    expected = assign_arms(seed, traffic.customer_id.tolist(), 0.3)
    assert out.arm.tolist() == list(expected)
    assert set(out.loc[out.arm == "challenger", "version"]) == {models["v2"]}
    assert set(out.loc[out.arm == "champion", "version"]) == {models["v1"]}
    assert np.allclose(out.proba_No + out.proba_Yes, 1.0)
    assert (out.prediction == np.where(out.proba_Yes > 0.5, "Yes", "No")).all()
    # the same ids, shuffled and mixed with new ones, in another "process" (engines dropped):
    dispose_engines()
    again = pd.concat([traffic.iloc[::7], traffic.iloc[:5].assign(
        customer_id=[f"new-{i}" for i in range(5)])]).sample(frac=1.0, random_state=1)
    second = score_batch(MODEL, again, "customer_id", output=str(state_dir / "again.csv"))
    rescored = pd.read_csv(second.output)
    first_arm = dict(zip(out["id"], out.arm))
    assert all(first_arm[i] == a for i, a in zip(rescored["id"], rescored.arm) if i in first_arm)
    assert second.new_keys_champion + second.new_keys_challenger == 5
    info = list_active_ab_tests(MODEL)[0]
    assert info.routed_champion + info.routed_challenger == 3005  # distinct keys
    assert open_store().row_counts()["ab_predictions"] == 3000 + len(again)


def test_without_an_active_test_the_champion_scores_everything(state_dir, models, traffic):
    result = score_batch(MODEL, traffic.head(200), "customer_id",
                         output=str(state_dir / "out" / "p.csv"))
    assert (result.test_id, result.n_champion, result.n_challenger) == (None, 200, 0)
    assert result.champion_version == models["v1"]
    out = pd.read_csv(result.output)
    assert set(out.arm) == {"champion"} and set(out.version) == {models["v1"]}
    assert open_store().row_counts()["ab_predictions"] == 0  # nothing to log without a test


def test_a_large_dataframe_goes_into_scoring_and_outcomes(state_dir, models, traffic):
    """40,000 rows of floats and strings: Prefect would record such a frame cell by cell (4 MB,
    refused by its API above 512 KiB); the flows take it and record a one-line description."""
    from prefect.client.orchestration import get_client

    rows = pd.concat([traffic] * 14, ignore_index=True).head(40_000)
    rows = rows.astype({c: float for c in rows.select_dtypes("number").columns})
    rows["customer_id"] = [f"big-{i:06d}" for i in range(len(rows))]
    test_id = create_ab_test(MODEL, traffic_split=0.5)
    state = score_batch(MODEL, rows, "customer_id", return_state=True)
    scored = state.result()
    assert scored.n_rows == 40_000 and scored.n_champion + scored.n_challenger == 40_000
    with get_client(sync_client=True) as client:
        recorded = client.read_flow_run(state.state_details.flow_run_id).parameters
    assert recorded["data"] == "<DataFrame 40000 rows x 20 columns>"
    outcomes = pd.DataFrame({"customer_id": rows.customer_id, "ok": 1.0})
    assert record_outcomes(test_id, outcomes, "customer_id", "ok").recorded == 40_000


def test_timestamps_of_replayed_traffic_are_kept(state_dir, models, traffic):
    test_id = create_ab_test(MODEL, traffic_split=0.5)
    rows = traffic.head(50).assign(seen=pd.date_range("2026-01-01", periods=50, freq="h"))
    result = score_batch(MODEL, rows, "customer_id", timestamp_column="seen")
    out = pd.read_parquet(result.output)
    assert out.timestamp.iloc[0] == pd.Timestamp("2026-01-01", tz="UTC")
    outcomes = pd.DataFrame({"customer_id": rows.customer_id, "ok": 1,
                             "when": pd.date_range("2026-01-02", periods=50, freq="h")})
    assert record_outcomes(test_id, outcomes, "customer_id", "ok", timestamp_column="when").recorded == 50
    store = open_store()
    [snap] = store.snapshots(store.get_test(test_id))
    assert snap["at_ms"] == pd.Timestamp("2026-01-04 01:00", tz="UTC").value // 10**6


# --------------------------------------------------------------------------- outcomes / results
def test_outcomes_are_joined_by_key_with_duplicates_conflicts_and_unknowns(state_dir, models, traffic):
    test_id = create_ab_test(MODEL, traffic_split=0.5)
    score_batch(MODEL, traffic.head(100), "customer_id")
    ids = traffic.customer_id.head(100).tolist()
    first = pd.DataFrame({"id": ids[:60] + ["nobody", "nobody2"],
                          "y": [True, False] * 30 + [True, True]})
    report = record_outcomes(test_id, first, "id", "y")
    assert (report.recorded, report.duplicates, report.unknown_keys, report.conflicting) == (60, 0, 2, 0)
    second = pd.DataFrame({"id": ids[:10] + ids[60:70] + [ids[70], ids[70]],
                           "y": ["1", "0"] * 5 + ["TRUE"] * 10 + ["1", "0"]})
    report = record_outcomes(test_id, second, "id", "y")
    # ids[0..9] again: equal values are duplicates, different ones conflicts; ids[70] twice with
    # two values in one batch: both rows rejected
    assert (report.recorded, report.duplicates, report.unknown_keys, report.conflicting) == (10, 10, 0, 2)
    first_values = dict(zip(first.id, first.y.astype(int)))
    assert sum(first_values[i] != v for i, v in zip(ids[:10], [1, 0] * 5)) == 0
    results = ab_test_results(test_id)
    assert sum(a.n for a in results.arms.values()) == 70
    assert sum(a.successes for a in results.arms.values()) == 30 + 10


def test_results_equal_the_reference_statistics_and_publish_artifacts(state_dir, models, traffic):
    test_id = create_ab_test(MODEL, traffic_split=0.2, min_samples_per_arm=100, min_duration_days=0)
    scored = score_batch(MODEL, traffic, "customer_id")
    outcomes = outcomes_for(scored.output, 0.30, 0.33, seed=3)
    record_outcomes(test_id, outcomes.iloc[:1500], "customer_id", "converted")
    record_outcomes(test_id, outcomes.iloc[1500:], "customer_id", "converted")
    results = ab_test_results(test_id)
    arms = pd.read_parquet(scored.output).merge(outcomes, left_on="id", right_on="customer_id")
    by_arm = arms.groupby("arm").converted.agg(["count", "sum"])
    a, b = results.arms["champion"], results.arms["challenger"]
    assert (a.n, a.successes, b.n, b.successes) == (
        by_arm.loc["champion", "count"], by_arm.loc["champion", "sum"],
        by_arm.loc["challenger", "count"], by_arm.loc["challenger", "sum"])
    z, p = proportions_ztest([b.successes, a.successes], [b.n, a.n])
    assert results.p_value == pytest.approx(p, rel=1e-9)
    assert results.difference == pytest.approx(b.successes / b.n - a.successes / a.n)
    srm = stats.chisquare([a.routed, b.routed], [3000 * 0.8, 3000 * 0.2])
    assert results.srm.p_value == pytest.approx(srm.pvalue, rel=1e-9)
    assert results.cs_low < results.ci_low < results.difference < results.ci_high < results.cs_high
    assert results.sequential_p_value >= results.p_value  # peeking-safe costs evidence
    assert results.guardrails.passed and results.recommendation == "continue"
    assert results.samples_needed.challenger > b.n
    # artifacts: the markdown summary is the key's latest version and links the MLflow plot
    artifact = Artifact.get(f"ab-{test_id}")
    assert artifact.type == "markdown" and "lift.png" in artifact.data
    assert results.plot_uri.endswith("/ab/lift.png") and results.mlflow_run_id
    files = [f.path for f in mlflow_client().list_artifacts(results.mlflow_run_id, "ab")]
    assert set(files) == {"ab/lift.png", "ab/results.json"}
    history_ = mlflow_client().get_metric_history(results.mlflow_run_id, "ab_sequential_p_value")
    assert history_[-1].step == a.n + b.n


def test_srm_is_flagged_on_a_log_skewed_away_from_the_split(state_dir, models):
    test_id = create_ab_test(MODEL, traffic_split=0.5, min_samples_per_arm=100, min_duration_days=0)
    store = open_store()
    test = store.get_test(test_id)
    keys = [f"k{i}" for i in range(1000)]
    arms = [1 if i < 440 else 0 for i in range(1000)]  # 44% challenger for a 50% split
    store.log_predictions(test, keys, arms, ["No"] * 1000, [0.2] * 1000, [1] * 1000)
    store.record_outcomes(test, keys, [i % 3 == 0 for i in range(1000)], [2] * 1000)
    results = ab_test_results(test_id)
    assert results.srm.mismatch and results.srm.p_value < 0.001
    assert results.srm.p_value == pytest.approx(stats.chisquare([560, 440]).pvalue, rel=1e-9)
    assert results.recommendation == "invalid" and "sample ratio mismatch" in results.reason
    assert not results.guardrails.srm_ok and not results.guardrails.passed
    before = store.fingerprint()
    with pytest.raises(ABTestNotReadyError, match="sample ratio mismatch.*force=True"):
        conclude_ab_test(test_id)
    assert store.fingerprint() == before
    final = conclude_ab_test(test_id, force=True)
    assert final.forced and not final.promoted and "invalid test" in final.conclusion
    assert alias_map(mlflow_client(), MODEL)["champion"] == models["v1"]


# --------------------------------------------------------------------------- conclusion
def test_conclude_promotes_the_winner_through_the_recorded_promotion(backend, models, traffic,
                                                                    monkeypatch):
    events = []
    monkeypatch.setattr(ab_testing, "emit_model_event",
                        lambda name, event, payload: events.append((name, event, payload)))
    test_id = create_ab_test(MODEL, traffic_split=0.5, min_samples_per_arm=200, min_duration_days=0)
    scored = score_batch(MODEL, traffic, "customer_id")
    report = record_outcomes(test_id, outcomes_for(scored.output, 0.40, 0.60, seed=1),
                             "customer_id", "converted")
    assert report.recorded == 3000
    [info] = list_active_ab_tests(MODEL)
    assert info.n_champion + info.n_challenger == 3000
    results = ab_test_results(test_id)
    assert results.recommendation == "promote_challenger" and results.guardrails.passed
    assert results.prob_challenger_better > 0.999
    final = conclude_ab_test(test_id)
    assert (final.status, final.promoted, final.forced) == ("concluded", True, False)
    assert final.conclusion.startswith(f"challenger v{models['v2']} won")
    assert alias_map(mlflow_client(), MODEL) == {"champion": models["v2"]}
    moves = [(e["alias"], e["from"], e["to"], e["kind"]) for e in history()[-2:]]
    assert moves == [("champion", models["v1"], models["v2"], "ab-test"),
                     ("challenger", models["v2"], None, "ab-test")]
    assert test_id in history()[-2]["reason"]
    assert [e[1] for e in events][-2:] == ["mlops.abtest.concluded", "mlops.model.promoted"]
    assert events[-2][2]["promoted"] is True and events[-2][2]["test_id"] == test_id
    # closed: results are frozen, no outcomes, no second conclusion, no longer active
    assert list_active_ab_tests(MODEL) == []
    assert ab_test_results(test_id).model_dump() == final.model_dump()
    store = open_store()
    before = store.fingerprint()
    with pytest.raises(ABTestClosedError, match="was concluded"):
        record_outcomes(test_id, outcomes_for(scored.output, 0.5, 0.5), "customer_id", "converted")
    with pytest.raises(ABTestClosedError, match="already concluded"):
        conclude_ab_test(test_id)
    assert store.fingerprint() == before
    # the model takes a new test once the old one is closed
    assert create_ab_test(MODEL, champion_version=models["v2"], challenger_version=models["v1"])


def test_no_promotion_when_the_test_ran_its_course_without_a_difference(state_dir, models, traffic):
    test_id = create_ab_test(MODEL, traffic_split=0.5, min_samples_per_arm=100, min_duration_days=0)
    scored = score_batch(MODEL, traffic, "customer_id")
    record_outcomes(test_id, outcomes_for(scored.output, 0.3, 0.3, seed=2), "customer_id", "converted")
    final = conclude_ab_test(test_id)
    assert final.recommendation == "keep_champion" and not final.promoted and not final.forced
    assert "no significant difference by the end of the test" in final.reason
    assert alias_map(mlflow_client(), MODEL)["champion"] == models["v1"]


@pytest.mark.parametrize("challenger_rate, promoted", [(0.45, True), (0.25, False)])
def test_forced_early_conclusion_is_marked_and_promotes_only_a_leading_challenger(
        state_dir, models, traffic, challenger_rate, promoted):
    test_id = create_ab_test(MODEL, traffic_split=0.5)  # policy: 1,000 per arm, 7 days
    scored = score_batch(MODEL, traffic.head(400), "customer_id")
    record_outcomes(test_id, outcomes_for(scored.output, 0.35, challenger_rate, seed=4),
                    "customer_id", "converted")
    store = open_store()
    before = store.fingerprint()
    with pytest.raises(ABTestNotReadyError, match=r"min samples.*need 1000 per arm.*min duration"
                                                  r".*of 7 days.*force=True"):
        conclude_ab_test(test_id)
    assert store.fingerprint() == before
    assert alias_map(mlflow_client(), MODEL)["champion"] == models["v1"]
    final = conclude_ab_test(test_id, force=True)
    assert final.forced and final.promoted is promoted
    assert final.conclusion.startswith("forced early conclusion")
    assert ("challenger v2 leads" if promoted else "does not lead") in final.conclusion
    record = store.get_test(test_id)
    assert record.forced and record.status == "concluded" and record.final_results["forced"]
    champion = alias_map(mlflow_client(), MODEL)["champion"]
    assert champion == (models["v2"] if promoted else models["v1"])
    if promoted:
        assert history()[-2]["kind"] == "ab-test" and "forced early" in history()[-2]["reason"]


def test_scheduled_analysis_refreshes_every_active_test(state_dir, models, traffic):
    first = create_ab_test(MODEL, traffic_split=0.5, min_samples_per_arm=100, min_duration_days=0)
    second = create_ab_test(OTHER, traffic_split=0.5)
    scored = score_batch(MODEL, traffic, "customer_id")
    record_outcomes(first, outcomes_for(scored.output, 0.4, 0.6, seed=6), "customer_id", "converted")
    looked = ab_test_analysis()
    assert {r.test_id: r.recommendation for r in looked} == {first: "promote_challenger",
                                                             second: "continue"}
    decided = ab_test_analysis(conclude_when_decided=True)
    assert [r.status for r in decided if r.test_id == first] == ["concluded"]
    assert [t.test_id for t in list_active_ab_tests()] == [second]
    assert alias_map(mlflow_client(), MODEL)["champion"] == models["v2"]


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def world(registry, traffic):
    """A store in the module's state folder with an active test on MODEL (scored, with
    outcomes) and a concluded one on OTHER."""
    reset_aliases(registry)
    active = create_ab_test(MODEL, traffic_split=0.5)
    scored = score_batch(MODEL, traffic.head(300), "customer_id")
    record_outcomes(active, outcomes_for(scored.output, 0.3, 0.3), "customer_id", "converted")
    closed = create_ab_test(OTHER)
    conclude_ab_test(closed, force=True, promote_winner=False)
    return {"active": active, "closed": closed, "ids": traffic.customer_id.head(300).tolist()}


def _bad_cases():
    return {
        "unknown model": (lambda w, d: create_ab_test("nope"), ModelNotFoundError,
                          "no registered model named 'nope'"),
        "invalid model name": (lambda w, d: create_ab_test("bad name!"), InvalidModelNameError,
                               "invalid model name"),
        "unknown version": (lambda w, d: create_ab_test(MODEL, 1, 99), VersionNotFoundError,
                            r"no version 99; existing versions: \[2, 1\]"),
        "version of another model": (lambda w, d: create_ab_test(MODEL, 1, f"models:/{OTHER}/2"),
                                     RegistryError, f"version of model '{OTHER}', not of '{MODEL}'"),
        "equal versions": (lambda w, d: create_ab_test(MODEL, 2, 2), ConfigurationError,
                           r"same version \(v2\)"),
        "equal versions by alias": (lambda w, d: create_ab_test(MODEL, "champion", 1),
                                    ConfigurationError, "same version"),
        "split 0": (lambda w, d: create_ab_test(MODEL, traffic_split=0), ConfigurationError,
                    "traffic_split must be strictly between 0 and 1"),
        "split 1": (lambda w, d: create_ab_test(MODEL, traffic_split=1.0), ConfigurationError,
                    "strictly between 0 and 1"),
        "split negative": (lambda w, d: create_ab_test(MODEL, traffic_split=-0.1),
                           ConfigurationError, "strictly between 0 and 1"),
        "split 150%": (lambda w, d: create_ab_test(MODEL, traffic_split=1.5), ConfigurationError,
                       "strictly between 0 and 1"),
        "alpha": (lambda w, d: create_ab_test(MODEL, alpha=1.5), ConfigurationError,
                  "alpha must be strictly between 0 and 1"),
        "min samples": (lambda w, d: create_ab_test(MODEL, min_samples_per_arm=0),
                        ConfigurationError, "min_samples_per_arm must be a whole number"),
        "min duration": (lambda w, d: create_ab_test(MODEL, min_duration_days=-1),
                         ConfigurationError, "min_duration_days must be a number of days >= 0"),
        "second active test": (lambda w, d: create_ab_test(MODEL), ActiveTestExistsError,
                               "already has an active A/B test 'churn-ab-.*one active test per model"),
        "unknown test id (results)": (lambda w, d: ab_test_results("churn-ab-20990101-000000"),
                                      ABTestNotFoundError, "no A/B test 'churn-ab-20990101-000000'"),
        "unknown test id (outcomes)": (lambda w, d: record_outcomes(
            "nope-1", pd.DataFrame({"id": [1], "y": [1]}), "id", "y"), ABTestNotFoundError,
            "no A/B test 'nope-1'"),
        "unknown test id (conclude)": (lambda w, d: conclude_ab_test("x", force=True),
                                       ABTestNotFoundError, "no A/B test 'x'"),
        "malformed test id": (lambda w, d: ab_test_results("../../etc/passwd"), ABTestNotFoundError,
                              "is not an A/B test id"),
        "scoring data without the id column": (lambda w, d: score_batch(MODEL, d.head(5), "user"),
                                               DataError, "no id column 'user'; columns: customer_id"),
        "scoring data without the model's columns": (
            lambda w, d: score_batch(MODEL, d.head(5).drop(columns=["tenure", "contract"]),
                                     "customer_id"),
            DataError, "lacks columns the model needs: tenure, contract"),
        "scoring data with a non-numeric feature": (
            lambda w, d: score_batch(MODEL, d.head(5).assign(tenure="long"), "customer_id"),
            DataError, "column 'tenure' must be numeric"),
        "scoring data with missing ids": (
            lambda w, d: score_batch(MODEL, d.head(5).assign(customer_id=[None, "a", "b", "c", "d"]),
                                     "customer_id"), DataError, "1 missing values"),
        "scoring an unknown model": (lambda w, d: score_batch("nope", d.head(5), "customer_id"),
                                     ModelNotFoundError, "no registered model named 'nope'"),
        "empty scoring data": (lambda w, d: score_batch(MODEL, d.head(0), "customer_id"),
                               DataError, "empty"),
        "unsupported output": (lambda w, d: score_batch(MODEL, d.head(5), "customer_id",
                                                        output="/tmp/p.xlsx"),
                               DataError, r"unsupported format '\.xlsx'"),
        "outcomes for a closed test": (lambda w, d: record_outcomes(
            w["closed"], pd.DataFrame({"id": ["a"], "y": [1]}), "id", "y"), ABTestClosedError,
            "was concluded at .* no more outcomes"),
        "non-binary conversion outcomes": (lambda w, d: record_outcomes(
            w["active"], pd.DataFrame({"id": w["ids"][:3], "y": [1, 2, 0.5]}), "id", "y"),
            DataError, r"non-binary values for a conversion test: 2\.0, 0\.5 \(2 rows\)"),
        "text conversion outcomes": (lambda w, d: record_outcomes(
            w["active"], pd.DataFrame({"id": w["ids"][:2], "y": ["yes", "1"]}), "id", "y"),
            DataError, "non-binary values for a conversion test: 'yes'"),
        "outcomes without the outcome column": (lambda w, d: record_outcomes(
            w["active"], pd.DataFrame({"id": w["ids"][:2], "z": [1, 0]}), "id", "y"),
            DataError, "no outcome column 'y'"),
        "outcomes with missing values": (lambda w, d: record_outcomes(
            w["active"], pd.DataFrame({"id": w["ids"][:2], "y": [1, None]}), "id", "y"),
            DataError, "1 missing values"),
        "outcomes without the id column": (lambda w, d: record_outcomes(
            w["active"], pd.DataFrame({"key": w["ids"][:2], "y": [1, 0]}), "id", "y"),
            DataError, "no id column 'id'"),
        "conclusion before the guardrails": (lambda w, d: conclude_ab_test(w["active"]),
                                             ABTestNotReadyError, "cannot conclude yet"),
        "concluding a closed test": (lambda w, d: conclude_ab_test(w["closed"], force=True),
                                     ABTestClosedError, "already concluded"),
        "listing an invalid model name": (lambda w, d: list_active_ab_tests("a b"),
                                          InvalidModelNameError, "invalid model name"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_and_changes_nothing(case, models, world, traffic):
    call, error, message = BAD[case]
    store = open_store()
    before = store.fingerprint()
    aliases = alias_map(mlflow_client(), MODEL)
    scores_dir = store_scores_dir()
    files = sorted(scores_dir.glob("*")) if scores_dir.exists() else []
    with pytest.raises(error, match=message):
        call(world, traffic)
    assert store.fingerprint() == before
    assert alias_map(mlflow_client(), MODEL) == aliases
    assert (sorted(scores_dir.glob("*")) if scores_dir.exists() else []) == files


def store_scores_dir():
    from blocks.mlflow_config import state_dir

    return state_dir() / "ab" / "scores"


# --------------------------------------------------------------------------- the main job
def test_lifecycle_step_runs_and_concludes_a_test_on_replayed_traffic(state_dir, models, tmp_path):
    from flows.ab_testing import lifecycle_step

    evaluation = tmp_path / "evaluation.csv"
    churn_frame().sample(500, random_state=21).to_csv(evaluation, index=False)
    move_alias(mlflow_client(), MODEL, "challenger", None, "as after the rollback drill", "test")

    class Story:
        model_name, data, versions, lines = MODEL, {"evaluation": evaluation}, \
            {"v1": models["v1"], "v2": models["v2"]}, []

        def say(self, line):
            self.lines.append(line)

    story = Story()
    final = lifecycle_step(story, requests=3000, batches=2, traffic_split=0.5)
    assert final.status == "concluded" and not final.forced
    assert final.recommendation in ("keep_champion", "promote_challenger")
    text = "\n".join(story.lines)
    assert "min_duration_days=0" in text and "ab verdict" in text and "ab close" in text
    assert f"v{models['v1']} champion vs v{models['v2']} challenger" in text
    assert list_active_ab_tests(MODEL) == []
