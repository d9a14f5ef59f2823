"""Data parameters of flows: a reference string for deployments, a DataFrame for Python callers.

Every flow that takes a dataset types that parameter `DataRef` (`str | DataFrame`): the Prefect UI
and `prefect deployment run --param` see a string (a path, an `s3://` URI or a
`served:<model>:<window>` reference to served traffic, tasks/served_traffic.py), a Python caller may
pass a DataFrame of any size. Prefect records each flow run's parameters in its API; it encodes a
DataFrame value by value (a float-only frame becomes a dict of every cell, other frames a bare
"<DataFrame>"), and the server refuses parameters over 512 KiB ("Flow run parameters must be less
than 524,288 bytes"), so a 38k-row frame stopped the run before it started. `data_flow` builds
flows that record a DataFrame argument as a one-line description instead; the flow function still
receives the DataFrame itself, in the caller's process.

Prefect has no public setting for how parameters are recorded (prefect#7910 and prefect#6962 are
the upstream reports of DataFrames as parameters), so `DataFlow` overrides the public
`Flow.serialize_parameters` in a subclass; nothing of Prefect is patched.
"""
from __future__ import annotations

from typing import Any, Callable

import pandas as pd
from prefect import Flow

from tasks.data import DataRef

__all__ = ["DataFlow", "DataRef", "data_flow", "describe_frame"]


def describe_frame(frame: pd.DataFrame) -> str:
    """How a DataFrame argument appears among a flow run's parameters in the Prefect UI."""
    return f"<DataFrame {frame.shape[0]} rows x {frame.shape[1]} columns>"


class DataFlow(Flow):
    """A flow whose DataFrame arguments stay in the calling process: the Prefect API records
    `describe_frame(frame)` for them, never their values."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return super().serialize_parameters(
            {k: describe_frame(v) if isinstance(v, pd.DataFrame) else v
             for k, v in parameters.items()})

    def with_options(self, **options: Any) -> "DataFlow":
        # Flow.with_options builds a plain Flow; keep the frames-stay-local behaviour
        copy = super().with_options(**options)
        copy.__class__ = type(self)
        return copy


def data_flow(**options: Any) -> Callable[[Callable[..., Any]], DataFlow]:
    """`@flow(...)` for flows with a `DataRef` parameter: same options, DataFrames stay local."""
    def decorate(fn: Callable[..., Any]) -> DataFlow:
        return DataFlow(fn=fn, **options)
    return decorate
