"""The ``rec-peers`` benchmark section: F(Q,B,I) against peers from real libraries, over seeds,
with a paired test over users.

MovieLens-100K is prepared once (``kuberank data prep``: leave-last-out, ties in log order) and
that prepared directory is the one source of every model below. F is kuberank's fine-tuned
model (Ray Train, epoch chosen on validation); the peers are RecBole's SASRec, GRU4Rec,
LightGCN and BPR (learned: early stopping on validation, one run per seed), RecBole's ItemKNN
and kuberank's EASE^R (deterministic: one run). Every model is ranked over the full catalogue
with seen items excluded and scored by :mod:`kuberank.metrics`; the table shows mean +- sd
over seeds. F is compared with the best peer (by mean test NDCG@10) per user: each user's
NDCG@10 averaged over seeds, paired t-test and paired bootstrap (:mod:`kuberank.significance`).

Scale (environment; the defaults are the full run):

- ``KUBERANK_REC_PEERS_SEEDS`` (3): seeds of F and of each learned peer;
- ``KUBERANK_REC_PEERS_MAX_EPOCHS`` (300, RecBole's default): epoch cap of the peers;
- ``KUBERANK_REC_PEERS_F_EPOCHS`` (F's default): epoch cap of F;
- ``KUBERANK_REC_PEERS_MODELS`` (all): comma-separated peers to run;
- ``KUBERANK_REC_PEERS_RUNS`` (``rec-peers-runs`` beside the bench's output directory): where
  each RecBole peer run (one model, one seed) is kept as it finishes.

A kept run is reused by a later invocation when its key matches: the model, the seed, the epoch
cap, the prepared data (content hash and split rule) and the RecBole and torch versions. A run
that takes an hour per seed (SASRec, GRU4Rec on a CPU) is therefore measured once, and the
section can be run seed by seed, in several sittings, towards the full table. A run stopped
midway resumes after its last finished epoch: its training state is saved after every epoch
under ``partial/<model>-seed<N>`` of the same directory (removed once the run is kept). F and EASE^R
(kuberank's own code, minutes) are measured afresh every time.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from kuberank import datasets, report, significance, storage

LEARNED = ("sasrec", "gru4rec", "lightgcn", "bpr")
DETERMINISTIC = ("itemknn", "ease")
F_NAME = "F(Q,B,I) fine-tuned"


def settings() -> dict:
    env = os.environ.get
    models = env("KUBERANK_REC_PEERS_MODELS", ",".join(LEARNED + DETERMINISTIC))
    f_epochs = env("KUBERANK_REC_PEERS_F_EPOCHS")
    return {
        "seeds": int(env("KUBERANK_REC_PEERS_SEEDS", "3")),
        "max_epochs": int(env("KUBERANK_REC_PEERS_MAX_EPOCHS", "300")),
        "f_epochs": int(f_epochs) if f_epochs else None,
        "models": [m.strip() for m in models.split(",") if m.strip()],
        "runs_dir": env("KUBERANK_REC_PEERS_RUNS"),
    }


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:  # the peer itself then names the extra to install
        return None


def run_key(name: str, seed: int, cfg: dict, manifest: dict) -> dict:
    """What a kept peer run must match to be reused."""
    return {
        "model": name,
        "seed": seed,
        "max_epochs": cfg["max_epochs"] if name in LEARNED else None,
        "data": manifest["content_hash"],
        "split": {k: manifest["split"][k] for k in ("rule", "tie_break")},
        "recbole": _version("recbole"),
        "torch": _version("torch"),
    }


def _run_path(runs_dir: Path, key: dict) -> Path:
    return runs_dir / f"{key['model']}-seed{key['seed']}.json"


def _partial_path(runs_dir: Path, key: dict) -> Path:
    return runs_dir / "partial" / _run_path(runs_dir, key).stem


def kept_run(runs_dir: Path, key: dict) -> dict | None:
    """The run kept under ``key``, or None (none kept, another key, or unreadable)."""
    path = _run_path(runs_dir, key)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored["run"] if isinstance(stored, dict) and stored.get("key") == key else None


def keep_run(runs_dir: Path, key: dict, run: dict) -> Path:
    """Write ``run`` under ``key`` (atomically: a killed writer leaves the old file or none)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = _run_path(runs_dir, key)
    storage.write_json(path, {"key": key, "run": run})
    return path


def peer_runs(data, manifest: dict, cfg: dict, runs_dir: Path) -> dict[str, list[dict]]:
    """Every peer of ``cfg`` over its seeds: RecBole's runs kept in (and reused from)
    ``runs_dir``; each run has ``seed``, ``metrics``, ``per_user``, ``epochs``, ``training``,
    ``seconds``, ``measured_at`` and ``reused``."""
    from benchmarks.sections import scored
    from kuberank.components.peers import load_peer

    runs: dict[str, list[dict]] = {}
    for name in cfg["models"]:
        for seed in range(cfg["seeds"] if name in LEARNED else 1):
            recbole = name != "ease"  # kuberank's own code is measured afresh, never kept
            key = run_key(name, seed, cfg, manifest) if recbole else None
            run = kept_run(runs_dir, key) if recbole else None
            if run is not None:
                run["reused"] = True
                print(f"{name} seed {seed}: kept run of {run['measured_at']} reused", flush=True)
            else:
                started = time.perf_counter()
                partial = _partial_path(runs_dir, key) if recbole else None
                ranker = load_peer(
                    name, max_epochs=cfg["max_epochs"], seed=seed, checkpoint_dir=partial
                )
                scores, per_user = scored(data, ranker, "test")
                training = getattr(ranker, "training", {})
                run = {
                    "seed": seed,
                    "metrics": scores,
                    "per_user": per_user,
                    "epochs": training.get("epochs_run") if recbole else None,
                    "training": training,
                    "seconds": time.perf_counter() - started,
                    "measured_at": f"{_dt.datetime.now(_dt.UTC):%Y-%m-%dT%H:%M:%SZ}",
                }
                if recbole:
                    keep_run(runs_dir, key, run)
                    shutil.rmtree(partial, ignore_errors=True)
                run["reused"] = False
            runs.setdefault(name, []).append(run)
            print(
                f"{name} seed {seed}: ndcg@10 {run['metrics']['ndcg@10']:.4f} {run['training']}",
                flush=True,
            )
    return runs


def _row(name: str, runs: list[dict]) -> dict:
    row = {"model": name, "seeds": len(runs)}
    for key in ("ndcg@10", "hit@10", "recall@100"):
        mean, sd = significance.mean_sd([r["metrics"][key] for r in runs])
        row[key] = f"{mean:.4f} ± {sd:.4f}" if len(runs) > 1 else f"{mean:.4f}"
        row[f"{key} mean"] = mean
    epochs = [r["epochs"] for r in runs if r["epochs"] is not None]
    row["epochs"] = (
        "closed form"
        if not epochs
        else f"{min(epochs)}-{max(epochs)}"
        if min(epochs) != max(epochs)
        else str(epochs[0])
    )
    row["train s"] = f"{sum(r['seconds'] for r in runs) / len(runs):.0f}"  # per run, with scoring
    return row


def rec_peers(out: Path, cisi: str | None):
    from benchmarks.sections import ML, _train, scored
    from kuberank.components.data_prep import prepare
    from kuberank.components.evaluate import ModelRanker
    from kuberank.model import read_info

    cfg = settings()
    prepared = out / "rec-peers" / "prepared"
    manifest = prepare(ML, str(prepared))
    spec = f"prepared:{prepared}"
    data = datasets.load(spec)
    task = datasets.eval_task(data, "test")
    runs: dict[str, list[dict]] = {}

    for seed in range(cfg["seeds"]):
        started = time.perf_counter()
        extra = {"epochs": cfg["f_epochs"]} if cfg["f_epochs"] else {}
        model, _ = _train(
            spec, out / "models" / f"rec-peers-f-{seed}", workers=2, seed=seed, **extra
        )
        scores, per_user = scored(data, ModelRanker(str(model), name=F_NAME), "test")
        runs.setdefault(F_NAME, []).append(
            {
                "seed": seed,
                "metrics": scores,
                "per_user": per_user,
                "epochs": int(read_info(model).training["epochs_run"]),
                "seconds": time.perf_counter() - started,
            }
        )
        print(f"{F_NAME} seed {seed}: ndcg@10 {scores['ndcg@10']:.4f}", flush=True)

    runs_dir = Path(cfg["runs_dir"]) if cfg["runs_dir"] else out.parent / "rec-peers-runs"
    runs.update(peer_runs(data, manifest, cfg, runs_dir))

    rows = [_row(name, r) for name, r in runs.items()]
    peers = [row for row in rows if row["model"] != F_NAME]
    lines = [
        f"MovieLens-100K, test split ({len(task)} users), full ranking over "
        f"{len(task.dataset.items)} items, seen items excluded; one prepared split "
        f"({manifest['split']['rule']}, ties by {manifest['split']['tie_break']} order; "
        f"{manifest['split']['users_tied_last_two']} users' last two interactions tie). "
        f"Mean ± sd over seeds; peers stop early on validation NDCG@10 (epochs run shown, "
        f"cap {cfg['max_epochs']}).",
        "",
        report.format_table(
            rows, ("ndcg@10", "hit@10", "recall@100", "epochs", "seeds", "train s"), first="model"
        ),
    ]
    reused = [
        f"{name} seed {r['seed']} ({r['measured_at']})"
        for name, model_runs in runs.items()
        for r in model_runs
        if r.get("reused")
    ]
    if reused:
        lines += ["", f"Kept runs reused from {runs_dir}: " + ", ".join(reused) + "."]
    result = {
        "settings": cfg,
        "split": manifest["split"],
        "rows": rows,
        "runs": {
            name: [{k: v for k, v in r.items() if k != "per_user"} for r in model_runs]
            for name, model_runs in runs.items()
        },
    }
    if peers and F_NAME in runs:
        best = max(peers, key=lambda row: row["ndcg@10 mean"])["model"]
        test = significance.paired_test(
            significance.average_per_query([r["per_user"] for r in runs[F_NAME]]),
            significance.average_per_query([r["per_user"] for r in runs[best]]),
        )
        low, high = test["bootstrap_ci95"]
        verdict = (
            "F is ahead"
            if test["difference"] > 0 and test["t_p"] < 0.05
            else f"{best} is ahead"
            if test["difference"] < 0 and test["t_p"] < 0.05
            else "no significant difference"
        )
        lines += [
            "",
            f"F against the best peer ({best}), paired over {test['queries']} users (each "
            f"user's NDCG@10 averaged over seeds): difference {test['difference']:+.4f} "
            f"(bootstrap 95% interval [{low:+.4f}, {high:+.4f}]), paired t-test p = "
            f"{test['t_p']:.3g}, bootstrap p = {test['bootstrap_p']:.3g}: {verdict}.",
        ]
        result["paired"] = {"a": F_NAME, "b": best, **test, "verdict": verdict}
    print("\n".join(lines), flush=True)
    return result, "\n".join(lines)
