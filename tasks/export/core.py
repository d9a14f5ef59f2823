"""Exporting one format end to end, without Prefect: capability check → environment → convert →
parity gate → (quantize → gate) → latency. One format failing never raises: it comes back as a
`failed` or `unsupported` result with the reason. The flow and bench/export.py both use this."""
from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.export.base import Conversion, Exporter, ExportSubject, Prediction, Runner, load_exporter
from tasks.export.latency import Latency, measure
from tasks.export.parity import Parity, bound_for, compare
from tasks.export.report import ExportedFile, ExportResult

LATENCY_ROWS = 200
LATENCY_BUDGET_S = 3.0


@dataclass
class Reference:
    """scikit-learn on the parity sample: predictions, and latency on the same rows."""

    prediction: Prediction
    latency: Latency | None
    n_rows: int


@dataclass
class FormatOutcome:
    result: ExportResult
    conversion: Conversion | None = None
    parity: Parity | None = None
    latency: Latency | None = None
    library_versions: dict[str, str] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sklearn_predict(subject: ExportSubject, X: pd.DataFrame) -> Prediction:
    pipeline = subject.pipeline
    if subject.is_classifier:
        return Prediction(scores=np.asarray(pipeline.predict_proba(X)),
                          labels=np.asarray(pipeline.predict(X)))
    return Prediction(scores=np.asarray(pipeline.predict(X), dtype=np.float64).reshape(-1))


def sklearn_reference(subject: ExportSubject, sample: pd.DataFrame, latency_rows: int = LATENCY_ROWS,
                      with_latency: bool = True) -> Reference:
    """Reference outputs, and scikit-learn's own single-row and batch latency on the same rows
    (predict_proba for classifiers, predict for regressors: what the exported files compute)."""
    prediction = sklearn_predict(subject, sample)
    latency = None
    if with_latency:
        call = subject.pipeline.predict_proba if subject.is_classifier else subject.pipeline.predict
        rows = [sample.iloc[[i]] for i in range(min(latency_rows, len(sample)))]
        latency = measure(call, rows, sample, len(sample), budget_s=LATENCY_BUDGET_S)
    return Reference(prediction, latency, len(sample))


def export_format(fmt: str, subject: ExportSubject, sample: pd.DataFrame, reference: Reference,
                  workdir: Path, quantize: bool = False, settings: dict[str, Any] | None = None,
                  latency_rows: int = LATENCY_ROWS, exporter: Exporter | None = None) -> FormatOutcome:
    """Export `subject` to `fmt` under `workdir/<fmt>/`; the folder then holds exactly the
    published files (a file failing its gate is moved to `workdir/rejected/`)."""
    started = time.monotonic()
    exporter = exporter or load_exporter(fmt)
    exporter.configure(settings or {})
    result = ExportResult(format=fmt, status="unsupported", title=exporter.title,
                          quantization="requested" if quantize else "not requested")
    outcome = FormatOutcome(result)

    def done(status: str, reason: str = "") -> FormatOutcome:
        result.status, result.reason = status, reason  # type: ignore[assignment]
        result.duration_s = round(time.monotonic() - started, 3)
        return outcome

    capability = exporter.check(subject)
    if not capability.supported:
        if quantize:
            result.quantization = "not applicable: format unsupported for this model"
        return done("unsupported", capability.reason)
    environment = exporter.environment()
    if not environment.supported:
        return done("failed", environment.reason)
    outcome.library_versions = exporter.library_versions()

    fmt_dir = workdir / fmt
    shutil.rmtree(fmt_dir, ignore_errors=True)
    fmt_dir.mkdir(parents=True, exist_ok=True)
    try:
        conversion = exporter.convert(subject, fmt_dir)
    except Exception as exc:  # a converter's failure is this format's result, not the flow's
        return done("failed", f"conversion failed: {_message(exc)}")

    runners: list[Runner] = []
    try:
        try:
            runner, parity = _gate(exporter, subject, conversion, sample, reference, runners)
        except Exception as exc:
            return done("failed", f"the exported file does not run: {_message(exc)}")
        if not parity.passed:
            result.rejected_path = str(_reject(conversion, workdir))
            _fill_parity(result, conversion, parity)
            outcome.conversion, outcome.parity = conversion, parity
            return done("failed", f"parity gate failed: {parity.explanation} "
                                  f"(bound {parity.bound}); not published")
        chosen = conversion
        if quantize:
            chosen, runner, parity = _quantized(exporter, subject, conversion, sample, reference,
                                                runner, parity, fmt_dir, workdir, runners, result)
        _fill_parity(result, chosen, parity)
        outcome.conversion, outcome.parity = chosen, parity
        result.runtime = runner.runtime
        result.latency_note = runner.latency_note
        if runner.measures_latency:
            try:
                outcome.latency = measure(runner.run, runner.single_rows(sample, latency_rows),
                                          runner.prepare(sample), len(sample),
                                          budget_s=LATENCY_BUDGET_S)
            except Exception as exc:  # latency is informative; the file passed its gate
                result.notes.append(f"latency not measured: {_message(exc)}")
        _fill_latency(result, outcome.latency, reference.latency)
    finally:
        for r in runners:
            r.close()

    result.files = [ExportedFile(name=p.name, path=f"{fmt}/{p.name}", sha256=sha256_file(p),
                                 size_bytes=p.stat().st_size) for p in chosen.files]
    result.path = str(chosen.model_file)
    result.size_bytes = result.files[0].size_bytes
    result.sha256 = result.files[0].sha256
    result.notes.extend(chosen.notes)
    return done("ok", "")


def _gate(exporter: Exporter, subject: ExportSubject, conversion: Conversion, sample: pd.DataFrame,
          reference: Reference, runners: list[Runner]) -> tuple[Runner, Parity]:
    runner = exporter.runner(subject, conversion)
    runners.append(runner)
    got = runner.predict(sample)
    parity = compare(subject.task, reference.prediction, got, bound_for(conversion.precision),
                     subject.classes)
    return runner, parity


def _quantized(exporter, subject, conversion, sample, reference, runner, parity, fmt_dir, workdir,
               runners, result) -> tuple[Conversion, Runner, Parity]:
    """Try the exporter's quantized variant; keep it only when it passes its own bound."""
    try:
        q = exporter.quantize(subject, conversion, fmt_dir)
    except Exception as exc:
        result.quantization = f"failed: {_message(exc)}; float32 published"
        return conversion, runner, parity
    if isinstance(q, str):
        result.quantization = q
        return conversion, runner, parity
    try:
        q_runner, q_parity = _gate(exporter, subject, q, sample, reference, runners)
    except Exception as exc:
        _reject(q, workdir)
        result.quantization = f"{q.quantization} refused: the file does not run ({_message(exc)}); " \
                              f"{conversion.precision} published"
        return conversion, runner, parity
    if not q_parity.passed:
        _reject(q, workdir)
        result.quantization = (f"{q.quantization} refused: {q_parity.explanation} (bound "
                               f"{q_parity.bound}); {conversion.precision} published")
        return conversion, runner, parity
    for path in conversion.files:  # the quantized file replaces the float one
        if path not in q.files:
            path.unlink(missing_ok=True)
    q.quantization = f"{q.quantization}; {q_parity.explanation} (bound {q_parity.bound})"
    result.quantization = q.quantization
    return q, q_runner, q_parity


def _reject(conversion: Conversion, workdir: Path) -> Path:
    target = workdir / "rejected"
    target.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in conversion.files:
        if path.exists():
            dest = target / path.name
            shutil.move(str(path), dest)
            moved.append(dest)
    return moved[0] if moved else target


def _fill_parity(result: ExportResult, conversion: Conversion, parity: Parity) -> None:
    result.precision = conversion.precision
    result.max_abs_diff = parity.max_abs_diff
    result.max_rel_diff = parity.max_rel_diff
    result.changed_labels = parity.changed_labels
    result.parity_rows = parity.n_rows
    result.parity_bound = parity.bound


def _fill_latency(result: ExportResult, mine: Latency | None, sklearn: Latency | None) -> None:
    if sklearn is not None:
        result.sklearn_p50_us = round(sklearn.p50_us, 1)
        result.sklearn_p99_us = round(sklearn.p99_us, 1)
        result.sklearn_rows_per_s = round(sklearn.rows_per_s or 0.0, 1)
    if mine is not None:
        result.latency_p50_us = round(mine.p50_us, 1)
        result.latency_p99_us = round(mine.p99_us, 1)
        result.rows_per_s = round(mine.rows_per_s or 0.0, 1)
        if sklearn is not None and mine.p50_us > 0:
            result.speedup_p50 = round(sklearn.p50_us / mine.p50_us, 1)


def _message(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 800 else text[:800] + " …"
