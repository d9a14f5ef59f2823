"""Latency and throughput of a predict function, measured the same way for every runtime (pure).

Single row: `rows` calls, one row each, inputs prepared beforehand (conversion to the runtime's
native input is not timed), after `warmup` untimed calls; p50 and p99 of the per-call wall time.
Batch: the whole sample in one call, `repeats` times; rows/s from the median call. Each
measurement stops early at `budget_s` so a slow runtime cannot stall a flow.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

WARMUP = 10
BATCH_REPEATS = 3


@dataclass
class Latency:
    p50_us: float
    p99_us: float
    single_rows: int  # single-row calls timed
    rows_per_s: float | None  # batch throughput
    batch_rows: int

    def to_dict(self) -> dict:
        return asdict(self)


def single_row(fn: Callable[[Any], Any], inputs: Sequence[Any], warmup: int = WARMUP,
               budget_s: float = 3.0) -> tuple[float, float, int]:
    """p50 and p99 (µs) of fn(x) over the prepared single-row inputs; how many were timed."""
    if not inputs:
        raise ValueError("no rows to time")
    for x in list(inputs)[:warmup]:
        fn(x)
    timings = []
    deadline = time.perf_counter() + budget_s
    for x in inputs:
        started = time.perf_counter_ns()
        fn(x)
        timings.append(time.perf_counter_ns() - started)
        if time.perf_counter() > deadline and len(timings) >= 20:
            break
    arr = np.asarray(timings, dtype=np.float64) / 1e3
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99)), len(timings)


def batch(fn: Callable[[Any], Any], native: Any, n_rows: int, repeats: int = BATCH_REPEATS,
          budget_s: float = 5.0) -> float:
    """Rows per second of fn on the whole prepared batch (median of `repeats` calls)."""
    durations = []
    deadline = time.perf_counter() + budget_s
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        fn(native)
        durations.append(time.perf_counter() - started)
        if time.perf_counter() > deadline:
            break
    return float(n_rows / max(np.median(durations), 1e-9))


def measure(run: Callable[[Any], Any], single_inputs: Sequence[Any], batch_input: Any,
            batch_rows: int, budget_s: float = 3.0) -> Latency:
    p50, p99, timed = single_row(run, single_inputs, budget_s=budget_s)
    rows_per_s = batch(run, batch_input, batch_rows, budget_s=budget_s) if batch_rows else None
    return Latency(p50, p99, timed, rows_per_s, batch_rows)
