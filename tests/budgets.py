"""The training settings of tests whose subject is not the search: one linear trial.

Dozens of tests train a model to have a version to register, promote, export, serve or watch; a
budget's worth of trials in each would multiply the suite's time. The search's own tests
(tests/test_training.py, tests/test_dask_search.py), the export tests of each family and the few
tests that need a search of two trials train more.
"""
from __future__ import annotations

# The budget only bounds the one trial (well under a second on a few hundred rows).
ONE_LINEAR_TRIAL = {"time_budget_s": 5, "candidates": ["linear"], "max_trials": 1}
