"""``make bench``: quality, training throughput and compression benchmarks.

Every section prints a table and ratios against a baseline measured in the same run, and
writes ``runs/bench-<timestamp>/bench.json`` and ``report.md`` with plots. Timings on a shared
2-core machine are noisy: the ratios are what to read. CISI (../shared/datasets/cisi) is used
when present; everything else runs on the embedded MovieLens-100K.

    python -m benchmarks.run [--sections quality,search,diversity,train,compression,serving,retrieval,images,overload]
        [--out runs]      # --sections rec-peers: the RecBole peers over seeds (hours on a CPU)

``search`` also runs every BEIR directory in ``KUBERANK_COLLECTIONS`` (colon-separated).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
from pathlib import Path

from benchmarks import sections

CISI = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "cisi"
ALL = (
    "quality",
    "rec-peers",
    "search",
    "diversity",
    "train",
    "compression",
    "serving",
    "retrieval",
    "images",
    "overload",
)
# rec-peers trains SASRec and GRU4Rec to convergence over 3 seeds: hours on 2 CPU cores (or
# minutes on a GPU), so `make bench` leaves it out; `--sections rec-peers` runs it
DEFAULT = tuple(s for s in ALL if s != "rec-peers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--sections",
        default=",".join(DEFAULT),
        help=f"comma-separated subset of {', '.join(ALL)} (default: all but rec-peers)",
    )
    parser.add_argument("--out", default="runs", help="where the report goes (default: runs)")
    parser.add_argument(
        "--cisi",
        default=os.environ.get("KUBERANK_CISI", str(CISI)),
        help="BEIR dir of CISI, if present",
    )
    args = parser.parse_args(argv)
    out = Path(args.out) / f"bench-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    cisi = f"beir:{args.cisi}" if Path(args.cisi, "corpus.jsonl").is_file() else None
    results, report = {}, ["# kuberank benchmarks", ""]
    for name in args.sections.split(","):
        name = name.strip()
        if name not in ALL:
            parser.error(f"--sections: unknown section {name!r}")
        print(f"\n=== {name} ===", flush=True)
        result, markdown = getattr(sections, name.replace("-", "_"))(out, cisi)
        results[name] = result
        report += [f"## {name}", "", markdown, ""]
        (out / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (out / "report.md").write_text("\n".join(report))
    print(f"\nreport: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
