"""The ``kuberank`` command line: thin wrappers around the pipeline steps' pure cores.

Every subcommand has ``--help``. Errors caused by input print one line naming the field or
file and exit with status 2; long work shows progress bars on stderr.

The top layer (docs/architecture.md, "Layers"): it may import every other layer; the demo
(``kuberank demo``) is :mod:`kuberank.cli.demo`. Each subcommand imports its step when it runs
(a step module loads kfp, pandas or torch: about a second each), so that ``kuberank --help``
and every subcommand start without the others' imports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kuberank import __version__
from kuberank.errors import KuberankError
from kuberank.store import MANIFEST


def _cmd_data_prep(args) -> int:
    # per-subcommand imports stay local: `kuberank --help` starts fast
    from kuberank.components.data_prep import prepare

    manifest = prepare(
        args.dataset,
        args.out,
        engine=args.engine,
        ray_address=args.ray_address,
        tie_break=args.tie_break,
        seed=args.seed,
    )
    print(
        json.dumps(manifest, indent=2)
        if args.json
        else f"{manifest['name']} ({manifest['kind']}): {manifest['rows']} -> {args.out}\n"
        f"splits {manifest['splits']}, content hash {manifest['content_hash'][:16]}…, engine {manifest['engine']}"
        + _split_line(manifest.get("split"))
    )
    return 0


def _split_line(rule: dict | None) -> str:
    if not rule:
        return ""
    return (
        f"\nsplit: {rule['rule']}, ties by {rule['tie_break']} order"
        + (f" (seed {rule['seed']})" if "seed" in rule else "")
        + f"; {rule['users_tied_last_two']} of {rule['users_evaluated']} users' validation and "
        "test interactions share a timestamp"
    )


def _cmd_evaluate(args) -> int:
    from kuberank import report
    from kuberank.components.evaluate import PEERS, evaluate

    peer_only = (args.max_epochs, args.seed, args.checkpoint_dir)
    if args.model not in PEERS and any(v is not None for v in peer_only):
        raise KuberankError(
            f"--max-epochs/--seed/--checkpoint-dir: only for the peers ({', '.join(PEERS)}), "
            f"not {args.model!r}"
        )
    model = args.model
    if model in PEERS:
        from kuberank.components.peers import RecBoleRanker

        given = {
            "max_epochs": args.max_epochs,
            "seed": args.seed,
            "checkpoint_dir": args.checkpoint_dir,
        }
        model = RecBoleRanker(model, **{k: v for k, v in given.items() if v is not None})
    result = evaluate(
        args.dataset,
        model,
        args.split,
        args.retrieval,
        args.fusion,
        mmr_lambda=args.mmr_lambda,
        calibration=args.calibration,
        tail_boost=args.tail_boost,
    )
    if getattr(model, "training", None):
        result["training"] = model.training
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(report.format_table([result], report.QUALITY_COLUMNS + ("map",)))
    return 0


def _cmd_train(args) -> int:
    from kuberank.components.finetune import TrainConfig, train
    from kuberank.model import read_info

    config = TrainConfig(
        dataset=args.dataset,
        out=args.out,
        workers=args.workers,
        epochs=args.epochs,
        max_minutes=args.max_minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        towers=args.towers,
        lora=args.lora,
        hard_negatives=args.hard_negatives,
        corpus_pairs=args.corpus_pairs,
        warm_start=args.warm_start,
        replay_fraction=args.replay_fraction,
        storage=args.storage,
        ray_address=args.ray_address,
        grad_accumulation=args.grad_accumulation,
        seed=args.seed,
        use_gpu=args.use_gpu,
    )
    out = train(config)
    info = read_info(out)
    summary = {
        "model": str(out),
        "kind": info.kind,
        "fingerprint": info.fingerprint,
        "trainable_parameters": info.training["trainable_parameters"],
        "total_parameters": info.training["total_parameters"],
        "epochs_run": info.training["epochs_run"],
        **info.metrics,
    }
    print(json.dumps(summary, indent=None if args.json else 2))
    return 0


def _cmd_compress(args) -> int:
    from kuberank.components.compress import CompressConfig, compress, one_level, parse_ladder

    fixed = one_level(args.layers, args.prune_ratio)
    if fixed and args.ladder:
        raise KuberankError("--ladder and --layers/--prune-ratio both given: use one of them")
    if args.epochs < 1:
        raise KuberankError(f"--epochs: {args.epochs} (need at least 1 distillation epoch)")
    report = compress(
        CompressConfig(
            model=args.model,
            dataset=args.dataset,
            out=args.out,
            ladder=fixed or parse_ladder(args.ladder),
            int8=args.int8,
            max_ndcg_drop=args.max_ndcg_drop,
            split=args.split,
            epochs=args.epochs,
            keep_teacher=args.keep_teacher,
        )
    )
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


def _cmd_export(args) -> int:
    from kuberank.components.export import export_model, export_tensorrt

    manifest = export_model(args.model, args.out, fp16=args.fp16)
    if args.tensorrt:
        manifest = export_tensorrt(args.out)
    summary = {
        "store": args.out,
        "version": manifest.get("version"),
        "parity": manifest.get("parity"),
        "sizes": manifest.get("sizes"),
        "fingerprint": manifest.get("embedding", {}).get("fingerprint"),
    }
    print(json.dumps(summary, indent=None if args.json else 2))
    return 0


def _cmd_edge_query(args) -> int:
    from kuberank.components.edge import edge_query, edge_stats

    results = edge_query(args.bundle, args.text, k=args.k)
    out = {
        "query": args.text,
        "results": [{"item_id": i, "score": round(float(s), 6)} for i, s in results],
    }
    if args.stats:
        out["stats"] = edge_stats(args.bundle)
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


def _cmd_index(args) -> int:
    from kuberank.components.index import build_index

    meta = build_index(args.model, args.dataset, args.out, ann_threshold=args.ann_threshold)
    if args.json:
        print(json.dumps(meta, sort_keys=True))
    else:
        ann = meta["ann"]["type"] if meta["ann"] else "exact search"
        edge = meta.get("edge_items")
        print(
            f"{meta['count']} items x {meta['dim']} -> {args.out}/index ({ann}); "
            + ("no edge bundle; " if edge is None else f"edge bundle {edge} items; ")
            + f"model fingerprint {meta['model_fingerprint']}"
        )
    return 0


def _cmd_demo(args) -> int:
    from kuberank.cli.demo import run_demo

    run_demo(args.out, verbose=args.verbose)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kuberank",
        description="Real-time search and recommendation ranking with pretrained transformers.",
    )
    parser.add_argument("--version", action="version", version=f"kuberank {__version__}")
    parser.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3 endpoint for s3:// URIs (MinIO, Ceph, ...); default: KUBERANK_S3_ENDPOINT_URL or AWS",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    dataset_help = (
        "movielens-100k | movielens-1m | beir:<dir|s3://...> | interactions:<file|s3://...> | "
        "prepared:<dir>"
    )

    data = sub.add_parser("data", help="prepare datasets", description="Prepare datasets.")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = data_sub.add_parser(
        "prep",
        help="load, split and write Parquet artifacts + manifest",
        description="Load a dataset, split it (BEIR qrels / leave-last-out) and write Parquet "
        "artifacts with a manifest, atomically.",
    )
    prep.add_argument("--dataset", required=True, metavar="SPEC", help=dataset_help)
    prep.add_argument("--out", required=True, metavar="DIR", help="output directory or s3:// URI")
    prep.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "local", "ray"],
        help="where the split runs: in-process, on Ray Data, or by size (default)",
    )
    prep.add_argument(
        "--ray-address", metavar="ADDR", help="Ray cluster to use (default: local on 127.0.0.1)"
    )
    prep.add_argument(
        "--tie-break",
        default="log",
        choices=["log", "random"],
        help="order of interactions with equal timestamps: the log's own order (default) "
        "or a seeded random order",
    )
    prep.add_argument("--seed", type=int, default=0, help="seed of --tie-break random (default: 0)")
    prep.add_argument("--json", action="store_true", help="print the manifest as JSON")
    prep.set_defaults(func=_cmd_data_prep)

    ev = sub.add_parser(
        "evaluate",
        help="score a model or baseline on a dataset split",
        description="Full ranking over all items; prints nDCG@10, MRR@10, Recall@100, ...",
    )
    ev.add_argument("--dataset", required=True, metavar="SPEC", help=dataset_help)
    ev.add_argument(
        "--model",
        required=True,
        metavar="MODEL",
        help="a baseline (popularity | ease | zero-shot | bm25), a peer trained with RecBole "
        "(sasrec | gru4rec | lightgcn | bpr | itemknn) or a model directory",
    )
    ev.add_argument(
        "--split",
        default="test",
        metavar="SPLIT",
        help="train | validation | tuning (train + validation) | test | all (default: test)",
    )
    ev.add_argument(
        "--retrieval",
        choices=("dense", "bm25", "hybrid"),
        default=None,
        help="dense: the model alone (default); bm25: the lexical baseline; hybrid: both "
        "fused (search collections)",
    )
    ev.add_argument(
        "--fusion",
        choices=("convex", "rrf"),
        default="convex",
        help="hybrid fusion: convex (weight fitted on the judged queries outside test; RRF "
        "without a validation split) or rrf (default: convex)",
    )
    ev.add_argument(
        "--mmr-lambda",
        type=float,
        metavar="L",
        help="re-rank each list's top 100 by MMR with this lambda in [0, 1] (1 = as ranked; "
        "similarity: the model's own item vectors, as its index serves them; baselines: the "
        "item text encoded by all-MiniLM-L6-v2)",
    )
    ev.add_argument(
        "--calibration",
        type=float,
        metavar="L",
        help="re-rank each list's top 100 towards the genre shares of the user's history "
        "(Steck 2018) with this lambda in [0, 1] (0 = as ranked); needs a genres attribute",
    )
    ev.add_argument(
        "--tail-boost",
        type=float,
        metavar="B",
        help="re-rank each list's top 100 by (1 - B) relevance (min-max scaled) + B for the "
        "items in the long tail (the least popular third), B in [0, 1] (0 = as ranked; 1 = "
        "the tail first): more exposure for the long tail",
    )
    ev.add_argument(
        "--max-epochs",
        type=int,
        metavar="N",
        help="peers: cap on training epochs (default 300; training stops earlier once "
        "validation NDCG@10 has not improved for 10 epochs)",
    )
    ev.add_argument("--seed", type=int, metavar="N", help="peers: training seed (default 0)")
    ev.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="peers: save the training state there after every epoch; a run stopped midway "
        "resumes from it with the same command, a finished one is not trained again",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_cmd_evaluate)

    tr = sub.add_parser(
        "train",
        help="fine-tune the two-tower ranker on Ray Train",
        description="Distributed fine-tuning (DDP on Ray Train) on the dataset's train split; "
        "writes a model directory (safetensors, tokenizer, config, kuberank.json).",
    )
    tr.add_argument("--dataset", required=True, metavar="SPEC", help=dataset_help)
    tr.add_argument(
        "--out", required=True, metavar="URI", help="model directory to write (a path or s3://)"
    )
    tr.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    tr.add_argument(
        "--epochs", type=int, help="epochs (default: 2 for search, 4 for recommendation)"
    )
    tr.add_argument(
        "--max-minutes", type=float, metavar="M", help="stop after the epoch that crosses M minutes"
    )
    tr.add_argument("--batch-size", type=int, help="per-worker batch size")
    tr.add_argument("--lr", type=float, help="learning rate")
    tr.add_argument(
        "--towers",
        default="shared",
        choices=["shared", "separate"],
        help="query/item tower weights",
    )
    tr.add_argument(
        "--lora", action="store_true", help="train LoRA adapters instead of all weights"
    )
    tr.add_argument(
        "--hard-negatives", action="store_true", help="add one BM25 hard negative per pair (search)"
    )
    tr.add_argument(
        "--corpus-pairs",
        type=float,
        default=0.0,
        metavar="R",
        help="search: add R in-domain pairs from the documents per judged pair (title -> body, "
        "else random crops); 0: none (default)",
    )
    tr.add_argument("--warm-start", metavar="DIR", help="continue from a previous model directory")
    tr.add_argument(
        "--replay-fraction", type=float, default=0.2, help="share of the previous data replayed"
    )
    tr.add_argument(
        "--storage", metavar="URI", help="checkpoint storage (default: <out>.checkpoints)"
    )
    tr.add_argument(
        "--ray-address", metavar="ADDR", help="Ray cluster (default: local on 127.0.0.1)"
    )
    tr.add_argument("--grad-accumulation", type=int, default=1, help="gradient accumulation steps")
    tr.add_argument("--seed", type=int, default=0, help="random seed")
    tr.add_argument(
        "--use-gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one GPU per worker, NCCL and mixed precision (default: when the cluster has GPUs)",
    )
    tr.add_argument("--json", action="store_true", help="one-line JSON summary")
    tr.set_defaults(func=_cmd_train)

    co = sub.add_parser(
        "compress",
        help="distil, prune and quantise a model behind a quality gate",
        description="Distil into fewer layers, prune feed-forward blocks, quantise to int8; the "
        "result is written only if its nDCG@10 is within --max-ndcg-drop of the teacher's.",
    )
    co.add_argument("--model", required=True, metavar="DIR", help="teacher model directory")
    co.add_argument("--dataset", required=True, metavar="SPEC", help=dataset_help)
    co.add_argument(
        "--out", required=True, metavar="DIR", help="compressed model directory to write"
    )
    co.add_argument(
        "--ladder",
        metavar="LxP,LxP",
        help="compression levels (student layers x share of feed-forward neurons pruned), most "
        "compressed first; the first that passes the gate is written (default: "
        "2x0.5,3x0.5,3x0.25,4x0.25,6x0)",
    )
    co.add_argument(
        "--layers", type=int, help="instead of --ladder, one level: student layers (default 3)"
    )
    co.add_argument(
        "--prune-ratio",
        type=float,
        help="instead of --ladder, one level: share of neurons pruned (default 0.25)",
    )
    co.add_argument(
        "--epochs",
        type=int,
        default=1,
        metavar="N",
        help="distillation epochs over the dataset's texts per student (default 1; a search "
        "student may need more: docs/benchmarks.md, compression)",
    )
    co.add_argument("--no-int8", dest="int8", action="store_false", help="skip int8 quantisation")
    co.add_argument(
        "--max-ndcg-drop", type=float, default=0.01, help="quality gate (absolute nDCG@10)"
    )
    co.add_argument("--split", metavar="SPLIT", help="gate split (default: validation, else test)")
    co.add_argument(
        "--keep-teacher",
        action="store_true",
        help="when no level passes the gate, write the teacher unchanged (fp32, reported as "
        '"compressed": false) instead of failing (the pipeline\'s behaviour)',
    )
    co.add_argument("--json", action="store_true", help="one-line JSON report")
    co.set_defaults(func=_cmd_compress)

    ex = sub.add_parser(
        "export",
        help="export a model to the model store (ONNX, Triton repositories, edge bundle)",
        description="ONNX with parity checks, int8 and fp16, Triton model repositories (production and "
        f"local), the edge bundle and {MANIFEST}, into a directory or s3:// prefix.",
    )
    ex.add_argument("--model", required=True, metavar="DIR", help="model directory")
    ex.add_argument("--out", required=True, metavar="STORE", help="model store (a path or s3://)")
    ex.add_argument("--no-fp16", dest="fp16", action="store_false", help="skip the fp16 GPU model")
    ex.add_argument(
        "--tensorrt", action="store_true", help="also build a TensorRT plan (GPU nodes only)"
    )
    ex.add_argument("--json", action="store_true", help="one-line JSON summary")
    ex.set_defaults(func=_cmd_export)

    edge = sub.add_parser(
        "edge", help="query an edge bundle", description="The edge bundle's small runner."
    )
    edge_sub = edge.add_subparsers(dest="edge_command", metavar="ACTION", required=True)
    eq = edge_sub.add_parser(
        "query", help="top-k items for a text", description="Rank the bundle's items for TEXT."
    )
    eq.add_argument("--bundle", required=True, metavar="DIR", help="edge bundle (STORE/edge)")
    eq.add_argument("--text", required=True, help="query text")
    eq.add_argument("--k", type=int, default=10, help="results (default: 10)")
    eq.add_argument(
        "--stats", action="store_true", help="also report bundle size and single-thread latency"
    )
    eq.add_argument("--json", action="store_true", help="one-line JSON")
    eq.set_defaults(func=_cmd_edge_query)

    ix = sub.add_parser(
        "index",
        help="embed a dataset's items and write STORE/index",
        description="Embed the dataset's items (documents or catalogue) with the model and write "
        "STORE/index (embeddings, ids, an ANN index beyond --ann-threshold, the "
        "encoder fingerprint) next to the export of the same model; the store's edge bundle "
        "(STORE/edge) gets the same items.",
    )
    ix.add_argument("--model", required=True, metavar="DIR", help="the exported model directory")
    ix.add_argument("--dataset", required=True, metavar="SPEC", help=dataset_help)
    ix.add_argument("--out", required=True, metavar="STORE", help="the model store (path or s3://)")
    ix.add_argument(
        "--ann-threshold",
        type=int,
        default=50_000,
        metavar="N",
        help="build a faiss HNSW index above N items (default: 50000)",
    )
    ix.add_argument("--json", action="store_true", help="print index.json")
    ix.set_defaults(func=_cmd_index)

    from kuberank.pipelines.cli import register as register_pipeline
    from kuberank.serving.cli import register as register_serving

    register_serving(sub, dataset_help)
    register_pipeline(sub)

    demo = sub.add_parser(
        "demo",
        help="run the embedded demo on MovieLens-100K",
        description="The whole pipeline on MovieLens-100K on kfp's local runner, then serving "
        "and a short load test; writes runs/<timestamp>/report.md. The console shows one line "
        "per step; each step's output is in runs/<timestamp>/logs/.",
    )
    demo.add_argument(
        "--out", default="runs", metavar="DIR", help="where runs are written (default: runs)"
    )
    demo.add_argument(
        "--verbose",
        action="store_true",
        help="also show each step's output (kfp's executor payloads, task logs) on the console",
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.s3_endpoint:
        os.environ["KUBERANK_S3_ENDPOINT_URL"] = args.s3_endpoint
    try:
        return args.func(args)
    except KuberankError as exc:
        print(f"kuberank: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kuberank: interrupted", file=sys.stderr)
        return 130
