"""PMML export with sklearn2pmml (a Java converter), evaluated for parity with JPMML-Evaluator.

Both need Java >= 11 (`$JAVA_HOME/bin/java`, else `java` on PATH). Without it the format is
reported `failed` with the fix, and the other formats go on. Licences: sklearn2pmml and
jpmml-evaluator are AGPL-3.0 (the PMML files they produce are yours); sklearn2pmml prints a
commercial-licensing banner (captured here, not shown).

Telemetry: on a failed conversion sklearn2pmml's Java side posts an incident report (the
exception, Java and Python package versions) to telemetry.jpmml.org. Unless the ExportSettings
block allows it (`pmml_failure_reports`), the converter runs with its HTTP(S) proxy pointed at a
closed loopback port, so nothing leaves the machine. It also refuses to run 360 days after its
build (warns after 180): the reason then says to upgrade sklearn2pmml.

Evaluation runs in a JVM started once per process through py4j (`die_on_exit`), so latency
figures include the py4j round trip (an in-JVM caller is faster).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.export.base import (Capability, Conversion, ExportError, Exporter, ExportSubject,
                               Prediction, Runner)
from tasks.export.capability import CONVERTER_ESTIMATORS, check_pipeline, without_empty_branches
from tasks.export.onnx import _versions

ESTIMATORS = CONVERTER_ESTIMATORS
MIN_JAVA = 11
JAVA_FIX = ("install Java {min} or newer (e.g. `apt-get install openjdk-17-jre-headless`) or set "
            "JAVA_HOME to a Java installation; the other formats do not need it")
# C1 JIT only: on 2 cores it loads an 18 MB forest in 6 s instead of 20 s (C2 warm-up dominates)
JVM_OPTS = ["-XX:TieredStopAtLevel=1"]
NO_TELEMETRY_OPTS = ["-Dhttps.proxyHost=127.0.0.1", "-Dhttps.proxyPort=9",
                     "-Dhttp.proxyHost=127.0.0.1", "-Dhttp.proxyPort=9"]


# --------------------------------------------------------------------------- Java
def find_java() -> str | None:
    """$JAVA_HOME/bin/java when JAVA_HOME is set, else `java` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("java")


@lru_cache(maxsize=8)
def java_version(java: str) -> tuple[int, str]:
    """(major version, version line) of a java executable; (0, error) when it does not run."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return 0, f"{java} -version failed: {exc}"
    line = (out.stderr or out.stdout).strip().splitlines()[0] if (out.stderr or out.stdout) else ""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', line)
    if not match:
        return 0, line or f"{java} -version printed nothing"
    major = int(match.group(1))
    if major == 1 and match.group(2):  # 1.8 -> 8
        major = int(match.group(2))
    return major, line


def java_home_of(java: str) -> str:
    return str(Path(java).resolve().parent.parent)


class PmmlExporter(Exporter):
    format = "pmml"
    title = "PMML"
    device = False
    suffix = ".pmml"

    def __init__(self) -> None:
        self.failure_reports = False

    def configure(self, settings: dict[str, Any]) -> None:
        self.failure_reports = bool(settings.get("pmml_failure_reports", False))

    def check(self, subject: ExportSubject) -> Capability:
        return check_pipeline(subject, self.title, ESTIMATORS)

    def environment(self) -> Capability:
        import importlib.util

        missing = [m for m in ("sklearn2pmml", "jpmml_evaluator", "py4j")
                   if importlib.util.find_spec(m) is None]
        if missing:
            return Capability.no(f"{', '.join(missing)} not installed; pip install -r requirements.txt")
        java = find_java()
        fix = JAVA_FIX.format(min=MIN_JAVA)
        if java is None:
            return Capability.no("Java not found (no $JAVA_HOME/bin/java, no java on PATH): PMML "
                                 f"conversion and its parity check run on the JVM; {fix}")
        major, line = java_version(java)
        if major < MIN_JAVA:
            return Capability.no(f"{java} is not usable Java >= {MIN_JAVA} ({line}); {fix}")
        return Capability.yes()

    # ------------------------------------------------------------------ convert
    def convert(self, subject: ExportSubject, workdir: Path) -> Conversion:
        from sklearn2pmml import make_pmml_pipeline, sklearn2pmml

        java = find_java()
        if java is None:
            raise ExportError(f"Java not found; {JAVA_FIX.format(min=MIN_JAVA)}")
        # a copy (sklearn2pmml escapes steps in place) without the branches that select no
        # column: their steps were never fitted and the converter would refuse them
        pipeline = without_empty_branches(subject.pipeline)
        pre = pipeline.steps[0][1] if len(pipeline.steps) > 1 else None
        columns = [str(c) for c in getattr(pre, "feature_names_in_", subject.schema.columns)]
        wrapped = make_pmml_pipeline(pipeline, active_fields=columns,
                                     target_fields=[subject.schema.target])
        path = workdir / f"{subject.basename}{self.suffix}"
        captured = io.StringIO()
        try:
            with contextlib.redirect_stdout(captured):
                sklearn2pmml(wrapped, str(path), java_home=java_home_of(java),
                             java_opts=JVM_OPTS + ([] if self.failure_reports else NO_TELEMETRY_OPTS))
        except Exception as exc:
            raise ExportError(f"sklearn2pmml failed: {converter_error(captured.getvalue(), exc)}") from exc
        if not path.is_file() or path.stat().st_size == 0:
            raise ExportError(f"sklearn2pmml wrote no file: {converter_error(captured.getvalue(), None)}")
        inputs = data_dictionary(path, columns)
        notes = [line.strip() for line in captured.getvalue().splitlines()
                 if "WARNING" in line and "older than" in line]
        return Conversion(files=[path], precision="float64", inputs=inputs,
                          outputs=_pmml_outputs(subject), notes=notes,
                          details={"java": java_version(java)[1]})

    def runner(self, subject: ExportSubject, conversion: Conversion) -> Runner:
        return PmmlRunner(conversion.model_file, subject)

    def library_versions(self) -> dict[str, str]:
        found = _versions("sklearn2pmml", "jpmml_evaluator", "py4j")
        java = find_java()
        if java:
            found["java"] = java_version(java)[1]
        return found


def converter_error(output: str, exc: Exception | None) -> str:
    """The Java converter's own words: its SEVERE lines and the exception it names."""
    lines = [l.strip() for l in output.splitlines() if l.strip()]
    picked = [l for l in lines if l.startswith("SEVERE") or re.search(r"(Exception|Error)\b.*:", l)]
    text = " | ".join(dict.fromkeys(picked))[:600] or (str(exc) if exc else "no output")
    if "expired" in text or "must be updated" in text:
        text += (" -- sklearn2pmml refuses to run 360 days after its build: upgrade sklearn2pmml "
                 "(and check the scikit-learn version it supports)")
    return text


def data_dictionary(path: Path, columns: list[str]) -> list[dict]:
    """Input fields of a PMML file (name, dataType, optype), read from its DataDictionary."""
    import xml.etree.ElementTree as ET

    fields: list[dict] = []
    for _event, elem in ET.iterparse(str(path), events=("end",)):
        tag = elem.tag.rsplit("}", 1)[-1]
        if tag == "DataField" and elem.get("name") in columns:
            fields.append({"name": elem.get("name"), "type": elem.get("dataType"),
                           "optype": elem.get("optype"), "missing": "absent or empty"})
        if tag == "DataDictionary":
            break
    return fields


def _pmml_outputs(subject: ExportSubject) -> list[dict]:
    target = subject.schema.target
    if not subject.is_classifier:
        return [{"name": target, "type": "double"}]
    return ([{"name": target, "type": "label"}] +
            [{"name": f"probability({c})", "type": "double"} for c in subject.classes])


# --------------------------------------------------------------------------- evaluation
_BACKENDS: dict[str, Any] = {}


def jvm_backend(java: str):
    """One py4j JVM per java executable and process (it dies with the process)."""
    backend = _BACKENDS.get(java)
    if backend is None:
        from jpmml_evaluator import _classpath
        from jpmml_evaluator.py4j import Py4JBackend
        from py4j.java_gateway import JavaGateway

        gateway = JavaGateway.launch_gateway(classpath=os.pathsep.join(_classpath([])),
                                             java_path=java, javaopts=list(JVM_OPTS),
                                             die_on_exit=True)
        backend = _BACKENDS[java] = Py4JBackend(gateway)
    return backend


class PmmlRunner(Runner):
    def __init__(self, path: Path, subject: ExportSubject):
        from jpmml_evaluator import make_evaluator

        java = find_java()
        if java is None:
            raise ExportError(f"Java not found; {JAVA_FIX.format(min=MIN_JAVA)}")
        self.backend = jvm_backend(java)
        try:
            self.evaluator = make_evaluator(str(path), backend=self.backend).verify()
        except Exception as exc:
            raise ExportError(f"JPMML-Evaluator could not load the PMML file: {exc}") from exc
        self.columns = [f["name"] for f in data_dictionary(path, subject.schema.columns)] or \
            subject.schema.columns
        self.numeric = set(subject.schema.numeric)
        self.target = subject.schema.target
        self.classes = subject.classes
        self.classifier = subject.is_classifier
        self.runtime = f"JPMML-Evaluator {_versions('jpmml_evaluator').get('jpmml_evaluator', '')} " \
                       f"on {java_version(java)[1]}"
        self.latency_note = "through the py4j bridge to a local JVM (an in-JVM caller is faster)"

    def prepare(self, X: pd.DataFrame) -> pd.DataFrame:
        frame = pd.DataFrame(index=X.index)
        for c in self.columns:
            col = X[c]
            frame[c] = (col.astype("float64") if c in self.numeric
                        else col.astype(object).where(col.notna(), None))
        return frame

    def single_rows(self, X: pd.DataFrame, n: int) -> list[Any]:
        rows = []
        for i in range(min(n, len(X))):
            row = {}
            for c in self.columns:
                v = X[c].iloc[i]
                row[c] = None if pd.isna(v) else (float(v) if c in self.numeric else str(v))
            rows.append(row)
        return rows

    def run(self, native: Any) -> Prediction:
        if isinstance(native, dict):
            results = pd.DataFrame([self.evaluator.evaluate(native)])
        else:
            results = self.evaluator.evaluateAll(native)
            errors = results["errors"] if "errors" in results else None
            if errors is not None and errors.notna().any():
                bad = errors[errors.notna()]
                raise ExportError(f"JPMML-Evaluator rejected {len(bad)} of {len(results)} rows, "
                                  f"e.g. {bad.iloc[0]}")
        if not self.classifier:
            return Prediction(scores=results[self.target].to_numpy(dtype=np.float64))
        cols = [f"probability({c})" for c in self.classes]
        missing = [c for c in cols if c not in results]
        if missing:
            raise ExportError(f"the PMML file has no output {missing[0]!r}; outputs: "
                              f"{list(results.columns)}")
        labels = results[self.target].to_numpy() if self.target in results else None
        return Prediction(scores=results[cols].to_numpy(dtype=np.float64), labels=labels)

    def close(self) -> None:
        try:
            self.backend.gateway.detach(self.evaluator.javaEvaluator)
        except Exception:  # the JVM may be gone already; nothing to release then
            pass
