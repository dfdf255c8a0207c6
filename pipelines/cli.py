"""``kuberank pipeline compile|run|submit`` and ``kuberank plan``: thin wrappers.

:func:`register` adds both subcommands to the ``kuberank`` parser's subparsers; errors raised
as KuberankError are printed by ``kuberank.cli.main`` (one line, exit status 2).
"""

import argparse
import json
import sys


def _cluster_settings(args):
    # per-subcommand imports stay local: `kuberank --help` starts fast
    from kuberank.pipelines.pipeline import ClusterSettings

    return ClusterSettings(
        training=args.training,
        accelerator_type=args.accelerator_type,
        accelerator_limit=args.accelerator_limit,
        s3_secret=args.s3_secret,
        image=args.image,
    )


def cmd_compile(args) -> int:
    from kuberank.pipelines.compile import compile_pipeline

    summary = compile_pipeline(args.out, args.target, _cluster_settings(args))
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"compiled the {summary['target']} pipeline to {args.out} (loaded back and checked): "
            f"{len(summary['tasks'])} tasks, GPU on {summary['gpu_tasks'] or 'none'}, "
            f"{len(summary['parameters'])} parameters"
        )
    return 0


def cmd_run(args) -> int:
    from kuberank.pipelines.local import run_local
    from kuberank.pipelines.submit import parse_params

    if not args.local:
        print(
            "kuberank: error: --local: only local runs are supported here; use "
            "`kuberank pipeline submit --host URL` for a cluster",
            file=sys.stderr,
        )
        return 2
    from pathlib import Path

    from kuberank.console import StepConsole
    from kuberank.pipelines.local import step_headline

    params = parse_params(args.param)
    logs = Path(args.root) / "logs"
    print(
        f"running the pipeline locally under {args.root} (kfp SubprocessRunner); step logs in "
        f"{logs}/ ...",
        file=sys.stderr,
    )
    console = StepConsole(logs, verbose=args.verbose, fd=2)  # stdout stays for --json

    def on_step(result) -> None:
        headline = step_headline(result.name, result.outputs)
        console.done(result.name, result.seconds, headline, ok=result.ok, log=result.log)

    try:
        with console.capture("pipeline"):
            result = run_local(
                args.root,
                log_dir=logs,
                on_start=console.begin,
                on_step=on_step,
                tee=args.verbose,
                **params,
            )
    finally:
        console.close()
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(
            f"done in {result['seconds']} s; model store {result['model_store']} "
            f"(version {result['release']['version']})"
        )
        print(f"quality report: {result['quality_report_path']}")
        print(f"release report: {result['release_report_path']}")
        print(
            "metrics: "
            + json.dumps(
                {
                    k: round(v, 4)
                    for k, v in result["metrics"].items()
                    if k in ("ndcg@10", "mrr@10", "recall@100", "hit@10")
                }
            )
        )
    return 0


def cmd_submit(args) -> int:
    from kuberank.pipelines.submit import parse_params, submit

    result = submit(
        args.host,
        package=args.package,
        arguments=parse_params(args.param),
        experiment=args.experiment,
        run_name=args.run_name,
        namespace=args.namespace,
        token=args.token,
        pipeline_root=args.pipeline_root,
        enable_caching=False if args.no_cache else None,
        service_account=args.service_account,
        cluster=_cluster_settings(args),
    )
    print(
        json.dumps(result)
        if args.json
        else f"submitted run {result['run_name']} (id {result['run_id']}) to {result['host']}, "
        f"experiment {result['experiment']}"
    )
    return 0


def cmd_plan(args) -> int:
    from kuberank.plan import Baseline, format_plan, plan

    baseline = Baseline(
        **{
            k: v
            for k, v in (
                ("triton_qps_per_gpu", args.gpu_qps),
                ("serve_qps_per_replica", args.replica_qps),
                ("target_utilisation", args.utilisation),
                ("shard_memory_gib", args.shard_memory_gib),
                ("dim", args.dim),
                ("bytes_per_value", args.bytes_per_value),
            )
            if v is not None
        }
    )
    result = plan(
        args.qps,
        args.items,
        train_rows=args.train_rows,
        epochs=args.epochs,
        train_budget_minutes=args.train_budget_minutes,
        baseline=baseline,
    )
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def _cluster_args(parser: argparse.ArgumentParser) -> None:
    from kuberank.config import IMAGE

    group = parser.add_argument_group("cluster settings (kfp-kubernetes)")
    group.add_argument(
        "--training",
        choices=["rayjob", "pod"],
        default="rayjob",
        help="fine-tune through a KubeRay RayJob (default) or inside the task's GPU pod",
    )
    group.add_argument(
        "--accelerator-type",
        default="nvidia.com/gpu",
        metavar="RESOURCE",
        help="GPU resource name (default: nvidia.com/gpu)",
    )
    group.add_argument(
        "--accelerator-limit", type=int, default=1, metavar="N", help="GPUs per GPU task"
    )
    group.add_argument(
        "--s3-secret",
        default="kuberank-s3",
        metavar="NAME",
        help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (default: kuberank-s3)",
    )
    group.add_argument(
        "--image", default=IMAGE, help=f"image of the RayJob pods (default: {IMAGE})"
    )


def register(sub) -> None:
    """Add ``pipeline`` (compile, run, submit) and ``plan`` to the kuberank subparsers."""
    pipe = sub.add_parser(
        "pipeline",
        help="the Kubeflow pipeline: compile, run locally, submit",
        description="The kfp pipeline data_prep -> finetune -> evaluate -> compress "
        "-> export -> index -> publish -> canary.",
    )
    actions = pipe.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)

    comp = actions.add_parser(
        "compile",
        help="write the IR YAML (loaded back and checked)",
        description="Compile the pipeline to kfp IR YAML, load it back with kfp "
        "and check tasks, GPU settings, caching and secrets.",
    )
    comp.add_argument("--out", required=True, metavar="FILE", help="IR YAML file to write")
    comp.add_argument(
        "--target",
        choices=["cluster", "local"],
        default="cluster",
        help="cluster (kfp-kubernetes settings; default) or local",
    )
    _cluster_args(comp)
    comp.add_argument("--json", action="store_true", help="print the check summary as JSON")
    comp.set_defaults(func=cmd_compile)

    param_help = "pipeline parameter NAME=VALUE (repeatable), e.g. workers=4 compress_model=false"
    run = actions.add_parser(
        "run",
        help="run the whole pipeline on this machine",
        description="Run every step with kfp's local SubprocessRunner; "
        "artifacts under --root, the model store at ROOT/store, each step's output in "
        "ROOT/logs/<step>.log (one line per step on stderr).",
    )
    run.add_argument("--local", action="store_true", required=True, help="run locally (required)")
    run.add_argument(
        "--root",
        default="runs/pipeline",
        metavar="DIR",
        help="local pipeline root (default: runs/pipeline)",
    )
    run.add_argument("--param", action="append", metavar="NAME=VALUE", help=param_help)
    run.add_argument(
        "--verbose",
        action="store_true",
        help="also show each task's output (kfp's executor payloads, its log) on the console",
    )
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.set_defaults(func=cmd_run)

    sm = actions.add_parser(
        "submit",
        help="submit a run to a Kubeflow Pipelines endpoint",
        description="Create a run with kfp.Client from --package or the cluster "
        "pipeline compiled now.",
    )
    sm.add_argument("--host", required=True, metavar="URL", help="KFP API endpoint (http[s]://...)")
    sm.add_argument("--package", metavar="FILE", help="IR YAML to submit (default: compile now)")
    sm.add_argument("--experiment", default="kuberank", help="experiment name (default: kuberank)")
    sm.add_argument("--run-name", metavar="NAME", help="run name (default: kuberank-<timestamp>)")
    sm.add_argument("--namespace", metavar="NS", help="Kubeflow profile namespace (multi-user)")
    sm.add_argument(
        "--token",
        metavar="TOKEN",
        help="bearer token (default: $KF_PIPELINES_TOKEN; else kfp's own credentials)",
    )
    sm.add_argument("--pipeline-root", metavar="URI", help="artifact root for this run (s3://...)")
    sm.add_argument(
        "--service-account", metavar="NAME", help="Kubernetes service account of the run"
    )
    sm.add_argument("--no-cache", action="store_true", help="disable caching for this run")
    sm.add_argument("--param", action="append", metavar="NAME=VALUE", help=param_help)
    _cluster_args(sm)
    sm.add_argument("--json", action="store_true", help="print the result as JSON")
    sm.set_defaults(func=cmd_submit)

    pl = sub.add_parser(
        "plan",
        help="capacity plan for a target load",
        description="Triton GPUs, Ray Serve replicas, index shards and training "
        "workers for --qps and --items (formulas: docs/scaling.md).",
    )
    pl.add_argument("--qps", type=float, required=True, help="peak queries per second")
    pl.add_argument("--items", type=int, required=True, help="items in the index")
    pl.add_argument(
        "--train-rows", type=int, default=0, help="training rows (0: skip training workers)"
    )
    pl.add_argument("--epochs", type=int, default=4, help="training epochs (default: 4)")
    pl.add_argument("--train-budget-minutes", type=float, default=60.0, help="training time budget")
    pl.add_argument("--gpu-qps", type=float, help="measured query-encoder q/s per GPU (Triton)")
    pl.add_argument("--replica-qps", type=float, help="measured req/s per Ray Serve replica")
    pl.add_argument("--utilisation", type=float, help="target utilisation (default: 0.6)")
    pl.add_argument("--shard-memory-gib", type=float, help="memory per index shard (default: 16)")
    pl.add_argument("--dim", type=int, help="embedding dimension (default: 384)")
    pl.add_argument("--bytes-per-value", type=int, choices=[1, 2, 4], help="4 fp32, 2 fp16, 1 int8")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    """A parser with only these subcommands (tests; ``kuberank.cli`` calls :func:`register`)."""
    parser = argparse.ArgumentParser(prog="kuberank")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser
