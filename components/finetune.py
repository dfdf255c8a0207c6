"""Fine-tuning step: distributed training of the two-tower ranker on Ray Train.

Pure core: :func:`train` (a :class:`TrainConfig` in, a model directory out). It runs
:func:`train_loop_per_worker` on a ``ray.train.torch.TorchTrainer`` (DDP: gloo on CPU, NCCL
on GPU), checkpointing every epoch to ``storage`` (a local path or s3://) and resuming from the
latest checkpoint after a worker failure (``FailureConfig(max_failures)``).

- search collections: the text towers are fine-tuned with an in-batch-negative contrastive
  loss (InfoNCE with temperature; other positives of the same query are masked out of the
  negatives), optionally with one BM25 hard negative per pair; where the collection has
  validation queries (``dev.tsv``, or those held out by :mod:`kuberank.datasets`), the epoch
  kept is the best by validation nDCG@10.
- recommendation: next-item prediction with a (sampled) softmax over items trains F's
  behaviour and collaborative terms on top of the item text vectors; the number of epochs
  kept is chosen on the validation split only (best checkpoint by validation nDCG@10).

Thin wrappers: the kfp component :func:`finetune_op` (submits to a Ray cluster address or
starts a local cluster) and ``kuberank train`` in the CLI.
"""

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
from kfp import dsl

from kuberank import datasets, storage
from kuberank.config import base_model_path
from kuberank.corpus_pairs import corpus_pairs
from kuberank.errors import KuberankError
from kuberank.kfp_component import step_component

SEARCH_DEFAULTS = {"epochs": 2, "batch_size": 32, "lr": 5e-5}
RECOMMENDATION_DEFAULTS = {"epochs": 4, "batch_size": 256, "lr": 3e-3}


@dataclasses.dataclass
class TrainConfig:
    dataset: str
    out: str
    workers: int = 2
    epochs: int | None = None  # default by kind (SEARCH_DEFAULTS / RECOMMENDATION_DEFAULTS)
    max_minutes: float | None = None  # stop after the epoch that crosses this budget
    batch_size: int | None = None
    lr: float | None = None
    temperature: float = 0.05
    hard_negatives: bool = False
    corpus_pairs: float = 0.0  # in-domain pairs from the documents per judged pair (search)
    towers: str = "shared"  # or "separate"
    lora: bool = False
    lora_rank: int = 8
    grad_accumulation: int = 1
    max_length: int = 128  # training sequence length (evaluation uses 256)
    query_max_length: int = 64
    seed: int = 0
    negatives: int = 512  # sampled-softmax negatives; the full catalogue when it is smaller
    max_history: int = 20  # behaviour sequence length (most recent items)
    warm_start: str | None = None  # a previous model directory
    replay_fraction: float = 0.2  # share of the previous model's training data replayed
    storage: str | None = None  # checkpoint storage (default: <out>.checkpoints)
    max_failures: int = 2
    ray_address: str | None = None
    use_gpu: bool | None = None  # default: when the cluster has GPUs
    fault_injection: dict | None = None  # tests only: {"kill_after_epoch": n, "marker": path}

    def resolved(self, kind: str) -> "TrainConfig":
        defaults = SEARCH_DEFAULTS if kind == datasets.SEARCH else RECOMMENDATION_DEFAULTS
        changes = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.towers not in ("shared", "separate"):
            raise KuberankError(f"--towers: {self.towers!r} is not 'shared' or 'separate'")
        if self.workers < 1:
            raise KuberankError("--workers: must be at least 1")
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- training data


def search_examples(data: datasets.Dataset, split: str = "train") -> dict:
    """(query, positive document) pairs of ``split``, with every query's positive set."""
    if split not in data.splits():
        raise KuberankError(
            f"{data.name}: the {split} split is empty (no judged queries): nothing to train on"
        )
    task = datasets.eval_task(data, split)
    index_of = {iid: i for i, iid in enumerate(data.item_ids)}
    pairs = [(q, index_of[d]) for q, qid in enumerate(task.query_ids) for d in task.qrels[qid]]
    if not pairs:
        raise KuberankError(
            f"{data.name}: the {split} split has no (query, relevant document) pair: nothing to train on"
        )
    return {"queries": [t or "" for t in task.texts], "pairs": pairs}


def recommendation_examples(data: datasets.Dataset, max_history: int) -> dict:
    """Next-item examples from every user's training sequence: (user, target, history)."""
    index_of = {iid: i for i, iid in enumerate(data.item_ids)}
    train = data.interactions[data.interactions["split"] == "train"]
    users = sorted(data.interactions["user_id"].unique(), key=str)
    user_index = {u: i for i, u in enumerate(users)}
    sequences = {
        u: g["item_id"].map(index_of).to_numpy() for u, g in train.groupby("user_id", sort=False)
    }
    rows = [(user_index[u], t) for u, seq in sequences.items() for t in range(1, len(seq))]
    if not rows:
        raise KuberankError(
            f"{data.name}: the train split has no user with two or more interactions: nothing to train on"
        )
    return {
        "users": users,
        "sequences": {user_index[u]: seq for u, seq in sequences.items()},
        "rows": rows,
        "max_history": max_history,
    }


def bm25_hard_negatives(
    data: datasets.Dataset, examples: dict, depth: int = 20, index=None
) -> list[int]:
    """For each pair, one of the three best-ranked BM25 documents of ``data`` that is not
    relevant to its query (``examples``: query texts and (query, document row) pairs);
    ``index``: ``data``'s :class:`kuberank.lexical.LexicalIndex` when one is built already.
    Only the queries of the pairs are scored."""
    from kuberank.lexical import LexicalIndex

    if index is None:
        index = LexicalIndex.build(data.item_ids, data.item_texts)
    positives: dict[int, set[int]] = {}
    for q, d in examples["pairs"]:
        positives.setdefault(q, set()).add(d)
    scores = dict(
        zip(positives, index.scores([examples["queries"][q] for q in positives]), strict=True)
    )
    best: dict[int, list[int]] = {}
    for q in positives:
        order = np.argsort(-scores[q], kind="stable")[: depth + len(positives[q])]
        best[q] = [int(d) for d in order if d not in positives[q]][:depth] or [int(order[-1])]
    rng = random.Random(0)
    return [rng.choice(best[q][:3]) for q, _ in examples["pairs"]]


def replay_sample(previous_model: str, fraction: float, seed: int) -> datasets.Dataset | None:
    """The data a previous model was trained on, for replay during a warm start."""
    from kuberank.model import is_kuberank_model, read_info

    if fraction <= 0 or not is_kuberank_model(previous_model):
        return None  # a plain encoder has no training data to replay
    spec = read_info(previous_model).dataset.get("spec")
    if not spec:
        return None
    return datasets.load(spec)


def recommendation_replay(
    data: datasets.Dataset, previous: datasets.Dataset, fraction: float, seed: int
) -> "pd.DataFrame":
    """Training interactions of a random ``fraction`` of the previous data's users, limited to
    items still in the catalogue; replayed users get their own ids (``replay:<id>``) so old
    sequences never merge into current ones."""
    old = previous.interactions[previous.interactions["split"] == "train"]
    users = sorted(old["user_id"].unique(), key=str)
    keep = set(random.Random(seed).sample(users, int(len(users) * fraction)))
    rows = old[old["user_id"].isin(keep) & old["item_id"].isin(set(data.item_ids))]
    return rows.assign(user_id="replay:" + rows["user_id"].astype(str))


# --------------------------------------------------------------------------- the worker loop


def _lr_lambda(total_steps: int, warmup: float = 0.1):
    warm = max(1, int(total_steps * warmup))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return schedule


def _build_towers(config: dict):
    import copy

    import torch
    from transformers import AutoModel, AutoTokenizer

    from kuberank.model import item_tower_path

    source = config["init_model"]
    tokenizer = AutoTokenizer.from_pretrained(source)
    query_tower = AutoModel.from_pretrained(source, add_pooling_layer=False)
    item_tower = None
    if config["towers"] == "separate":
        separate = item_tower_path(source)
        item_tower = (
            AutoModel.from_pretrained(separate, add_pooling_layer=False)
            if separate != Path(source)
            else copy.deepcopy(query_tower)
        )
    if config["lora"]:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config["lora_rank"],
            lora_alpha=2 * config["lora_rank"],
            target_modules=["query", "key", "value", "dense"],
            lora_dropout=0.0,
        )
        query_tower = get_peft_model(query_tower, lora)
        if item_tower is not None:
            item_tower = get_peft_model(item_tower, lora)
    torch.manual_seed(config["seed"])
    return tokenizer, query_tower, item_tower


class TwoTower:
    """Builds the torch module holding both towers (a class so it pickles for Ray)."""

    @staticmethod
    def module(query_tower, item_tower):
        from torch import nn

        from kuberank.encoder import mean_pool

        class _TwoTower(nn.Module):
            def __init__(self):
                super().__init__()
                self.query_tower = query_tower
                self.item_tower = item_tower

            def embed(self, tower, batch):
                hidden = tower(**batch).last_hidden_state
                return nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)

            def forward(self, queries, docs):
                item_tower = self.item_tower if self.item_tower is not None else self.query_tower
                return self.embed(self.query_tower, queries), self.embed(item_tower, docs)

        return _TwoTower()


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker (DDP is set up by ``prepare_model``)."""
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    random.seed(config["seed"] + rank)
    np.random.seed(config["seed"] + rank)
    torch.manual_seed(config["seed"])
    torch.set_num_threads(max(1, config["threads_per_worker"]))
    device = ray.train.torch.get_device()
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16

    if config["kind"] == datasets.SEARCH:
        step_fn, model, params, extra = _search_setup(config)
    else:
        step_fn, model, params, extra = _recommendation_setup(config)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=0.01)
    rows = config["n_rows"]
    per_worker = math.ceil(rows / world)
    steps_per_epoch = math.ceil(per_worker / (config["batch_size"] * config["grad_accumulation"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        _lr_lambda(steps_per_epoch * config["epochs"])
        if config["kind"] == datasets.SEARCH
        else (lambda s: 1.0),
    )
    start_epoch, best, history = 0, None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt:
            state = torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=False)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, history = state["epoch"] + 1, state.get("best"), state.get("history", [])

    writer, events_dir = None, None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        # Events travel inside every checkpoint, so they reach any storage (local or S3).
        events_dir = Path(tempfile.mkdtemp(prefix="kuberank-tensorboard-"))
        if checkpoint:
            with checkpoint.as_directory() as ckpt:
                if (Path(ckpt) / "tensorboard").is_dir():
                    shutil.copytree(Path(ckpt) / "tensorboard", events_dir, dirs_exist_ok=True)
        writer = SummaryWriter(str(events_dir))
    progress = ray.get_actor(config["progress_actor"]) if config.get("progress_actor") else None
    started = time.monotonic()
    for epoch in range(start_epoch, config["epochs"]):
        _maybe_inject_fault(config, epoch, rank)
        order = np.random.default_rng(config["seed"] + epoch).permutation(rows)[rank::world]
        model.train()
        losses = []
        batch = config["batch_size"]
        epoch_started = time.monotonic()
        for step, start in enumerate(range(0, per_worker, batch)):
            index = order[start : start + batch]
            if len(index) == 0:  # uneven shards: a zero-weight step keeps DDP in lockstep
                index = order[:1]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                loss = step_fn(model, index, device) / config["grad_accumulation"]
            loss.backward()
            if (step + 1) % config["grad_accumulation"] == 0:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item() * config["grad_accumulation"])
            if progress is not None and rank == 0:
                progress.update.remote(1)
            if writer is not None:
                global_step = epoch * math.ceil(per_worker / batch) + step
                writer.add_scalar("train/loss", losses[-1], global_step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], global_step)
        metrics = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "start_epoch": start_epoch,
            "minutes": (time.monotonic() - started) / 60,
            "samples_per_s": rows / max(time.monotonic() - epoch_started, 1e-9),
        }
        if extra.get("validate") is not None:
            metrics.update(extra["validate"](_unwrap(model)))
            if best is None or metrics["val_ndcg@10"] > best:
                best = metrics["val_ndcg@10"]
        if writer is not None:
            for name, value in metrics.items():
                if name.startswith("val_"):
                    writer.add_scalar(f"eval/{name[4:]}", value, epoch)
            writer.flush()
        over_budget = config.get("max_minutes") and metrics["minutes"] >= config["max_minutes"]
        metrics["stopped_early"] = bool(over_budget and epoch + 1 < config["epochs"])
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                torch.save(
                    {
                        "model": _unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "best": best,
                        "history": history,
                    },
                    Path(tmp) / "state.pt",
                )
                shutil.copytree(events_dir, Path(tmp) / "tensorboard")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)
        if over_budget:
            break
    if writer is not None:
        writer.close()


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _maybe_inject_fault(config: dict, epoch: int, rank: int) -> None:
    """Tests only: SIGKILL this worker once, mid-run, at the start of the epoch after
    ``kill_after_epoch`` (whose checkpoint has had time to be registered)."""
    fault = config.get("fault_injection") or {}
    marker = fault.get("marker")
    if (
        rank == 0
        and marker
        and epoch == fault.get("kill_after_epoch", -2) + 1
        and not os.path.exists(marker)
    ):
        time.sleep(3)
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), 9)


def _search_setup(config: dict):
    import torch

    tokenizer, query_tower, item_tower = _build_towers(config)
    model = TwoTower.module(query_tower, item_tower)
    queries, pairs = config["queries"], config["pairs"]
    doc_texts, hard = config["doc_texts"], config.get("hard_negatives")
    positives = {(q, d) for q, d in pairs} | {(q, d) for q, d in config.get("mask_pairs", [])}

    def tokenize(texts, max_length, device):
        batch = tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {k: v.to(device) for k, v in batch.items()}

    def step(model, index, device):
        batch_pairs = [pairs[i] for i in index]
        docs = [d for _, d in batch_pairs]
        if hard:
            docs += [hard[i] for i in index]
        q_vecs, d_vecs = model(
            tokenize([queries[q] for q, _ in batch_pairs], config["query_max_length"], device),
            tokenize([doc_texts[d] for d in docs], config["max_length"], device),
        )
        logits = q_vecs @ d_vecs.T / config["temperature"]
        # Another positive of the same query is no negative: mask it out.
        mask = torch.tensor(
            [
                [j != i and (q, d) in positives for j, d in enumerate(docs)]
                for i, (q, _) in enumerate(batch_pairs)
            ],
            device=logits.device,
        )
        logits = logits.masked_fill(mask, float("-inf"))
        labels = torch.arange(len(batch_pairs), device=logits.device)
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    validate = None
    if config.get("validation"):
        validation = config["validation"]
        docs = doc_texts[: validation["n_docs"]]  # replayed documents follow: not judged here

        def encode(model, tower, texts, max_length):
            device = next(model.parameters()).device
            out = [
                model.embed(tower, tokenize(texts[i : i + 64], max_length, device)).float().cpu()
                for i in range(0, len(texts), 64)
            ]
            return torch.cat(out)

        def validate(model):
            from kuberank import metrics as m

            item_tower = model.item_tower if model.item_tower is not None else model.query_tower
            model.eval()
            with torch.no_grad():
                q = encode(
                    model, model.query_tower, validation["queries"], config["query_max_length"]
                )
                d = encode(model, item_tower, docs, config["max_length"])
            scores = (q @ d.T).numpy()
            run = {
                str(r): [str(i) for i in np.argsort(-scores[r], kind="stable")[:100]]
                for r in range(len(scores))
            }
            qrels = {
                str(r): {str(i): rel for i, rel in relevant.items()}
                for r, relevant in enumerate(validation["relevant"])
            }
            result = m.evaluate_run(run, qrels, cutoffs=(10,))
            model.train()
            return {"val_ndcg@10": result["ndcg@10"], "val_hit@10": result["hit@10"]}

    params = [p for p in model.parameters() if p.requires_grad]
    return step, model, params, {"validate": validate}


def _recommendation_setup(config: dict):
    import torch

    from kuberank.model import Scorer, ScorerConfig, pad_histories

    cfg = ScorerConfig(**config["scorer"])
    scorer = Scorer(cfg)
    if config.get("warm_scorer"):
        own = scorer.state_dict()
        scorer.load_state_dict(
            {k: v for k, v in config["warm_scorer"].items() if own[k].shape == v.shape},
            strict=False,
        )
    item_text = torch.from_numpy(config["item_text"])
    all_items = torch.arange(cfg.n_items)
    sequences, rows = config["sequences"], config["rows"]

    def step(model, index, device):
        users = torch.tensor([rows[i][0] for i in index])
        targets = torch.tensor([sequences[rows[i][0]][rows[i][1]] for i in index])
        hist = torch.from_numpy(
            pad_histories([sequences[rows[i][0]][: rows[i][1]] for i in index], cfg.max_history)
        )
        if cfg.n_items <= config["negatives"]:
            candidates = all_items
        else:  # sampled softmax: the batch's targets plus shared uniform negatives
            sampled = torch.randint(0, cfg.n_items, (config["negatives"],))
            candidates = torch.unique(torch.cat([targets, sampled]))
        scores = model(
            item_text[candidates],
            candidates,
            history=hist,
            history_text=item_text[hist.clamp(min=0)],
            users=users,
        )
        # Seen items are never recommended: mask them (the target stays).
        seen = (hist[:, :, None] == candidates[None, None, :]).any(1)
        is_target = candidates[None, :] == targets[:, None]
        scores = scores.masked_fill(seen & ~is_target, float("-inf"))
        labels = is_target.float().argmax(1)
        return torch.nn.functional.cross_entropy(scores, labels)

    validate = None
    if config.get("validation"):
        validation = config["validation"]

        def validate(model):
            from kuberank import metrics as m

            model.eval()
            with torch.no_grad():
                hist = torch.from_numpy(pad_histories(validation["histories"], cfg.max_history))
                scores = model(
                    item_text,
                    all_items,
                    history=hist,
                    history_text=item_text[hist.clamp(min=0)],
                    users=torch.tensor(validation["users"]),
                ).numpy()
            run = {}
            for row, exclude in enumerate(validation["exclude"]):
                scores[row, exclude] = -np.inf
                run[str(row)] = [str(i) for i in np.argsort(-scores[row], kind="stable")[:100]]
            qrels = {str(row): {str(t): 1} for row, t in enumerate(validation["targets"])}
            result = m.evaluate_run(run, qrels, cutoffs=(10,))
            model.train()
            return {"val_ndcg@10": result["ndcg@10"], "val_hit@10": result["hit@10"]}

    return step, scorer, [p for p in scorer.parameters() if p.requires_grad], {"validate": validate}


# --------------------------------------------------------------------------- the driver


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self):
            self.done = 0

        def update(self, n):
            self.done += n

        def value(self):
            return self.done

    return Progress


def checkpoint_storage(out: str) -> str:
    """The default checkpoint storage of a run writing ``out``: ``<out>.checkpoints`` beside
    it, on S3 when ``out`` is (every node of a cluster must reach it; a local path would be
    each node's own disk)."""
    if storage.is_s3(out):
        return f"{str(out).rstrip('/')}.checkpoints"
    return f"{Path(out).resolve()}.checkpoints"


def train(config: TrainConfig) -> Path:
    """Fine-tune on the ``train`` split of ``config.dataset`` and write the model directory."""
    import ray
    import ray.train
    import torch
    from ray.train.torch import TorchTrainer

    from kuberank.progress import bar
    from kuberank.raycluster import ensure_ray

    data = datasets.load(config.dataset)
    config = config.resolved(data.kind)
    init_model = config.warm_start or base_model_path()
    from kuberank.encoder import check_model_dir

    check_model_dir(init_model)
    _check_tokenizer_matches(init_model, config.towers)
    loop_config, finalize = _prepare(data, config, init_model)

    ensure_ray(config.ray_address)
    gpus = ray.cluster_resources().get("GPU", 0) or (1 if torch.cuda.is_available() else 0)
    use_gpu = gpus >= 1 if config.use_gpu is None else config.use_gpu
    cpus = int(ray.cluster_resources().get("CPU", 1))
    loop_config["threads_per_worker"] = max(1, cpus // config.workers)
    storage_uri = config.storage or checkpoint_storage(config.out)
    storage.check_writable(storage_uri)
    filesystem, storage_path = storage.arrow_filesystem(storage_uri)
    run_name = _run_name(data, config)
    Progress = _progress_actor()
    actor_name = f"kuberank-progress-{os.getpid()}-{time.time_ns()}"
    progress = Progress.options(name=actor_name).remote()
    loop_config["progress_actor"] = actor_name
    total_steps = (
        math.ceil(math.ceil(loop_config["n_rows"] / config.workers) / loop_config["batch_size"])
        * config.epochs
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            # With validation queries (recommendation always; search where the collection
            # has them) the best epoch by validation nDCG@10 is kept (tuning on validation
            # only); resuming after a failure always starts from the latest checkpoint.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute="val_ndcg@10" if loop_config.get("validation") else None,
                checkpoint_score_order="max",
            ),
        ),
    )
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=_fit(trainer)), daemon=True)
    thread.start()
    with bar(
        desc=f"train ({data.name}, {config.workers} workers)", total=total_steps, unit="step"
    ) as pbar:
        while thread.is_alive():
            thread.join(timeout=1.0)
            try:
                pbar.n = min(ray.get(progress.value.remote(), timeout=5), total_steps)
                pbar.refresh()
            except Exception:  # the progress actor is best effort
                pass
    result = outcome.get("result")
    if isinstance(result, BaseException):
        raise KuberankError(f"training failed: {result}") from result
    ray.kill(progress)
    return finalize(result)


def _run_name(data: datasets.Dataset, config: TrainConfig) -> str:
    """The same data and settings give the same run name, so re-running a crashed command
    resumes from its latest checkpoint; any change starts a fresh run."""
    import hashlib

    settings = {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k not in ("workers", "ray_address", "max_failures", "storage", "fault_injection", "out")
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(_data_hash(data).encode())
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in data.name)
    return f"kuberank-{safe}-{digest.hexdigest()[:12]}"


def _fit(trainer):
    try:
        return trainer.fit()
    except BaseException as exc:  # surfaced by the driver thread
        return exc


def _check_tokenizer_matches(model_dir: str, towers: str) -> None:
    """Separate towers must share one vocabulary: the query tower's tokenizer feeds both."""
    from transformers import AutoTokenizer

    from kuberank.model import item_tower_path

    if towers != "separate" or item_tower_path(model_dir) == Path(model_dir):
        return
    query_vocab = AutoTokenizer.from_pretrained(model_dir).get_vocab()
    item_vocab = AutoTokenizer.from_pretrained(item_tower_path(model_dir)).get_vocab()
    if query_vocab != item_vocab:
        raise KuberankError(
            f"--warm-start: {model_dir}: the item tower's tokenizer does not match the query tower's"
        )


def _prepare(data: datasets.Dataset, config: TrainConfig, init_model: str):
    """Build the workers' config and the function that turns the result into a model dir."""
    loop = {
        "kind": data.kind,
        "init_model": init_model,
        "towers": config.towers,
        "lora": config.lora,
        "lora_rank": config.lora_rank,
        "seed": config.seed,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "grad_accumulation": config.grad_accumulation,
        "temperature": config.temperature,
        "max_length": config.max_length,
        "query_max_length": config.query_max_length,
        "negatives": config.negatives,
        "max_minutes": config.max_minutes,
        "fault_injection": config.fault_injection,
    }
    if data.kind == datasets.SEARCH:
        examples = search_examples(data)
        doc_texts = list(data.item_texts)
        lexical = None
        if config.hard_negatives:  # one BM25 index of the documents for both kinds of pairs
            from kuberank.lexical import LexicalIndex

            lexical = LexicalIndex.build(data.item_ids, data.item_texts)
        hard = bm25_hard_negatives(data, examples, index=lexical) if lexical is not None else None
        mask_pairs, adapted = [], {}
        if config.corpus_pairs > 0:  # in-domain pairs from the documents themselves
            titles, bodies = data.item_titles_and_bodies()
            limit = max(1, round(config.corpus_pairs * len(examples["pairs"])))
            extra, adapted = corpus_pairs(titles, bodies, seed=config.seed, limit=limit)
            if extra and not adapted["title"]:
                print(f"{data.name}: the documents have no titles: corpus pairs by cropping")
            offset_q, offset_d = len(examples["queries"]), len(doc_texts)
            examples["queries"] += [q for q, _, _ in extra]
            doc_texts += [positive for _, positive, _ in extra]
            examples["pairs"] += [(offset_q + i, offset_d + i) for i in range(len(extra))]
            # the whole document a pair was cut from is no negative of its query either
            mask_pairs = [(offset_q + i, row) for i, (_, _, row) in enumerate(extra)]
            if hard is not None:
                hard += bm25_hard_negatives(
                    data, {"queries": examples["queries"], "pairs": mask_pairs}, index=lexical
                )
        replayed = 0
        previous = (
            replay_sample(config.warm_start, config.replay_fraction, config.seed)
            if config.warm_start
            else None
        )
        if previous is not None and previous.kind == datasets.SEARCH:
            old = search_examples(previous)
            chosen = random.Random(config.seed).sample(
                range(len(old["pairs"])), int(len(old["pairs"]) * config.replay_fraction)
            )
            # Replayed pairs point into the previous collection: its queries and texts follow ours.
            offset_q, offset_d = len(examples["queries"]), len(doc_texts)
            examples["queries"] += old["queries"]
            examples["pairs"] += [
                (old["pairs"][i][0] + offset_q, old["pairs"][i][1] + offset_d) for i in chosen
            ]
            doc_texts += previous.item_texts
            if hard is not None:
                old_hard = bm25_hard_negatives(previous, old)
                hard += [old_hard[i] + offset_d for i in chosen]
            replayed = len(chosen)
        loop.update(
            queries=examples["queries"],
            pairs=examples["pairs"],
            doc_texts=doc_texts,
            n_rows=len(examples["pairs"]),
            replayed_rows=replayed,
            mask_pairs=mask_pairs,
            corpus_pairs_used=adapted,
        )
        if hard is not None:
            loop["hard_negatives"] = hard
        if "validation" in data.splits():  # the checkpoint kept is the best on these queries
            task = datasets.eval_task(data, "validation")
            index_of = {iid: i for i, iid in enumerate(data.item_ids)}
            loop["validation"] = {
                "queries": [t or "" for t in task.texts],
                "relevant": [
                    {index_of[d]: int(rel) for d, rel in task.qrels[qid].items()}
                    for qid in task.query_ids
                ],
                "n_docs": len(data.item_ids),
            }
    else:
        loop.update(_recommendation_loop(data, config, init_model))

    def finalize(result) -> Path:
        return _write_model(data, config, init_model, loop, result)

    return loop, finalize


def _recommendation_loop(data: datasets.Dataset, config: TrainConfig, init_model: str) -> dict:
    from kuberank.encoder import TextEncoder
    from kuberank.model import ScorerConfig, is_kuberank_model, item_tower_path

    train_data, replayed = data, 0
    if config.warm_start and config.replay_fraction > 0:
        previous = replay_sample(config.warm_start, config.replay_fraction, config.seed)
        if previous is not None and previous.kind == datasets.RECOMMENDATION:
            replay = recommendation_replay(data, previous, config.replay_fraction, config.seed)
            train_data = dataclasses.replace(
                data, interactions=pd.concat([data.interactions, replay], ignore_index=True)
            )
            replayed = len(replay)
    examples = recommendation_examples(train_data, max_history=config.max_history)
    encoder = TextEncoder(str(item_tower_path(init_model)))
    item_text = encoder.encode(data.item_texts, desc="encode items")
    scorer = ScorerConfig(
        n_items=len(data.items),
        n_users=len(examples["users"]),
        text_dim=encoder.dim,
        max_history=config.max_history,
        use_relevance=True,
        use_behaviour=True,
        use_collaborative=True,
    )
    task = datasets.eval_task(data, "validation")
    user_index = {u: i for i, u in enumerate(examples["users"])}
    item_index = {iid: i for i, iid in enumerate(data.item_ids)}
    validation = {
        "histories": task.histories,
        "exclude": task.exclude,
        "users": [user_index[u] for u in task.users],
        "targets": [item_index[next(iter(task.qrels[q]))] for q in task.query_ids],
    }
    warm = None
    if config.warm_start and is_kuberank_model(config.warm_start):
        warm = _warm_scorer_state(config.warm_start, data, examples["users"])
    return {
        "scorer": dataclasses.asdict(scorer),
        "item_text": item_text,
        "sequences": examples["sequences"],
        "rows": examples["rows"],
        "n_rows": len(examples["rows"]),
        "users": examples["users"],
        "validation": validation,
        "warm_scorer": warm,
        "replayed_rows": replayed,
    }


def _warm_scorer_state(previous: str, data: datasets.Dataset, users: list[str]) -> dict:
    """The previous scorer's parameters, with id tables re-indexed to this dataset's ids."""
    from kuberank.model import load_scorer, read_info

    info = read_info(previous)
    state = load_scorer(previous, info).state_dict()
    old_items = {iid: i for i, iid in enumerate(info.item_ids)}
    old_users = {u: i for i, u in enumerate(info.user_ids)}
    items_map = [old_items.get(i, info.scorer.n_items) for i in data.item_ids] + [
        info.scorer.n_items
    ]
    users_map = [old_users.get(u, info.scorer.n_users) for u in users] + [info.scorer.n_users]
    for key in ("item_id.weight", "item_cf.weight", "item_bias.weight"):
        state[key] = state[key][items_map]
    state["user_cf.weight"] = state["user_cf.weight"][users_map]
    return state


def _best_checkpoint(result, kind: str):
    if getattr(result, "best_checkpoints", None):
        scored = [(ckpt, m) for ckpt, m in result.best_checkpoints if "val_ndcg@10" in m]
        if scored:
            return max(scored, key=lambda pair: pair[1]["val_ndcg@10"])
    return result.checkpoint, result.metrics


def _write_model(data, config: TrainConfig, init_model: str, loop: dict, result) -> Path:
    import torch

    from kuberank.model import ModelInfo, Scorer, ScorerConfig, save_model

    if result.checkpoint is None:
        raise KuberankError("training produced no checkpoint")
    checkpoint, chosen = _best_checkpoint(result, data.kind)
    with checkpoint.as_directory() as ckpt:
        state = torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=False)["model"]
    with result.checkpoint.as_directory() as ckpt:  # the latest holds every epoch's history
        history = torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=False)[
            "history"
        ]
        events = Path(tempfile.mkdtemp(prefix="kuberank-events-"))
        if (Path(ckpt) / "tensorboard").is_dir():
            shutil.copytree(Path(ckpt) / "tensorboard", events, dirs_exist_ok=True)
    loop = dict(loop, lora=config.lora)
    tokenizer, query_tower, item_tower = _build_towers(loop)
    scorer = None
    if data.kind == datasets.SEARCH:
        towers = TwoTower.module(query_tower, item_tower)
        towers.load_state_dict(state)
        query_tower, item_tower = towers.query_tower, towers.item_tower
    else:
        scorer = Scorer(ScorerConfig(**loop["scorer"]))
        scorer.load_state_dict(state)
    trainable = sum(p.numel() for p in query_tower.parameters() if p.requires_grad)
    total = sum(p.numel() for p in query_tower.parameters())
    if config.lora:  # merge the adapters: the exported model is a plain transformer
        query_tower = query_tower.merge_and_unload()
        item_tower = item_tower.merge_and_unload() if item_tower is not None else None
    if data.kind == datasets.RECOMMENDATION:
        trainable, total = (sum(p.numel() for p in scorer.parameters()),) * 2
    info = ModelInfo(
        kind=data.kind,
        base_model=init_model,
        towers=config.towers,
        scorer=ScorerConfig(**loop["scorer"])
        if scorer is not None
        else ScorerConfig(text_dim=query_tower.config.hidden_size),
        item_ids=data.item_ids if scorer is not None else [],
        user_ids=loop.get("users", []),
        dataset={"spec": config.dataset, "name": data.name, "content_hash": _data_hash(data)},
        training={
            **{
                k: v for k, v in dataclasses.asdict(config).items() if k not in ("fault_injection",)
            },
            "trainable_parameters": int(trainable),
            "replayed_rows": int(loop.get("replayed_rows", 0)),
            "corpus_pairs_used": dict(loop.get("corpus_pairs_used") or {}),
            "total_parameters": int(total),
            "epochs_run": len(history),
            "chosen_epoch": int(chosen.get("epoch", -1)),
            "resumed_from_epoch": max(
                (int(row.get("start_epoch", 0)) for row in history), default=0
            ),
            "history": [
                {k: v for k, v in row.items() if isinstance(v, (int, float, bool))}
                for row in history
            ],
        },
        metrics={k: v for k, v in chosen.items() if k.startswith("val_")},
        version=time.strftime("%Y%m%d%H%M%S"),
    )
    local_out = (
        Path(tempfile.mkdtemp(prefix="kuberank-model-")) / "model"
        if storage.is_s3(config.out)
        else Path(config.out)
    )
    with storage.atomic_dir(local_out) as tmp:
        save_model(tmp, query_tower, tokenizer, scorer, info, item_encoder=item_tower)
        shutil.copytree(events, tmp / "tensorboard")
    shutil.rmtree(events, ignore_errors=True)
    if storage.is_s3(config.out):
        storage.publish(local_out, config.out)
    return local_out


def _data_hash(data: datasets.Dataset) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name, table in data.tables().items():
        digest.update(name.encode())
        digest.update(table.to_csv(index=False).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the kfp wrapper


@step_component()
def finetune_prepared_op(
    prepared: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    workers: int = 2,
    epochs: int = 0,
    max_minutes: float = 0.0,
    batch_size: int = 0,
    max_length: int = 128,
    ray_address: str = "",
):
    """Fine-tune on the prepared dataset artifact inside this task: a local Ray cluster on
    127.0.0.1, or the Ray cluster at ``ray_address``."""
    import json

    from kuberank.components.finetune import TrainConfig, train

    out = train(
        TrainConfig(
            dataset=f"prepared:{prepared.path}",
            out=model.path,
            workers=workers,
            epochs=epochs or None,
            max_minutes=max_minutes or None,
            batch_size=batch_size or None,
            max_length=max_length,
            ray_address=ray_address or None,
        )
    )
    info = json.loads((out / "kuberank.json").read_text())
    model.metadata.update(
        {"fingerprint": info["fingerprint"], "kind": info["kind"], **info["metrics"]}
    )
