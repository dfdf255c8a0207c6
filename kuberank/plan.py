"""Capacity planning: how many Triton GPUs, Ray Serve replicas, index shards and training
workers a target load needs (``kuberank plan --qps Q --items N``).

Every formula is a pure function below; :func:`plan` combines them from a :class:`Baseline`
of per-unit throughputs. Where each number comes from (docs/scaling.md has the full story):

- measured here (2 shared CPU cores, docs/serving.md "Benchmark"): bare Triton ensemble 315 q/s
  at concurrency 32 on CPU; the Ray Serve app with in-process ONNX 74 req/s and with Triton
  41 req/s on the same 2 cores; the in-process batched limit 861 q/s. Fine-tuning the
  recommendation ranker on MovieLens-100K: about 4,000 training rows/s with 2 CPU workers
  (6 epochs of 97,171 rows in 2.41 min).
- assumed for GPUs (not measured here: no GPU on this machine), to be replaced by ``make bench``
  numbers from a GPU node: MiniLM-L6 query encoder under TensorRT fp16 at 64 tokens with dynamic
  batching, 4,000 q/s per GPU; one Ray Serve ranking replica (4 CPUs) 400 req/s; retrieval over
  one index shard (HNSW, efSearch 128) 2,000 q/s per replica; text-tower fine-tuning 400
  pairs/s per GPU worker.
"""

import math
from dataclasses import asdict, dataclass

from kuberank.errors import KuberankError

GIB = 1024**3


@dataclass(frozen=True)
class Baseline:
    """Per-unit throughputs and sizes the plan scales from (see the module docstring)."""

    triton_qps_per_gpu: float = 4000.0  # assumed: TensorRT fp16, MiniLM-L6, 64 tokens
    serve_qps_per_replica: float = 400.0  # assumed: one 4-CPU ranking replica
    retriever_qps_per_shard_replica: float = 2000.0  # assumed: HNSW efSearch 128
    train_rows_per_s_per_worker: float = 2000.0  # measured: ~4,000 rows/s with 2 CPU workers
    dim: int = 384  # all-MiniLM-L6-v2
    bytes_per_value: int = 4  # float32 vectors (2 = fp16, 1 = int8)
    hnsw_m: int = 32  # kuberank/item_index.py HNSW_M
    shard_memory_gib: float = 16.0  # memory of one retriever replica for its shard
    target_utilisation: float = 0.6  # headroom for bursts, failover and rollouts
    memory_headroom: float = 0.7  # share of a shard's memory the index may use
    scaling_efficiency: float = 0.85  # DDP throughput per added worker
    min_replicas: int = 2  # never a single point of failure


MEASURED_HERE = {
    "triton_cpu_qps_2_cores": 315.0,
    "serve_onnx_rps_2_cores": 74.4,
    "serve_triton_rps_2_cores": 41.0,
    "in_process_limit_qps_2_cores": 861.0,
    "train_rows_per_s_2_cpu_workers": 4035.0,
}


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise KuberankError(f"{name}: must be positive, got {value}")


def replicas_for(qps: float, per_replica_qps: float, utilisation: float, minimum: int = 1) -> int:
    """ceil(qps / (per-replica throughput x target utilisation)), at least ``minimum``."""
    _positive("per-replica throughput", per_replica_qps)
    if not 0 < utilisation <= 1:
        raise KuberankError(f"--utilisation: must be in (0, 1], got {utilisation}")
    if qps < 0:
        raise KuberankError(f"--qps: must not be negative, got {qps}")
    return max(minimum, math.ceil(qps / (per_replica_qps * utilisation)))


def index_bytes(items: int, dim: int, bytes_per_value: int = 4, hnsw_m: int = 0) -> int:
    """Vectors (items x dim x bytes) plus, for HNSW, the level-0 graph (2M int32 links per
    item; upper levels add ~1/M more, ignored)."""
    if items < 0:
        raise KuberankError(f"--items: must not be negative, got {items}")
    return items * dim * bytes_per_value + items * 2 * hnsw_m * 4


def index_shards(total_bytes: int, shard_memory_bytes: float, headroom: float) -> int:
    """ceil(index bytes / (memory per shard x headroom)), at least 1."""
    _positive("--shard-memory-gib", shard_memory_bytes)
    return max(1, math.ceil(total_bytes / (shard_memory_bytes * headroom)))


def training_workers(
    rows: int, epochs: int, rows_per_s_per_worker: float, budget_minutes: float, efficiency: float
) -> int:
    """Workers so that ``epochs`` over ``rows`` fit the budget when each added worker brings
    ``efficiency`` of one worker's throughput: the smallest n with
    rows x epochs <= rate x (1 + (n - 1) x efficiency) x budget."""
    _positive("--train-budget-minutes", budget_minutes)
    _positive("rows per second per worker", rows_per_s_per_worker)
    needed = rows * epochs / (rows_per_s_per_worker * budget_minutes * 60)  # in single-worker units
    if needed <= 1:
        return 1
    return 1 + math.ceil((needed - 1) / efficiency)


def plan(
    qps: float,
    items: int,
    *,
    train_rows: int = 0,
    epochs: int = 4,
    train_budget_minutes: float = 60.0,
    baseline: Baseline | None = None,
) -> dict:
    """The capacity plan for ``qps`` queries/s over ``items`` items (and, with ``train_rows``,
    the fine-tuning workers for a time budget)."""
    b = baseline or Baseline()
    _positive("--qps", qps)
    if items < 1:
        raise KuberankError(f"--items: must be at least 1, got {items}")
    u = b.target_utilisation
    ann = items > 50_000  # kuberank/item_index.py DEFAULT_ANN_THRESHOLD
    size = index_bytes(items, b.dim, b.bytes_per_value, b.hnsw_m if ann else 0)
    shards = index_shards(size, b.shard_memory_gib * GIB, b.memory_headroom)
    result = {
        "inputs": {
            "qps": qps,
            "items": items,
            "train_rows": train_rows,
            "epochs": epochs,
            "train_budget_minutes": train_budget_minutes,
        },
        "baseline": asdict(b),
        "triton_gpus": replicas_for(qps, b.triton_qps_per_gpu, u, b.min_replicas),
        "serve_replicas": replicas_for(qps, b.serve_qps_per_replica, u, b.min_replicas),
        "index": {
            "bytes": size,
            "gib": round(size / GIB, 3),
            "ann": ann,
            "shards": shards,
            "replicas_per_shard": replicas_for(
                qps, b.retriever_qps_per_shard_replica, u, b.min_replicas
            ),
        },
    }
    if train_rows:
        result["training_workers"] = training_workers(
            train_rows,
            epochs,
            b.train_rows_per_s_per_worker,
            train_budget_minutes,
            b.scaling_efficiency,
        )
    return result


def format_plan(result: dict) -> str:
    """The plan as a short table for the terminal."""
    i, idx = result["inputs"], result["index"]
    rows = [
        ("Triton GPUs (query encoder)", result["triton_gpus"]),
        ("Ray Serve ranking replicas", result["serve_replicas"]),
        (f"index shards ({idx['gib']} GiB{', HNSW' if idx['ann'] else ', exact'})", idx["shards"]),
        ("retriever replicas per shard", idx["replicas_per_shard"]),
    ]
    if "training_workers" in result:
        rows.append(
            (
                f"training workers ({i['train_rows']} rows x {i['epochs']} epochs in "
                f"{i['train_budget_minutes']:g} min)",
                result["training_workers"],
            )
        )
    width = max(len(r[0]) for r in rows)
    head = (
        f"plan for {i['qps']:g} q/s over {i['items']:,} items "
        f"(target utilisation {result['baseline']['target_utilisation']:g})"
    )
    return "\n".join([head] + [f"  {name:<{width}}  {value}" for name, value in rows])
