"""train_model against a real Prefect API and the embedded MLflow store.

Tests whose subject is not the search pass a small max_trials (the search's first trials); only
the search's own tests at the end spend a time budget."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pandas as pd
import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from sklearn.datasets import load_diabetes, load_iris, make_classification
from threadpoolctl import threadpool_limits

from flows.training import SEARCH_SHARE, train_model
from tasks.demo_data import churn_frame
from tasks.errors import ConfigurationError
from tasks.registry import HISTORY_EXPERIMENT, alias_map, mlflow_client, read_alias_history
from tasks.training import load_artifact_json
from tasks.training import HOLDOUT_SHARE, N_FOLDS
from tasks.training_search import (BOOSTING_CHUNK, FAMILIES, FINAL_TREES, TRIAL_TIME_SHARE,
                                   Candidate, Search, TrialResult, build_pipeline,
                                   check_families, choose_finalist,
                                   cross_validate, cv_repeats, family_finalists, final_params,
                                   fit_reproducibly, fit_until, forest_start_features,
                                   infer_schema, permutation_importance_by_column,
                                   prepare_features, starting_candidates)
from tests.budgets import ONE_LINEAR_TRIAL

FAST = dict(time_budget_s=10, candidates=["linear", "random_forest"], max_trials=2)


@pytest.fixture(scope="module")
def churn():
    return churn_frame().sample(1500, random_state=1).reset_index(drop=True)


def test_first_version_is_champion_with_everything_stored(state_dir, churn, tmp_path,
                                                          prefect_results):
    path = tmp_path / "churn.csv"
    churn.to_csv(path, index=False)
    results_before = set(prefect_results.iterdir())
    result = train_model(str(path), "churn", "customer_churn", **FAST)
    # Prefect persisted the run's results where the session says, not in ~/.prefect/storage
    assert set(prefect_results.iterdir()) - results_before

    assert result.version == 1 and result.aliases == ["champion"]
    assert result.family in {"linear", "random_forest"} and result.metric == "roc_auc"
    assert 0.6 < result.score <= 1.0 and result.semver == "1.0.0"
    client = mlflow_client()
    assert alias_map(client, "customer_churn") == {"champion": 1}
    mv = client.get_model_version("customer_churn", "1")
    assert "roc_auc" in mv.description and mv.tags["semver"] == "1.0.0"
    run = client.get_run(result.run_id)
    tags = run.data.tags
    assert tags["mlops.data_ref"] == str(path)
    assert len(tags["mlops.data_sha256"]) == 64 and tags["mlops.target"] == "churn"
    assert tags["mlops.task"] == "binary" and tags["mlops.git_commit"]
    assert tags["lib.scikit-learn"] == "1.9.0"
    assert {"holdout_roc_auc", "holdout_accuracy", "cv_roc_auc"} <= set(run.data.metrics)

    schema = load_artifact_json(result.run_id, "schema.json")
    assert "contract" in schema["categorical"] and "tenure" in schema["numeric"]
    assert schema["categories"]["contract"] == ["Month-to-month", "One year", "Two year"]
    assert schema["classes"] == ["No", "Yes"]
    profile = load_artifact_json(result.run_id, "profile.json")
    assert set(profile["features"]) == set(schema["numeric"] + schema["categorical"])
    assert profile["n_rows"] == 1200  # the training rows, holdout excluded
    importances = load_artifact_json(result.run_id, "feature_importances.json")
    assert set(importances) == set(schema["numeric"] + schema["categorical"])
    assert abs(sum(importances.values()) - 1) < 1e-9
    holdout = pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="mlops/holdout.parquet"))
    assert len(holdout) == 300 and "churn" in holdout.columns
    history = read_alias_history(client, "customer_churn")
    assert history[-1]["alias"] == "champion" and history[-1]["to"] == 1
    # the history's experiment keeps its artifacts beside the training's, not in ./mlruns
    assert client.get_experiment_by_name(HISTORY_EXPERIMENT).artifact_location == (
        state_dir / "mlartifacts" / HISTORY_EXPERIMENT).as_uri()

    # the registered model predicts on raw columns, unseen categories included
    model = mlflow.sklearn.load_model("models:/customer_churn@champion")
    rows = churn.drop(columns=["churn"]).head(5).copy()
    rows.loc[0, "contract"] = "Ten year"
    assert set(model.predict(rows)) <= {"No", "Yes"}


def test_a_boosting_winner_is_refit_on_every_row_with_the_iterations_early_stopping_chose(
        state_dir, churn):
    result = train_model(churn, "churn", "boosted", candidates=["hist_gradient_boosting"],
                         max_trials=1)
    params = mlflow_client().get_run(result.run_id).data.params
    assert params["family"] == "hist_gradient_boosting" and params["n_train_rows"] == "1500"
    # the measured fit (search rows) stopped early; the registered refit keeps its iterations
    # and holds no validation fraction back from its 1,500 rows
    boosting = mlflow.sklearn.load_model(result.model_uri).named_steps["model"]
    assert params["early_stopping"] == "False" and boosting.early_stopping is False
    assert 0 < boosting.max_iter == int(params["max_iter"]) == boosting.n_iter_ < 500


def test_a_forest_winner_is_chosen_measured_and_registered_with_at_least_final_trees(
        state_dir, churn):
    result = train_model(churn, "churn", "forest", candidates=["random_forest", "extra_trees"],
                         max_trials=2)
    [chosen] = [row for row in result.leaderboard if row["chosen"]]
    searched = json.loads(chosen["params"])
    assert searched["n_estimators"] < FINAL_TREES  # the search's cheap first forests
    # chosen on the holdout with more trees (both finalists were fit), measured the same way:
    # the version's score is the chosen finalist's holdout score
    assert all(row["holdout"] is not None for row in result.leaderboard)
    assert result.score == pytest.approx(chosen["holdout"], abs=1e-6)
    # and registered with them: the same configuration, more trees
    params = mlflow_client().get_run(result.run_id).data.params
    forest = mlflow.sklearn.load_model(result.model_uri).named_steps["model"]
    assert int(params["n_estimators"]) == len(forest.estimators_) == FINAL_TREES
    assert forest.max_depth == searched["max_depth"] == int(params["max_depth"])
    # a forest searched with more trees keeps them; other families are fit as searched
    assert final_params("random_forest", {"n_estimators": 280})["n_estimators"] == 280
    assert final_params("linear", {"C": 0.5}) == {"C": 0.5}


def test_later_versions_become_challenger_or_nothing(state_dir, churn):
    first = train_model(churn, "churn", "customer_churn", **ONE_LINEAR_TRIAL)
    second = train_model(churn, "churn", "customer_churn", **ONE_LINEAR_TRIAL)
    third = train_model(churn, "churn", "customer_churn", promote="never", **ONE_LINEAR_TRIAL)
    assert (first.aliases, second.aliases, third.aliases) == (["champion"], ["challenger"], [])
    assert (second.semver, third.semver) == ("1.1.0", "1.2.0")
    assert alias_map(mlflow_client(), "customer_churn") == {"champion": 1, "challenger": 2}
    always = train_model(churn, "churn", "customer_churn", promote="always", **ONE_LINEAR_TRIAL)
    assert "champion" in always.aliases
    assert mlflow_client().get_model_version("customer_churn", "4").run_id == always.run_id
    # a DataFrame has no path to record
    assert mlflow_client().get_run(first.run_id).data.tags["mlops.data_ref"] == "(DataFrame)"


def test_changed_input_schema_bumps_the_major_version(state_dir, churn):
    train_model(churn, "churn", "m", **ONE_LINEAR_TRIAL)
    narrower = train_model(churn.drop(columns=["tenure"]), "churn", "m", **ONE_LINEAR_TRIAL)
    assert narrower.semver == "2.0.0"


def test_every_family_competes_and_the_history_is_in_mlflow_and_prefect(state_dir, churn):
    result = train_model(churn, "churn", "every_family", max_trials=4)
    # the search's first trials are each family's cheap starting point
    assert {row["family"] for row in result.leaderboard} == {
        "linear", "random_forest", "extra_trees", "hist_gradient_boosting"}
    complete = [row["roc_auc"] for row in result.leaderboard if row["status"] == "complete"]
    assert complete and complete == sorted(complete, reverse=True)
    assert result.search.trials == 4 and result.search.stop_reason == "max_trials"
    # each family's best is scored on the holdout rows too; the registered one is marked chosen
    [chosen] = [row for row in result.leaderboard if row["chosen"]]
    assert result.family == chosen["family"]
    assert result.cv_score == pytest.approx(chosen["roc_auc"], abs=1e-6)
    assert all(0.5 < row["holdout"] <= 1 for row in result.leaderboard)

    # MLflow: one row per trial (params, folds, score, seconds, status) and the progress plot
    history = load_artifact_json(result.run_id, "trials.json")
    frame = pd.DataFrame(history["data"], columns=history["columns"])
    assert list(frame["trial"]) == [0, 1, 2, 3]
    assert {"params", "folds", "roc_auc", "seconds", "status", "holdout",
            "chosen"} <= set(frame.columns)
    artifacts = {f.path for f in mlflow_client().list_artifacts(result.run_id, "mlops")}
    assert "mlops/search_progress.png" in artifacts
    tags = mlflow_client().get_run(result.run_id).data.tags
    assert tags["mlops.search_stop"] == "max_trials" and "4 trials" in tags["mlops.search"]
    # Prefect: the same rows in the table artifact, the stop reason in its description
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-every-family"])))
    assert found and "stopped after max_trials=4" in found[-1].description
    assert "extra_trees" in str(found[-1].data)


def test_regression_on_a_parquet_file(state_dir, tmp_path):
    frame = load_diabetes(as_frame=True).frame
    path = tmp_path / "diabetes.parquet"
    frame.to_parquet(path)
    result = train_model(str(path), "target", "diabetes", **FAST)
    assert result.task == "regression" and result.metric == "rmse"
    assert 30 < result.score < 80  # rmse of a sensible model on this data (std ≈ 77)
    assert {"rmse", "mae", "r2"} <= set(result.holdout_metrics)


def test_multiclass_with_a_categorical_column_and_missing_values(state_dir):
    iris = load_iris(as_frame=True).frame
    iris["target"] = iris["target"].map({0: "setosa", 1: "versicolor", 2: "virginica"})
    rng = np.random.default_rng(0)
    iris["batch"] = rng.choice(["a", "b", None], size=len(iris))
    iris.loc[rng.choice(len(iris), 10, replace=False), "sepal length (cm)"] = np.nan
    result = train_model(iris, "target", "iris", metric="accuracy", **FAST)
    assert result.task == "multiclass" and result.metric == "accuracy" and result.score > 0.8
    model = mlflow.sklearn.load_model(f"models:/iris/{result.version}")
    assert set(model.predict(iris.drop(columns=["target"]))) <= {"setosa", "versicolor", "virginica"}


# --------------------------------------------------------------------------- the search itself
def hard_binary(n: int = 3000) -> pd.DataFrame:
    """Noisy data no configuration masters quickly: the search has something left to find."""
    X, y = make_classification(n_samples=n, n_features=25, n_informative=8, flip_y=0.15,
                               class_sep=0.6, random_state=3)
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])])
    frame["label"] = np.where(y == 1, "yes", "no")
    return frame


def test_a_search_that_has_not_converged_uses_its_budget(state_dir):
    budget = 8
    result = train_model(hard_binary(), "label", "hard", time_budget_s=budget)
    search = result.search
    assert search.stop_reason == "budget" and search.budget_s == pytest.approx(budget * SEARCH_SHARE)
    # at least 80 % of the search's share is spent searching ...
    assert search.seconds >= 0.8 * search.budget_s, search
    # ... and no more than the share plus the fold a trial was in when the deadline passed
    # (a trial stops between folds, or within a boosting fit when it is one TPE proposed; the
    # refit, holdout and logging come after and are not cut)
    longest_fold = max(row["seconds"] / max(row["folds"], 1) for row in result.leaderboard)
    assert search.seconds <= search.budget_s + longest_fold + 1.0, (search, longest_fold)
    # the heading's counts add up to the leaderboard's rows, whatever stopped each trial
    statuses = [row["status"] for row in result.leaderboard]
    assert (search.completed, search.pruned, search.cut, search.failed) == tuple(
        statuses.count(s) for s in ("complete", "pruned", "deadline", "error"))
    assert search.trials == len(statuses)


def test_a_budget_too_short_for_a_full_trial_still_yields_a_model(state_dir):
    result = train_model(hard_binary(), "label", "tiny", time_budget_s=0.5)
    assert result.search.stop_reason == "budget" and result.version == 1
    [best] = [row for row in result.leaderboard if row["chosen"]]
    assert best["status"] in ("complete", "deadline") and best["folds"] >= 1
    assert result.family == best["family"] and 0.5 < result.score <= 1.0
    # boosting's starting point cannot run its five folds in 0.35 s: the deadline cut it, and
    # the search's heading says so
    assert result.search.cut >= 1
    assert f"{result.search.cut} cut at the time limit" in result.search.describe()


def test_a_deadline_passed_before_the_search_began_still_runs_one_batch():
    """Flow start-up and data preparation can outlast a short budget on a busy machine: the
    search still runs its first batch (one fold each) and ranks it, then stops for the budget."""
    frame = hard_binary(400)
    schema = infer_schema(frame, "label", "binary")
    X, y = prepare_features(frame, schema), frame["label"]
    search = Search(schema.task, "roc_auc", check_families(None), random_state=0, batch_size=2,
                    max_trials=None, deadline=time.monotonic() - 1.0)
    batch = search.ask()
    assert len(batch) == 2
    search.tell([cross_validate(p.number, p.candidate, X, y, schema, "roc_auc", 5, 0,
                                search.deadline, p.should_prune) for p in batch])
    assert search.ask() == [] and search.stop_reason == "budget"
    best = search.ranked()[0]
    assert best.status == "deadline" and len(best.scores) == 1 and 0.5 < best.mean <= 1.0


def test_a_slow_proposed_trial_is_cut_at_its_share_of_the_search_time():
    """One configuration must not hold a core for most of a budget-only search: a trial TPE
    proposes runs at most a third of the search's time, even inside one boosting fit, and what
    it fitted so far still scores. The families' starting points are not capped, and a search
    with max_trials never is (its trials must not depend on the machine's speed)."""
    search = Search("binary", "roc_auc", list(FAMILIES), random_state=0, batch_size=6,
                    max_trials=None, deadline=time.monotonic() + 30)
    planned = search.ask()
    assert [t.time_cap_s for t in planned[:4]] == [None] * 4  # one starting point per family
    assert all(t.time_cap_s == pytest.approx(30 * TRIAL_TIME_SHARE, abs=0.5) for t in planned[4:])
    fixed = Search("binary", "roc_auc", list(FAMILIES), random_state=0, batch_size=6,
                   max_trials=6, deadline=None)
    assert all(t.time_cap_s is None for t in fixed.ask())

    frame = hard_binary(1500)
    schema = infer_schema(frame, "label", "binary")
    X, y = prepare_features(frame, schema), frame["label"]
    slow = Candidate("hist_gradient_boosting", {"learning_rate": 0.01, "max_leaf_nodes": 64,
                                                "min_samples_leaf": 2, "early_stopping": False})
    uncapped = time.monotonic()
    full_fold = build_pipeline(schema, slow.family, slow.params, 0)
    with threadpool_limits(limits=1, user_api="openmp"):  # as a trial runs (one core each)
        fit_reproducibly(full_fold, X, y)
    full_s = time.monotonic() - uncapped
    assert full_fold.named_steps["model"].n_iter_ == 500

    cap = full_s / 4
    cut = cross_validate(0, slow, X, y, schema, "roc_auc", 5, 0, None, time_cap_s=cap)
    assert cut.status == "deadline" and len(cut.scores) == 1 and 0.5 < cut.scores[0] <= 1.0
    assert cut.seconds < cap + full_s / 4 + 0.5, (cut.seconds, cap, full_s)


def test_a_boosting_fit_under_a_time_limit_predicts_as_one_fit_when_not_cut(churn):
    """The limit grows the model in chunks; the chunks must not change the model."""
    schema = infer_schema(churn, "churn", "binary")
    X, y = prepare_features(churn, schema), churn["churn"]
    params = {"learning_rate": 0.05, "max_leaf_nodes": 15, "validation_fraction": 0.2}
    chunked = build_pipeline(schema, "hist_gradient_boosting", params, 3)
    with threadpool_limits(limits=1, user_api="openmp"):  # as trials run, one core each
        whole = fit_reproducibly(build_pipeline(schema, "hist_gradient_boosting", params, 3), X, y)
        assert fit_until(chunked, X, y, until=time.monotonic() + 600) is False
    assert chunked.named_steps["model"].n_iter_ == whole.named_steps["model"].n_iter_ > 16
    np.testing.assert_array_equal(chunked.predict_proba(X), whole.predict_proba(X))


def test_a_boosting_fit_early_stopped_at_the_end_of_a_chunk_stops_there_under_a_limit():
    """scikit-learn checks early stopping after each iteration but ends a fit that reached
    max_iter without stopping: a stop due exactly where a chunk ends must still stop the fit."""
    X_raw, labels = make_classification(n_samples=600, n_features=8, n_informative=3, flip_y=0.3,
                                        random_state=5)
    frame = pd.DataFrame(X_raw, columns=[f"x{i}" for i in range(8)])
    frame["label"] = np.where(labels == 1, "yes", "no")
    schema = infer_schema(frame, "label", "binary")
    X, y = prepare_features(frame, schema), frame["label"]
    params = {"learning_rate": 0.1, "n_iter_no_change": 4}  # stops at 16 with random_state 2
    whole = fit_reproducibly(build_pipeline(schema, "hist_gradient_boosting", params, 2), X, y)
    assert whole.named_steps["model"].n_iter_ == BOOSTING_CHUNK
    chunked = build_pipeline(schema, "hist_gradient_boosting", params, 2)
    assert fit_until(chunked, X, y, until=time.monotonic() + 600) is False
    assert chunked.named_steps["model"].n_iter_ == BOOSTING_CHUNK
    np.testing.assert_array_equal(chunked.predict_proba(X), whole.predict_proba(X))


def test_small_data_is_cross_validated_in_repeated_passes():
    """A score on a few hundred rows is too noisy to rank configurations by: k-fold runs again
    with new shuffles until 3,000 held-out predictions back each score (at most 3 passes) ..."""
    assert [cv_repeats(n, 10) for n in (100, 952, 1499, 1500, 2999, 3000, 500_000)] == [3, 3, 3, 2, 2, 1, 1]
    # ... where fits are cheap: a small but wide table (ames: 1,172 rows, 312 one-hot columns)
    # gets one pass, more trials being worth more there than a steadier score
    assert cv_repeats(952, 20) == 3 and cv_repeats(1172, 312) == 1
    frame = hard_binary(400)
    schema = infer_schema(frame, "label", "binary")
    X, y = prepare_features(frame, schema), frame["label"]
    [linear] = starting_candidates("binary", ["linear"])
    once = cross_validate(0, linear, X, y, schema, "roc_auc", 5, 0, None)
    thrice = cross_validate(0, linear, X, y, schema, "roc_auc", 5, 0, None, repeats=3)
    assert len(once.scores) == 5 and len(thrice.scores) == 15 and thrice.status == "complete"
    assert thrice.scores[5:10] != thrice.scores[:5]  # each pass has its own shuffle


def test_the_first_classification_forests_consider_sqrt_of_the_columns_at_each_split(churn):
    """Breiman's default (scikit-learn's too): the search starts from decorrelated forests with
    leaves of a few rows (smoother class probabilities); a regression search keeps its wider
    start and smaller leaves."""
    schema = infer_schema(churn, "churn", "binary")

    def first_forests(task: str) -> dict:
        search = Search(task, "roc_auc" if task == "binary" else "rmse",
                        ["random_forest", "extra_trees"], random_state=0, batch_size=2,
                        max_trials=2, deadline=None, encoded_columns=schema.encoded_columns)
        return {t.candidate.family: (t.candidate.params["max_features"],
                                     t.candidate.params["min_samples_leaf"])
                for t in search.ask()}

    share = round(schema.encoded_columns ** -0.5, 3)
    assert schema.encoded_columns > 4
    assert first_forests("binary") == {"random_forest": (share, 4), "extra_trees": (share, 4)}
    assert first_forests("regression") == {"random_forest": (0.5, 2), "extra_trees": (0.7, 2)}
    # few columns: at most all of them; very many: at least a tenth
    assert forest_start_features("multiclass", 1) == (1.0, 1.0)
    assert forest_start_features("binary", 10_000) == (0.1, 0.1)
    assert forest_start_features("regression", 40) == (0.5, 0.7)


def test_an_l1_trial_scores_the_same_alone_and_beside_another_on_threads(churn):
    """liblinear's random state is one per process: side by side, two L1 fits used to perturb
    each other, so a fixed max_trials gave slightly different scores from run to run."""
    frame = churn.iloc[:640]
    schema = infer_schema(frame, "churn", "binary")
    X, y = prepare_features(frame, schema), frame["churn"]
    first = Candidate("linear", {"C": 1.936, "penalty": "l1", "class_weight": None})
    other = Candidate("linear", {"C": 0.3, "penalty": "l1", "class_weight": "balanced"})

    def score(candidate):
        return cross_validate(0, candidate, X, y, schema, "roc_auc", 5, 7, None, repeats=3).scores

    alone = score(first)
    for _ in range(3):
        with ThreadPoolExecutor(2) as pool:
            beside = pool.submit(score, first)
            pool.submit(score, other)
            assert beside.result() == alone


def test_pruning_compares_a_trial_with_its_own_family_only():
    """Cheap linear trials that score well must not prune the forests' trials: a family is
    pruned against its own completed trials, once it has 4 of them."""
    search = Search("binary", "roc_auc", ["linear", "random_forest"], random_state=0,
                    batch_size=1, max_trials=None, deadline=None, patience=1000)
    score = {"linear": 0.9, "random_forest": 0.7}
    rules: dict[str, list] = {"linear": [], "random_forest": []}  # in the order they were asked
    while min(len(r) for r in rules.values()) < 6:
        [planned] = search.ask()
        family = planned.candidate.family
        rules[family].append(planned.should_prune)
        search.tell([TrialResult(planned.number, planned.candidate, "roc_auc",
                                 [score[family]] * 5)])
    for family, median in score.items():
        # before the family has 4 completed trials nothing of it is pruned, however low ...
        assert not any(rule(0, [0.1]) for rule in rules[family][:4])
        # ... then a trial is judged against its family's median, not the best family's
        for rule in rules[family][4:]:
            assert rule(0, [median - 0.05]) and not rule(0, [median + 0.01])


def test_the_family_is_chosen_on_the_holdout_rows_as_well_as_on_the_folds():
    """On ames a ridge regression led the tree ensembles in cross-validation on outlier-free
    search rows, then missed the holdout's outliers badly: the holdout rows weigh in by their
    number, as one more fold."""
    def trial(number, family, cv):
        return TrialResult(number, Candidate(family, {}), "rmse", [cv] * 5)

    ridge, boosting = trial(0, "linear", 25_600), trial(1, "hist_gradient_boosting", 27_300)
    finalists = family_finalists([ridge, boosting, trial(2, "hist_gradient_boosting", 27_400)])
    assert finalists == [ridge, boosting]  # the best of each family, best first
    # 1,172 search rows, 293 holdout rows: (25,600 * 1,172 + 47,700 * 293) / 1,465 = 30,020
    assert choose_finalist(finalists, {0: 47_700, 1: 29_200}, 1172, 293) is boosting
    # a holdout that agrees with the folds changes nothing; neither does a missing score
    assert choose_finalist(finalists, {0: 26_000, 1: 29_200}, 1172, 293) is ridge
    assert choose_finalist(finalists, {0: None, 1: 29_200}, 1172, 293) is ridge
    # AUC: greater is better
    a, b = (TrialResult(n, Candidate(f, {}), "roc_auc", [cv] * 5)
            for n, f, cv in ((0, "linear", 0.85), (1, "random_forest", 0.84)))
    assert choose_finalist([a, b], {0: 0.80, 1: 0.86}, 1000, 250) is b
    assert choose_finalist([a, b], {0: 0.84, 1: 0.86}, 1000, 250) is a


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_importances_equal_scikit_learns_permutation_importance(churn, task):
    """The importances drift weighs features by are scikit-learn's permutation importances (the
    same shuffles), computed in a few stacked predict calls. Churn has categoricals with missing
    values; 57 permuted copies of 1,200 rows x 19 columns, stacked in one call by default and in
    calls of two copies (the last one alone) when the batch is kept small."""
    from sklearn.inspection import permutation_importance

    frame = churn.iloc[:1200].copy()
    frame.loc[::7, "payment_method"] = None
    target = "churn" if task == "binary" else "monthly_charges"
    schema = infer_schema(frame, target, task)
    X, y = prepare_features(frame, schema), frame[target]
    model = fit_reproducibly(build_pipeline(schema, "hist_gradient_boosting", {"max_iter": 30}, 0),
                             X, y)
    ours = permutation_importance_by_column(model, X, y, task, random_state=5, n_repeats=3)
    in_small_batches = permutation_importance_by_column(model, X, y, task, random_state=5,
                                                        n_repeats=3, batch_cells=2 * 1200 * 19)

    reference = permutation_importance(
        model, X, y, n_repeats=3, random_state=5, n_jobs=1,
        scoring="neg_root_mean_squared_error" if task == "regression" else "accuracy")
    raw = np.clip(reference.importances_mean, 0, None)
    assert raw.sum() > 0
    assert list(ours) == list(X.columns)
    assert np.allclose(list(ours.values()), raw / raw.sum(), rtol=0, atol=1e-12)
    assert list(in_small_batches) == list(ours)
    assert np.allclose(list(in_small_batches.values()), list(ours.values()), rtol=0, atol=1e-12)


def test_a_converged_search_stops_early_and_says_so(state_dir):
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    frame = pd.DataFrame({"x": x, "noise": rng.normal(size=300), "label": np.where(x > 0, "a", "b")})
    result = train_model(frame, "label", "easy", time_budget_s=60)
    search = result.search
    assert search.stop_reason == "converged" and "converged" in search.describe()
    assert search.seconds < 0.5 * search.budget_s  # it did not wait for its 42 s
    assert result.cv_score == 1.0
    tags = mlflow_client().get_run(result.run_id).data.tags
    assert tags["mlops.search_stop"] == "converged"


def test_max_trials_gives_the_same_model_twice_and_records_pruned_trials(state_dir, churn):
    runs = [train_model(churn.iloc[:800], "churn", "twice", max_trials=12, random_state=7,
                        candidates=["linear", "hist_gradient_boosting"])
            for _ in range(2)]
    first, second = runs
    assert first.search.trials == second.search.trials == 12
    assert first.search.stop_reason == "max_trials"
    key = [(r["trial"], r["candidate"], r["status"], r["roc_auc"]) for r in first.leaderboard]
    assert key == [(r["trial"], r["candidate"], r["status"], r["roc_auc"]) for r in second.leaderboard]
    assert first.leaderboard[0]["params"] == second.leaderboard[0]["params"]
    assert first.score == second.score

    # bad trials were pruned on early folds, and are recorded so (not as complete ones)
    pruned = [r for r in first.leaderboard if r["status"] == "pruned"]
    width = infer_schema(churn.iloc[:800], "churn", "binary").encoded_columns
    all_folds = N_FOLDS * cv_repeats(round(800 * (1 - HOLDOUT_SHARE)), width)
    assert pruned and all(1 <= r["folds"] < all_folds for r in pruned)
    assert first.search.pruned == len(pruned)
    history = load_artifact_json(first.run_id, "trials.json")
    statuses = dict(zip(history["columns"], zip(*history["data"])))["status"]
    assert statuses.count("pruned") == len(pruned)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_trials=0), "max_trials must be a positive number of trials, got 0"),
    (dict(max_trials=-3), "max_trials must be a positive number of trials, got -3"),
    (dict(candidates=["xgboost"]), r"unknown candidate families \['xgboost'\]"),
    (dict(candidates=["linear", "svm"]), r"unknown candidate families \['svm'\]"),
])
def test_bad_search_settings_are_refused_before_anything_is_trained(state_dir, churn, kwargs,
                                                                    message):
    with pytest.raises(ConfigurationError, match=message):
        train_model(churn.iloc[:300], "churn", "refused", **kwargs)
    assert mlflow_client().search_registered_models() == []
