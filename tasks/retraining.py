"""Retraining tasks: what the champion knows, the gate slice, gate scores, one retraining per model
at a time, the promotion that a transaction can undo, and the history in MLflow.

The decisions themselves are plain functions in tasks/retraining_rules.py.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction

from blocks.mlflow_config import resolve_mlflow_config
from blocks.monitoring import MonitoringPolicy
from blocks.retraining_policy import RetrainingPolicy
from tasks.comparison import score_version
from tasks.data import LoadedData, frame_sha256, load_labelled_table
from tasks.drift import ProfileNotFoundError, build_drift_report, read_reference
from tasks.drift_metrics import DriftInputError
from tasks.errors import DataError, MlopsError, RegistryError
from tasks.registry import (alias_map, get_registered_model, mlflow_client, model_slug,
                            move_alias, promote, resolve_version)
from tasks.retraining_rules import RetrainResult, gate_split, unseen_mask
from tasks.training import SEEN_ROWS_NAME, load_artifact_json
from tasks.training_search import DEFAULT_METRIC, Schema, row_hashes

HISTORY_KIND = "retraining"
RESULT_TAG = "mlops.retrain_result"
MIN_GATE_ROWS = 20         # fewer unseen rows in the gate than this cannot judge anything
MIN_EVAL_ROWS = 30         # unseen rows needed to measure the production metric
SLOT_LEASE_S = 600         # default RetrainingPolicy.slot_lease_s
MAX_NAMED_FEATURES = 4     # drifted features named in a data drift reason


class RetrainingInProgressError(MlopsError, RuntimeError):
    """Another retraining of the same model holds its concurrency slot."""


class ChampionState:
    """What retraining needs of the current champion. A plain class: Prefect walks dataclass task
    arguments element by element, and `seen` can hold a million fingerprints."""

    def __init__(self, model_name: str, version: int, run_id: str | None, created_at: datetime,
                 schema: dict, metric: str, holdout: dict[str, float], seen: np.ndarray | None,
                 seen_count: int | None, experiment_id: str | None) -> None:
        self.model_name, self.version, self.run_id = model_name, version, run_id
        self.created_at, self.schema, self.metric = created_at, schema, metric
        self.holdout, self.seen, self.seen_count = holdout, seen, seen_count
        self.experiment_id = experiment_id

    @property
    def target(self) -> str:
        return self.schema["target"]

    def __repr__(self) -> str:
        return f"ChampionState({self.model_name!r}, v{self.version})"


def _seen_rows(run_id: str) -> np.ndarray | None:
    import mlflow

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"mlops/{SEEN_ROWS_NAME}", dst_path=tmp)
            return np.load(path)
    except (MlflowException, OSError):
        return None  # a version trained before fingerprints were stored


def read_champion(model_name: str) -> ChampionState:
    client = mlflow_client()
    if "champion" not in alias_map(client, model_name):
        raise RegistryError(
            f"model {model_name!r} has no champion to retrain against; make one first, e.g. "
            f"promote_model({model_name!r}, <version>) or train_model(..., promote='always')")
    mv = resolve_version(client, model_name, "champion")
    try:
        schema = load_artifact_json(mv.run_id, "schema.json")
    except (MlflowException, OSError):
        raise DataError(f"model {model_name!r} v{mv.version} has no stored input schema "
                        "(mlops/schema.json); retraining needs a champion trained by train_model"
                        ) from None
    run = client.get_run(mv.run_id)
    tags = {**run.data.tags, **(mv.tags or {})}
    metric = tags.get("mlops.metric") or DEFAULT_METRIC[schema["task"]]
    holdout = {k[len("holdout_"):]: float(v) for k, v in run.data.metrics.items()
               if k.startswith("holdout_")}
    count = tags.get("mlops.data_rows")
    return ChampionState(
        model_name=model_name, version=int(mv.version), run_id=mv.run_id,
        created_at=datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=timezone.utc),
        schema=schema, metric=metric, holdout=holdout, seen=_seen_rows(mv.run_id),
        seen_count=int(count) if count and count.isdigit() else None,
        experiment_id=run.info.experiment_id)


@task(name="read-champion", cache_policy=NO_CACHE)
def load_champion(model_name: str) -> ChampionState:
    return read_champion(model_name)


@task(name="load-labelled-data", cache_policy=NO_CACHE)
def load_labelled(data: Any) -> LoadedData:
    return load_labelled_table(data)


# --------------------------------------------------------------------------- unseen rows
class LabelledView:
    """The labelled data as the champion sees it: fingerprints and which rows are new to it."""

    def __init__(self, frame: pd.DataFrame, fingerprints: np.ndarray, unseen: np.ndarray,
                 how: str) -> None:
        self.frame, self.fingerprints, self.unseen, self.how = frame, fingerprints, unseen, how

    @property
    def n_unseen(self) -> int:
        return int(self.unseen.sum())


def check_labelled(loaded: LoadedData, target: str, champion: ChampionState) -> pd.DataFrame:
    """The data must carry the champion's target and input columns, with labels everywhere."""
    frame = loaded.frame
    where = loaded.ref or "the labelled data"
    if target != champion.target:
        raise DataError(f"target {target!r} is not the one model {champion.model_name!r} predicts "
                        f"({champion.target!r}); pass target={champion.target!r}")
    if target not in frame.columns:
        raise DataError(f"{where} lacks the target column {target!r}; columns: "
                        f"{', '.join(map(str, frame.columns))}")
    schema = Schema.from_dict(champion.schema)
    missing = [c for c in schema.columns if c not in frame.columns]
    extra = [c for c in frame.columns if c not in schema.columns and c != target]
    if missing or extra:
        raise DataError(
            f"{where} has a different schema than model {champion.model_name!r} "
            f"v{champion.version}: missing columns {missing or 'none'}, new columns "
            f"{extra or 'none'}; retrain on data with the champion's columns, or train a new "
            "model with train_model")
    for c in schema.numeric:
        if not pd.api.types.is_numeric_dtype(frame[c]) and \
                pd.to_numeric(frame[c], errors="coerce").isna().sum() > frame[c].isna().sum():
            raise DataError(f"{where}: column {c!r} must be numeric (it was at training); got "
                            f"{frame[c].dtype}")
    if frame[target].isna().any():
        raise DataError(f"{where}: target {target!r} has {int(frame[target].isna().sum())} "
                        "missing labels; drop the rows without an outcome")
    return frame


def labelled_view(loaded: LoadedData, target: str, champion: ChampionState) -> LabelledView:
    frame = check_labelled(loaded, target, champion).reset_index(drop=True)
    prints = row_hashes(frame, Schema.from_dict(champion.schema))
    unseen, how = unseen_mask(prints, champion.seen, champion.seen_count)
    return LabelledView(frame, prints, unseen, how)


@task(name="find-unseen-rows", cache_policy=NO_CACHE)
def find_unseen(loaded: LoadedData, target: str, champion: ChampionState) -> LabelledView:
    return labelled_view(loaded, target, champion)


# --------------------------------------------------------------------------- the gate slice
class GatePlan:
    def __init__(self, folder: Path, train_path: Path, gate_path: Path, n_train: int, n_gate: int,
                 n_unseen: int, gate_sha256: str, how: str, seen_all: np.ndarray) -> None:
        self.folder, self.train_path, self.gate_path = folder, train_path, gate_path
        self.n_train, self.n_gate, self.n_unseen = n_train, n_gate, n_unseen
        self.gate_sha256, self.how, self.seen_all = gate_sha256, how, seen_all


@contextmanager
def gate_scratch() -> Iterator[Path]:
    """A folder for one retraining's gate slice, removed when the retraining ends: the slice
    lives on in MLflow (store_gate_slice, record_retraining), never on the worker's disk, so any
    machine reads it and a worker keeps nothing a later run needs."""
    with tempfile.TemporaryDirectory(prefix="mlops-gate-") as folder:
        yield Path(folder)


@task(name="split-gate-slice", cache_policy=NO_CACHE)
def plan_gate(view: LabelledView, champion: ChampionState, policy: RetrainingPolicy,
              scratch: Path, min_new_rows: int | None = None) -> GatePlan:
    """Hold out `gate_share` of the rows the champion never saw; the challenger trains on the
    rest. Both files are written to `scratch` (gate_scratch) for this run's tasks to read."""
    needed = policy.min_new_rows if min_new_rows is None else min_new_rows
    if view.n_unseen < max(needed, 2 * MIN_GATE_ROWS):
        raise DataError(
            f"too few labelled rows for a retraining of {champion.model_name!r}: "
            f"{view.n_unseen} rows v{champion.version} has not seen ({view.how}); needed at least "
            f"{max(needed, 2 * MIN_GATE_ROWS)} (min_new_rows {needed}, and {MIN_GATE_ROWS} for "
            "the gate); collect more labelled rows")
    labels = view.frame[champion.target] if champion.schema["task"] != "regression" else None
    gate = gate_split(view.unseen, labels, policy.gate_share)
    folder = Path(scratch)
    # a copy of a gate row (same fingerprint) must not reach the challenger's training rows
    train_mask = ~gate & ~np.isin(view.fingerprints, view.fingerprints[gate])
    train, gate_rows = view.frame[train_mask], view.frame[gate]
    train_path, gate_path = folder / "train.parquet", folder / "gate.parquet"
    train.to_parquet(train_path, index=False)
    gate_rows.to_parquet(gate_path, index=False)
    return GatePlan(folder, train_path, gate_path, len(train), len(gate_rows), view.n_unseen,
                    frame_sha256(gate_rows.reset_index(drop=True)), view.how,
                    np.unique(view.fingerprints))


@task(name="mark-rows-seen", cache_policy=NO_CACHE)
def mark_seen(run_id: str, seen: np.ndarray, n_rows: int) -> None:
    """The challenger was given every labelled row (the gate slice too): record them all as seen,
    so the next check counts only rows that arrive later."""
    client = mlflow_client()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SEEN_ROWS_NAME
        np.save(path, seen)
        client.log_artifact(run_id, str(path), "mlops")
    client.set_tag(run_id, "mlops.data_rows", str(n_rows))


GATE_SLICE_FOLDER = "mlops/gate-slice"  # artifact folder of the challenger's run


@task(name="store-gate-slice", cache_policy=NO_CACHE)
def store_gate_slice(run_id: str, plan: GatePlan) -> str:
    """Keep the challenger's training rows and the gate rows with its MLflow run (the artifact
    store every machine reads: S3 behind the MLflow server in the production stack) and point
    its data reference there; returns that reference."""
    client = mlflow_client()
    for path in (plan.train_path, plan.gate_path):
        client.log_artifact(run_id, str(path), GATE_SLICE_FOLDER)
    ref = f"runs:/{run_id}/{GATE_SLICE_FOLDER}/{Path(plan.train_path).name}"
    client.set_tag(run_id, "mlops.data_ref", ref)
    return ref


@task(name="score-on-gate-rows", cache_policy=NO_CACHE)
def score_gate(model_name: str, champion_version: int, challenger_version: int,
               gate_path: str) -> tuple[dict[str, float], dict[str, float]]:
    """Both versions on the very same rows (one frame, read once): (champion, challenger)."""
    frame = pd.read_parquet(gate_path)
    loaded = LoadedData(frame=frame, ref=gate_path)
    return (score_version.fn(model_name, champion_version, loaded),
            score_version.fn(model_name, challenger_version, loaded))


@task(name="read-challenger-schema", cache_policy=NO_CACHE)
def read_schema(run_id: str) -> dict:
    return load_artifact_json(run_id, "schema.json")


# --------------------------------------------------------------------------- signals' inputs
def _newest_run(client, experiment_ids: list[str], kind: str, model_name: str,
                version: int | None = None):
    query = f"tags.`mlops.kind` = '{kind}' AND tags.`mlops.model_name` = '{model_name}'"
    if version is not None:
        query += f" AND tags.`mlops.model_version` = '{version}'"
    runs = client.search_runs(experiment_ids, query, order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


def experiments_of(champion: ChampionState) -> list[str]:
    ids = {resolve_mlflow_config().ensure_experiment()}
    if champion.experiment_id:
        ids.add(champion.experiment_id)
    return sorted(ids)


@task(name="read-latest-drift-check", cache_policy=NO_CACHE)
def latest_drift(champion: ChampionState) -> tuple[float | None, str]:
    """The newest check_drift of the champion version recorded in MLflow: (score, where/when)."""
    client = mlflow_client()
    run = _newest_run(client, experiments_of(champion), "drift-check", champion.model_name,
                      champion.version)
    if run is None:
        return None, f"no check_drift of v{champion.version} recorded"
    when = datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc)
    return (float(run.data.metrics.get("drift_score", float("nan"))),
            f"check_drift of v{champion.version} at {when:%Y-%m-%d %H:%M} UTC on "
            f"{run.data.tags.get('mlops.data_ref', '?')} (run {run.info.run_id})")


@task(name="measure-data-drift", cache_policy=NO_CACHE)
def data_drift(champion: ChampionState, view: LabelledView | None, policy: MonitoringPolicy
               ) -> tuple[float | None, str]:
    """The drift score of the labelled rows the champion never saw against its stored training
    profile: the comparison check_drift makes, with the policy's settings, but nothing recorded.
    (score, on what); None when there are too few such rows or no profile to compare with."""
    if view is None:
        return None, "no labelled data given"
    if view.n_unseen < MIN_EVAL_ROWS:
        return None, (f"{view.n_unseen} labelled rows v{champion.version} has not seen, fewer "
                      f"than the {MIN_EVAL_ROWS} a drift score needs")
    try:
        reference = read_reference(champion.model_name, champion.version)
        report = build_drift_report(reference, view.frame[view.unseen], policy)
    except (ProfileNotFoundError, DriftInputError) as exc:
        return None, str(exc)
    names = report.drifted_features  # most drifted first
    drifted = ", ".join(names[:MAX_NAMED_FEATURES]) or "none"
    if len(names) > MAX_NAMED_FEATURES:
        drifted += f" and {len(names) - MAX_NAMED_FEATURES} more"
    return report.score, (f"on {report.n_current} labelled rows v{champion.version} has not "
                          f"seen; drifted: {drifted}")


@task(name="measure-production-metric", cache_policy=NO_CACHE)
def production_metric(champion: ChampionState, view: LabelledView | None
                      ) -> tuple[float | None, str]:
    """The champion's primary metric on labelled rows it never saw; without enough of them, its
    newest recorded evaluate_production."""
    if view is not None and view.n_unseen >= MIN_EVAL_ROWS:
        rows = view.frame[view.unseen]
        loaded = LoadedData(frame=rows, ref=None)
        scores = score_version.fn(champion.model_name, champion.version, loaded)
        return scores.get(champion.metric), f"on {len(rows)} labelled rows v{champion.version} " \
                                            f"has not seen ({view.how})"
    client = mlflow_client()
    run = _newest_run(client, experiments_of(champion), "production-evaluation",
                      champion.model_name, champion.version)
    key = f"production_{champion.metric}"
    if run is not None and key in run.data.metrics:
        when = datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc)
        return float(run.data.metrics[key]), (f"newest evaluate_production at "
                                              f"{when:%Y-%m-%d %H:%M} UTC")
    return None, (f"fewer than {MIN_EVAL_ROWS} unseen labelled rows and no evaluate_production "
                  f"of v{champion.version} recorded")


# --------------------------------------------------------------------------- one at a time
def slot_name(model_name: str) -> str:
    return f"mlops-retraining-{model_slug(model_name)}"


def check_slot_free(model_name: str) -> None:
    """Refuse at once (RetrainingInProgressError) while a retraining of the model holds its slot:
    a caller about to start one asynchronously learns it now, not from a failed run later."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    name = slot_name(model_name)
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:  # never retrained: the limit is created on first use
            return
    if limit.active_slots >= limit.limit:
        raise RetrainingInProgressError(
            f"another retraining of {model_name!r} is running (concurrency limit {name!r} has "
            "its one slot taken); nothing was started. Wait for it to finish (Prefect UI: "
            "Concurrency) and see retraining_history")


@contextmanager
def retraining_slot(model_name: str, lease_s: float = SLOT_LEASE_S) -> Iterator[str]:
    """Hold the model's strict global concurrency limit (1 slot) or refuse at once.

    The limit is created on first use. The holder's client renews the lease while it lives; a
    holder that died (kill -9, lost machine) frees the slot when ``lease_s`` has passed. The
    Prefect API being briefly away (a server restart) does not fail the retraining: a renewal
    that fails is retried by the next one, and a release that cannot reach the API leaves the
    slot to its lease (logged), instead of turning a finished retraining into a failed run.
    """
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = slot_name(model_name)
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, 1)
        except ObjectAlreadyExists:  # created by a concurrent first retraining
            pass
    held = concurrency(name, occupy=1, max_retries=0, strict=True, lease_duration=lease_s,
                       raise_on_lease_renewal_failure=False)
    try:
        held.__enter__()
    except ConcurrencySlotAcquisitionError as exc:
        if "423" not in str(exc):
            raise
        raise RetrainingInProgressError(
            f"another retraining of {model_name!r} is running (concurrency limit {name!r} "
            "has its one slot taken); this one is refused and nothing was changed. Wait for "
            "it to finish (Prefect UI: Concurrency) and see retraining_history") from None
    try:
        yield name
    finally:
        try:
            held.__exit__(None, None, None)  # the release does not depend on how the body ended
        except httpx.TransportError as exc:
            logging.getLogger(__name__).warning(
                "could not release the retraining slot %r (Prefect API unreachable: %s); it "
                "frees itself when its lease ends, at most %.0f s from now", name, exc, lease_s)


# --------------------------------------------------------------------------- promotion
# A promotion is: record the intent (registered-model tag) -> move `champion` -> verify it -> clear
# the intent. A run killed between the move and the verification leaves the intent behind; the
# model's next retraining undoes the unverified promotion first (undo_interrupted_promotion).
PROMOTION_INTENT_TAG = "mlops.promotion_intent"


def read_promotion_intent(client, model_name: str) -> dict[str, Any] | None:
    raw = (get_registered_model(client, model_name).tags or {}).get(PROMOTION_INTENT_TAG)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return {"from": None, "to": None, "raw": raw}


def clear_promotion_intent(client, model_name: str) -> None:
    try:
        client.delete_registered_model_tag(model_name, PROMOTION_INTENT_TAG)
    except MlflowException:
        pass  # already cleared


def restore_champion(client, model_name: str, previous: int | None, promoted: int,
                     why: str) -> None:
    """`champion` back on `previous` (removed if there was none), `challenger` on `promoted`."""
    if previous is None:
        move_alias(client, model_name, "champion", None, why, "rollback")
    else:
        promote(client, model_name, previous, "champion", why, kind="rollback")
    move_alias(client, model_name, "challenger", promoted, why, "rollback")


@task(name="promote-challenger-to-champion", cache_policy=NO_CACHE)
def promote_champion(model_name: str, version: int, reason: str) -> int | None:
    """Move `champion` to `version`, the intent recorded first; inside a transaction, its rollback
    hook moves it back and its commit hook (after verification) clears the intent."""
    from prefect.runtime import flow_run

    client = mlflow_client()
    previous = alias_map(client, model_name).get("champion")
    txn = get_transaction()
    if txn is not None:
        txn.set("model_name", model_name)
        txn.set("previous_champion", previous)
        txn.set("promoted", version)
    client.set_registered_model_tag(model_name, PROMOTION_INTENT_TAG, json.dumps({
        "from": previous, "to": version, "flow_run_id": flow_run.get_id(),
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    promote(client, model_name, version, "champion", reason, kind="retrain")
    return previous


@promote_champion.on_commit
def _promotion_verified(txn: Transaction) -> None:
    clear_promotion_intent(mlflow_client(), txn.get("model_name"))


@promote_champion.on_rollback
def _restore_champion(txn: Transaction) -> None:
    name, previous, promoted = (txn.get("model_name"), txn.get("previous_champion"),
                                txn.get("promoted"))
    client = mlflow_client()
    restore_champion(client, name, previous, promoted,
                     f"retraining failed after promoting v{promoted}: champion restored")
    clear_promotion_intent(client, name)
    get_run_logger().warning("rolled back: %s champion is v%s again (v%s stays challenger)",
                             name, previous, promoted)


@task(name="undo-interrupted-promotion", cache_policy=NO_CACHE)
def undo_interrupted_promotion(model_name: str) -> str | None:
    """Call holding the model's retraining slot: an intent still recorded then belongs to a run
    that died between moving `champion` and verifying it. If `champion` is still where that run
    put it, it goes back to the version before (the promoted one stays challenger); either way
    the intent is cleared. Returns what was done, None when nothing was pending."""
    client = mlflow_client()
    intent = read_promotion_intent(client, model_name)
    if intent is None:
        return None
    promoted, previous = intent.get("to"), intent.get("from")
    held = alias_map(client, model_name).get("champion")
    if promoted is not None and held == promoted:
        restore_champion(client, model_name, previous, promoted,
                         f"promotion of v{promoted} interrupted before its verification (flow "
                         f"run {intent.get('flow_run_id')} died): champion restored")
        done = (f"undid the unverified promotion of v{promoted} (flow run "
                f"{intent.get('flow_run_id')} died before verifying it): champion is "
                f"{'v' + str(previous) if previous is not None else 'unset'} again")
    else:
        done = (f"cleared the intent of an interrupted promotion of v{promoted}: champion has "
                f"moved since (now {'v' + str(held) if held is not None else 'unset'})")
    clear_promotion_intent(client, model_name)
    get_run_logger().warning("%s: %s", model_name, done)
    return done


@task(name="verify-champion", cache_policy=NO_CACHE)
def verify_champion(model_name: str, version: int, gate_path: str, metric: str,
                    expected: float) -> None:
    """Read the promotion back from MLflow: `champion` resolves to `version` and the model it
    loads scores the gate rows as the gate measured."""
    client = mlflow_client()
    held = alias_map(client, model_name).get("champion")
    if held != version:
        raise RegistryError(f"after promotion `champion` points at v{held}, not v{version}")
    frame = pd.read_parquet(gate_path)
    scores = score_version.fn(model_name, "champion",
                              LoadedData(frame=frame, ref=gate_path))
    if not math.isclose(scores.get(metric, float("nan")), expected, rel_tol=1e-9, abs_tol=1e-12):
        raise RegistryError(f"the promoted champion scores {metric} {scores.get(metric)} on the "
                            f"gate rows, not the {expected} the gate measured")


@task(name="set-challenger-alias", cache_policy=NO_CACHE)
def keep_as_challenger(model_name: str, version: int, reason: str) -> None:
    client = mlflow_client()
    promote(client, model_name, version, "challenger", reason, kind="retrain")


@task(name="active-ab-tests", cache_policy=NO_CACHE)
def active_ab_tests(model_name: str) -> list[str]:
    from tasks.ab import open_store

    return [t.test_id for t in open_store().list_tests(model_name, "active")]


# --------------------------------------------------------------------------- history
@task(name="record-retraining", cache_policy=NO_CACHE)
def record_retraining(result: RetrainResult, gate_path: str | None,
                      experiment_id: str | None = None) -> str:
    """The retraining as a finished MLflow run: tags (the whole result in `mlops.retrain_result`),
    both versions' gate metrics, the gate rows."""
    from mlflow.entities import Metric

    client = mlflow_client()
    experiment = experiment_id or resolve_mlflow_config().ensure_experiment()
    tags = {"mlops.kind": HISTORY_KIND, "mlops.model_name": result.model_name,
            "mlops.trigger": result.trigger, "mlops.decision": result.decision,
            "mlops.promoted": str(result.promoted).lower(),
            "mlops.champion_version": str(result.champion_version),
            "mlops.challenger_version": str(result.challenger_version),
            "mlflow.note.content": f"{result.decision}: {result.why}"}
    run = client.create_run(experiment, run_name=f"retrain-{result.model_name}", tags=tags,
                            start_time=int((result.started_at or datetime.now(timezone.utc))
                                           .timestamp() * 1000))
    run_id = run.info.run_id
    try:
        result.run_id = run_id
        client.set_tag(run_id, RESULT_TAG, result.model_dump_json())
        now_ms = int(time.time() * 1000)
        metrics = {**{f"champion_{k}": v for k, v in result.champion_metrics.items()},
                   **{f"challenger_{k}": v for k, v in result.challenger_metrics.items()},
                   "promoted": float(result.promoted)}
        items = [Metric(k, float(v), now_ms, 0) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if items:
            client.log_batch(run_id, metrics=items)
        client.log_dict(run_id, json.loads(result.model_dump_json()), "retraining/result.json")
        if gate_path and Path(gate_path).is_file():
            client.log_artifact(run_id, gate_path, "retraining")
        client.set_terminated(run_id, "FINISHED" if result.decision != "failed" else "FAILED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def read_history(model_name: str, limit: int = 100) -> list[RetrainResult]:
    client = mlflow_client()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(
        experiments, f"tags.`mlops.kind` = '{HISTORY_KIND}' AND "
                     f"tags.`mlops.model_name` = '{model_name}'",
        order_by=["attributes.start_time DESC"], max_results=limit)
    found = []
    for run in runs:
        raw = run.data.tags.get(RESULT_TAG)
        if raw:
            result = RetrainResult.model_validate_json(raw)
            result.run_id = run.info.run_id
            found.append(result)
    return found


@task(name="read-retraining-history", cache_policy=NO_CACHE)
def load_history(model_name: str, limit: int = 100) -> list[RetrainResult]:
    return read_history(model_name, limit)


def hours_since_last(history: list[RetrainResult], now: datetime | None = None) -> float | None:
    """Hours since the newest retraining that did not fail (a failed one does not hold the next)."""
    now = now or datetime.now(timezone.utc)
    for r in history:
        if r.decision != "failed" and r.started_at is not None:
            return (now - r.started_at).total_seconds() / 3600
    return None


def history_table(history: list[RetrainResult]) -> list[dict[str, Any]]:
    def f(x):
        return None if x is None else round(x, 5)

    return [{"when (UTC)": r.started_at.strftime("%Y-%m-%d %H:%M:%S") if r.started_at else "",
             "trigger": r.trigger, "reason": r.reason[:120],
             "champion": f"v{r.champion_version}" if r.champion_version else "",
             "challenger": f"v{r.challenger_version}" if r.challenger_version else "",
             f"champion {r.metric or 'score'}": f(r.champion_score),
             f"challenger {r.metric or 'score'}": f(r.challenger_score),
             "gate rows": r.gate_rows, "decision": r.decision, "why": r.why[:160]}
            for r in history]
