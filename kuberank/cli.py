"""The ``kuberank`` command line: thin wrappers around the pipeline steps' pure cores.

Every subcommand has ``--help``. Errors caused by input print one line naming the field or
file and exit with status 2; long work shows progress bars on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kuberank import __version__
from kuberank.errors import KuberankError


def _cmd_data_prep(args) -> int:
    from kuberank.components.data_prep import prepare

    manifest = prepare(args.dataset, args.out, engine=args.engine, ray_address=args.ray_address)
    print(json.dumps(manifest, indent=2) if args.json else
          f"{manifest['name']} ({manifest['kind']}): {manifest['rows']} -> {args.out}\n"
          f"splits {manifest['splits']}, content hash {manifest['content_hash'][:16]}…, engine {manifest['engine']}")
    return 0


def _cmd_evaluate(args) -> int:
    from kuberank import report
    from kuberank.components.evaluate import evaluate

    result = evaluate(args.dataset, args.model, args.split)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(report.format_table([result], report.QUALITY_COLUMNS + ("map",)))
    return 0


def _cmd_demo(args) -> int:
    from kuberank.demo import run_demo

    run_demo(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kuberank",
        description="Real-time search and recommendation ranking with pretrained transformers.",
    )
    parser.add_argument("--version", action="version", version=f"kuberank {__version__}")
    parser.add_argument(
        "--s3-endpoint", metavar="URL",
        help="S3 endpoint for s3:// URIs (MinIO, Ceph, ...); default: KUBERANK_S3_ENDPOINT_URL or AWS",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    dataset_help = "movielens-100k | beir:<dir|s3://...> | interactions:<file|s3://...> | prepared:<dir>"

    data = sub.add_parser("data", help="prepare datasets", description="Prepare datasets.")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = data_sub.add_parser(
        "prep", help="load, split and write Parquet artifacts + manifest",
        description="Load a dataset, split it (BEIR qrels / leave-last-out) and write Parquet "
                    "artifacts with a manifest, atomically.",
    )
    prep.add_argument("--dataset", required=True, metavar="SPEC", help=dataset_help)
    prep.add_argument("--out", required=True, metavar="DIR", help="output directory or s3:// URI")
    prep.add_argument("--engine", default="auto", choices=["auto", "local", "ray"],
                      help="where the split runs: in-process, on Ray Data, or by size (default)")
    prep.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to use (default: local on 127.0.0.1)")
    prep.add_argument("--json", action="store_true", help="print the manifest as JSON")
    prep.set_defaults(func=_cmd_data_prep)

    ev = sub.add_parser(
        "evaluate", help="score a model or baseline on a dataset split",
        description="Full ranking over all items; prints nDCG@10, MRR@10, Recall@100, ...",
    )
    ev.add_argument("--dataset", required=True, metavar="SPEC", help=dataset_help)
    ev.add_argument("--model", required=True, metavar="MODEL",
                    help="zero-shot | bm25 | popularity | a model directory")
    ev.add_argument("--split", default="test", metavar="SPLIT",
                    help="train | validation | test | all (default: test)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_cmd_evaluate)

    demo = sub.add_parser("demo", help="run the embedded demo on MovieLens-100K",
                          description="Prepare MovieLens-100K, evaluate, write runs/<timestamp>/report.md.")
    demo.add_argument("--out", default="runs", metavar="DIR", help="where runs are written (default: runs)")
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


if __name__ == "__main__":
    sys.exit(main())
