"""A/B testing of model versions (docs/python-api.md): create a test, score traffic through it, record
outcomes, read peeking-safe results, conclude (promoting the winner through the registry's
recorded promotion), list active tests; `ab_test_analysis` refreshes every active test's results
on a schedule. `lifecycle_step` is the main job's A/B chapter.

Where things live: the store is SQL (tasks/ab.py; SQLite in the state folder unless an `ABPolicy`
block names PostgreSQL), statistics are tasks/ab_stats.py, routing tasks/routing.py.
"""
from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger

from flows.parameters import DataRef, data_flow
from tasks.ab import ABTestClosedError, ABTestNotReadyError, check_test_id
from tasks.ab_tasks import (ABResults, ABTestInfo, OutcomeReport, ScoreResult, challenger_leads,
                            close_test, log_plot, open_test, publish_results, read_results,
                            read_tests, record_outcome_rows, route_and_score,
                            save_final_results, validate_new_test, write_and_log)
from tasks.events import emit_model_event
from tasks.prefect_api import run_subflow
from tasks.registry import validate_model_name
from tasks.training import load_data

MetricType = Literal["conversion", "continuous"]


@flow(name="create-ab-test")
def create_ab_test(
    model_name: str,
    champion_version: int | str | None = None,
    challenger_version: int | str | None = None,
    traffic_split: float = 0.1,
    metric_type: MetricType = "conversion",
    min_samples_per_arm: int | None = None,
    min_duration_days: float | None = None,
    alpha: float | None = None,
    higher_is_better: bool = True,
    description: str = "",
) -> str:
    """Start an A/B test of two versions of a model; returns its id. One active test per model.

    Args:
        model_name: Registered model whose versions are compared.
        champion_version: Version (number or alias) that keeps most traffic; empty: the
            `champion` alias holder.
        challenger_version: Version (number or alias) under test; empty: the `challenger` alias
            holder.
        traffic_split: The challenger's share of entities, 0 < split < 1 (5-10% is usual).
        metric_type: conversion (a success 1/0 per entity) or continuous (a number per entity).
        min_samples_per_arm: Entities with an outcome each arm needs before a verdict; empty:
            the ABPolicy block's (else computed from the power analysis).
        min_duration_days: Days the test runs at least; empty: the ABPolicy block's (7).
        alpha: Significance level; empty: the ABPolicy block's (0.05).
        higher_is_better: For continuous metrics where lower is better, false.
        description: Why the test runs (shown with the test).
    """
    validate_model_name(model_name)
    spec = validate_new_test(model_name, champion_version, challenger_version, traffic_split,
                             metric_type, min_samples_per_arm, min_duration_days, alpha,
                             higher_is_better, description)
    test = open_test(spec)
    emit_model_event(model_name, "mlops.abtest.created", {
        "test_id": test.test_id, "champion_version": test.champion_version,
        "challenger_version": test.challenger_version, "traffic_split": test.traffic_split,
        "metric_type": test.metric_type})
    results = read_results(test.test_id)
    publish_results(results)
    get_run_logger().info("A/B test %s: %s v%d (champion) vs v%d (challenger), %g%% to the "
                          "challenger", test.test_id, model_name, test.champion_version,
                          test.challenger_version, test.traffic_split * 100)
    return test.test_id


@data_flow(name="score-batch")
def score_batch(model_name: str, data: DataRef, id_column: str, output: str | None = None,
                timestamp_column: str | None = None) -> ScoreResult:
    """Score a batch of entities. With an active test, each row is routed by a stable hash of
    (test, id) and scored by its arm's version, and every prediction is logged; without one the
    champion scores everything.

    Args:
        model_name: Registered model to score with.
        data: Rows to score: a csv/parquet path or s3://bucket/key URI (a DataFrame from Python).
        id_column: Column with the entity id that routing is sticky on (e.g. customer_id).
        output: Where predictions go (columns id, arm, version, prediction, proba_<class>): a
            csv/parquet path or s3:// URI; empty: a parquet file in the state folder.
        timestamp_column: Column with the rows' own times (replayed traffic); empty: now.
    """
    validate_model_name(model_name)
    loaded = load_data(data)
    scored = route_and_score(model_name, loaded.frame, id_column, output, timestamp_column)
    result = write_and_log(scored, model_name)
    get_run_logger().info("scored %d rows of %s: %d champion (v%d), %d challenger%s -> %s",
                          result.n_rows, model_name, result.n_champion, result.champion_version,
                          result.n_challenger,
                          f" (v{result.challenger_version}, test {result.test_id})"
                          if result.test_id else " (no active test)", result.output)
    return result


@data_flow(name="record-outcomes")
def record_outcomes(test_id: str, data: DataRef, id_column: str, outcome_column: str,
                    timestamp_column: str | None = None) -> OutcomeReport:
    """Record outcomes joined to routed predictions by id. Repeats count once, contradictions
    are rejected, unknown ids are counted.

    Args:
        test_id: The A/B test (as create_ab_test returned it).
        data: Outcome rows: a csv/parquet path or s3://bucket/key URI (a DataFrame from Python).
        id_column: Column with the entity id the predictions were routed by.
        outcome_column: Column with the outcome: 1/0 or true/false for conversion tests, numbers
            for continuous tests.
        timestamp_column: Column with the outcomes' own times; empty: now.
    """
    check_test_id(test_id)
    loaded = load_data(data)
    return record_outcome_rows(test_id, loaded.frame, id_column, outcome_column, timestamp_column)


@flow(name="ab-test-results")
def ab_test_results(test_id: str) -> ABResults:
    """Per-arm numbers, fixed-horizon and always-valid statistics, SRM, guardrails and one
    recommendation, from the running sums (constant time however long the log). Publishes the
    Prefect artifact `ab-<test_id>` with the lift/confidence-sequence plot, also logged to MLflow.

    Args:
        test_id: The A/B test (as create_ab_test returned it).
    """
    check_test_id(test_id)
    results = read_results(test_id)
    if results.status == "active":
        run_id, uri, link = log_plot(test_id, results)
        results = results.model_copy(update={"mlflow_run_id": run_id or results.mlflow_run_id,
                                             "plot_uri": uri})
        publish_results(results, link)
    return results


@flow(name="conclude-ab-test")
def conclude_ab_test(test_id: str, promote_winner: bool = True, force: bool = False) -> ABResults:
    """Close a test with its final results. With the guardrails passed (min samples, min
    duration, no SRM), a `promote_challenger` verdict makes the challenger `champion` through the
    registry's recorded promotion. Before the guardrails pass it refuses unless forced.

    Args:
        test_id: The A/B test (as create_ab_test returned it).
        promote_winner: Make a winning challenger `champion`; false: only record the verdict.
        force: Conclude before the guardrails pass (recorded as forced; promotes only if the
            challenger leads).
    """
    check_test_id(test_id)
    results = read_results(test_id, final=True)
    if results.status != "active":
        raise ABTestClosedError(f"A/B test {test_id!r} was already concluded at "
                                f"{results.concluded_at:%Y-%m-%d %H:%M} UTC: {results.conclusion}")
    g = results.guardrails
    leads = challenger_leads(results)
    if not g.passed and not force:
        raise ABTestNotReadyError(
            f"A/B test {test_id!r} cannot conclude yet: {'; '.join(g.failing)}. Results so far: "
            f"{results.recommendation} ({results.reason}). Wait, or pass force=True to conclude "
            "early (recorded as forced; it promotes only if the challenger leads)")
    vc, vh = results.champion_version, results.challenger_version
    if g.passed:
        winner = results.recommendation == "promote_challenger"
        verdict = {"promote_challenger": f"challenger v{vh} won",
                   "keep_champion": f"champion v{vc} kept"}.get(results.recommendation,
                                                                 results.recommendation)
        conclusion = f"{verdict}: {results.reason}"
    elif g.srm_ok:
        winner = leads
        conclusion = (f"forced early conclusion ({'; '.join(g.failing)}): challenger v{vh} "
                      f"{'leads' if leads else 'does not lead'} "
                      f"(difference {_f(results.difference, '+.4g')}, P(challenger better) = "
                      f"{_f(results.prob_challenger_better, '.3f')})")
    else:
        winner = False
        conclusion = (f"forced conclusion of an invalid test ({'; '.join(g.failing)}): no "
                      "promotion, the routing or logging is broken")
    promote = promote_winner and winner
    if winner and not promote_winner:
        conclusion += "; challenger not promoted (promote_winner=False)"
    final = close_test(test_id, results, forced=not g.passed, promote=promote,
                       conclusion=conclusion)
    payload = {"test_id": test_id, "recommendation": final.recommendation,
               "promoted": final.promoted, "forced": final.forced, "champion_version": vc,
               "challenger_version": vh, "conclusion": conclusion,
               "difference": final.difference, "sequential_p_value": final.sequential_p_value}
    emit_model_event(final.model_name, "mlops.abtest.concluded", payload)
    if final.promoted:
        emit_model_event(final.model_name, "mlops.model.promoted",
                         {"version": vh, "stage": "champion", "reason": f"A/B test {test_id}"})
    run_id, uri, link = log_plot(test_id, final)
    final = final.model_copy(update={"mlflow_run_id": run_id or final.mlflow_run_id,
                                     "plot_uri": uri})
    save_final_results(final)
    publish_results(final, link)
    get_run_logger().info("A/B test %s concluded: %s", test_id, conclusion)
    return final


@flow(name="list-active-ab-tests")
def list_active_ab_tests(model_name: str | None = None) -> list[ABTestInfo]:
    """Active tests, newest first, with routed and outcome counts.

    Args:
        model_name: Only this model's tests; empty: every model's.
    """
    if model_name is not None:
        validate_model_name(model_name)
    return read_tests(model_name, "active")


@flow(name="ab-test-analysis")
def ab_test_analysis(model_name: str | None = None,
                     conclude_when_decided: bool = False) -> list[ABResults]:
    """The scheduled look (hourly in prefect.yaml): refresh the results and artifacts of every
    active test. Reading often is safe: verdicts use the always-valid sequential test.

    Args:
        model_name: Only this model's tests; empty: every active test.
        conclude_when_decided: Conclude tests whose guardrails passed with a promote_challenger
            or keep_champion verdict (promoting a winning challenger).
    """
    out = []
    # each subflow waits for a restarting Prefect API (tasks/prefect_api.py) instead of failing
    # the hourly run
    for info in run_subflow(list_active_ab_tests, model_name):
        results = run_subflow(ab_test_results, info.test_id)
        if (conclude_when_decided and results.guardrails.passed
                and results.recommendation in ("promote_challenger", "keep_champion")):
            results = run_subflow(conclude_ab_test, info.test_id)
        out.append(results)
    return out


# --------------------------------------------------------------------------- the main job
def lifecycle_step(story, requests: int = 24_000, batches: int = 6, traffic_split: float = 0.3,
                   seed: int = 11) -> ABResults:
    """The main job's A/B chapter: v1 (champion) against v2 on replayed churn traffic.

    The evaluation customers are resampled into `requests` visits, each with its own customer id,
    and replayed in `batches`: score_batch routes and scores them, then each visit's outcome is
    recorded as 1 when the prediction was right. min_duration_days=0 (a replay has no weekly
    cycle), so the test concludes as soon as both arms have the policy's minimum sample.
    """
    import numpy as np
    import pandas as pd

    from flows.registry import promote_model
    from tasks.demo_data import TARGET

    name, v1, v2 = story.model_name, story.versions["v1"], story.versions["v2"]
    for info in list_active_ab_tests(name):  # a rerun of the demo starts a fresh test
        conclude_ab_test(info.test_id, promote_winner=False, force=True)
    promote_model(name, v2, "challenger", reason="lifecycle demo: A/B test against the champion")
    test_id = create_ab_test(name, v1, v2, traffic_split=traffic_split, min_duration_days=0,
                             description="lifecycle demo: replayed churn traffic")
    evaluation = pd.read_csv(story.data["evaluation"])
    rng = np.random.default_rng(seed)
    visits = evaluation.iloc[rng.integers(0, len(evaluation), requests)].reset_index(drop=True)
    visits.insert(0, "customer_id", [f"c{seed}-{i:06d}" for i in range(requests)])
    truth = visits[TARGET].astype(str).to_numpy()
    requests_only = visits.drop(columns=[TARGET])
    story.say(f"ab test   {test_id}: v{v1} champion vs v{v2} challenger, "
              f"{traffic_split:.0%} of customers to the challenger, min_duration_days=0, "
              f"{requests} replayed visits of {len(evaluation)} unseen customers")
    for part in np.array_split(np.arange(requests), batches):
        scored = score_batch(name, requests_only.iloc[part], "customer_id")
        predictions = pd.read_parquet(scored.output)
        outcomes = pd.DataFrame({"customer_id": requests_only.customer_id.iloc[part].to_numpy(),
                                 "correct": (predictions.prediction.astype(str).to_numpy()
                                             == truth[part]).astype(int)})
        record_outcomes(test_id, outcomes, "customer_id", "correct")
    results = ab_test_results(test_id)
    a, b = results.arms["champion"], results.arms["challenger"]
    story.say(f"ab result accuracy v{a.version} {_f(a.rate, '.4f')} (n={a.n}) vs v{b.version} "
              f"{_f(b.rate, '.4f')} (n={b.n}); lift {_f(results.difference, '+.4f')} "
              f"(always-valid {1 - results.alpha:.0%} [{_f(results.cs_low, '+.4f')}, "
              f"{_f(results.cs_high, '+.4f')}], sequential p={_f(results.sequential_p_value, '.3g')}); "
              f"SRM p={_f(results.srm.p_value, '.2g')}; "
              f"P(v{b.version} better)={_f(results.prob_challenger_better, '.2f')}")
    story.say(f"ab verdict {results.recommendation}: {results.reason}")
    final = conclude_ab_test(test_id)
    champion = next((v.version for v in _versions(name) if "champion" in v.aliases), None)
    story.say(f"ab close  {(final.conclusion or '').split(':')[0]}; promoted={final.promoted}, "
              f"champion is now v{champion}; plot {final.plot_uri or '(not logged)'}")
    return final


def _f(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _versions(model_name: str):
    from flows.registry import list_versions

    return list_versions(model_name)
