"""``kuberank explain | policy | serve | bench``: thin CLI wrappers over the serving modules."""

from __future__ import annotations

import json

from kuberank.errors import KuberankError


def _cmd_explain(args) -> int:
    # per-subcommand imports stay local: `kuberank --help` starts fast
    from kuberank.model import TERMS
    from kuberank.serving.explain import explain_offline

    answer = explain_offline(args.model_store, args.query, args.history, args.user_id, args.k)
    if args.json:
        print(json.dumps(answer, sort_keys=True))
        return 0
    for item in answer["items"]:
        why = item["explain"]
        terms = ", ".join(f"{t} {why[t]:+.4f}" for t in TERMS if t in why)
        print(f"{item['id']}\t{item['score']:.4f} = {terms}")
        for h in why.get("history", []):
            print(
                f"\t  history {h['id']}: attention {h['attention']:.3f}, {h['contribution']:+.4f}"
            )
    return 0


def _cmd_policy(args) -> int:
    from kuberank.serving.policies import check_file, write_policy

    if args.policy_command == "set":
        out = write_policy(args.model_store, args.file)
    else:
        out = check_file(args.model_store, args.file)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        version = "unversioned" if out["version"] is None else f"version {out['version']}"
        caps = ", ".join(f"{a} {s:g}" for a, s in out["caps"].items()) or "none"
        print(
            f"policy {version}, fingerprint {out['fingerprint']}: {out['blocked_items']} blocked "
            f"items, {out['blocked_terms']} blocked terms ({out['on_blocked_term']}), caps {caps}"
            + (f" -> {out['store']}" if "store" in out else "")
        )
    return 0


def _settings(args) -> dict:
    settings = {}
    if getattr(args, "settings", None):
        try:
            settings = json.loads(args.settings)
        except ValueError as exc:
            raise KuberankError(f"--settings: not JSON: {exc}") from exc
    return settings


def _ingress_option(parser) -> None:
    from kuberank.serving.launcher import DEFAULT_INGRESS, INGRESS_MODES

    parser.add_argument(
        "--ingress",
        choices=INGRESS_MODES,
        default=DEFAULT_INGRESS,
        help="haproxy (default): one local HAProxy in front of the Ingress replicas, which "
        "bounds what each replica holds and sheds the excess with a fast 503; direct: each "
        "Ingress replica serves HTTP itself, on a port of its own; proxy: through Ray Serve's "
        "proxy, which balances replicas and retries a dead one",
    )
    parser.add_argument(
        "--ingress-replicas",
        type=int,
        default=0,
        metavar="N",
        help="haproxy or direct ingress: Ingress replicas, each with its share of the cores and "
        "its own port (default 0: one per core)",
    )


def _cmd_serve(args) -> int:
    from kuberank.serving.launcher import serve_forever

    return serve_forever(
        args.model_store,
        port=args.port,
        use_triton=not args.no_triton,
        settings=_settings(args),
        ingress=args.ingress,
        ingress_replicas=args.ingress_replicas,
    )


def _numbers(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise KuberankError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def _cmd_bench(args) -> int:
    from kuberank.serving.bench import TARGETS, format_table, serve_and_bench

    targets = tuple(t.strip() for t in args.targets.split(",")) if args.targets else TARGETS
    if args.rates:
        levels = _numbers(args.rates, "--rates")
    else:
        levels = _numbers(args.concurrency, "--concurrency")
    result = serve_and_bench(
        args.model_store,
        targets=targets,
        mode="open" if args.rates else "closed",
        levels=levels,
        requests=args.requests,
        max_seconds=args.max_seconds,
        queries=args.queries,
        out_dir=args.out,
        settings=_settings(args),
        ingress=args.ingress,
        ingress_replicas=args.ingress_replicas,
        open_at=_numbers(args.open_at, "--open-at") if args.open_at else (),
    )
    print(json.dumps(result, sort_keys=True) if args.json else format_table(result))
    return 0


def register(sub, dataset_help: str) -> None:
    """Add the serving subcommands to the ``kuberank`` parser."""
    xp = sub.add_parser(
        "explain",
        help="rank offline and show the terms of F behind each score",
        description="What /search (with --query) or /recommend (without) answers with "
        '"explain": true, computed in this process from the store (no server): each item\'s '
        "relevance, behaviour (with the history items that weighed most) and collaborative "
        "terms, which sum to its score.",
    )
    xp.add_argument("--model-store", required=True, metavar="STORE", help="path or s3:// URI")
    xp.add_argument("--query", help="query text (a search); without it, a recommendation")
    xp.add_argument("--history", nargs="*", default=[], metavar="ID", help="history item ids")
    xp.add_argument("--user-id", help="a user the model knows")
    xp.add_argument("--k", type=int, default=10, help="results (default: 10)")
    xp.add_argument("--json", action="store_true", help="the response body as one JSON line")
    xp.set_defaults(func=_cmd_explain)

    po = sub.add_parser(
        "policy",
        help="write or check a store's serving policy (blocklist, blocked terms, caps)",
        description="The serving policy lives in STORE/policy.json, versioned: served with the "
        "store's model and reloaded with it; /readyz names its version and fingerprint "
        "(docs/serving.md, Policies).",
    )
    po_sub = po.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    for action, text in (
        ("set", "check FILE against the store's index and write it as the store's policy"),
        ("check", "check FILE (or, without it, the store's own policy) against the store's index"),
    ):
        one = po_sub.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        one.add_argument("--model-store", required=True, metavar="STORE", help="path or s3:// URI")
        one.add_argument(
            "--file", required=action == "set", metavar="FILE", help="a policy JSON file"
        )
        one.add_argument("--json", action="store_true", help="the summary as one JSON line")
        one.set_defaults(func=_cmd_policy)

    sv = sub.add_parser(
        "serve",
        help="serve a model store locally (Triton + Ray Serve on 127.0.0.1)",
        description="Start the bundled tritonserver on STORE/triton-local and the Ray Serve ranking "
        "app, on 127.0.0.1; Ctrl-C or SIGTERM stops both.",
    )
    sv.add_argument("--model-store", required=True, metavar="STORE", help="path or s3:// URI")
    sv.add_argument("--port", type=int, metavar="P", help="HTTP port (default: a free one)")
    sv.add_argument(
        "--no-triton", action="store_true", help="encode queries in process (ONNX Runtime)"
    )
    sv.add_argument("--settings", metavar="JSON", help="app settings, e.g. '{\"candidates\": 200}'")
    _ingress_option(sv)
    sv.set_defaults(func=_cmd_serve)

    bn = sub.add_parser(
        "bench",
        help="load benchmark: kuberank vs naive server vs in-process limit (loopback)",
        description="Closed-loop (--concurrency) or open-loop (--rates) load against kuberank with "
        "Triton, kuberank with in-process ONNX Runtime, a naive FastAPI+PyTorch server "
        "and the in-process batched limit; bounded by --requests and --max-seconds.",
    )
    bn.add_argument("--model-store", required=True, metavar="STORE", help="path or s3:// URI")
    from kuberank.serving.bench import CONCURRENCY_LEVELS

    default_levels = ",".join(str(c) for c in CONCURRENCY_LEVELS)
    bn.add_argument(
        "--concurrency",
        default=default_levels,
        metavar="C,C,...",
        help=f"closed-loop client counts (default: {default_levels})",
    )
    bn.add_argument("--rates", metavar="R,R,...", help="open-loop request rates per second instead")
    bn.add_argument(
        "--open-at",
        metavar="F,F,...",
        help="after the closed-loop levels, fixed-rate levels at these fractions of the "
        "in-process limit, e.g. 0.3,0.4,0.5: the rate sustained when arrivals do not wait",
    )
    bn.add_argument("--requests", type=int, default=200, help="requests per level (default: 200)")
    bn.add_argument("--max-seconds", type=float, default=15.0, help="time limit per level")
    bn.add_argument("--queries", type=int, default=200, help="distinct queries (default: 200)")
    bn.add_argument(
        "--targets", metavar="T,T", help="subset of kuberank-triton,kuberank-onnx,naive,limit"
    )
    bn.add_argument("--out", metavar="DIR", help="write bench.json and latency_vs_load.png here")
    bn.add_argument("--settings", metavar="JSON", help="app settings for the kuberank targets")
    _ingress_option(bn)
    bn.add_argument("--json", action="store_true", help="print the result as one JSON object")
    bn.set_defaults(func=_cmd_bench)
