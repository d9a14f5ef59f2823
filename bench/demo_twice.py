"""Does `make demo` tell the same story twice? Runs the main job twice, each in a fresh state
folder, and compares the two summaries.

    .venv/bin/python bench/demo_twice.py                  # the demo as `make demo` runs it
    .venv/bin/python bench/demo_twice.py --max-trials 2   # quicker

What may differ between two runs by design is masked before comparing: the state folder, random
ids (the A/B test id, MLflow run ids), the log file's time stamp and wall-clock figures (the total
seconds, the export latencies). Everything else — versions, families, scores, comparisons, drift,
A/B figures, the retraining decision — must match: `max_trials` makes each search reproducible and
the A/B routing seed is the model's test count in its store, not the random test id (tasks/ab.py).
Two demos take 4-5 minutes on a busy 2-core machine, too long for the test suite, hence a script.
Exit status 0 when the stories match, 1 with a diff when they do not.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def story_of(stdout: str, home: Path) -> list[str]:
    """The summary's lines with what differs by design masked (see the module docstring)."""
    lines = stdout.split("mlops-flows lifecycle summary", 1)[1].splitlines()[2:]
    out = []
    for line in lines:
        line = line.replace(str(home), "<home>")
        line = re.sub(r"demo-\d{8}-\d{6}\.log", "demo-<time>.log", line)
        line = re.sub(r"[a-z0-9-]+-\d{8}-[0-9a-f]{6}\b", "<test-id>", line)
        line = re.sub(r"/[0-9a-f]{32}/", "/<run-id>/", line)
        line = re.sub(r"\s+p50 .*$", "", line)  # export latencies: measured, so they vary
        out.append(line)
    return out


def run_demo(home: Path, extra: list[str]) -> tuple[list[str], float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.lifecycle", *extra], cwd=ROOT,
                          env={**os.environ, "MLOPS_HOME": str(home), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"the demo failed (state folder {home}):\n{done.stdout}\n{done.stderr}")
    return story_of(done.stdout, home), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-trials", type=int, help="passed to the demo (default: its own)")
    args = parser.parse_args()
    extra = [] if args.max_trials is None else ["--max-trials", str(args.max_trials)]
    stories, seconds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in ("first", "second"):
            story, took = run_demo(Path(tmp) / run, extra)
            stories.append(story)
            seconds.append(took)
            print(f"{run} run: {took:.0f} s, {len(story)} summary lines", flush=True)
    first, second = stories
    if first == second:
        print("the same story twice:\n  " + "\n  ".join(first))
        return 0
    print("the stories differ:\n" + "\n".join(difflib.unified_diff(first, second, "first",
                                                                     "second", lineterm="")))
    return 1


if __name__ == "__main__":
    sys.exit(main())
