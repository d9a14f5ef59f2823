"""The main job: the model lifecycle end to end on the bundled churn data, on embedded defaults.

Each step is a function that runs flows and returns lines for the summary; later capabilities
(drift, export, A/B tests, retraining) add steps to STEPS rather than rewriting the job.

`python -m flows.lifecycle` (what `make demo` runs) always uses embedded defaults: Prefect's
embedded API with its database in the state folder, MLflow on SQLite in the same folder, whatever
Prefect profile is active (after `make up` the stack's profile is). `--stack` runs it against the
active profile's Prefect API and the MLflow that API's blocks name instead. The console shows a
line per chapter and the summary; the libraries' own output goes to a log file it names.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Iterator

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

# Where the story is told: the terminal, also when the libraries' output goes to a log file.
console: IO[str] = sys.stdout
DEMO_MAX_TRIALS = 8  # each search's trials in the demo: reproducible and well under 3 minutes


@dataclass
class Story:
    model_name: str
    budget_s: float
    data: dict[str, Path] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    max_trials: int | None = None  # each search's trials: the same summary on every run

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(f"          {line}", file=console, flush=True)


def step_data(story: Story) -> None:
    story.data = write_churn_batches(state_dir() / "data")
    story.say(f"data      IBM telco churn, batches in {story.data['early'].parent}")


def step_train(story: Story) -> None:
    # promote="always": a rerun of the demo starts its own story with a fresh champion
    first = train_model(str(story.data["early"]), TARGET, story.model_name,
                        time_budget_s=story.budget_s, max_trials=story.max_trials,
                        promote="always")
    story.versions["v1"] = first.version
    story.say(f"train     v{first.version} {first.family:<24} holdout {first.metric} "
              f"{first.score:.4f} on 40% of customers -> {', '.join(first.aliases)}")
    second = train_model(str(story.data["grown"]), TARGET, story.model_name,
                         time_budget_s=story.budget_s, max_trials=story.max_trials)
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


CHAPTERS = {step_data: "data", step_train: "train two versions",
            step_compare: "compare on unseen customers", step_promote_and_rollback:
            "promote and roll back", step_drift: "drift", step_export: "export",
            step_ab_test: "A/B test", step_retrain: "retraining"}


@flow(name="mlops-lifecycle", log_prints=True)
def lifecycle(model_name: str = MODEL_NAME, time_budget_s: float = 20,
              until: str | None = None, max_trials: int | None = DEMO_MAX_TRIALS) -> list[str]:
    """Train, register, compare, promote and roll back the churn model, check drift, export,
    run an A/B test and a retraining; returns the summary lines.

    Args:
        model_name: Registered model name the story uses.
        time_budget_s: Training budget of each train_model call, in seconds.
        until: Stop after this chapter (data, train, compare, promote_and_rollback, drift,
            export, ab_test or retrain; a prefix is enough); empty: the whole story.
        max_trials: Trials of each model search (the same models, so the same story, on every
            run); empty: time_budget_s decides.
    """
    names = [step.__name__.removeprefix("step_") for step in STEPS]
    if until is not None and not any(n.startswith(until) for n in names):
        raise ValueError(f"unknown chapter {until!r}; use one of {', '.join(names)}")
    story = Story(model_name=model_name, budget_s=time_budget_s, max_trials=max_trials)
    started = time.monotonic()
    for number, step in enumerate(STEPS, 1):
        print(f"[{number}/{len(STEPS)}] {CHAPTERS[step]} "
              f"({time.monotonic() - started:.0f} s)", file=console, flush=True)
        step(story)
        if until is not None and step.__name__.removeprefix("step_").startswith(until):
            break
    story.lines.extend(where_to_look())
    return story.lines


def where_to_look() -> list[str]:
    from prefect.settings import get_current_settings

    uri = resolve_mlflow_config().tracking_uri
    mlflow_ui = uri if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}"
    settings = get_current_settings()
    prefect_ui = (settings.ui_url or settings.api.url if settings.api.url else
                  f"PREFECT_HOME={settings.home} prefect server start, then http://127.0.0.1:4200")
    return [f"look      MLflow UI: {mlflow_ui}",
            f"          Prefect UI: {prefect_ui}",
            "          (flow runs and their artifacts: train-, registry-, compare-, drift-, "
            "export-, ab-, retraining-)"]


@contextmanager
def embedded_prefect(home: Path) -> Iterator[None]:
    """Prefect's embedded API with its database under `home`, whatever profile is active: the
    stack's profile (left active by `make up`, or pointing at a server gone after a reboot) and
    the blocks saved there are not used."""
    from prefect.settings import (PREFECT_API_KEY, PREFECT_API_URL, PREFECT_HOME,
                                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
                                  temporary_settings)

    home.mkdir(parents=True, exist_ok=True)
    with temporary_settings(updates={PREFECT_HOME: str(home),
                                     PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120},
                            restore_defaults={PREFECT_API_URL, PREFECT_API_KEY}):
        yield


@contextmanager
def library_output_to(log_path: Path) -> Iterator[IO[str]]:
    """Send everything written to this process's stdout and stderr (Python, and the native
    start-up lines of TensorFlow, oneDNN and absl, which write to the file descriptors) to
    `log_path`; yields a stream on the terminal for the story."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def main(argv: list[str] | None = None) -> int:
    global console
    parser = argparse.ArgumentParser(prog="python -m flows.lifecycle", description=(
        "The model lifecycle end to end on the bundled churn data (what `make demo` runs)."))
    parser.add_argument("--stack", action="store_true", help=(
        "run against the active Prefect profile's API (the stack of `make up`) and the MLflow "
        "its blocks name; default: embedded Prefect and MLflow under the state folder"))
    parser.add_argument("--budget", type=float, default=20,
                        help="training budget per train_model call, seconds (default 20)")
    parser.add_argument("--max-trials", type=int, default=DEMO_MAX_TRIALS,
                        help=f"trials per model search (default {DEMO_MAX_TRIALS}: the same "
                             "summary on every run); 0: the budget decides")
    parser.add_argument("--until", help="stop after this chapter (e.g. train, drift, export)")
    args = parser.parse_args(argv)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    home = state_dir()
    log_path = home / "logs" / f"demo-{datetime.now():%Y%m%d-%H%M%S}.log"
    mode = "the stack (active Prefect profile)" if args.stack else f"embedded defaults in {home}"
    started = time.monotonic()
    print(f"mlops-flows lifecycle on {mode}; library output: {log_path}", flush=True)
    from flows.local_runs import local_run_settings

    with library_output_to(log_path) as terminal:
        console = terminal
        try:
            with local_run_settings(), (nullcontext() if args.stack
                                        else embedded_prefect(home / "prefect")):
                summary = lifecycle(time_budget_s=args.budget, until=args.until,
                                    max_trials=args.max_trials or None)
        except BaseException:
            import traceback

            traceback.print_exc()  # into the log
            print(f"the lifecycle failed; the error and the libraries' output are in {log_path}",
                  file=terminal, flush=True)
            return 1
        finally:
            console = sys.stdout
    print("\n".join(["", f"mlops-flows lifecycle summary ({time.monotonic() - started:.0f} s)",
                     "-" * 36, *summary, f"log       library output: {log_path}"]), flush=True)
    # the embedded API stops at exit and says so; that line is not part of the story
    logging.getLogger("prefect").setLevel(logging.WARNING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
