"""Stable traffic routing for A/B tests of model versions (pure: no Prefect, MLflow or SQL).

Every entity key is hashed together with the test's seed into a number ``u`` in ``[0, 1)``; the
entity goes to the challenger when ``u < traffic_split``. The hash is BLAKE2b, so the same
(seed, key) gets the same arm in every process, on every machine and after every restart (Python's
built-in ``hash()`` is salted per process and must never be used for this).

Exact definition (changing it re-routes live users, so a golden-value test pins it)::

    digest = blake2b(f"{seed}:{key}".encode("utf-8"), digest_size=8).digest()
    u      = (int.from_bytes(digest, "big") >> 11) / 2**53

Only the top 53 bits are used so that ``u`` is exactly representable as a float64 and is strictly
below 1.0 (a full ``uint64 / 2**64`` rounds values near 2**64 up to 1.0).

Keys are formatted with ``str()``: the integer ``42`` and the string ``"42"`` route identically,
but the float ``42.0`` does not (``"42.0"``). Pass identifiers as strings or integers, never as
floats (a pandas integer column with missing values becomes float: convert it first). Missing
keys (``None``/NaN) raise ``ValueError``.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

try:  # pandas is optional: only used to recognise its missing-value markers and Series input
    import pandas as pd
except ImportError:  # pragma: no cover
    pd = None

CHAMPION: Literal["champion"] = "champion"
CHALLENGER: Literal["challenger"] = "challenger"
Arm = Literal["champion", "challenger"]

_SCALE = 2.0**-53


def validate_traffic_split(traffic_split: float) -> float:
    """Return ``traffic_split`` as a float, or raise ``ValueError`` unless it lies in (0, 1)."""
    try:
        split = float(traffic_split)
    except (TypeError, ValueError):
        raise ValueError(
            f"traffic_split must be a number strictly between 0 and 1 (the challenger's share "
            f"of traffic), got {traffic_split!r}"
        ) from None
    if not (0.0 < split < 1.0):
        raise ValueError(
            f"traffic_split must be strictly between 0 and 1 (the challenger's share of "
            f"traffic, e.g. 0.1 for 10%), got {traffic_split!r}"
        )
    return split


def _is_missing(key: Any) -> bool:
    if key is None:
        return True
    if isinstance(key, float) and math.isnan(key):
        return True
    return pd is not None and (key is pd.NA or key is pd.NaT)


def _key_text(key: Any) -> str:
    if _is_missing(key):
        raise ValueError(f"entity key must not be missing (None/NaN), got {key!r}")
    return str(key)


def _digests(seed: str | int, keys: Iterable[Any]) -> bytes:
    prefix = f"{seed}:"
    blake2b = hashlib.blake2b
    return b"".join(
        [
            blake2b(
                (prefix + (k if type(k) is str else _key_text(k))).encode(), digest_size=8
            ).digest()
            for k in keys
        ]
    )


def hash_unit(seed: str | int, key: Any) -> float:
    """Map (test seed, entity key) to a stable number in ``[0, 1)``."""
    return (int.from_bytes(_digests(seed, [key]), "big") >> 11) * _SCALE


def hash_units(seed: str | int, keys: Iterable[Any]) -> np.ndarray:
    """Vectorised :func:`hash_unit`: one float64 in ``[0, 1)`` per key, in order.

    Accepts a list, tuple, numpy array or pandas Series/Index of keys. About 0.1 s per 200,000
    keys: one BLAKE2b call per key, then a single numpy conversion of the joined digests.
    """
    if hasattr(keys, "tolist"):  # numpy arrays / pandas objects -> plain Python scalars
        keys = keys.tolist()
    words = np.frombuffer(_digests(seed, keys), dtype=">u8").astype(np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * _SCALE


def assign_arm(u: float, traffic_split: float) -> Arm:
    """The arm for one hash unit: ``"challenger"`` if ``u < traffic_split`` else ``"champion"``."""
    split = validate_traffic_split(traffic_split)
    if not (0.0 <= u < 1.0):
        raise ValueError(f"u must be a hash unit in [0, 1), got {u!r}")
    return CHALLENGER if u < split else CHAMPION


def route(seed: str | int, key: Any, traffic_split: float) -> Arm:
    """The arm of one entity in the test with ``seed``: ``assign_arm(hash_unit(seed, key), split)``."""
    return assign_arm(hash_unit(seed, key), traffic_split)


def assign_arms(seed: str | int, keys: Iterable[Any], traffic_split: float):
    """Vectorised :func:`route`: the arm of every key.

    Returns a pandas Series (same index, name ``"arm"``) when ``keys`` is a Series, otherwise a
    numpy array of ``"champion"``/``"challenger"`` strings. 200,000 keys take about 0.1 s.
    """
    split = validate_traffic_split(traffic_split)
    u = hash_units(seed, keys)
    arms = np.where(u < split, CHALLENGER, CHAMPION).astype(object)
    if pd is not None and isinstance(keys, pd.Series):
        return pd.Series(arms, index=keys.index, name="arm")
    return arms


def is_challenger(seed: str | int, keys: Iterable[Any], traffic_split: float) -> np.ndarray:
    """Boolean mask, True where the key is routed to the challenger (cheapest vectorised form)."""
    split = validate_traffic_split(traffic_split)
    return hash_units(seed, keys) < split
