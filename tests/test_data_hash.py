"""The content hash recorded with every training run, drift check and evaluation
(`mlops.data_sha256`): the same table gives the same hash however it was stored; any change of a
value, a column name or the row labels gives another."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from tasks.data import LoadedData, frame_sha256, load_table


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    n = 2_000
    return pd.DataFrame({
        "amount": rng.normal(size=n),
        "count": rng.integers(0, 9, n),
        "flag": rng.random(n) < 0.5,
        "plan": pd.Series(rng.choice(["basic", "pro", "team"], n), dtype=object),
        "when": pd.date_range("2026-01-01", periods=n, freq="h"),
        "missing": np.where(rng.random(n) < 0.1, np.nan, 1.0),
    })


def _round_trip(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    buffer = io.BytesIO()
    if kind == "parquet":
        frame.to_parquet(buffer, index=False)
        return pd.read_parquet(io.BytesIO(buffer.getvalue()))
    frame.to_csv(buffer, index=False)
    return pd.read_csv(io.BytesIO(buffer.getvalue()), parse_dates=["when"])


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_a_stored_and_read_back_table_keeps_its_hash(table, kind):
    back = _round_trip(table, kind)
    assert str(back["plan"].dtype) != "object" or kind == "csv"  # strings come back as `str`
    assert frame_sha256(back) == frame_sha256(table)


@pytest.mark.parametrize("change", ["one value", "one string", "a column name", "row labels",
                                    "row order", "a missing value filled", "int as float"])
def test_any_change_of_content_changes_the_hash(table, change):
    other = table.copy()
    if change == "one value":
        other.loc[1234, "amount"] = np.nextafter(other.loc[1234, "amount"], np.inf)
    elif change == "one string":
        other.loc[7, "plan"] = "basic " if other.loc[7, "plan"] == "basic" else "basic"
    elif change == "a column name":
        other = other.rename(columns={"amount": "amount2"})
    elif change == "row labels":
        other.index = other.index + 1
    elif change == "row order":
        other = other.iloc[::-1].reset_index(drop=True)
    elif change == "a missing value filled":
        other["missing"] = other["missing"].fillna(0.0)
    else:
        other["count"] = other["count"].astype(float)
    assert frame_sha256(other) != frame_sha256(table)


def test_loaded_data_hashes_the_frame_it_holds(table):
    loaded = load_table(table)
    assert isinstance(loaded, LoadedData) and loaded.ref is None
    assert loaded.sha256 == frame_sha256(table)
    assert LoadedData(table, "given", sha256="abc").sha256 == "abc"
