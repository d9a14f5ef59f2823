"""The exporter interface and the registry of formats (no Prefect, no converter imports).

One exporter per format, behind one small interface, so a new format plugs in without touching
the flow:

    class MyExporter(Exporter):
        format = "tflite"; title = "TensorFlow Lite"; device = True; suffix = ".tflite"
        def configure(self, settings: dict)             # optional: ExportSettings values
        def check(self, subject) -> Capability          # before converting: estimator, preprocessing, dtypes
        def environment(self) -> Capability              # optional: runtime prerequisites (Java, a package)
        def convert(self, subject, workdir) -> Conversion           # float32 file(s) in workdir
        def quantize(self, subject, conversion, workdir) -> Conversion | str   # optional; str = why not
        def runner(self, subject, conversion) -> Runner  # runs or evaluates the file for parity/latency
        def library_versions(self) -> dict[str, str]     # what the manifest records

The registry (`FORMATS`) names each format's class as "module:Class": ONNX, PMML, TensorFlow
Lite and Core ML, each in its own module under tasks/export/. A registered format whose module
cannot be found resolves to a `PendingExporter`, which reports every model `unsupported` with the
entry's `pending` reason, so registering a format and its module can land separately; adding
`tasks/export/<format>.py` with the named class is all it takes for `formats=[...]` and, for a
device format, `"edge"` to pick it up. Converters (skl2onnx, sklearn2pmml, the LiteRT schema,
coremltools) are imported inside the methods that need them, never at module top level, so
importing the flow stays fast.
"""
from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from tasks.errors import ConfigurationError, MlopsError
from tasks.training_search import Schema

EDGE = "edge"  # pseudo-format: every device format available, as one zip bundle


class ExportError(MlopsError, RuntimeError):
    """An export cannot be done or found: says what is missing and how to get it."""


# --------------------------------------------------------------------------- what exporters share
@dataclass
class Capability:
    """Whether an exporter can carry a model (or can run here), and why not."""

    supported: bool
    reason: str = ""

    @classmethod
    def yes(cls) -> "Capability":
        return cls(True, "")

    @classmethod
    def no(cls, reason: str) -> "Capability":
        return cls(False, reason)


@dataclass
class ExportSubject:
    """What every exporter works from: one registered version's fitted pipeline and its contract.

    `pipeline` takes the raw columns of `schema` (numeric float64, categoricals as object strings
    with NaN for missing, as `tasks.training_search.prepare_features` makes them).
    """

    model_name: str
    version: int
    pipeline: Any
    schema: Schema
    run_id: str | None = None
    family: str | None = None
    model_uri: str | None = None

    @property
    def slug(self) -> str:
        import re

        return re.sub(r"[^a-z0-9]+", "-", self.model_name.lower()).strip("-") or "model"

    @property
    def basename(self) -> str:
        """File stem of every exported file: `<model-slug>-v<version>`."""
        return f"{self.slug}-v{self.version}"

    @property
    def task(self) -> str:
        return self.schema.task

    @property
    def is_classifier(self) -> bool:
        return self.schema.task != "regression"

    @property
    def classes(self) -> list:
        """Class labels in the order of the probability columns (the estimator's `classes_`)."""
        if not self.is_classifier:
            return []
        return list(getattr(self.pipeline, "classes_", self.schema.classes))

    @property
    def estimator(self) -> Any:
        steps = getattr(self.pipeline, "steps", None)
        return steps[-1][1] if steps else self.pipeline


@dataclass
class Prediction:
    """Outputs of one model on a batch: class probabilities (n, k) in `ExportSubject.classes`
    order and labels for classifiers; predictions (n,) for regressors (labels None)."""

    scores: np.ndarray
    labels: np.ndarray | None = None


@dataclass
class Conversion:
    """What `convert` (or `quantize`) produced. `files[0]` is the model file the runner loads;
    further files (metadata, vocabularies) ship beside it in the manifest and the bundle."""

    files: list[Path]
    precision: str = "float32"  # float32 | float64 | float16 | int8: selects the parity bound
    quantization: str = "not requested"
    inputs: list[dict] = field(default_factory=list)  # the file's input contract (manifest)
    outputs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # anything else for the manifest

    @property
    def model_file(self) -> Path:
        return self.files[0]


class Runner(ABC):
    """Runs (or evaluates) an exported file on prepared raw features.

    `prepare` turns a DataFrame into the runtime's native input and is never timed; `run` is what
    latency measures. A runner without a runtime here (Core ML on Linux evaluates its spec with a
    walker) sets `measures_latency = False` and says why in `latency_note`.
    """

    runtime: str = ""
    latency_note: str = ""
    measures_latency: bool = True

    @abstractmethod
    def prepare(self, X: pd.DataFrame) -> Any: ...

    @abstractmethod
    def run(self, native: Any) -> Prediction: ...

    def predict(self, X: pd.DataFrame) -> Prediction:
        return self.run(self.prepare(X))

    def single_rows(self, X: pd.DataFrame, n: int) -> list[Any]:
        return [self.prepare(X.iloc[[i]]) for i in range(min(n, len(X)))]

    def close(self) -> None:
        """Release the runtime (sessions, JVM objects)."""


class Exporter(ABC):
    """One format. Subclasses set the class attributes and implement convert and runner."""

    format: ClassVar[str]
    title: ClassVar[str]
    device: ClassVar[bool] = False  # part of "edge"
    suffix: ClassVar[str] = ""

    def configure(self, settings: dict[str, Any]) -> None:
        """Options from the ExportSettings block (each exporter reads the keys it knows)."""

    def check(self, subject: ExportSubject) -> Capability:
        """Can this format carry the model? Decided before any file is written."""
        return Capability.yes()

    def environment(self) -> Capability:
        """Can this format be produced and verified on this machine? (e.g. Java for PMML)"""
        return Capability.yes()

    @abstractmethod
    def convert(self, subject: ExportSubject, workdir: Path) -> Conversion: ...

    def quantize(self, subject: ExportSubject, conversion: Conversion,
                 workdir: Path) -> Conversion | str:
        """A smaller variant of `conversion`, or the reason there is none (never a silent no-op)."""
        return f"not applicable: {self.title} has no quantized variant"

    @abstractmethod
    def runner(self, subject: ExportSubject, conversion: Conversion) -> Runner: ...

    def library_versions(self) -> dict[str, str]:
        return {}


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ExporterEntry:
    format: str
    title: str
    target: str  # "module:Class"
    device: bool
    pending: str  # the reason reported when the module cannot be found


FORMATS: dict[str, ExporterEntry] = {}


def register_exporter(entry: ExporterEntry) -> None:
    FORMATS[entry.format] = entry


for _entry in (
    ExporterEntry("onnx", "ONNX", "tasks.export.onnx:OnnxExporter", device=True,
                  pending="the ONNX exporter is not installed"),
    ExporterEntry("pmml", "PMML", "tasks.export.pmml:PmmlExporter", device=False,
                  pending="the PMML exporter is not installed"),
    ExporterEntry("tflite", "TensorFlow Lite", "tasks.export.tflite:TFLiteExporter", device=True,
                  pending="the TensorFlow Lite exporter is not installed"),
    ExporterEntry("coreml", "Core ML", "tasks.export.coreml:CoreMLExporter", device=True,
                  pending="the Core ML exporter is not installed"),
):
    register_exporter(_entry)


class PendingExporter(Exporter):
    """Stands in for a registered format whose module cannot be found: always unsupported."""

    def __init__(self, entry: ExporterEntry):
        self.entry = entry
        self.format = entry.format  # type: ignore[misc]
        self.title = entry.title  # type: ignore[misc]
        self.device = entry.device  # type: ignore[misc]

    def check(self, subject: ExportSubject) -> Capability:
        return Capability.no(self.entry.pending)

    def convert(self, subject: ExportSubject, workdir: Path) -> Conversion:
        raise ExportError(self.entry.pending)

    def runner(self, subject: ExportSubject, conversion: Conversion) -> Runner:
        raise ExportError(self.entry.pending)


def load_exporter(fmt: str) -> Exporter:
    """The exporter of a registered format (a PendingExporter when its module is absent)."""
    entry = FORMATS.get(fmt)
    if entry is None:
        raise ConfigurationError(f"unknown export format {fmt!r}; choose from "
                                 f"{', '.join(known_formats())}")
    module_name, _, attr = entry.target.partition(":")
    if importlib.util.find_spec(module_name) is None:
        return PendingExporter(entry)
    return getattr(importlib.import_module(module_name), attr)()


def known_formats() -> list[str]:
    return [*FORMATS, EDGE]


def device_formats() -> list[str]:
    return [f for f, e in FORMATS.items() if e.device]


@dataclass(frozen=True)
class FormatPlan:
    """Which formats to produce, in order, and whether the edge bundle is wanted."""

    formats: tuple[str, ...]
    edge: bool
    quantize: frozenset[str]  # formats for which a quantized variant is attempted


def plan_formats(formats: str | list[str] | tuple[str, ...], quantize: bool = False) -> FormatPlan:
    """Validate and expand the requested formats ("edge" = every device format, quantized where
    that is honest). Raises ConfigurationError naming the unknown ones."""
    requested = [formats] if isinstance(formats, str) else list(formats or [])
    if not requested:
        raise ConfigurationError(f"no export format given; choose from {', '.join(known_formats())}")
    names = [str(f).strip().lower() for f in requested]
    unknown = [r for r, n in zip(requested, names) if n not in FORMATS and n != EDGE]
    if unknown:
        raise ConfigurationError(f"unknown export format(s) {', '.join(map(repr, unknown))}; "
                                 f"choose from {', '.join(known_formats())}")
    ordered: list[str] = []
    edge = EDGE in names
    for name in names:
        for fmt in (device_formats() if name == EDGE else [name]):
            if fmt not in ordered:
                ordered.append(fmt)
    quantized = set(ordered) if quantize else set()
    if edge:  # an edge bundle is always quantized, where a variant keeps parity
        quantized |= set(device_formats())
    return FormatPlan(tuple(ordered), edge, frozenset(quantized))
