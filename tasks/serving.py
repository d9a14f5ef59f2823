"""Online serving: the versions a service answers with, kept warm, and the check of request rows.

No Prefect and no `api/` import: the REST service (api/predict.py, api/v2.py) holds one
`ServingCache` per worker process.

A version answers from its published ONNX export (`export_model(..., formats=["onnx"])`, made
once per version by the export flow or the deployment trigger on alias moves) through one warm
onnxruntime session; until that export exists, or when the family cannot export, the MLflow model
(the fitted scikit-learn pipeline) answers. `LoadedVersion.backend` says which.

Rows arrive as JSON records. They are checked column by column against the version's stored
schema, without building a model object per row: a missing column or a wrong type is an
`InputError` naming `rows[i].column`; extra columns are ignored; an unknown category behaves as
in training (its one-hot is all zero).

Hot reload: `ServingCache.refresh()` reads each served model's aliases from MLflow and its active
A/B test from the A/B store (two small reads per model), loads what changed, then swaps the
model's `Route` in one assignment, so a request sees the old route or the new one, never a half.
A background thread calls it every `poll_seconds`.
"""
from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tasks.errors import DataError, MlopsError, ModelNotFoundError

logger = logging.getLogger("api.serving")

ONNX = "onnx"
MLFLOW = "mlflow"


class InputError(DataError):
    """A request row the model cannot read; `field` names the input (e.g. `rows[2].age`)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class NoChampionError(MlopsError, LookupError):
    """A registered model without a champion: nothing to serve."""


# --------------------------------------------------------------------------- input checks
def check_rows(rows: Any, numeric: Sequence[str], categorical: Sequence[str],
               max_rows: int) -> dict[str, list]:
    """The request's rows as one list per model column (numeric: float or NaN; categorical: str
    or None), checked against the schema. Raises InputError naming the row and column."""
    if not isinstance(rows, list) or not rows:
        raise InputError("rows must be a non-empty list of records ({column: value})", "rows")
    if len(rows) > max_rows:
        raise RowLimitError(f"rows has {len(rows)} records; the limit per request is {max_rows} "
                            "(split the batch, or score files with score_batch)")
    columns: dict[str, list] = {c: [None] * len(rows) for c in (*numeric, *categorical)}
    for i, row in enumerate(rows):
        if type(row) is not dict:
            raise InputError(f"rows[{i}] must be a record {{column: value}}, got "
                             f"{type(row).__name__}", f"rows[{i}]")
        for c in numeric:
            try:
                v = row[c]
            except KeyError:
                raise _lacks(i, c, numeric, categorical) from None
            t = type(v)
            if t is float or t is int:
                columns[c][i] = v
            elif v is None:
                columns[c][i] = math.nan
            elif t is bool:
                columns[c][i] = float(v)
            else:
                raise InputError(f"rows[{i}].{c} must be a number or null (numeric at "
                                 f"training), got {t.__name__} {_short(v)}", f"rows[{i}].{c}")
        for c in categorical:
            try:
                v = row[c]
            except KeyError:
                raise _lacks(i, c, numeric, categorical) from None
            t = type(v)
            if t is str or v is None:
                columns[c][i] = v
            elif t is int or t is float or t is bool:
                columns[c][i] = str(v)  # as in training: categories are compared as text
            else:
                raise InputError(f"rows[{i}].{c} must be a string, a number or null "
                                 f"(categorical), got {t.__name__}", f"rows[{i}].{c}")
    return columns


def _lacks(i: int, column: str, numeric: Sequence[str], categorical: Sequence[str]) -> InputError:
    return InputError(f"rows[{i}] lacks column {column!r} (the model needs: "
                      f"{', '.join([*numeric, *categorical])})", f"rows[{i}].{column}")


class RowLimitError(InputError):
    """More rows in one request than the service accepts (answered 413)."""


def check_ids(ids: Any, n_rows: int, required: bool) -> list[str] | None:
    """Entity ids as routing keys (str), one per row; None when absent and not required."""
    if ids is None:
        if required:
            raise InputError("ids are required while an A/B test of this model is active (one "
                             "entity id per row, so the same entity always gets the same arm)",
                             "ids")
        return None
    if not isinstance(ids, list) or len(ids) != n_rows:
        raise InputError(f"ids must be a list with one id per row ({n_rows}), got "
                         f"{len(ids) if isinstance(ids, list) else type(ids).__name__}", "ids")
    keys = []
    for i, k in enumerate(ids):
        t = type(k)
        if t is str:
            if not k.strip() or len(k) > 200:
                raise InputError(f"ids[{i}] must be a non-empty string of at most 200 "
                                 "characters", f"ids[{i}]")
            keys.append(k)
        elif t is int:
            keys.append(str(k))
        else:
            raise InputError(f"ids[{i}] must be a string or an integer (routing formats ids as "
                             f"text), got {t.__name__} {_short(k)}", f"ids[{i}]")
    return keys


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------- answers
@dataclass
class Answer:
    """Predictions of one batch: labels (or values), probabilities [N, n_classes] or None."""

    predictions: list
    probabilities: np.ndarray | None
    classes: list

    def scores(self) -> list[float | None]:
        """The number logged per row for A/B tests (as score_batch): P(class 1) for binary,
        the top probability for multiclass, the value for regression."""
        if self.probabilities is None:
            return [float(p) for p in self.predictions]
        p = self.probabilities
        return (p[:, 1] if p.shape[1] == 2 else p.max(axis=1)).astype(float).tolist()


class OnnxSession:
    """One warm onnxruntime session of a version's ONNX export (single thread: request latency)."""

    def __init__(self, path: Path, manifest: dict):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        entry = manifest["formats"][ONNX]
        self.inputs = [(i["name"], i["column"], i["type"] == "float32") for i in entry["inputs"]]
        outputs = manifest.get("outputs", {})
        self.classifier = outputs.get("task") != "regression"
        self.classes = list(outputs.get("classes", []))
        self.runtime = f"onnxruntime {ort.__version__}"

    def predict(self, columns: dict[str, list]) -> Answer:
        feeds = {}
        for name, column, numeric in self.inputs:
            values = columns[column]
            if numeric:
                feeds[name] = np.asarray(values, dtype=np.float32).reshape(-1, 1)
            else:  # the ONNX input contract spells a missing category ""
                feeds[name] = np.asarray([("" if v is None else v) for v in values],
                                         dtype=object).reshape(-1, 1)
        out = self.session.run(None, feeds)
        if self.classifier:
            proba = np.asarray(out[1], dtype=np.float64)
            return Answer([self.classes[j] for j in proba.argmax(axis=1)], proba, self.classes)
        return Answer(np.asarray(out[0], dtype=np.float64).reshape(-1).tolist(), None, [])


class PipelineModel:
    """The MLflow model (fitted scikit-learn pipeline) of a version: the fallback answer."""

    def __init__(self, pipeline: Any, schema: Any):
        self.pipeline, self.schema = pipeline, schema
        self.classifier = schema.task != "regression"
        self.classes = list(getattr(pipeline, "classes_", [])) if self.classifier else []
        self.classes = [c.item() if hasattr(c, "item") else c for c in self.classes]

    def predict(self, columns: dict[str, list]) -> Answer:
        import pandas as pd

        frame = pd.DataFrame({c: columns[c] for c in self.schema.columns})
        for c in self.schema.numeric:
            frame[c] = frame[c].astype("float64")
        for c in self.schema.categorical:
            frame[c] = frame[c].astype(object)
        if not self.classifier:
            return Answer(np.asarray(self.pipeline.predict(frame), float).tolist(), None, [])
        proba = np.asarray(self.pipeline.predict_proba(frame), dtype=np.float64)
        return Answer([self.classes[j] for j in proba.argmax(axis=1)], proba, self.classes)


@dataclass
class LoadedVersion:
    """A version ready to answer: its schema, its runner and which backend it is."""

    model_name: str
    version: int
    numeric: list[str]
    categorical: list[str]
    task: str
    classes: list
    backend: str  # "onnx" or "mlflow"
    runner: Any
    reason: str = ""  # why the MLflow model answers (no export yet, family cannot export)
    loaded_at: float = field(default_factory=time.time)

    @property
    def columns(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    def predict(self, columns: dict[str, list]) -> Answer:
        return self.runner.predict(columns)


def load_version(model_name: str, version: int, onnx_dir: Path | None = None) -> LoadedVersion:
    """A version with its ONNX export when one is published (one onnxruntime session), else its
    MLflow model. Reads only: never exports."""
    from tasks.ab_tasks import load_scorer
    from tasks.export.steps import read_manifest
    from tasks.registry import mlflow_client, resolve_version

    client = mlflow_client()
    mv = resolve_version(client, model_name, version)
    n = int(mv.version)
    manifest = read_manifest(mv.run_id) if mv.run_id else None
    entry = (manifest or {}).get("formats", {}).get(ONNX)
    if entry is not None and entry.get("status") == "ok":
        path = _download_onnx(model_name, n, onnx_dir)
        session = OnnxSession(Path(path), manifest)
        cols = manifest["input_schema"]["columns"]
        return LoadedVersion(
            model_name, n, [c["name"] for c in cols if c["kind"] == "numeric"],
            [c["name"] for c in cols if c["kind"] == "categorical"],
            manifest["outputs"].get("task", "regression"), session.classes, ONNX, session)
    reason = ("no ONNX export published yet (export_model or the export-model deployment "
              "makes it)" if entry is None else
              f"the ONNX export is {entry.get('status')}: {entry.get('reason')}")
    scorer = load_scorer(model_name, n)
    runner = PipelineModel(scorer.model, scorer.schema)
    return LoadedVersion(model_name, n, list(scorer.schema.numeric),
                         list(scorer.schema.categorical), scorer.schema.task, runner.classes,
                         MLFLOW, runner, reason)


def _download_onnx(model_name: str, version: int, onnx_dir: Path | None) -> str:
    from tasks.export.steps import fetch_export

    # a folder per process: two workers loading the same version never write one file together
    target = Path(tempfile.mkdtemp(prefix=f"serving-v{version}-", dir=onnx_dir))
    return fetch_export(model_name, version, ONNX, target)


def export_published(model_name: str, version: int) -> bool:
    """Whether the version has an ONNX export now (one artifact listing)."""
    from tasks.export.steps import EXPORTS
    from tasks.export.manifest import MANIFEST_NAME
    from tasks.registry import mlflow_client, resolve_version

    client = mlflow_client()
    mv = resolve_version(client, model_name, version)
    names = {a.path for a in client.list_artifacts(mv.run_id, f"{EXPORTS}/{ONNX}")} \
        if mv.run_id else set()
    if not names:
        return False
    listed = {a.path for a in client.list_artifacts(mv.run_id, EXPORTS)}
    return f"{EXPORTS}/{MANIFEST_NAME}" in listed


# --------------------------------------------------------------------------- routes
@dataclass(frozen=True)
class ABArms:
    """The active test of a model as the hot path needs it."""

    test: Any  # tasks.ab.TestRecord
    champion: LoadedVersion
    challenger: LoadedVersion


@dataclass(frozen=True)
class Route:
    """What answers a model's requests now: the champion, and the arms of an active test."""

    model_name: str
    champion: LoadedVersion
    ab: ABArms | None = None

    @cached_property
    def columns(self) -> tuple[list[str], list[str]]:
        """(numeric, categorical) columns every version of the route needs."""
        return columns_for(self)

    def versions(self) -> list[LoadedVersion]:
        found = [self.champion]
        if self.ab is not None:
            found += [self.ab.champion, self.ab.challenger]
        return found


@dataclass(frozen=True)
class Wanted:
    """What the registry and the A/B store say a model should serve."""

    champion: int
    test: Any = None


class ServingCache:
    """The routes of the models this process serves, their loaded versions, and the refresh that
    follows alias moves and A/B tests.

    `read_wanted(model_name)` tells what a model should serve now (the registry's champion and
    the A/B store's active test); it is the only I/O of a refresh when nothing changed.
    """

    def __init__(self, read_wanted: Callable[[str], Wanted],
                 loader: Callable[[str, int], LoadedVersion] = load_version,
                 has_export: Callable[[str, int], bool] = export_published,
                 poll_seconds: float = 1.0, keep_versions: int = 8):
        self.read_wanted, self.loader, self.has_export = read_wanted, loader, has_export
        self.poll_seconds = poll_seconds
        self.keep_versions = keep_versions
        self.routes: dict[str, Route] = {}
        self._versions: dict[tuple[str, int], LoadedVersion] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = False
        self.last_refresh_s: float | None = None
        self.refresh_errors = 0

    # ---------------------------------------------------------------- reads
    def route(self, model_name: str) -> Route:
        """The model's route, loading it on first use (a model registered after start)."""
        route = self.routes.get(model_name)
        if route is not None:
            return route
        with self._lock:
            route = self.routes.get(model_name)
            if route is None:
                route = self._build(model_name, self.read_wanted(model_name))
                self.routes[model_name] = route
        return route

    def version(self, model_name: str, version: int) -> LoadedVersion:
        """A specific version (V2 `/versions/{v}`), loaded once and kept."""
        return self._version(model_name, int(version))

    # ---------------------------------------------------------------- loading
    def _version(self, model_name: str, version: int) -> LoadedVersion:
        key = (model_name, version)
        loaded = self._versions.get(key)
        if loaded is None:
            with self._lock:
                loaded = self._versions.get(key)
                if loaded is None:
                    loaded = self.loader(model_name, version)
                    logger.info("serving %s v%d from %s%s", model_name, version, loaded.backend,
                                f" ({loaded.reason})" if loaded.reason else "")
                    self._versions[key] = loaded
        return loaded

    def _build(self, model_name: str, wanted: Wanted) -> Route:
        champion = self._version(model_name, wanted.champion)
        ab = None
        if wanted.test is not None:
            t = wanted.test
            ab = ABArms(t, self._version(model_name, t.champion_version),
                        self._version(model_name, t.challenger_version))
        return Route(model_name, champion, ab)

    def warm(self, model_names: list[str]) -> None:
        """Load the routes of these models (the champions at start); `ready` once done."""
        for name in model_names:
            try:
                self.route(name)
            except NoChampionError:
                continue
        self.ready = True

    # ---------------------------------------------------------------- refresh
    def refresh(self) -> list[str]:
        """Re-read what every served model should serve; load what changed (and ONNX exports
        that appeared for versions the MLflow model answers), then swap routes. Returns the
        models whose route changed."""
        changed = []
        for name in list(self.routes):
            current = self.routes[name]
            try:
                wanted = self.read_wanted(name)
                upgraded = self._upgrade_exports(current)
                same_test = (current.ab is None and wanted.test is None) or (
                    current.ab is not None and wanted.test is not None
                    and current.ab.test.test_id == wanted.test.test_id)
                if wanted.champion == current.champion.version and same_test and not upgraded:
                    continue
                route = self._build(name, wanted)
            except Exception as exc:  # keep serving what is loaded; the log says why
                self.refresh_errors += 1
                logger.warning("could not refresh %s (still serving v%d): %s: %s", name,
                               current.champion.version, type(exc).__name__, exc)
                continue
            self.routes[name] = route
            changed.append(name)
            logger.info("%s now served by v%d (%s)%s", name, route.champion.version,
                        route.champion.backend,
                        f", A/B test {route.ab.test.test_id}" if route.ab else "")
        self._forget_unused()
        self.last_refresh_s = time.time()
        return changed

    def _upgrade_exports(self, route: Route) -> bool:
        """Replace versions the MLflow model answers by their ONNX export once it exists."""
        upgraded = False
        for loaded in {id(v): v for v in route.versions()}.values():
            if loaded.backend == ONNX or not self.has_export(loaded.model_name, loaded.version):
                continue
            fresh = self.loader(loaded.model_name, loaded.version)
            if fresh.backend == ONNX:
                with self._lock:
                    self._versions[(loaded.model_name, loaded.version)] = fresh
                upgraded = True
        return upgraded

    def _forget_unused(self) -> None:
        with self._lock:
            used = {(v.model_name, v.version) for r in self.routes.values() for v in r.versions()}
            extra = [k for k in self._versions if k not in used]
            for key in extra[:max(0, len(self._versions) - self.keep_versions)]:
                del self._versions[key]

    def start(self, initial: Callable[[], list[str]] | None = None) -> None:
        """Warm the models `initial()` names, then refresh every `poll_seconds` (a daemon
        thread, stopped by `stop()`)."""

        def loop():
            try:
                self.warm(initial() if initial else [])
            except Exception:
                logger.exception("could not load the champions at start; the service stays "
                                 "not ready and retries")
                self._stop.wait(self.poll_seconds)
                if not self._stop.is_set():
                    return loop()
            while not self._stop.wait(self.poll_seconds):
                self.refresh()

        self._thread = threading.Thread(target=loop, name="serving-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


# --------------------------------------------------------------------------- the registry side
def champion_models() -> list[str]:
    """Registered models that have a champion (the service loads them at start)."""
    from tasks.registry import mlflow_client

    client = mlflow_client()
    return sorted(m.name for m in client.search_registered_models(max_results=1000)
                  if "champion" in (m.aliases or {}))


def wanted_reader(store_url: str | None = None) -> Callable[[str], Wanted]:
    """`read_wanted` over MLflow (the champion alias) and the A/B store (the active test)."""
    from mlflow.exceptions import MlflowException

    from tasks.ab import open_store
    from tasks.registry import mlflow_client

    client = mlflow_client()
    store = open_store(store_url)

    def read(model_name: str) -> Wanted:
        try:
            model = client.get_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise ModelNotFoundError(f"no registered model {model_name!r}; register or train "
                                         "it first (GET /api/v1/mlops/models/{name}/versions "
                                         "lists versions)") from None
            raise
        champion = (model.aliases or {}).get("champion")
        if champion is None:
            raise NoChampionError(f"model {model_name!r} has no champion; promote a version "
                                  "(POST /api/v1/mlops/models/promote) before serving it")
        return Wanted(int(champion), store.active_test(model_name))

    return read


# --------------------------------------------------------------------------- answering
@dataclass
class Part:
    """The rows of one request one version answered."""

    arm: str
    loaded: LoadedVersion
    rows: np.ndarray | None  # positions in the request; None: every row
    answer: Answer
    seconds: float


def answer_rows(route: Route, columns: dict[str, list], keys: list[str] | None) -> list[Part]:
    """Route the rows (an active test: the sticky hash of score_batch on each id) and let each
    arm's version answer its rows."""
    if route.ab is None:
        return [_part("champion", route.champion, columns, None)]
    from tasks.routing import hash_unit, is_challenger

    test = route.ab.test
    if len(keys) <= 8:  # the same hash; numpy's set-up costs more than a few keys
        split = test.traffic_split
        challenger = np.array([hash_unit(test.seed, k) < split for k in keys])
    else:
        challenger = is_challenger(test.seed, keys, test.traffic_split)
    parts = []
    for arm, loaded, mask in (("champion", route.ab.champion, ~challenger),
                              ("challenger", route.ab.challenger, challenger)):
        if mask.all():
            parts.append(_part(arm, loaded, columns, None))
        elif mask.any():
            rows = np.flatnonzero(mask)
            subset = {c: [v[i] for i in rows] for c, v in columns.items()}
            parts.append(_part(arm, loaded, subset, rows))
    return parts


def _part(arm: str, loaded: LoadedVersion, columns: dict[str, list], rows) -> Part:
    began = time.perf_counter()
    answer = loaded.predict(columns)
    return Part(arm, loaded, rows, answer, time.perf_counter() - began)


def columns_for(route: Route) -> tuple[list[str], list[str]]:
    """The columns every version of the route needs (numeric, categorical): rows are checked
    against all of them before any version answers."""
    numeric: dict[str, None] = {}
    categorical: dict[str, None] = {}
    for v in route.versions():
        numeric.update(dict.fromkeys(v.numeric))
        categorical.update(dict.fromkeys(v.categorical))
    clash = set(numeric) & set(categorical)
    for c in clash:  # numeric in one arm, categorical in the other: text covers both
        del numeric[c]
    return list(numeric), list(categorical)
