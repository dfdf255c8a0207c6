"""Fine-tuning step: distributed training of the two-tower ranker on Ray Train.

Pure core: :func:`train` (a :class:`TrainConfig` in, a model directory out). It runs
:func:`train_loop_per_worker` on a ``ray.train.torch.TorchTrainer`` (DDP: gloo on CPU, NCCL
on GPU), checkpointing every epoch to ``storage`` (a local path or s3://) and resuming from the
latest checkpoint after a worker failure (``FailureConfig(max_failures)``).

What is trained depends on the dataset's kind, one :class:`TrainingTask` each
(components/training.py; :data:`TASKS`): search collections fine-tune the text towers
(components/finetune_search.py), interaction logs train F's behaviour and collaborative terms
(components/finetune_recommendation.py). This module is the loop both share: the optimiser,
checkpoints, resume, TensorBoard events, the best epoch by validation nDCG@10, the model
directory.

Thin wrappers: the kfp component :func:`finetune_prepared_op` (trains in its task on a local
Ray cluster or submits to a Ray cluster address) and ``kuberank train`` in the CLI.
"""

import dataclasses
import hashlib
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
from kfp import dsl

from kuberank import datasets, storage
from kuberank.components.finetune_recommendation import RecommendationTask
from kuberank.components.finetune_search import SearchTask
from kuberank.components.training import TrainingTask, build_towers, unwrap
from kuberank.config import base_model_path
from kuberank.encoder import check_model_dir
from kuberank.errors import KuberankError
from kuberank.kfp_component import step_component
from kuberank.progress import bar
from kuberank.raycluster import ensure_ray

# one implementation of the training interface per dataset kind (components/training.py)
TASKS: dict[str, TrainingTask] = {task.kind: task for task in (SearchTask(), RecommendationTask())}


def task_for(kind: str) -> TrainingTask:
    if kind not in TASKS:
        raise KuberankError(f"fine-tuning: no training task for {kind!r} data")
    return TASKS[kind]


@dataclasses.dataclass
class TrainConfig:
    dataset: str
    out: str
    workers: int = 2
    epochs: int | None = None  # default by kind (the task's ``defaults``)
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
        defaults = task_for(kind).defaults
        changes = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.towers not in ("shared", "separate"):
            raise KuberankError(f"--towers: {self.towers!r} is not 'shared' or 'separate'")
        if self.workers < 1:
            raise KuberankError("--workers: must be at least 1")
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- the worker loop


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker (DDP is set up by ``prepare_model``)."""
    import ray.train  # ray, torch, transformers: heavy; loaded only when training
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

    task = task_for(config["kind"])
    step_fn, model, params, extra = task.setup(config)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=0.01)
    rows = config["n_rows"]
    per_worker = math.ceil(rows / world)
    steps_per_epoch = math.ceil(per_worker / (config["batch_size"] * config["grad_accumulation"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, task.schedule(steps_per_epoch * config["epochs"])
    )
    start_epoch, best, history = 0, None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt:
            state = torch.load(Path(ckpt) / "state.pt", map_location="cpu", weights_only=False)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, history = state["epoch"] + 1, state.get("best"), state.get("history", [])

    writer, events_dir = None, None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        # Events travel inside every checkpoint, so they reach any storage (local or S3). On
        # the driver's node they go under its scratch directory, which the driver removes
        # even when this worker is killed.
        scratch = config.get("scratch")
        events_dir = Path(
            tempfile.mkdtemp(
                prefix="kuberank-tensorboard-",
                dir=scratch if scratch and Path(scratch).is_dir() else None,
            )
        )
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
            metrics.update(extra["validate"](unwrap(model)))
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
                        "model": unwrap(model).state_dict(),
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
        shutil.rmtree(events_dir, ignore_errors=True)  # its events are in every checkpoint


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

    data = datasets.load(config.dataset)
    config = config.resolved(data.kind)
    init_model = config.warm_start or base_model_path()
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
    # The workers' scratch on this node (their TensorBoard events), removed when fit returns:
    # a worker killed mid-run cannot remove its own.
    scratch = Path(tempfile.mkdtemp(prefix="kuberank-train-"))
    loop_config["scratch"] = str(scratch)
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
    try:
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
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = outcome.get("result")
    if isinstance(result, BaseException):
        raise KuberankError(f"training failed: {result}") from result
    ray.kill(progress)
    return finalize(result)


def _run_name(data: datasets.Dataset, config: TrainConfig) -> str:
    """The same data and settings give the same run name, so re-running a crashed command
    resumes from its latest checkpoint; any change starts a fresh run."""
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

    from kuberank.model import item_tower_path  # local: kuberank.model imports torch

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
    loop.update(task_for(data.kind).prepare(data, config, init_model))

    def finalize(result) -> Path:
        return _write_model(data, config, init_model, loop, result)

    return loop, finalize


def _best_checkpoint(result):
    if getattr(result, "best_checkpoints", None):
        scored = [(ckpt, m) for ckpt, m in result.best_checkpoints if "val_ndcg@10" in m]
        if scored:
            return max(scored, key=lambda pair: pair[1]["val_ndcg@10"])
    return result.checkpoint, result.metrics


def _write_model(data, config: TrainConfig, init_model: str, loop: dict, result) -> Path:
    import torch

    from kuberank.model import ModelInfo, ScorerConfig, save_model

    if result.checkpoint is None:
        raise KuberankError("training produced no checkpoint")
    checkpoint, chosen = _best_checkpoint(result)
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
    tokenizer, query_tower, item_tower = build_towers(loop)
    query_tower, item_tower, scorer, trainable, total = task_for(data.kind).restore(
        state, loop, query_tower, item_tower
    )
    if config.lora:  # merge the adapters: the exported model is a plain transformer
        query_tower = query_tower.merge_and_unload()
        item_tower = item_tower.merge_and_unload() if item_tower is not None else None
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
