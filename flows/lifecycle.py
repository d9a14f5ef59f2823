"""The main job: the model lifecycle end to end on the bundled churn data, on embedded defaults.

Each step is a function that runs flows and returns lines for the summary; later capabilities
(drift, export, A/B tests, retraining) add steps to STEPS rather than rewriting the job.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow  # noqa: E402

from blocks.mlflow_config import resolve_mlflow_config, state_dir  # noqa: E402
from flows.ab_testing import lifecycle_step as step_ab_test  # noqa: E402
from flows.drift import lifecycle_step as step_drift  # noqa: E402
from flows.export import lifecycle_step as step_export  # noqa: E402
from flows.registry import compare_versions, list_versions, promote_model, rollback_model  # noqa: E402
from flows.retraining import lifecycle_step as step_retrain  # noqa: E402
from flows.training import train_model  # noqa: E402
from tasks.demo_data import MODEL_NAME, TARGET, write_churn_batches  # noqa: E402


@dataclass
class Story:
    model_name: str
    budget_s: float
    data: dict[str, Path] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)


def step_data(story: Story) -> None:
    story.data = write_churn_batches(state_dir() / "data")
    story.say(f"data      IBM telco churn, batches in {story.data['early'].parent}")


def step_train(story: Story) -> None:
    # promote="always": a rerun of the demo starts its own story with a fresh champion
    first = train_model(str(story.data["early"]), TARGET, story.model_name,
                        time_budget_s=story.budget_s, promote="always")
    story.versions["v1"] = first.version
    story.say(f"train     v{first.version} {first.family:<24} holdout {first.metric} "
              f"{first.score:.4f} on 40% of customers -> {', '.join(first.aliases)}")
    second = train_model(str(story.data["grown"]), TARGET, story.model_name,
                         time_budget_s=story.budget_s)
    story.versions["v2"] = second.version
    story.say(f"train     v{second.version} {second.family:<24} holdout {second.metric} "
              f"{second.score:.4f} on 80% of customers -> {', '.join(second.aliases)}")


def step_compare(story: Story) -> None:
    v1, v2 = story.versions["v1"], story.versions["v2"]
    cmp = compare_versions(story.model_name, v1, v2, data=str(story.data["evaluation"]))
    a, b = cmp.scores_on_data[str(v1)], cmp.scores_on_data[str(v2)]
    story.say(f"compare   same {cmp.n_rows} unseen customers: roc_auc v{v1} {a['roc_auc']:.4f} "
              f"vs v{v2} {b['roc_auc']:.4f}; accuracy {a['accuracy']:.4f} vs {b['accuracy']:.4f}")


def step_promote_and_rollback(story: Story) -> None:
    v1, v2 = story.versions["v1"], story.versions["v2"]
    promoted = promote_model(story.model_name, v2, "champion", reason="lifecycle demo: more data")
    story.say(f"promote   v{promoted.version} is now {', '.join(promoted.aliases)}")
    back = rollback_model(story.model_name, reason="lifecycle demo: rollback drill")
    story.say(f"rollback  v{back.version} is champion again (the previous champion, v{v1})")
    table = ", ".join(f"v{v.version}[{'/'.join(v.aliases) or '-'}]"
                      for v in list_versions(story.model_name))
    story.say(f"registry  {table}")


STEPS = [step_data, step_train, step_compare, step_promote_and_rollback, step_drift,
         step_export, step_ab_test, step_retrain]


@flow(name="mlops-lifecycle", log_prints=True)
def lifecycle(model_name: str = MODEL_NAME, time_budget_s: float = 20) -> list[str]:
    """Train, register, compare, promote and roll back the churn model; returns the summary."""
    story = Story(model_name=model_name, budget_s=time_budget_s)
    for step in STEPS:
        step(story)
    uri = resolve_mlflow_config().tracking_uri
    mlflow_ui = uri if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}"
    story.say(f"look      MLflow UI: {mlflow_ui}")
    story.say("          Prefect UI: flow runs and their artifacts (train-, registry-, compare-, drift-, export-, ab-, retraining-) "
              "(`make up` serves it on http://127.0.0.1:4200)")
    return story.lines


if __name__ == "__main__":
    import logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # coremltools warns at import that its macOS-only runtime is absent; the export says so itself
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    from flows.local_runs import local_run_settings

    with local_run_settings():
        summary = lifecycle()
    print("\n".join(["", "mlops-flows lifecycle summary", "-" * 30, *summary]))
