"""Flow parameters as users see them: every flow that takes a dataset accepts a DataFrame of any
size from Python, records only a one-line description of it in the Prefect API, and shows a
string in the UI form and to `prefect deployment run --param`; every form field is explained."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing

import numpy as np
import pandas as pd
import pytest
from prefect import Flow
from prefect.client.orchestration import get_client

import flows
from flows.local_runs import local_run_settings
from flows.parameters import DataFlow, DataRef, data_flow

# Parameters that name a dataset; a flow's parameter of another name that mentions DataFrame in
# its annotation counts too.
DATA_PARAMETERS = {"data", "sample_data"}


def every_flow() -> list[tuple[str, Flow]]:
    found = {}
    for info in pkgutil.iter_modules(flows.__path__):
        module = importlib.import_module(f"flows.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, Flow) and value.fn.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    return sorted(found.items())


def data_parameters(flow_object: Flow) -> list[str]:
    hints = typing.get_type_hints(flow_object.fn, include_extras=True)
    return [name for name in inspect.signature(flow_object.fn).parameters
            if name in DATA_PARAMETERS or "DataFrame" in str(hints.get(name, ""))]


def test_the_data_flows_are_the_ones_the_contract_names():
    with_data = {name.rsplit(".", 1)[1] for name, f in every_flow() if data_parameters(f)}
    assert {"train_model", "compare_versions", "check_drift", "evaluate_production",
            "profile_model", "score_batch", "record_outcomes", "should_retrain", "retrain_model",
            "export_model"} <= with_data


@pytest.mark.parametrize("name,flow_object", every_flow(), ids=[n for n, _ in every_flow()])
def test_every_data_parameter_is_a_dataref_of_a_data_flow(name, flow_object):
    hints = typing.get_type_hints(flow_object.fn, include_extras=True)
    for parameter in data_parameters(flow_object):
        assert hints[parameter] in (DataRef, DataRef | None), (
            f"{name}({parameter}=...) must be typed DataRef (or DataRef | None)")
        assert isinstance(flow_object, DataFlow), f"{name} takes data: decorate it with data_flow"
        # the UI form and --param see a string
        schema = flow_object.parameters.properties[parameter]
        kinds = {schema.get("type")} | {s.get("type") for s in schema.get("anyOf", [])}
        assert "string" in kinds and "object" not in kinds and "array" not in kinds, schema
        # a large frame is recorded as a description, whatever its column types
        frame = pd.DataFrame({"x": np.arange(200_000, dtype=float), "s": "a"})
        recorded = flow_object.serialize_parameters({parameter: frame})
        assert recorded == {parameter: "<DataFrame 200000 rows x 2 columns>"}


@data_flow(name="count-rows")
def count_rows(data: DataRef, column: str = "x") -> float:
    frame = data if isinstance(data, pd.DataFrame) else pd.read_csv(data)
    return float(frame[column].sum())


def test_a_100k_row_frame_reaches_the_flow_and_only_its_description_reaches_the_api():
    """Float-only frames are the ones Prefect would encode cell by cell (3 MB here, refused by
    its API above 512 KiB); with data_flow the run starts and the flow gets the frame itself."""
    frame = pd.DataFrame({"x": np.arange(100_000, dtype=float), "y": np.ones(100_000)})
    with local_run_settings():
        state = count_rows(frame, return_state=True)
        renamed = count_rows.with_options(name="count-rows-renamed")(frame)
    assert state.result() == renamed == float(frame.x.sum())
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.parameters == {"data": "<DataFrame 100000 rows x 2 columns>", "column": "x"}
    assert isinstance(count_rows.with_options(name="copy"), DataFlow)


def test_a_path_is_recorded_as_given(tmp_path):
    path = tmp_path / "rows.csv"
    pd.DataFrame({"x": [1.0, 2.0]}).to_csv(path, index=False)
    with local_run_settings():
        state = count_rows(str(path), return_state=True)
    assert state.result() == 3.0
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).parameters["data"] == str(path)


@pytest.mark.parametrize("name,flow_object", every_flow(), ids=[n for n, _ in every_flow()])
def test_every_deployment_form_explains_every_parameter(name, flow_object):
    """The Prefect UI's run form shows the docstring's `Args:` entry under each field."""
    fields = flow_object.parameters.properties
    unexplained = [p for p, schema in fields.items() if not schema.get("description")]
    assert unexplained == [], f"{name}: add these to the docstring's Args: section: {unexplained}"
