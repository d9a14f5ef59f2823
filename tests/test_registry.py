"""Registry flows against a real Prefect API and the embedded MLflow store."""
from __future__ import annotations

import json
from contextlib import contextmanager

import mlflow
import pytest
from sklearn.linear_model import LogisticRegression

from blocks.mlflow_config import DEFAULT_DOCUMENT, MLflowConfig, resolve_mlflow_config
from flows.ab_testing import conclude_ab_test, create_ab_test
from flows.export import export_model
from flows.registry import (compare_versions, list_versions, promote_model, register_model,
                            rollback_model)
from flows.training import train_model
from tasks.demo_data import churn_frame
from tasks.errors import (InvalidModelNameError, ModelNotFoundError, RegistryError,
                          VersionNotFoundError)
from tasks.registry import (CHAMPION_EXPORTED_AT_TAG, EXPORTED_AT_TAG, EXPORTS_INDEXED_TAG,
                            HISTORY_TAG, alias_map, apply_retention, mlflow_client)


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
    history = json.loads(mlflow_client().get_registered_model("m").tags[HISTORY_TAG])
    moves = [(e["alias"], e["from"], e["to"]) for e in history]
    assert moves == [("champion", None, 1), ("challenger", None, 2), ("champion", 1, 2),
                     ("challenger", 2, None)]
    assert history[2]["reason"] == "won the test" and history[2]["at"].startswith("20")


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
    history = json.loads(mlflow_client().get_registered_model("m").tags[HISTORY_TAG])
    assert history[-1]["kind"] == "rollback"


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
    fast = dict(time_budget_s=8, candidates=["linear"])
    train_model(churn.iloc[:700], "churn", "c", **fast)
    train_model(churn.iloc[:1400], "churn", "c", **fast)
    eval_path = tmp_path / "eval.csv"
    churn.iloc[1400:].to_csv(eval_path, index=False)
    cmp = compare_versions("c", 1, "challenger", data=str(eval_path))
    assert (cmp.version_a, cmp.version_b, cmp.n_rows) == (1, 2, 1000)
    assert set(cmp.scores_on_data) == {"1", "2"}
    for scores in cmp.scores_on_data.values():
        assert 0.6 < scores["roc_auc"] < 1 and 0.5 < scores["accuracy"] < 1
    assert cmp.metric_diff["holdout_roc_auc"] == pytest.approx(
        cmp.metrics_b["holdout_roc_auc"] - cmp.metrics_a["holdout_roc_auc"])
    assert cmp.param_diff["n_train_rows"] == {"a": "560", "b": "1120"}
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
    fast = dict(time_budget_s=3, candidates=["linear"])
    train_model(churn.iloc[:400], "churn", "c", promote="always", **fast)  # v1 champion
    export_model("c", "champion", formats=["onnx"])  # devices now run v1
    client = mlflow_client()
    assert {EXPORTED_AT_TAG, CHAMPION_EXPORTED_AT_TAG} <= set(client.get_model_version("c", "1").tags)
    train_model(churn.iloc[:800], "churn", "c", promote="always", **fast)  # v2 champion
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
