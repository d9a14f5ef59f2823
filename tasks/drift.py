"""Drift and production-monitoring tasks: read a version's stored reference, compare a batch with
it, record the check in MLflow, draw the most drifted features, publish to the Prefect UI.

The statistics are in :mod:`tasks.drift_metrics` (pure); this module does the I/O around them.

Where a version's reference lives
---------------------------------
``train_model`` stores, in the version's run under ``mlops/``: ``profile.json`` (the drift
profile of the training rows), ``feature_importances.json``, ``schema.json`` and
``holdout.parquet``. ``profile_model`` creates a profile for an older version in a run of its own
and points the version's tag ``mlops.profile_run_id`` at it; that tag wins over the training run.
A drift check reads only these -- never the training data.

The model drift score
---------------------
``score = sum_i w_i [feature i drifted] / sum_i w_i`` with ``w_i`` the permutation importance of
feature ``i`` stored with the version (features the model ignores weigh 0), or equal weights when
the version has no importances (``weighting="equal"``). A feature drifts when its test rejects
"same distribution" at ``feature_alpha`` (KS for numeric features, chi-squared for categorical
ones; both account for the two sample sizes) *and* its effect reaches the policy's minimum
(``min_effect_numeric`` reference standard deviations of Wasserstein distance,
``min_effect_categorical`` of Jensen-Shannon distance), so that a tiny but significant shift of a
huge batch does not count. ``drifted = score > drift_threshold`` (0.3 by default).
"""
from __future__ import annotations

import functools
import io
import json
import math
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from blocks.mlflow_config import MLflowConfig, resolve_mlflow_config
from blocks.monitoring import MonitoringPolicy
from tasks.data import READABLE, LoadedData, load_table, s3_bucket_for
from tasks.drift_metrics import (DriftInputError, FeatureStats, build_profile, compare_to_profile,
                                 model_drift_score)
from tasks.errors import DataError, MlopsError
from tasks.mlflow_links import artifact_link, inline_image, run_link
from tasks.registry import mlflow_client, model_slug, resolve_version

PROFILE_NAME = "profile.json"
IMPORTANCES_NAME = "feature_importances.json"
SCHEMA_NAME = "schema.json"
PROFILE_RUN_TAG = "mlops.profile_run_id"  # set on a model version by profile_model
MAX_PLOTTED_FEATURES = 4
IMPORTANCE_ROWS = 600  # labelled rows profile_model uses for permutation importances


class ProfileNotFoundError(MlopsError, LookupError):
    """A model version has no stored drift profile."""


# --------------------------------------------------------------------------- results
class FeatureDrift(BaseModel):
    """One feature of a drift check (docs/python-api.md; extra fields after ``drifted``)."""

    name: str
    kind: Literal["numeric", "categorical"]
    method: str = Field(description="the test behind statistic/p_value: ks, psi or chi2")
    statistic: float
    p_value: float
    psi: float = Field(description="PSI over the reference quantile bins (categories), eps 1e-4")
    effect: float = Field(description="numeric: Wasserstein distance in reference sds; "
                                      "categorical: Jensen-Shannon distance (base 2)")
    importance: float = Field(description="weight of this feature in the model drift score")
    drifted: bool
    wasserstein: float | None = None
    js: float | None = None
    unseen_share: float | None = None
    unseen_categories: list[str] = Field(default_factory=list)
    missing_delta: float = 0.0
    missing_rate_reference: float = 0.0
    missing_rate_current: float = 0.0
    mean_reference: float | None = None
    mean_current: float | None = None
    psi_threshold: float = Field(0.0, description="PSI that noise alone exceeds with prob. alpha")
    psi_exceeds_noise: bool = False
    ks_error_bound: float | None = Field(None, description="|statistic - exact KS| <= this")
    n_reference: int = 0
    n_current: int = 0
    current_counts: list[int] = Field(
        default_factory=list,
        description="current rows per cell of the profile: numeric, per reference quantile bin; "
                    "categorical, per profiled category (the profile's order), then the rows "
                    "outside them -- what the plot draws against the profile's own counts")


class DriftReport(BaseModel):
    """The result of ``check_drift`` (docs/python-api.md; extra fields after ``n_current``)."""

    model_name: str
    version: int
    score: float = Field(description="model drift score in [0, 1]: importance-weighted share "
                                     "of drifted features")
    threshold: float = Field(description="drift_threshold of the monitoring policy")
    drifted: bool = Field(description="score > threshold")
    features: list[FeatureDrift] = Field(description="drifted first, then by PSI")
    n_reference: int = Field(description="rows of the reference (training) data profiled")
    n_current: int = Field(description="rows of the batch checked")
    drifted_features: list[str] = Field(default_factory=list)
    weighting: Literal["importance", "equal"] = "importance"
    alpha: float = 0.05
    min_effect: dict[str, float] = Field(default_factory=dict)
    alert_threshold: float = 0.5
    alerted: bool = False
    alerts_sent: list[str] = Field(default_factory=list)
    alert_errors: list[str] = Field(default_factory=list)
    data_ref: str | None = None
    data_sha256: str | None = None
    run_id: str | None = Field(None, description="MLflow run that recorded the check")
    plot_uri: str | None = None
    checked_at: datetime | None = None
    duration_s: float | None = None


class ProfileInfo(BaseModel):
    """The result of ``profile_model``."""

    model_name: str
    version: int
    run_id: str = Field(description="MLflow run holding mlops/profile.json")
    n_rows: int
    features: dict[str, str] = Field(description="feature -> numeric | categorical")
    importances: bool = Field(description="feature importances available for the drift score")
    data_ref: str | None = None
    data_sha256: str | None = None
    replaced: bool = False


# --------------------------------------------------------------------------- the reference
class Reference:
    """What a drift check or an evaluation needs of a version -- never the training data.

    Deliberately not a dataclass: Prefect walks dataclass, dict and list task arguments element by
    element (``visit_collection``), which took seconds per task on a profile's ~60k numbers.
    """

    def __init__(self, model_name: str, version: int, run_id: str | None,
                 experiment_id: str | None, profile: dict | None,
                 importances: dict[str, float] | None, schema: dict | None,
                 tags: dict[str, str], profile_run_id: str | None = None,
                 run_metrics: dict[str, float] | None = None,
                 mlflow_config: MLflowConfig | None = None) -> None:
        self.model_name = model_name
        self.version = version
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.profile = profile
        self.importances = importances
        self.schema = schema
        self.tags = tags
        self.profile_run_id = profile_run_id
        self.run_metrics = run_metrics
        # the configuration this reference was read with: the check records with the same one,
        # without resolving it again (each resolution reads a block document from the Prefect API)
        self.mlflow_config = mlflow_config

    def __repr__(self) -> str:
        return (f"Reference({self.model_name!r}, v{self.version}, run {self.run_id}, "
                f"profile {'yes' if self.profile else 'no'})")


def _run_or_none(client, run_id: str | None):
    """The run, or None when there is no run id or the run is gone."""
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:  # deleted run, unreachable store: as if nothing were stored
        return None


def _listed(run) -> set[str]:
    """Names of the files under a run's ``mlops/`` folder (empty when the run is gone)."""
    if run is None:
        return set()
    import mlflow

    try:
        return {Path(f.path).name for f in
                mlflow.artifacts.list_artifacts(artifact_uri=f"{run.info.artifact_uri}/mlops")}
    except Exception:  # unreachable artifact store: as if nothing were stored
        return set()


def _download_json(run, name: str):
    """A JSON document under the run's ``mlops/`` folder, read from the run's artifact location
    (a ``runs:/`` URI would look the run and its logged models up again for every file)."""
    import mlflow

    return mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/mlops/{name}")


def read_reference(model_name: str, version: int | str, need_profile: bool = True,
                   read_profile: bool = True) -> Reference:
    """Resolve ``version`` (number or alias) and read its stored profile, importances, schema.

    Raises ModelNotFoundError / VersionNotFoundError (unknown model or alias) and, with
    ``need_profile``, ProfileNotFoundError saying how to create the profile. ``read_profile=False``
    skips downloading the profile (``profile`` is then None).
    """
    config = resolve_mlflow_config()
    client = mlflow_client(config)
    mv = resolve_version(client, model_name, version)
    number = int(mv.version)
    tags = dict(mv.tags or {})
    version_run = _run_or_none(client, mv.run_id)
    run_files = _listed(version_run)
    profile_run_id = tags.get(PROFILE_RUN_TAG)
    profile_run = _run_or_none(client, profile_run_id) if profile_run_id else None
    profile_files = _listed(profile_run)
    if PROFILE_NAME not in profile_files:
        profile_run = version_run if PROFILE_NAME in run_files else None
        profile_files = run_files
    if profile_run is None and need_profile:
        raise ProfileNotFoundError(
            f"model {model_name!r} version {number} has no drift profile (it was registered "
            "before profiles were stored, or outside train_model); create one from the data it "
            f"was trained on: profile_model({model_name!r}, {number}, data=<training data path, "
            "URI or DataFrame>)")
    # the documents are read at the same time: each is a round trip to the artifact store
    importances_run = next((run for run, files in ((profile_run, profile_files),
                                                   (version_run, run_files))
                            if run and IMPORTANCES_NAME in files), None)
    wanted = {"profile": (profile_run, PROFILE_NAME) if profile_run and read_profile else None,
              "importances": (importances_run, IMPORTANCES_NAME) if importances_run else None,
              "schema": (version_run, SCHEMA_NAME) if SCHEMA_NAME in run_files else None}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {key: pool.submit(_download_json, *where) for key, where in wanted.items() if where}
        documents = {key: future.result() for key, future in futures.items()}
    profile, schema = documents.get("profile"), documents.get("schema")
    importances = ({str(k): float(v) for k, v in documents["importances"].items()}
                   if "importances" in documents else None)
    found = version_run or profile_run
    experiment_id = found.info.experiment_id if found else None
    run_metrics = dict(version_run.data.metrics) if version_run else None
    return Reference(model_name=model_name, version=number, run_id=mv.run_id or None,
                     experiment_id=experiment_id, profile=profile, importances=importances,
                     schema=schema, tags=tags,
                     profile_run_id=profile_run.info.run_id if profile_run else None,
                     run_metrics=run_metrics, mlflow_config=config)


@task(name="read-reference", cache_policy=NO_CACHE)
def load_reference(model_name: str, version: int | str, need_profile: bool = True,
                   read_profile: bool = True) -> Reference:
    return read_reference(model_name, version, need_profile, read_profile)


# --------------------------------------------------------------------------- the batch
def latest_in_prefix(uri: str) -> str:
    """``s3://bucket/prefix/`` -> the URI of the newest csv/parquet object under the prefix."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    block = s3_bucket_for(bucket, uri, purpose="list")
    objects = [o for o in block.list_objects(folder=prefix)
               if Path(o["Key"]).suffix.lower() in READABLE]
    if not objects:
        raise DataError(f"no csv or parquet object under {uri!r}; upload the batch there or pass "
                        "the URI of one object")
    newest = max(objects, key=lambda o: (o["LastModified"], o["Key"]))
    return f"s3://{bucket}/{newest['Key']}"


def latest_in_folder(folder: Path) -> Path:
    """The newest csv/parquet file directly in ``folder`` (by modification time, then name)."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in READABLE]
    if not files:
        raise DataError(f"no csv or parquet file in folder {str(folder)!r}; put the batch there "
                        "or pass the path of one file")
    return max(files, key=lambda p: (p.stat().st_mtime, p.name))


def resolve_batch(data: Any) -> Any:
    """A folder or an ``s3://bucket/prefix/`` (trailing slash) means its newest batch file."""
    if isinstance(data, str) and data.startswith("s3://") and data.endswith("/"):
        return latest_in_prefix(data)
    if isinstance(data, (str, Path)) and not str(data).startswith("s3://"):
        path = Path(data).expanduser()
        if path.is_dir():
            return str(latest_in_folder(path))
    return data


@task(name="load-batch", cache_policy=NO_CACHE)
def load_batch(data: Any) -> LoadedData:
    """Read a batch: a csv/parquet path, a folder (its newest file), ``s3://bucket/key``,
    ``s3://bucket/prefix/`` (its newest object) or a DataFrame."""
    return load_table(resolve_batch(data))


# --------------------------------------------------------------------------- the check (pure)
def _feature_drift(fs: FeatureStats, importance: float) -> FeatureDrift:
    d = fs.to_dict()
    keep = set(FeatureDrift.model_fields)
    return FeatureDrift(**{k: v for k, v in d.items() if k in keep}, importance=importance)


def _weights(names: list[str], importances: dict[str, float] | None
             ) -> tuple[dict[str, float], Literal["importance", "equal"]]:
    raw = {n: float((importances or {}).get(n, 0.0) or 0.0) for n in names}
    raw = {n: (w if math.isfinite(w) and w > 0 else 0.0) for n, w in raw.items()}
    total = sum(raw.values())
    if importances and total > 0:
        return {n: w / total for n, w in raw.items()}, "importance"
    return {n: 1.0 / len(names) for n in names}, "equal"


def build_drift_report(reference: Reference, current: pd.DataFrame, policy: MonitoringPolicy,
                       data_ref: str | None = None, data_sha256: str | None = None) -> DriftReport:
    """Compare ``current`` with the version's profile; raises DriftInputError for bad data."""
    if reference.profile is None:
        raise ProfileNotFoundError(f"model {reference.model_name!r} version {reference.version} "
                                   "has no drift profile; run profile_model first")
    if not isinstance(current, pd.DataFrame):
        raise DriftInputError(f"the batch must be a table, got {type(current).__name__}")
    min_effect = {"numeric": policy.min_effect_numeric,
                  "categorical": policy.min_effect_categorical}
    stats = compare_to_profile(reference.profile, current, alpha=policy.feature_alpha,
                               min_effect=min_effect)
    weights, weighting = _weights([s.name for s in stats], reference.importances)
    score = model_drift_score(stats, weights)
    features = [_feature_drift(s, weights[s.name]) for s in stats]
    features.sort(key=lambda f: (not f.drifted, -f.psi, f.name))
    drifted_names = [f.name for f in features if f.drifted]
    return DriftReport(
        model_name=reference.model_name, version=reference.version, score=score,
        threshold=policy.drift_threshold, drifted=bool(score > policy.drift_threshold),
        features=features, n_reference=int(reference.profile.get("n_rows", 0)),
        n_current=int(len(current)), drifted_features=drifted_names, weighting=weighting,
        alpha=policy.feature_alpha, min_effect=min_effect,
        alert_threshold=policy.drift_alert_threshold, data_ref=data_ref, data_sha256=data_sha256,
        checked_at=datetime.now(timezone.utc))


@task(name="compare-to-profile", cache_policy=NO_CACHE)
def compare_batch(reference: Reference, loaded: LoadedData, policy: MonitoringPolicy) -> DriftReport:
    report = build_drift_report(reference, loaded.frame, policy, loaded.ref)
    report.data_sha256 = loaded.sha256  # hashed while the comparison ran
    return report


# --------------------------------------------------------------------------- plots
# The panels are plain bars, drawn with Pillow (installed with matplotlib, whose DejaVu Sans font
# they use). The same figure as four matplotlib Axes took about 0.4 s of CPU to build and render
# here -- as long as comparing a million rows -- where these panels take a few milliseconds.
PANEL_WIDTH, PANEL_HEIGHT, HEADER_HEIGHT = 640, 390, 56  # pixels
REFERENCE_COLOR, CURRENT_COLOR = (141, 160, 203), (252, 141, 98)
INK = (0, 0, 0)


@dataclass
class _Panel:
    """One feature's bars: labels, reference and current shares, a title, an x-axis caption."""

    title: str
    labels: list[str]
    reference: np.ndarray
    current: np.ndarray
    xlabel: str | None = None


def _fmt(x: float) -> str:
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{int(x)}" if float(x).is_integer() else f"{x:.3g}"


def _shares(counts) -> np.ndarray:
    a = np.asarray(counts, dtype=np.float64)
    return a / max(a.sum(), 1.0)


def _numeric_bars(name: str, fp: dict, f: FeatureDrift) -> _Panel:
    edges = np.asarray(fp["bins"]["edges"], dtype=np.float64)
    labels = ([f"≤{_fmt(edges[0])}"] if edges.size else ["all"])
    labels += [f"{_fmt(a)}–{_fmt(b)}" for a, b in zip(edges[:-1], edges[1:])]
    if edges.size:
        labels.append(f">{_fmt(edges[-1])}")
    # current_counts are per bin (e[i-1], e[i]], like the profile's counts
    return _Panel(f"{name}: KS {f.statistic:.3f}, PSI {f.psi:.3f}, moved {f.effect:.2f} sd"
                  + (" — DRIFTED" if f.drifted else ""), labels,
                  _shares(fp["bins"]["counts"]), _shares(f.current_counts),
                  "reference quantile bins")


def _categorical_bars(name: str, fp: dict, f: FeatureDrift, top: int = 12) -> _Panel:
    ref_counts: dict[str, int] = dict(fp["categories"])
    names = list(ref_counts)
    current = dict(zip(names, f.current_counts[:len(names)]))
    unseen = int(sum(f.current_counts[len(names):]))  # values outside the profiled categories
    keys = sorted(ref_counts, key=lambda k: -ref_counts[k])[:top]
    ref = [ref_counts[k] for k in keys]
    cur = [current.get(k, 0) for k in keys]
    rest_ref = sum(ref_counts.values()) - sum(ref) + int(fp.get("other_count", 0))
    rest_cur = sum(current.values()) - sum(cur)
    if rest_ref or rest_cur:
        keys, ref, cur = keys + ["(other)"], ref + [rest_ref], cur + [rest_cur]
    if unseen:
        keys, ref, cur = keys + ["(unseen)"], ref + [0], cur + [unseen]
    return _Panel(f"{name}: chi² p={f.p_value:.2g}, JS {f.effect:.3f}, PSI {f.psi:.3f}"
                  + (" — DRIFTED" if f.drifted else ""), [k[:18] for k in keys],
                  _shares(ref), _shares(cur))


@functools.lru_cache(maxsize=None)
def _font(pixels: int):
    """DejaVu Sans from matplotlib's data folder, found without importing matplotlib (~0.3 s in a
    fresh worker process)."""
    from importlib.util import find_spec

    from PIL import ImageFont

    package = Path(find_spec("matplotlib").origin).parent
    return ImageFont.truetype(str(package / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"), pixels)


def _ticks(top: float, most: int = 6) -> tuple[list[float], int]:
    """Round tick values from 0 to at least ``top`` (at most ``most`` + 1) and their decimals."""
    top = max(top, 1e-9)
    raw = top / most
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    n = math.ceil(top / step - 1e-9)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if step / magnitude == 2.5 else 0)
    return [i * step for i in range(n + 1)], decimals


def _text_mask(text: str, font):
    """``text`` as an 8-bit coverage image (to paste turned)."""
    from PIL import Image, ImageDraw

    _, _, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right + 2, bottom + 2), 0)
    ImageDraw.Draw(mask).text((0, 0), text, font=font, fill=255)
    return mask


def _text_at_45(image, xy: tuple[float, float], text: str, font) -> int:
    """``text`` turned 45° counter-clockwise with its end at ``xy`` (the top-right corner there,
    as matplotlib places right-aligned rotated tick labels); returns its height in pixels."""
    from PIL import Image

    mask = _text_mask(text, font).rotate(45, expand=True, resample=Image.Resampling.BICUBIC)
    image.paste(INK, (round(xy[0]) - mask.width, round(xy[1])), mask)
    return mask.height


def _text_upwards(image, xy: tuple[float, float], text: str, font) -> None:
    """``text`` reading upwards, centred on ``xy``."""
    from PIL import Image

    mask = _text_mask(text, font).transpose(Image.Transpose.ROTATE_90)
    image.paste(INK, (round(xy[0] - mask.width / 2), round(xy[1] - mask.height / 2)), mask)


def _draw_panel(image, draw, x0: int, y0: int, panel: _Panel) -> None:
    left, right = x0 + 80, x0 + PANEL_WIDTH - 24
    top, bottom = y0 + 30, y0 + PANEL_HEIGHT - 104
    width, height = right - left, bottom - top
    highest = float(max(panel.reference.max(initial=0), panel.current.max(initial=0)))
    ticks, decimals = _ticks(highest * 1.05)  # a margin above the highest bar
    scale = height / ticks[-1]
    small = _font(10)
    for t in ticks:
        y = bottom - t * scale
        draw.line([(left - 4, y), (left, y)], fill=INK)
        draw.text((left - 7, y), f"{t:.{decimals}f}", fill=INK, font=small, anchor="rm")
    slot = width / len(panel.labels)
    labels_height = 0
    for i, label in enumerate(panel.labels):
        middle = left + (i + 0.5) * slot
        for share, x, color in ((panel.reference[i], middle - 0.4 * slot, REFERENCE_COLOR),
                                (panel.current[i], middle, CURRENT_COLOR)):
            if share > 0:
                draw.rectangle([x, bottom - share * scale, x + 0.4 * slot, bottom], fill=color)
        draw.line([(middle, bottom), (middle, bottom + 4)], fill=INK)
        height_here = _text_at_45(image, (middle + 3, bottom + 6), label, small)
        labels_height = max(labels_height, height_here)
    draw.rectangle([left, top, right, bottom], outline=INK)
    draw.text(((left + right) / 2, top - 8), panel.title, fill=INK, font=_font(12), anchor="ms")
    _text_upwards(image, (x0 + 16, (top + bottom) / 2), "share of rows", _font(11))
    if panel.xlabel:
        draw.text(((left + right) / 2, min(bottom + labels_height + 22, y0 + PANEL_HEIGHT - 4)),
                  panel.xlabel, fill=INK, font=_font(11), anchor="ms")


def plot_most_drifted(report: DriftReport, profile: dict,
                      max_features: int = MAX_PLOTTED_FEATURES) -> bytes | None:
    """PNG of reference versus current distributions (shares of rows) for the most drifted
    features (``report.features`` order), two panels a row; None when there are none.

    Drawn from summaries only: the reference from the profile's bin / category counts, the
    current data from each feature's ``current_counts`` (counted once, by the comparison) --
    the batch itself is not read again.
    """
    chosen = report.features[:max_features]
    if not chosen:
        return None
    from PIL import Image, ImageDraw

    panels = [_numeric_bars(f.name, profile["features"][f.name], f) if f.kind == "numeric"
              else _categorical_bars(f.name, profile["features"][f.name], f) for f in chosen]
    cols = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    image = Image.new("RGB", (PANEL_WIDTH * cols, HEADER_HEIGHT + PANEL_HEIGHT * rows), "white")
    draw = ImageDraw.Draw(image)
    draw.text((image.width / 2, 18), f"{report.model_name} v{report.version}: drift score "
              f"{report.score:.2f} (threshold {report.threshold:.2f})", fill=INK, font=_font(15),
              anchor="mm")
    legend = ((REFERENCE_COLOR, "reference (profile)"), (CURRENT_COLOR, "current"))
    x = (image.width - sum(30 + _font(11).getlength(label) for _, label in legend) + 30) / 2
    for color, label in legend:  # one line under the title, centred
        draw.rectangle([x, 37, x + 18, 46], fill=color)
        draw.text((x + 24, 42), label, fill=INK, font=_font(11), anchor="lm")
        x += 24 + _font(11).getlength(label) + 30
    for i, panel in enumerate(panels):
        _draw_panel(image, draw, PANEL_WIDTH * (i % cols),
                    HEADER_HEIGHT + PANEL_HEIGHT * (i // cols), panel)
    buffer = io.BytesIO()
    # zlib level 1: a few % larger than the default level 6, a fraction of its encoding time
    image.save(buffer, format="png", compress_level=1)
    return buffer.getvalue()


# --------------------------------------------------------------------------- recording
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /:]")
PLOT_PATH = "drift/most_drifted_features.png"
REPORT_PATH = "drift/report.json"


def metric_key(prefix: str, name: str) -> str:
    return f"{prefix}.{_METRIC_NAME.sub('_', name)}"[:250]


def _config(reference: Reference | None = None) -> MLflowConfig:
    """The MLflow configuration the reference was read with, else the one in force."""
    return (reference.mlflow_config if reference is not None else None) or resolve_mlflow_config()


def _experiment_for(reference: Reference) -> str:
    return reference.experiment_id or _config(reference).ensure_experiment()


@dataclass
class Recorded:
    run_id: str
    experiment_id: str
    plot_uri: str | None
    run_url: str | None


@dataclass
class OpenRun:
    """An MLflow run created before what it records is known (it is filled by ``finish_run``)."""
    run_id: str
    experiment_id: str
    artifact_uri: str


def open_run(reference: Reference, run_name: str) -> OpenRun:
    """Create a run in the version's experiment. Its tags come with ``finish_run``, so that readers
    that find runs by ``mlops.kind`` never see one that is half written."""
    client = mlflow_client(reference.mlflow_config)
    experiment_id = _experiment_for(reference)
    run = client.create_run(experiment_id, run_name=run_name)
    return OpenRun(run.info.run_id, experiment_id, run.info.artifact_uri)


def finish_run(reference: Reference, run: OpenRun, tags: dict[str, str],
               metrics: dict[str, float], documents: dict[str, Any],
               files: Callable[[], dict[str, bytes]] | None = None) -> None:
    """Fill an open run and end it FINISHED (FAILED when anything fails): tags and metrics in one
    request per 900 metrics, and, at the same time, the JSON documents and the files (path ->
    bytes, made by ``files`` in the uploading thread: drawing a plot overlaps the metrics)."""
    from mlflow.entities import Metric, RunTag

    client = mlflow_client(reference.mlflow_config)
    tags = {**tags, "mlflow.note.content": tags.get("mlops.summary", "")}

    def log_values() -> None:
        now_ms = int(time.time() * 1000)
        items = [Metric(k, float(v), now_ms, 0) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        run_tags = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, max(len(items), 1), 900):  # MLflow caps a batch at 1000 metrics
            client.log_batch(run.run_id, metrics=items[i:i + 900], tags=run_tags if i == 0 else [])

    def log_files() -> None:
        contents = [*((p, json.dumps(d, indent=2, default=str).encode()) for p, d in documents.items()),
                    *(files() if files else {}).items()]
        if not contents:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for path, content in contents:
                local = Path(tmp, path)
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(content)
            client.log_artifacts(run.run_id, tmp)

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            for future in [pool.submit(log_values), pool.submit(log_files)]:
                future.result()
        client.set_terminated(run.run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run.run_id, "FAILED")
        raise


def _log_run(reference: Reference, run_name: str, tags: dict[str, str], metrics: dict[str, float],
             documents: dict[str, Any], files: dict[str, bytes]) -> tuple[str, str, str]:
    """One finished MLflow run. Returns (run id, experiment id, artifact location)."""
    run = open_run(reference, run_name)
    finish_run(reference, run, tags, metrics, documents, (lambda: files) if files else None)
    return run.run_id, run.experiment_id, run.artifact_uri


@task(name="open-drift-run", cache_policy=NO_CACHE)
def open_drift_run(reference: Reference) -> OpenRun:
    """The check's MLflow run, created while the comparison runs."""
    return open_run(reference, f"drift-{reference.model_name}-v{reference.version}")


def discard_run(reference: Reference, opened) -> None:
    """Delete the run opened (``opened``: its future) for a check that raised."""
    try:
        run = opened.result()
    except Exception:  # the run was never created: nothing to delete (the caller re-raises)
        return
    mlflow_client(reference.mlflow_config).delete_run(run.run_id)


def drift_links(run: OpenRun, reference: Reference, report: DriftReport) -> Recorded:
    """Where the check is (or is being) recorded: the run's page and the plot's URL."""
    config = _config(reference)
    plot_uri = (artifact_link(run.run_id, PLOT_PATH, config, run.artifact_uri)
                if report.features else None)
    return Recorded(run_id=run.run_id, experiment_id=run.experiment_id, plot_uri=plot_uri,
                    run_url=run_link(run.run_id, run.experiment_id, config))


@task(name="record-drift-check", cache_policy=NO_CACHE)
def record_drift_check(report: DriftReport, reference: Reference, run: OpenRun) -> None:
    """Fill the check's MLflow run: tags, metrics, the report JSON and the plot of the most
    drifted features (drawn from the report and the profile while the metrics are sent)."""
    metrics: dict[str, float] = {
        "drift_score": report.score, "drift_threshold": report.threshold,
        "drifted": float(report.drifted), "n_drifted_features": len(report.drifted_features),
        "n_features": len(report.features), "n_current": report.n_current,
        "n_reference": report.n_reference,
    }
    for f in report.features:
        metrics[metric_key("psi", f.name)] = f.psi
        metrics[metric_key("effect", f.name)] = f.effect
        metrics[metric_key("statistic", f.name)] = f.statistic
        metrics[metric_key("drifted", f.name)] = float(f.drifted)
    tags = {
        "mlops.kind": "drift-check", "mlops.model_name": report.model_name,
        "mlops.model_version": str(report.version), "mlops.drifted": str(report.drifted).lower(),
        "mlops.data_ref": report.data_ref or "(DataFrame)",
        "mlops.data_sha256": report.data_sha256 or "",
        "mlops.drifted_features": ",".join(report.drifted_features)[:4000],
        "mlops.summary": (f"drift score {report.score:.3f} (threshold {report.threshold}); "
                          f"drifted: {', '.join(report.drifted_features) or 'none'}"),
    }

    def plot() -> dict[str, bytes]:
        png = plot_most_drifted(report, reference.profile)
        return {PLOT_PATH: png} if png else {}

    finish_run(reference, run, tags, metrics, {REPORT_PATH: json.loads(report.model_dump_json())},
               plot)


# --------------------------------------------------------------------------- Prefect UI
def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def drift_table(report: DriftReport) -> list[dict[str, Any]]:
    return [{"feature": f.name, "kind": f.kind, "test": f.method,
             "statistic": round(f.statistic, 4), "p_value": float(f"{f.p_value:.3g}"),
             "psi": round(f.psi, 4), "effect": round(f.effect, 4),
             "importance": round(f.importance, 4), "drifted": f.drifted}
            for f in report.features]


def drift_markdown(report: DriftReport, recorded: Recorded | None) -> str:
    verdict = "DRIFTED" if report.drifted else "not drifted"
    lines = [
        f"## Drift check: {report.model_name} v{report.version} — {verdict}",
        "",
        f"**Model drift score {report.score:.3f}** "
        f"({'>' if report.drifted else '≤'} drift_threshold {report.threshold:.2f}; "
        f"{report.weighting}-weighted share of drifted features; alert above "
        f"{report.alert_threshold:.2f}).",
        "",
        f"- data: `{report.data_ref or 'a DataFrame'}` — {report.n_current:,} rows, versus the "
        f"profile of the {report.n_reference:,} training rows of v{report.version}",
        f"- drifted features ({len(report.drifted_features)}/{len(report.features)}): "
        f"{', '.join(report.drifted_features) or 'none'}",
        f"- per-feature test at alpha {report.alpha} (KS numeric, chi² categorical) and minimum "
        f"effect {report.min_effect.get('numeric')} sd / JS {report.min_effect.get('categorical')}",
    ]
    if report.alerted:
        lines.append(f"- alert sent to: {', '.join(report.alerts_sent) or 'no channel'}"
                     + (f" (failed: {'; '.join(report.alert_errors)})" if report.alert_errors else ""))
    if recorded is not None:
        lines.append(f"- MLflow run `{recorded.run_id}`"
                     + (f" ([open]({recorded.run_url}))" if recorded.run_url else ""))
        if recorded.plot_uri:
            lines.append(f"- plot: [reference vs current, most drifted features]({recorded.plot_uri})")
            lines += inline_image(recorded.plot_uri, "most drifted features")
    lines += ["", "| feature | kind | test | statistic | p-value | PSI (noise) | effect | importance | drifted |",
              "|---|---|---|---|---|---|---|---|---|"]
    for f in report.features:
        lines.append(f"| {f.name} | {f.kind} | {f.method} | {f.statistic:.4f} | {_p(f.p_value)} | "
                     f"{f.psi:.4f} ({f.psi_threshold:.4f}) | {f.effect:.3f} | {f.importance:.3f} | "
                     f"{'**yes**' if f.drifted else 'no'} |")
    return "\n".join(lines) + "\n"


@task(name="publish-drift-artifacts", cache_policy=NO_CACHE)
def publish_drift(report: DriftReport, recorded: Recorded | None) -> str:
    """Markdown summary at ``drift-<slug>`` and the per-feature table at ``drift-<slug>-features``."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = f"drift-{model_slug(report.model_name)}"
    headline = (f"{report.model_name} v{report.version}: drift score {report.score:.2f} "
                f"({'drifted' if report.drifted else 'not drifted'})")
    create_markdown_artifact(key=key, markdown=drift_markdown(report, recorded), description=headline)
    create_table_artifact(key=f"{key}-features", table=drift_table(report), description=headline)
    return key


# --------------------------------------------------------------------------- profile_model
def model_input_kinds(reference: Reference, frame: pd.DataFrame) -> dict[str, str]:
    """feature -> kind: from the stored schema, else the model's signature, else the dtypes of
    ``frame`` (the target named by the version's tag left out)."""
    schema = reference.schema
    if schema:
        return {**{c: "numeric" for c in schema["numeric"]},
                **{c: "categorical" for c in schema["categorical"]}}
    names: list[str] | None = None
    try:
        from mlflow.models import get_model_info

        sig = get_model_info(f"models:/{reference.model_name}/{reference.version}").signature
        if sig is not None and sig.inputs is not None and sig.inputs.has_input_names():
            names = list(sig.inputs.input_names())
    except Exception:
        names = None
    target = reference.tags.get("mlops.target")
    if names is None:
        names = [str(c) for c in frame.columns if str(c) != target]
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise DriftInputError(f"the data lacks columns the model takes: {missing}; pass the data "
                              "the version was trained on")
    from tasks.drift_metrics import _infer_kind

    kinds = {}
    for n in names:
        kind = _infer_kind(frame[n])
        if kind is None:
            raise DriftInputError(f"column {n!r} has unsupported dtype {frame[n].dtype}")
        kinds[n] = kind
    return kinds


def _model_features(frame: pd.DataFrame, kinds: dict[str, str]) -> pd.DataFrame:
    """The columns as the model sees them (numeric float64, categorical strings)."""
    missing = [c for c in kinds if c not in frame.columns]
    if missing:
        raise DriftInputError(f"the data lacks {len(missing)} column(s) the model takes: "
                              f"{missing}; pass the data version was trained on")
    out = pd.DataFrame(index=frame.index)
    bad = []
    for c, kind in kinds.items():
        if kind == "numeric":
            try:
                out[c] = pd.to_numeric(frame[c]).astype("float64")
            except (ValueError, TypeError):
                bad.append(f"{c!r} ({frame[c].dtype})")
        else:
            col = frame[c].astype(object)
            out[c] = col.where(col.isna(), col.astype(str)).astype(object)
    if bad:
        raise DriftInputError(f"columns the model takes as numbers are not numeric: "
                              f"{', '.join(bad)}; fix the data")
    return out


def _importances(reference: Reference, frame: pd.DataFrame, X: pd.DataFrame) -> dict | None:
    """Permutation importances on up to IMPORTANCE_ROWS labelled rows, when the data holds the
    target the version was trained on and the version has a schema; else None."""
    schema = reference.schema
    if not schema or schema.get("target") not in frame.columns:
        return None
    import mlflow

    from tasks.training_search import permutation_importance_by_column

    y = frame[schema["target"]]
    keep = y.notna().to_numpy()
    Xs, ys = X[keep].iloc[:IMPORTANCE_ROWS], y[keep].iloc[:IMPORTANCE_ROWS]
    if len(Xs) < 10:
        return None
    try:
        model = mlflow.sklearn.load_model(f"models:/{reference.model_name}/{reference.version}")
        return permutation_importance_by_column(model, Xs, ys, schema["task"], random_state=0)
    except Exception as exc:  # optional: without importances every feature weighs the same
        from prefect import get_run_logger

        get_run_logger().warning("no feature importances for %s v%s (%s: %s); the drift score "
                                 "will weigh every feature the same", reference.model_name,
                                 reference.version, type(exc).__name__, exc)
        return None


@task(name="build-and-store-profile", cache_policy=NO_CACHE)
def store_profile(reference: Reference, loaded: LoadedData, overwrite: bool) -> ProfileInfo:
    """Profile the training data of an existing version into a run of its own and point the
    version's ``mlops.profile_run_id`` tag at it (the training run is left untouched)."""
    replaced = reference.profile is not None
    if replaced and not overwrite:
        raise DataError(
            f"model {reference.model_name!r} version {reference.version} already has a drift "
            "profile; pass overwrite=True to replace it (checks then compare against the new data)")
    frame = loaded.frame
    if len(frame) == 0:
        raise DriftInputError("the training data has no rows; pass the rows the version was "
                              "trained on")
    kinds = model_input_kinds(reference, frame)
    X = _model_features(frame, kinds)
    profile = build_profile(X, feature_types=kinds)
    importances = reference.importances or _importances(reference, frame, X)
    documents: dict[str, Any] = {f"mlops/{PROFILE_NAME}": profile}
    if importances is not None:
        documents[f"mlops/{IMPORTANCES_NAME}"] = importances
    tags = {"mlops.kind": "profile", "mlops.model_name": reference.model_name,
            "mlops.model_version": str(reference.version),
            "mlops.data_ref": loaded.ref or "(DataFrame)", "mlops.data_sha256": loaded.sha256,
            "mlops.summary": f"drift profile of v{reference.version}: {len(X)} rows"}
    run_id, _, _ = _log_run(reference, f"profile-{reference.model_name}-v{reference.version}", tags,
                         {"n_rows": len(X), "n_features": len(kinds)}, documents, {})
    client = mlflow_client(reference.mlflow_config)
    client.set_model_version_tag(reference.model_name, str(reference.version), PROFILE_RUN_TAG, run_id)
    return ProfileInfo(model_name=reference.model_name, version=reference.version, run_id=run_id,
                       n_rows=len(X), features=kinds, importances=importances is not None,
                       data_ref=loaded.ref, data_sha256=loaded.sha256, replaced=replaced)


# --------------------------------------------------------------------------- evaluate_production
class PerformanceReport(BaseModel):
    """The result of ``evaluate_production`` (docs/python-api.md; extra fields after
    ``degraded``)."""

    model_name: str
    version: int
    metrics: dict[str, float] = Field(description="every applicable metric on the labelled data")
    baseline_metrics: dict[str, float] = Field(description="the version's holdout metrics")
    degraded: bool = Field(description="some threshold of the monitoring policy was crossed")
    reasons: list[str] = Field(default_factory=list, description="what crossed which threshold")
    metric: str | None = Field(None, description="the version's primary metric")
    metric_diff: dict[str, float] = Field(default_factory=dict, description="current − baseline")
    task: str | None = None
    target: str | None = None
    n_rows: int = 0
    thresholds: dict[str, float] = Field(default_factory=dict)
    alerted: bool = False
    alerts_sent: list[str] = Field(default_factory=list)
    alert_errors: list[str] = Field(default_factory=list)
    data_ref: str | None = None
    data_sha256: str | None = None
    run_id: str | None = None
    checked_at: datetime | None = None
    duration_s: float | None = None


def baseline_metrics(reference: Reference) -> dict[str, float]:
    """Holdout metrics recorded with the version (``holdout_<m>`` run metrics, else the
    version's ``metric.<m>`` tags)."""
    found = {k[len("holdout_"):]: float(v) for k, v in (reference.run_metrics or {}).items()
             if k.startswith("holdout_")}
    if not found:
        found = {k[len("metric."):]: float(v) for k, v in reference.tags.items()
                 if k.startswith("metric.")}
    return found


def degradation_reasons(task_kind: str, metrics: dict[str, float], baseline: dict[str, float],
                        metric: str | None, policy: MonitoringPolicy) -> list[str]:
    """Each threshold of the policy the metrics cross, as a sentence (pure)."""
    from tasks.training_search import greater_is_better

    reasons = []
    if task_kind == "regression":
        if "r2" in metrics and metrics["r2"] < policy.r2_alert_threshold:
            reasons.append(f"r2 {metrics['r2']:.4f} is below r2_alert_threshold "
                           f"{policy.r2_alert_threshold:.2f}")
    elif "accuracy" in metrics and metrics["accuracy"] < policy.accuracy_alert_threshold:
        reasons.append(f"accuracy {metrics['accuracy']:.4f} is below accuracy_alert_threshold "
                       f"{policy.accuracy_alert_threshold:.2f}")
    if metric and metric in metrics and metric in baseline and baseline[metric] != 0:
        now, then = metrics[metric], baseline[metric]
        worse = (then - now) if greater_is_better(metric) else (now - then)
        relative = worse / abs(then)
        if relative > policy.max_relative_degradation:
            reasons.append(f"{metric} {now:.4f} is {relative:.1%} worse than the holdout "
                           f"{then:.4f} (max_relative_degradation "
                           f"{policy.max_relative_degradation:.0%})")
    return reasons


def evaluate_labelled(reference: Reference, frame: pd.DataFrame, target: str,
                      policy: MonitoringPolicy, data_ref: str | None = None,
                      data_sha256: str | None = None) -> PerformanceReport:
    """Score the version on labelled rows; compare with its holdout metrics. Raises DataError for
    empty data, a missing target or feature columns, missing or unknown labels."""
    import mlflow

    from tasks.training_search import DEFAULT_METRIC, Schema, evaluate_metrics, prepare_features

    if reference.schema is None:
        raise DataError(
            f"model {reference.model_name!r} version {reference.version} has no stored input "
            "schema (mlops/schema.json), so its features and task are unknown; evaluate a "
            "version trained with train_model")
    schema = Schema.from_dict(reference.schema)
    if not isinstance(frame, pd.DataFrame) or len(frame) == 0:
        raise DataError("the labelled data is empty; pass production rows with their outcomes")
    if target not in frame.columns:
        raise DataError(f"the labelled data lacks the target column {target!r}; columns: "
                        f"{', '.join(map(str, frame.columns))}")
    missing = [c for c in schema.columns if c not in frame.columns]
    if missing:
        raise DataError(f"the labelled data lacks {len(missing)} column(s) the model needs: "
                        f"{missing}")
    y = frame[target]
    if y.isna().all():
        raise DataError(f"target column {target!r} is entirely missing; record outcomes first")
    if y.isna().any():
        raise DataError(f"target column {target!r} has {int(y.isna().sum())} missing labels; "
                        "drop the rows without an outcome")
    if schema.task != "regression":
        known = {str(c) for c in schema.classes}
        unknown = sorted({str(v) for v in y.unique()} - known)
        if unknown:
            raise DataError(f"target {target!r} holds labels the model was not trained on: "
                            f"{unknown[:10]}; it knows {sorted(known)}")
        if all(not isinstance(c, str) for c in schema.classes):
            y = y.astype(type(schema.classes[0]))
        else:
            y = y.astype(str)
    elif not pd.api.types.is_numeric_dtype(y):
        raise DataError(f"target {target!r} must be numeric for a regression model; got {y.dtype}")
    for c in schema.columns:
        if frame[c].isna().all():
            raise DataError(f"column {c!r} is entirely missing in the labelled data")
    X = prepare_features(frame, schema)
    model = mlflow.sklearn.load_model(f"models:/{reference.model_name}/{reference.version}")
    metrics = evaluate_metrics(model, X, y, schema.task)
    baseline = baseline_metrics(reference)
    metric = reference.tags.get("mlops.metric") or DEFAULT_METRIC.get(schema.task)
    reasons = degradation_reasons(schema.task, metrics, baseline, metric, policy)
    thresholds = ({"r2_alert_threshold": policy.r2_alert_threshold} if schema.task == "regression"
                  else {"accuracy_alert_threshold": policy.accuracy_alert_threshold})
    thresholds["max_relative_degradation"] = policy.max_relative_degradation
    return PerformanceReport(
        model_name=reference.model_name, version=reference.version, metrics=metrics,
        baseline_metrics=baseline, degraded=bool(reasons), reasons=reasons, metric=metric,
        metric_diff={k: metrics[k] - baseline[k] for k in sorted(set(metrics) & set(baseline))},
        task=schema.task, target=target, n_rows=len(frame), thresholds=thresholds,
        data_ref=data_ref, data_sha256=data_sha256, checked_at=datetime.now(timezone.utc))


@task(name="score-labelled-batch", cache_policy=NO_CACHE)
def evaluate_batch(reference: Reference, loaded: LoadedData, target: str,
                   policy: MonitoringPolicy) -> PerformanceReport:
    report = evaluate_labelled(reference, loaded.frame, target, policy, loaded.ref)
    report.data_sha256 = loaded.sha256  # hashed while the batch was scored
    return report


@task(name="record-evaluation", cache_policy=NO_CACHE)
def record_evaluation(report: PerformanceReport, reference: Reference) -> Recorded:
    metrics = {f"production_{k}": v for k, v in report.metrics.items()}
    metrics.update({f"delta_{k}": v for k, v in report.metric_diff.items()})
    metrics.update({"degraded": float(report.degraded), "n_rows": report.n_rows})
    tags = {"mlops.kind": "production-evaluation", "mlops.model_name": report.model_name,
            "mlops.model_version": str(report.version),
            "mlops.degraded": str(report.degraded).lower(),
            "mlops.data_ref": report.data_ref or "(DataFrame)",
            "mlops.data_sha256": report.data_sha256 or "",
            "mlops.summary": "; ".join(report.reasons) or "no threshold crossed"}
    run_id, experiment_id, _ = _log_run(
        reference, f"evaluate-{report.model_name}-v{report.version}", tags, metrics,
        {"monitoring/performance.json": json.loads(report.model_dump_json())}, {})
    return Recorded(run_id=run_id, experiment_id=experiment_id, plot_uri=None,
                    run_url=run_link(run_id, experiment_id, _config(reference)))


def performance_markdown(report: PerformanceReport) -> str:
    verdict = "DEGRADED" if report.degraded else "healthy"
    lines = [f"## Production evaluation: {report.model_name} v{report.version} — {verdict}", "",
             f"- labelled data: `{report.data_ref or 'a DataFrame'}` — {report.n_rows:,} rows, "
             f"target `{report.target}`",
             *[f"- **{r}**" for r in report.reasons]]
    if report.alerted:
        lines.append(f"- alert sent to: {', '.join(report.alerts_sent) or 'no channel'}"
                     + (f" (failed: {'; '.join(report.alert_errors)})" if report.alert_errors else ""))
    if report.run_id:
        lines.append(f"- MLflow run `{report.run_id}`")
    lines += ["", "| metric | production | holdout | difference |", "|---|---|---|---|"]
    for k, v in report.metrics.items():
        base = report.baseline_metrics.get(k)
        lines.append(f"| {k}{' (primary)' if k == report.metric else ''} | {v:.4f} | "
                     f"{'' if base is None else f'{base:.4f}'} | "
                     f"{'' if base is None else f'{v - base:+.4f}'} |")
    return "\n".join(lines) + "\n"


@task(name="publish-evaluation-artifact", cache_policy=NO_CACHE)
def publish_evaluation(report: PerformanceReport) -> str:
    from prefect.artifacts import create_markdown_artifact

    key = f"performance-{model_slug(report.model_name)}"
    create_markdown_artifact(
        key=key, markdown=performance_markdown(report),
        description=f"{report.model_name} v{report.version}: "
                    f"{'degraded' if report.degraded else 'healthy'} on {report.n_rows} rows")
    return key


def elapsed(started: float) -> float:
    return round(time.monotonic() - started, 3)
