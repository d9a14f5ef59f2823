"""Registry flows against a real Prefect API and the embedded MLflow store."""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import mlflow
import pytest
import yaml
from prefect import flow
from sklearn.linear_model import LogisticRegression

from blocks.mlflow_config import DEFAULT_DOCUMENT, MLflowConfig, resolve_mlflow_config
from flows.ab_testing import conclude_ab_test, create_ab_test
from flows.export import export_model
from flows.registry import (alias_history, compare_versions, list_versions, promote_model,
                            register_model, rollback_model)
from flows.training import train_model
from tasks.demo_data import churn_frame
from tasks.errors import (InvalidModelNameError, ModelNotFoundError, RegistryError,
                          VersionNotFoundError)
from tasks.registry import (CHAMPION_EXPORTED_AT_TAG, EXPORTED_AT_TAG, EXPORTS_INDEXED_TAG,
                            HISTORY_TAG, AliasMove, alias_map, apply_retention, mlflow_client,
                            find_version, promote, promote_alias)
from tests.budgets import ONE_LINEAR_TRIAL
from tests.conftest import ROOT


def log_tiny_model(accuracy: float = 0.9, C: float = 1.0) -> str:
    """A real (small) sklearn model logged to MLflow; returns its run id."""
    experiment_id = resolve_mlflow_config().ensure_experiment()
    model = LogisticRegression(C=C).fit([[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1])
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_param("C", C)
        mlflow.log_metric("holdout_accuracy", accuracy)
        mlflow.sklearn.log_model(model, name="model", pip_requirements=["scikit-learn"])
    return run.info.run_id


def registered(n: int, name: str = "m") -> list[int]:
    return [register_model(name, run_id=log_tiny_model(C=float(i + 1))).version for i in range(n)]


def versions_left(name: str = "m") -> list[int]:
    return [v.version for v in list_versions(name)]


def moves(name: str = "m") -> list[tuple]:
    return [(m.alias, m.from_version, m.to_version, m.kind) for m in alias_history(name)]


@contextmanager
def saved_mlflow_config(**fields):
    """A saved `default` MLflowConfig on the test's embedded store, with `fields` set."""
    embedded = MLflowConfig.embedded()
    MLflowConfig(tracking_uri=embedded.tracking_uri, registry_uri=embedded.registry_uri,
                 artifact_location=embedded.artifact_location, **fields).save(
        DEFAULT_DOCUMENT, overwrite=True)
    try:
        yield
    finally:
        MLflowConfig.delete(DEFAULT_DOCUMENT)


def extra_versions(n: int, name: str = "m") -> list[int]:
    """n more versions of one logged model, created straight in MLflow (fast; no retention)."""
    run_id = log_tiny_model()
    client = mlflow_client()
    return [int(client.create_model_version(name, f"runs:/{run_id}/model", run_id).version)
            for _ in range(n)]


def test_register_from_run_id_and_model_uri_with_metadata(state_dir):
    run_id = log_tiny_model()
    v1 = register_model("m", run_id=run_id, description="first", metrics={"auc": 0.81},
                        tags={"team": "growth"})
    assert (v1.version, v1.description, v1.run_id) == (1, "first", run_id)
    assert v1.metrics["auc"] == 0.81 and v1.metrics["holdout_accuracy"] == 0.9
    assert v1.tags["team"] == "growth" and v1.semver == "1.0.0"
    v2 = register_model("m", model_uri=f"runs:/{log_tiny_model()}/model")
    assert v2.version == 2 and v2.semver == "1.1.0"
    assert [v.version for v in list_versions("m")] == [2, 1]  # newest first


def test_a_retried_registration_returns_the_same_version(state_dir):
    run_id = log_tiny_model()
    first = register_model("m", run_id=run_id)
    again = register_model("m", run_id=run_id)
    assert first.version == again.version == 1
    assert len(list_versions("m")) == 1


def test_promote_accepts_seed_stages_and_records_every_move(state_dir):
    registered(3)
    assert promote_model("m", 1, "Production", reason="launch").aliases == ["champion"]
    assert promote_model("m", 2, "Staging").aliases == ["challenger"]
    promoted = promote_model("m", "challenger", "champion", reason="won the test")
    assert promoted.version == 2 and promoted.aliases == ["champion"]  # no longer a challenger
    assert alias_map(mlflow_client(), "m") == {"champion": 2}
    history = alias_history("m")
    assert [(m.alias, m.from_version, m.to_version) for m in history] == [
        ("champion", None, 1), ("challenger", None, 2), ("champion", 1, 2), ("challenger", 2, None)]
    assert history[2].reason == "won the test" and history[2].at.year >= 2026
    assert [m.at for m in history] == sorted(m.at for m in history)


def test_rollback_goes_to_the_previous_champion_even_after_a_restart(state_dir):
    registered(3)
    promote_model("m", 1)
    promote_model("m", 2)
    promote_model("m", 3)
    mlflow.set_tracking_uri(None)  # forget everything in memory: history lives in the registry
    assert rollback_model("m", reason="v3 misbehaves").version == 2
    assert rollback_model("m").version == 1
    with pytest.raises(RegistryError, match="no earlier champion"):
        rollback_model("m")
    assert rollback_model("m", version=3).version == 3  # a named version
    assert rollback_model("m").version == 1
    assert alias_history("m")[-1].kind == "rollback"


def test_registry_tasks_act_on_every_call_in_a_flow_that_persists_results(state_dir):
    """A user's own flow that persists results (as train_model does) and moves the champion back
    and forth: the third move repeats the first one's inputs, and must still move the alias."""
    registered(2)

    @flow(persist_result=True)
    def swap_champions() -> list[int]:
        seen = []
        for version in (1, 2, 1):
            promote_alias("m", version, reason="swap")
            seen.append(find_version("m", "champion").version)
        return seen

    assert swap_champions() == [1, 2, 1]
    assert alias_map(mlflow_client(), "m") == {"champion": 1}
    assert moves() == [("champion", None, 1, "promote"), ("champion", 1, 2, "promote"),
                       ("champion", 2, 1, "promote")]


def test_rollback_without_an_earlier_champion_is_refused(state_dir):
    registered(2)
    promote_model("m", 1)
    with pytest.raises(RegistryError, match="no earlier champion.*version=<n>"):
        rollback_model("m")
    assert alias_map(mlflow_client(), "m") == {"champion": 1}


def test_retention_keeps_ten_newest_and_every_aliased_version(state_dir):
    registered(2)
    promote_model("m", 1)
    registered(10)  # registration applies retention
    left = [v.version for v in list_versions("m")]
    assert left == list(range(12, 2, -1)) + [1]  # v2 deleted, v1 kept as champion
    assert apply_retention(mlflow_client(), "m", keep=3) == [9, 8, 7, 6, 5, 4, 3]
    assert [v.version for v in list_versions("m")] == [12, 11, 10, 1]


@pytest.mark.parametrize("call, error, message", [
    (lambda: promote_model("nope", 1), ModelNotFoundError, "no registered model named 'nope'"),
    (lambda: promote_model("m", 7), VersionNotFoundError, r"no version 7; existing versions: \[2, 1\]"),
    (lambda: promote_model("m", "challenger"), VersionNotFoundError, "no version with alias 'challenger'"),
    (lambda: promote_model("m", "models:/other/1"), RegistryError, "version of model 'other', not of 'm'"),
    (lambda: promote_model("m", 1, stage="Archived"), Exception, "stage: Input should be 'champion'"),
    (lambda: list_versions("bad name!"), InvalidModelNameError, "invalid model name"),
    (lambda: register_model("m"), RegistryError, "pass model_uri"),
    (lambda: register_model("m", run_id="0" * 32), RegistryError, "does not exist"),
    (lambda: rollback_model("m", version=9), VersionNotFoundError, "no version 9"),
])
def test_bad_registry_input_is_refused_and_changes_nothing(state_dir, call, error, message):
    registered(2)
    with pytest.raises(error, match=message):
        call()
    assert alias_map(mlflow_client(), "m") == {}
    assert [v.version for v in list_versions("m")] == [2, 1]


def test_compare_versions_on_the_same_rows(state_dir, tmp_path):
    churn = churn_frame().sample(2400, random_state=3).reset_index(drop=True)
    train_model(churn.iloc[:700], "churn", "c", **ONE_LINEAR_TRIAL)
    train_model(churn.iloc[:1400], "churn", "c", **ONE_LINEAR_TRIAL)
    eval_path = tmp_path / "eval.csv"
    churn.iloc[1400:].to_csv(eval_path, index=False)
    cmp = compare_versions("c", 1, "challenger", data=str(eval_path))
    assert (cmp.version_a, cmp.version_b, cmp.n_rows) == (1, 2, 1000)
    assert set(cmp.scores_on_data) == {"1", "2"}
    for scores in cmp.scores_on_data.values():
        assert 0.6 < scores["roc_auc"] < 1 and 0.5 < scores["accuracy"] < 1
    assert cmp.metric_diff["holdout_roc_auc"] == pytest.approx(
        cmp.metrics_b["holdout_roc_auc"] - cmp.metrics_a["holdout_roc_auc"])
    # every row given: the registered model is refit on the holdout too
    assert cmp.param_diff["n_train_rows"] == {"a": "700", "b": "1400"}
    recorded_only = compare_versions("c", 1, 2)
    assert recorded_only.scores_on_data is None
    with pytest.raises(Exception, match="lacks the target column 'churn'"):
        compare_versions("c", 1, 2, data=churn.drop(columns=["churn"]))


# --------------------------------------------------------------------------- retention
def test_an_ab_test_arm_survives_registrations_beyond_keep_until_the_test_ends(state_dir):
    registered(2)
    promote_model("m", 1, "champion")
    promote_model("m", 2, "challenger")
    test_id = create_ab_test("m", traffic_split=0.5)
    with saved_mlflow_config(keep_versions=2):
        registered(1)
        promote_model("m", 3, "challenger", reason="a retraining's new challenger")
        registered(2)  # v4, v5: v2 is far beyond the 2 newest and holds no alias any more
        assert alias_map(mlflow_client(), "m") == {"champion": 1, "challenger": 3}
        assert versions_left() == [5, 4, 3, 2, 1]  # v2 is an arm of the running test
        conclude_ab_test(test_id, promote_winner=False, force=True)
        registered(1)  # the test is over: v2 (and v4) go
        assert versions_left() == [6, 5, 3, 1]


def test_keep_versions_from_the_saved_mlflow_config_block_is_honoured(state_dir):
    registered(4)
    with saved_mlflow_config(keep_versions=2):
        assert resolve_mlflow_config().keep_versions == 2
        registered(1)
        assert versions_left() == [5, 4]
    registered(1)  # no block saved: the default, 10
    assert versions_left() == [6, 5, 4]
    with pytest.raises(ValueError, match="keep_versions"):
        MLflowConfig(tracking_uri="sqlite:///x.db", keep_versions=0)


def test_the_newest_champion_export_survives_retention(state_dir):
    churn = churn_frame().sample(900, random_state=5).reset_index(drop=True)
    train_model(churn.iloc[:400], "churn", "c", promote="always", **ONE_LINEAR_TRIAL)  # v1 champion
    export_model("c", "champion", formats=["onnx"])  # devices now run v1
    client = mlflow_client()
    assert {EXPORTED_AT_TAG, CHAMPION_EXPORTED_AT_TAG} <= set(client.get_model_version("c", "1").tags)
    train_model(churn.iloc[:800], "churn", "c", promote="always", **ONE_LINEAR_TRIAL)  # v2 champion
    with saved_mlflow_config(keep_versions=1):
        register_model("c", run_id=log_tiny_model())  # v3
        assert versions_left("c") == [3, 2, 1]  # v1 has no alias, but is the newest export
        # a store exported before exports were tagged: the manifest in v1's run is found
        for key in (EXPORTED_AT_TAG, CHAMPION_EXPORTED_AT_TAG):
            client.delete_model_version_tag("c", "1", key)
        client.delete_registered_model_tag("c", EXPORTS_INDEXED_TAG)
        register_model("c", run_id=log_tiny_model())  # v4
        assert versions_left("c") == [4, 2, 1]
        assert CHAMPION_EXPORTED_AT_TAG in client.get_model_version("c", "1").tags
        export_model("c", "champion", formats=["onnx"])  # devices move on to v2
        register_model("c", run_id=log_tiny_model())  # v5
        assert versions_left("c") == [5, 2]


# --------------------------------------------------------------------------- alias history
@pytest.mark.parametrize("registered_before_history_runs", [False, True])
def test_twenty_concurrent_promotions_are_all_recorded(state_dir, registered_before_history_runs):
    if registered_before_history_runs:  # no history run yet: the first moves race to make it
        mlflow_client().create_registered_model("m")
        targets = extra_versions(20)
    else:
        registered(1)
        targets = [1] + extra_versions(19)
    start, errors = threading.Barrier(len(targets)), []

    def promote_one(version: int) -> None:
        try:
            start.wait()
            promote_alias.fn("m", version, "champion", reason=f"concurrent {version}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote_one, args=(v,)) for v in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    history = alias_history("m")
    assert len(history) == 20
    assert sorted(m.to_version for m in history) == targets
    assert {m.reason for m in history} == {f"concurrent {v}" for v in targets}
    assert alias_map(mlflow_client(), "m")["champion"] in targets


def test_five_hundred_moves_then_rollback_and_the_whole_history(state_dir, capsys):
    registered(1)
    extra_versions(2)  # v1, v2, v3
    client = mlflow_client()
    started = time.perf_counter()
    for i in range(500):  # champion: 1, 2, 3, 1, 2, 3, ... (500 moves, the last to v2)
        promote(client, "m", i % 3 + 1, "champion", reason=f"move {i}")
    moved_s = time.perf_counter() - started
    started = time.perf_counter()
    history = alias_history("m")
    read_s = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n500 alias moves: {moved_s:.1f} s ({moved_s / 500 * 1000:.0f} ms each); "
              f"alias_history of 500 moves: {read_s * 1000:.0f} ms (flow included)")
    assert len(history) == 500
    assert [m.reason for m in history] == [f"move {i}" for i in range(500)]
    assert all(m.kind == "promote" for m in history)
    assert (history[0].from_version, history[0].to_version) == (None, 1)
    assert (history[-1].from_version, history[-1].to_version) == (1, 2)
    assert rollback_model("m", reason="v2 misbehaves").version == 1
    assert len(alias_history("m")) == 501


def test_a_legacy_json_history_is_still_read(state_dir):
    registered(3)
    client = mlflow_client()
    # as stores written before one tag per move hold it: one JSON list on the registered model
    legacy = [{"alias": "champion", "from": None, "to": 1, "kind": "promote", "reason": "launch",
               "at": "2026-01-05T10:00:00+00:00"},
              {"alias": "champion", "from": 1, "to": 2, "kind": "retrain", "reason": "drift",
               "at": "2026-02-05T10:00:00+00:00"}]
    client.set_registered_model_tag("m", HISTORY_TAG, json.dumps(legacy))
    client.set_registered_model_alias("m", "champion", "2")
    promote_model("m", 3, reason="better")
    assert moves() == [("champion", None, 1, "promote"), ("champion", 1, 2, "retraining"),
                       ("champion", 2, 3, "promote")]
    assert rollback_model("m").version == 2
    assert rollback_model("m").version == 1  # known from the legacy history only
    assert json.loads(client.get_registered_model("m").tags[HISTORY_TAG]) == legacy  # untouched


def test_alias_history_explains_its_parameter_and_has_a_deployment(state_dir):
    schema = alias_history.parameters.model_dump()
    assert "Registered model name" in schema["properties"]["model_name"]["description"]
    assert isinstance(AliasMove.model_fields["kind"].description, str)
    with pytest.raises(ModelNotFoundError, match="no registered model named 'nope'"):
        alias_history("nope")
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [deployment] = [d for d in config["deployments"]
                    if d["entrypoint"] == "flows/registry.py:alias_history"]
    assert deployment["name"] == "default"
    assert (deployment["work_pool"]["name"], deployment["work_pool"]["work_queue_name"]) == (
        "mlops", "ml-retraining-queue")
