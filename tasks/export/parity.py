"""The parity gate: an exported file against the scikit-learn model on the same rows (pure).

Reference. scikit-learn on the sample rows as given (numeric float64), i.e. what the model does on
the data it will face, not scikit-learn on float32-cast copies of them; measured here, a
float32-cast reference moves the reference rather than the export: HistGradientBoosting thresholds
are data values (19.85), float32(19.85) = 19.850000381 > 19.85, so scikit-learn itself answers
differently on float32-cast rows (54 of 2,043 churn rows, up to 0.2 in probability) while the ONNX
file, comparing float32 with float32 thresholds, matches scikit-learn on the real rows to 2e-7.
Random forests cast to float32 internally, linear models barely move: for them both references
agree.

Bounds (documented and reported with every result):

| precision | max abs diff (probabilities; regression: × max(1, max abs prediction)) | changed labels |
|---|---|---|
| float32, float64 | 1e-5 | 0 |
| float16 | 1e-3 | ≤ 0.1 % of rows |
| int8 (dynamic) | 5e-2 | ≤ 0.5 % of rows |

Regression bounds scale with the prediction's magnitude because float32 carries about seven
significant digits: a 5,000-dollar prediction cannot agree to 1e-5 dollars.

Ties. A forest of small leaves often gives a row exactly equal class probabilities (60 trees
voting 30/30); scikit-learn's float64 sum then breaks the tie by its own rounding order
([0.5, 0.5000000000000001] picks the second class), which no float32 (or differently ordered
float64) sum can reproduce. A label that differs only on such a row, where the reference's top
probabilities are equal to within float64 summation noise (`TIE_MARGIN`), is reported as
`tied_labels` and not counted as changed; any real margin, however small (8e-7), still counts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tasks.export.base import Prediction


@dataclass(frozen=True)
class Bound:
    max_abs_diff: float
    max_changed_share: float = 0.0  # of rows

    def describe(self, task: str) -> str:
        scale = " x max(1, max |prediction|)" if task == "regression" else ""
        labels = ("" if task == "regression" else
                  ", 0 changed labels" if self.max_changed_share == 0 else
                  f", changed labels <= {self.max_changed_share:.1%} of rows")
        return f"max |diff| <= {self.max_abs_diff:g}{scale}{labels}"


# Top-two reference probabilities closer than this are a tie the float64 sum broke by rounding
# (a few ulps per tree summed; 1e-12 leaves room for thousands of trees, far below any real margin).
TIE_MARGIN = 1e-12

BOUNDS: dict[str, Bound] = {
    "float64": Bound(1e-5, 0.0),
    "float32": Bound(1e-5, 0.0),
    "float16": Bound(1e-3, 0.001),
    "int8": Bound(5e-2, 0.005),
}


def bound_for(precision: str) -> Bound:
    return BOUNDS.get(precision, BOUNDS["float32"])


@dataclass
class Parity:
    n_rows: int
    max_abs_diff: float | None  # None when a NaN appeared where the reference has a number
    max_rel_diff: float | None
    changed_labels: int | None  # None for regression
    tolerance: float  # the absolute bound that applied
    max_changed_labels: int | None
    bound: str
    passed: bool
    explanation: str
    tied_labels: int | None = None  # differing labels on rows the reference itself ties (see module doc)

    def to_dict(self) -> dict:
        return asdict(self)


def compare(task: str, reference: Prediction, candidate: Prediction, bound: Bound,
            classes: list | None = None) -> Parity:
    """Max |diff| of probabilities (or predictions) and changed labels, against `bound`."""
    ref = np.asarray(reference.scores, dtype=np.float64)
    got = np.asarray(candidate.scores, dtype=np.float64)
    if task == "regression":
        ref, got = ref.reshape(-1), got.reshape(-1)
    elif ref.ndim == 1:
        ref = ref.reshape(-1, 1)
    if got.shape != ref.shape:
        got = got.reshape(ref.shape) if got.size == ref.size else got
    n = int(ref.shape[0])
    if got.shape != ref.shape:
        return Parity(n, None, None, None, 0.0, None, bound.describe(task), False,
                      f"output shape {got.shape} differs from scikit-learn's {ref.shape}")
    nan_mismatch = int(np.sum(np.isnan(got) != np.isnan(ref)))
    diff = np.abs(np.nan_to_num(got, nan=0.0) - np.nan_to_num(ref, nan=0.0))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(max(1.0, np.nanmax(np.abs(ref)))) if ref.size else 1.0
    rel = diff / np.maximum(1.0, np.abs(np.nan_to_num(ref, nan=0.0)))
    max_rel = float(rel.max()) if rel.size else 0.0
    tolerance = bound.max_abs_diff * (scale if task == "regression" else 1.0)

    changed: int | None = None
    allowed: int | None = None
    tied: int | None = None
    if task != "regression":
        ref_labels = _labels(reference, ref, classes)
        got_labels = _labels(candidate, got, classes)
        differ = ref_labels != got_labels
        ties = differ & _reference_ties(ref, got_labels, classes)
        tied, changed = int(np.sum(ties)), int(np.sum(differ & ~ties))
        allowed = int(np.floor(bound.max_changed_share * n))

    problems = []
    if nan_mismatch:
        problems.append(f"{nan_mismatch} values are NaN in one output and not the other")
    if max_abs > tolerance:
        problems.append(f"max |diff| {max_abs:.3g} > {tolerance:.3g}")
    if changed is not None and changed > allowed:
        problems.append(f"{changed} of {n} labels changed (allowed {allowed})")
    passed = not problems
    explanation = ("within bounds" if passed else "; ".join(problems)) + f" on {n} rows"
    if tied:
        explanation += (f" ({tied} rows where scikit-learn's probabilities tie answered with the "
                        "other tied label)")
    return Parity(n, None if nan_mismatch else max_abs, None if nan_mismatch else max_rel,
                  changed, tolerance, allowed, bound.describe(task), passed, explanation, tied)


def _reference_ties(ref: np.ndarray, got_labels: np.ndarray, classes: list | None) -> np.ndarray:
    """Rows where the candidate's label has the reference's top probability to within
    TIE_MARGIN (False where the scores have no column per class)."""
    names = [str(c) for c in (classes or range(ref.shape[1]))]
    if ref.ndim != 2 or ref.shape[1] != len(names) or ref.shape[1] < 2:
        return np.zeros(len(got_labels), dtype=bool)
    column = {name: i for i, name in enumerate(names)}
    idx = np.asarray([column.get(label, -1) for label in got_labels])
    known = idx >= 0
    at_label = np.where(known, ref[np.arange(len(idx)), np.maximum(idx, 0)], -np.inf)
    top = np.nanmax(ref, axis=1)
    return known & (top - at_label <= TIE_MARGIN)


def _labels(pred: Prediction, scores: np.ndarray, classes: list | None) -> np.ndarray:
    if pred.labels is not None:
        return np.asarray(pred.labels).astype(str).reshape(-1)
    idx = np.argmax(scores, axis=1)
    names = np.asarray([str(c) for c in (classes or range(scores.shape[1]))])
    return names[idx]


def changed_label_rows(reference: Prediction, candidate: Prediction,
                       classes: list | None = None) -> np.ndarray:
    """Row positions whose label differs (for diagnosis)."""
    ref = np.asarray(reference.scores, dtype=np.float64)
    got = np.asarray(candidate.scores, dtype=np.float64)
    return np.flatnonzero(_labels(reference, ref, classes) != _labels(candidate, got, classes))
