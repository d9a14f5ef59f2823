"""Stable hash routing for A/B tests (tasks/routing.py): pure, no Prefect."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks import routing
from tasks.routing import (
    CHALLENGER,
    CHAMPION,
    assign_arm,
    assign_arms,
    hash_unit,
    hash_units,
    is_challenger,
    route,
)
from tests.conftest import ROOT

N_KEYS = 200_000


def _keys(n: int = N_KEYS) -> list[str]:
    return [f"customer-{i}" for i in range(n)]


def test_hash_unit_is_the_documented_blake2b_formula():
    for seed, key in [("ab-42", "customer-1"), (7, 123), ("s", "é-ünïcode"), ("", "")]:
        digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
        expected = (int.from_bytes(digest, "big") >> 11) / 2**53
        assert hash_unit(seed, key) == expected
        assert 0.0 <= hash_unit(seed, key) < 1.0


def test_golden_values_never_change():
    # Changing the hash re-routes every live user: these values must stay exactly the same.
    assert hash_unit("ab-test-1", "customer-1") == 0.7727090610159475
    assert hash_unit("ab-test-1", 42) == 0.14629101244102372
    assert route("ab-test-1", "customer-1", 0.5) == CHAMPION
    assert route("ab-test-1", 42, 0.5) == CHALLENGER


def test_vectorised_matches_scalar_and_accepts_many_containers():
    keys = _keys(2_000)
    u = hash_units("seed-1", keys)
    assert u.dtype == np.float64 and u.shape == (2_000,)
    assert np.array_equal(u, [hash_unit("seed-1", k) for k in keys])
    assert np.array_equal(u, hash_units("seed-1", np.array(keys)))
    assert np.array_equal(u, hash_units("seed-1", pd.Series(keys)))
    assert np.array_equal(u, hash_units("seed-1", pd.Index(keys)))
    assert np.array_equal(u, hash_units("seed-1", iter(keys)))
    assert hash_units("seed-1", []).shape == (0,)


def test_integer_and_string_keys_route_the_same():
    ints = list(range(1_000))
    assert np.array_equal(hash_units("s", ints), hash_units("s", [str(i) for i in ints]))
    assert np.array_equal(hash_units("s", np.arange(1_000)), hash_units("s", ints))
    assert np.array_equal(hash_units("s", pd.Series(ints, dtype="int64")), hash_units("s", ints))


@pytest.mark.parametrize("split", [0.05, 0.2, 0.5, 0.9])
def test_share_within_0_3_percent_of_split_on_200k_keys(split):
    mask = is_challenger("ab-share", _keys(), split)
    assert abs(mask.mean() - split) <= 0.003


def test_200k_keys_well_under_a_second():
    keys = pd.Series(_keys())
    assign_arms("warm-up", keys[:1000], 0.1)
    start = time.perf_counter()
    arms = assign_arms("ab-speed", keys, 0.1)
    elapsed = time.perf_counter() - start
    assert len(arms) == N_KEYS
    assert elapsed < 1.0, f"routing 200k keys took {elapsed:.2f}s"


def test_series_in_series_out_with_index_kept():
    keys = pd.Series(["a", "b", "c", "d"], index=[10, 11, 12, 13])
    arms = assign_arms("idx", keys, 0.5)
    assert isinstance(arms, pd.Series)
    assert list(arms.index) == [10, 11, 12, 13]
    assert arms.name == "arm"
    assert set(arms) <= {CHAMPION, CHALLENGER}
    assert list(arms) == [route("idx", k, 0.5) for k in keys]
    plain = assign_arms("idx", ["a", "b"], 0.5)
    assert isinstance(plain, np.ndarray) and list(plain) == list(arms[:2])


def test_same_assignment_in_separate_processes():
    keys = _keys(5_000)
    here = assign_arms("ab-proc", keys, 0.3).tolist()
    script = textwrap.dedent(
        """
        import json, sys
        from tasks.routing import assign_arms
        keys = [f"customer-{i}" for i in range(5000)]
        print(json.dumps(assign_arms("ab-proc", keys, 0.3).tolist()))
        """
    )
    results = []
    for hash_seed in ("1", "12345"):  # different salts for Python's own hash(): must not matter
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        results.append(json.loads(out.stdout))
    assert results[0] == here
    assert results[1] == here


def test_deterministic_per_seed_and_different_across_seeds():
    keys = _keys(50_000)
    a1 = is_challenger("seed-A", keys, 0.5)
    a2 = is_challenger("seed-A", keys, 0.5)
    b = is_challenger("seed-B", keys, 0.5)
    assert np.array_equal(a1, a2)
    # Independent seeds agree on about half the keys at a 50/50 split (s^2 + (1-s)^2).
    agreement = (a1 == b).mean()
    assert abs(agreement - 0.5) < 0.01
    # ... and the units are uncorrelated between seeds.
    ua, ub = hash_units("seed-A", keys), hash_units("seed-B", keys)
    assert abs(np.corrcoef(ua, ub)[0, 1]) < 0.02


def test_units_look_uniform():
    u = hash_units("uniform", _keys(100_000))
    counts, _ = np.histogram(u, bins=20, range=(0.0, 1.0))
    from scipy import stats

    assert stats.chisquare(counts).pvalue > 0.001
    assert u.min() >= 0.0 and u.max() < 1.0


def test_raising_the_split_only_moves_champion_users_to_the_challenger():
    keys = _keys(20_000)
    at_10 = is_challenger("ramp", keys, 0.1)
    at_25 = is_challenger("ramp", keys, 0.25)
    assert np.all(at_25[at_10])  # nobody who saw the challenger goes back
    assert at_25.sum() > at_10.sum()


def test_assign_arm_boundaries():
    assert assign_arm(0.0, 0.2) == CHALLENGER
    assert assign_arm(0.1999999, 0.2) == CHALLENGER
    assert assign_arm(0.2, 0.2) == CHAMPION
    assert assign_arm(0.999999, 0.2) == CHAMPION


@pytest.mark.parametrize("split", [0, 1, -0.1, 1.5, float("nan"), "half", None])
def test_bad_split_raises(split):
    with pytest.raises(ValueError, match="traffic_split"):
        assign_arm(0.5, split)
    with pytest.raises(ValueError, match="traffic_split"):
        assign_arms("s", ["a"], split)
    with pytest.raises(ValueError, match="traffic_split"):
        route("s", "a", split)


@pytest.mark.parametrize("u", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_unit_raises(u):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        assign_arm(u, 0.5)


@pytest.mark.parametrize("key", [None, float("nan"), pd.NA])
def test_missing_keys_raise(key):
    with pytest.raises(ValueError, match="missing"):
        hash_unit("s", key)
    with pytest.raises(ValueError, match="missing"):
        assign_arms("s", ["a", key], 0.5)


def test_module_is_pure():
    source = Path(routing.__file__).read_text()
    for banned in ("prefect", "mlflow", "sqlalchemy", "sqlite3"):
        assert f"import {banned}" not in source and f"from {banned}" not in source
