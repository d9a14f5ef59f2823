"""Every bad training input gets a clear error naming the problem and the fix; nothing registered."""
from __future__ import annotations

import pandas as pd
import pytest

from flows.training import train_model
from tasks.demo_data import churn_frame
from tasks.errors import ConfigurationError, DataError, InvalidModelNameError
from tasks.registry import mlflow_client
from tests.budgets import ONE_LINEAR_TRIAL


@pytest.fixture(scope="module")
def churn():
    return churn_frame().sample(300, random_state=2).reset_index(drop=True)


def write(tmp_path, name: str, content: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


CASES = {
    "missing file": (lambda tmp, df: str(tmp / "nope.csv"), "churn", DataError,
                     r"data file not found: '.*nope\.csv'"),
    "unreadable format": (lambda tmp, df: write(tmp, "data.xlsx", b"PK\x03\x04"), "churn", DataError,
                          r"unsupported format '\.xlsx'.*csv or parquet"),
    "corrupt parquet": (lambda tmp, df: write(tmp, "data.parquet", b"not parquet"), "churn",
                        DataError, r"cannot read .*data\.parquet' as parquet"),
    "target absent": (lambda tmp, df: df, "churned", DataError,
                      r"target column 'churned' is not in the data; columns are: churn, female"),
    "empty data": (lambda tmp, df: write(tmp, "empty.csv", ",".join(df.columns) + "\n"), "churn",
                   DataError, r"the data is empty \(0 rows\)"),
    "one class only": (lambda tmp, df: df[df.churn == "No"], "churn", DataError,
                       r"only one class \('No'\); a classifier needs at least two"),
    "too few rows": (lambda tmp, df: pd.concat([df[df.churn == "No"].head(20),
                                                df[df.churn == "Yes"].head(3)]), "churn", DataError,
                     r"too few rows for 5-fold cross-validation: class 'Yes' has 3 rows"),
    "too few rows (regression)": (lambda tmp, df: df.head(12), "monthly_charges", DataError,
                                  r"too few rows for 5-fold cross-validation: 12; need at least 25"),
    "missing target values": (lambda tmp, df: df.assign(churn=df.churn.where(df.index > 5)), "churn",
                              DataError, r"target 'churn' has 6 missing values"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_training_data_is_refused_before_anything_is_registered(case, state_dir, tmp_path, churn):
    make_data, target, error, message = CASES[case]
    with pytest.raises(error, match=message):
        train_model(make_data(tmp_path, churn), target, "customer_churn", **ONE_LINEAR_TRIAL)
    assert mlflow_client().search_registered_models() == []


@pytest.mark.parametrize("name", ["", "has space", "slash/name", "-leading", "x" * 101, "churn;drop"])
def test_invalid_model_names_are_refused(name, state_dir, churn):
    with pytest.raises(InvalidModelNameError, match="invalid model name.*e.g. customer_churn"):
        train_model(churn, "churn", name, **ONE_LINEAR_TRIAL)
    assert mlflow_client().search_registered_models() == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(metric="rmse"), r"metric 'rmse' does not apply to a binary task; choose from \['roc_auc'"),
    (dict(candidates=["xgboost"]), r"unknown candidate families \['xgboost'\]"),
    (dict(time_budget_s=0), "time_budget_s must be positive"),
])
def test_bad_parameters_are_refused(kwargs, message, state_dir, churn):
    with pytest.raises(ConfigurationError, match=message):
        train_model(churn, "churn", "customer_churn", **{**ONE_LINEAR_TRIAL, **kwargs})
    assert mlflow_client().search_registered_models() == []
