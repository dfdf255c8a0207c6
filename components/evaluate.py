"""Evaluation step: rank every judged query (or user) over the full item set and score the run.

Pure core: :func:`evaluate` (dataset + ranker + split -> metrics). Rankers are the baselines
(BM25, popularity, the zero-shot encoder) and model directories. Thin wrappers: the kfp
component :func:`evaluate_op` and ``kuberank evaluate`` in the CLI.

Contract: ``kuberank evaluate --dataset SPEC --model zero-shot|bm25|popularity|DIR
[--split train|test|all] --json`` prints one JSON object with at least ``ndcg@10``,
``mrr@10``, ``recall@100`` and ``queries``, and the beyond-accuracy metrics of
:mod:`kuberank.beyond_accuracy` (``coverage@10``, ``gini@10``, ``arp@10``, ``ild@10``,
``novelty@10``, ``exposure_{head,mid,tail}@10``).
"""

import time
from pathlib import Path

import numpy as np
from kfp import dsl
from scipy import sparse

from kuberank import beyond_accuracy, datasets, fusion, longtail, metrics, significance
from kuberank.calibration import CALIBRATION_ATTRIBUTE, group_matrix, miscalibration
from kuberank.config import base_model_path
from kuberank.errors import KuberankError
from kuberank.kfp_component import step_component
from kuberank.lexical import META_FILE, LexicalIndex, read_meta
from kuberank.metrics import top_k
from kuberank.progress import bar
from kuberank.report import QUALITY_COLUMNS, format_table
from kuberank.reranking import KINDS, Reranker
from kuberank.store import LEXICAL_DIR, is_store, store_path

RUN_DEPTH = 1000  # ranked items kept per query (MAP and recall@100 need depth)
BASELINES = ("bm25", "popularity", "zero-shot", "ease")
PEERS = ("sasrec", "gru4rec", "lightgcn", "bpr", "itemknn")  # RecBole: components/peers.py


class Ranker:
    """Scores every item for a batch of evaluation rows. ``prepare`` sees the task once."""

    name = "ranker"

    def prepare(self, task: datasets.EvalTask) -> None:  # pragma: no cover - interface
        pass

    def scores(self, task: datasets.EvalTask, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def item_vectors(self) -> np.ndarray | None:
        """The ranker's own item vectors after ``prepare`` (a dense model's item tower, the
        vectors its served index holds), or None where it has none (baselines, peers)."""
        return None


class BM25Ranker(Ranker):
    """BM25 over item text (:mod:`kuberank.lexical`: bm25s, the store's lexical index).
    ``stored``: a model store's lexical index, used when it holds the task's items (same ids,
    same order; ``kuberank index`` of the same collection), else BM25 is built here."""

    name = "bm25"

    def __init__(self, stored=None):
        self.stored, self.source = stored, None

    def prepare(self, task):
        data = task.dataset
        if self.stored is not None and self.stored.ids == [str(i) for i in data.item_ids]:
            self.index, self.source = self.stored, "store"
        else:
            self.index, self.source = LexicalIndex.build(data.item_ids, data.item_texts), "built"

    def scores(self, task, rows):
        return self.index.scores([task.texts[r] for r in rows])


class PopularityRanker(Ranker):
    """Items ranked by how often they occur in the users' known interactions."""

    name = "popularity"

    def prepare(self, task):
        if task.dataset.kind != datasets.RECOMMENDATION:
            raise KuberankError(
                "--model popularity: a recommendation baseline; this dataset is a search collection"
            )
        counts = np.zeros(len(task.dataset.items), dtype=np.float32)
        for history in task.histories:
            np.add.at(counts, history, 1.0)
        self.counts = counts

    def scores(self, task, rows):
        return np.broadcast_to(self.counts, (len(rows), len(self.counts)))


def _user_item_matrix(task: datasets.EvalTask):
    """Binary users x items matrix of the task's known interactions (CSR)."""
    rows = np.repeat(np.arange(len(task)), [len(h) for h in task.histories])
    cols = np.concatenate(task.histories) if len(task) else np.zeros(0, dtype=np.int64)
    matrix = sparse.csr_matrix(
        (np.ones(len(cols), dtype=np.float32), (rows, cols)),
        shape=(len(task), len(task.dataset.items)),
    )
    matrix.data[:] = 1.0
    return matrix


class EASERanker(Ranker):
    """EASE^R (Steck, 2019): a closed-form item-item model, B = I - P / diag(P) with
    P = (X^T X + lambda I)^-1. A strong non-sequential collaborative baseline."""

    name = "ease"

    def __init__(self, l2: float = 500.0):
        self.l2 = l2

    def prepare(self, task):
        if task.dataset.kind != datasets.RECOMMENDATION:
            raise KuberankError(
                "--model ease: a recommendation baseline; this dataset is a search collection"
            )
        self.matrix = _user_item_matrix(task)
        gram = (self.matrix.T @ self.matrix).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += self.l2
        inverse = np.linalg.inv(gram)
        self.weights = -inverse / np.diag(inverse)
        self.weights[np.diag_indices_from(self.weights)] = 0.0

    def scores(self, task, rows):
        return np.asarray(self.matrix[rows] @ self.weights)


class ModelRanker(Ranker):
    """A model in any form (see :func:`kuberank.model.resolve_model`): the towers embed
    queries and items and F scores them. For search F reduces to Q·I; for recommendation the
    behaviour and collaborative terms use the user's history and id. A plain encoder without
    F (the zero-shot baseline) scores a user without query text by the mean embedding of the
    history."""

    def __init__(self, path: str, name: str | None = None):
        # kuberank.model and torch: heavy (torch); loaded only for a model directory
        from kuberank.model import ScorerConfig, load_scorer, resolve_model

        self.path = path
        self.name = name or Path(path).name
        resolved = resolve_model(path)
        self.info = resolved.info
        if self.info is None:  # a plain encoder or a store of one: F = Q·I
            from kuberank.model import ModelInfo

            self.info = ModelInfo(kind=datasets.SEARCH, base_model=path, scorer=ScorerConfig())
        self.scorer = load_scorer(resolved.scorer_dir, self.info) if resolved.scorer_dir else None
        self.query_encoder, self.item_encoder = resolved.query_encoder, resolved.item_encoder

    def prepare(self, task):
        import torch

        data = task.dataset
        if getattr(self, "_encoded", None) is not data:  # once per dataset (hybrid fits first)
            self.item_text = torch.from_numpy(
                np.array(self.item_encoder.encode(data.item_texts, desc="encode items"))
            )
            self._encoded = data
        model_items = {iid: i for i, iid in enumerate(self.info.item_ids)}
        unknown = self.info.scorer.n_items
        self.item_index = torch.tensor(
            [model_items.get(i, unknown) for i in data.item_ids], dtype=torch.long
        )
        model_users = {u: i for i, u in enumerate(self.info.user_ids)}
        self.user_index = [model_users.get(u, self.info.scorer.n_users) for u in task.users]
        with_text = [i for i, t in enumerate(task.texts) if t]
        self.query_vecs = torch.zeros(len(task), self.item_text.shape[1])
        if with_text:
            encoded = self.query_encoder.encode(
                [task.texts[i] for i in with_text], desc="encode queries"
            )
            self.query_vecs[with_text] = torch.from_numpy(np.array(encoded))
        self.has_text = np.array([t is not None for t in task.texts])
        if self.scorer is None:
            for i, history in enumerate(task.histories):
                if task.texts[i] is None and len(history):
                    mean = self.item_text[history].mean(0)
                    self.query_vecs[i] = mean / mean.norm().clamp(min=1e-9)

    def item_vectors(self) -> np.ndarray:
        vectors = self.item_text.numpy()
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)

    def scores(self, task, rows):
        import torch

        from kuberank.model import pad_histories

        if self.info.kind == datasets.SEARCH or self.scorer is None:
            return (self.query_vecs[rows] @ self.item_text.T).numpy()
        hist = torch.from_numpy(
            pad_histories([task.histories[r] for r in rows], self.info.scorer.max_history)
        )
        # History positions index the dataset's items; map them to the model's id rows.
        hist_model = torch.where(
            hist >= 0, self.item_index[hist.clamp(min=0)], torch.full_like(hist, -1)
        )
        query = self.query_vecs[rows] if self.has_text[rows].all() else None
        with torch.no_grad():
            return self.scorer(
                self.item_text,
                self.item_index,
                query=query,
                history=hist_model,
                history_text=self.item_text[hist.clamp(min=0)],
                users=torch.tensor([self.user_index[r] for r in rows], dtype=torch.long),
            ).numpy()


class HybridRanker(Ranker):
    """A dense ranker (a model) fused with BM25 over the same items (:mod:`kuberank.fusion`):
    ``rrf``, or ``convex`` with a weight given or fitted on the ``tuning`` queries (train and
    validation: never test, never the split evaluated). Without a validation split, convex
    falls back to RRF and says so in :attr:`fusion`. ``lexical``: a store's lexical index
    (used for the store's own items instead of building BM25 again)."""

    def __init__(
        self,
        dense: Ranker,
        method: str = "convex",
        weight: float | None = None,
        stored: dict | None = None,
        lexical=None,
    ):
        if method not in fusion.METHODS:
            raise KuberankError(f"--fusion: one of {', '.join(fusion.METHODS)}, got {method!r}")
        self.dense, self.lexical = dense, BM25Ranker(lexical)
        self.name = f"{dense.name}+bm25"
        self.method, self.weight = method, weight
        self.fusion: dict = {}
        if stored:  # the fusion a store's index recorded (fitted on validation at index time)
            self.method, self.weight = stored["method"], stored.get("weight")
            self.fusion = {"from": "store", **stored}

    def prepare(self, task):
        if task.dataset.kind != datasets.SEARCH:
            raise KuberankError(
                "--retrieval hybrid: fuses BM25 with the dense ranking of query text; "
                "this dataset is a recommendation log (use --retrieval dense)"
            )
        self.lexical.prepare(task)
        self.fusion["lexical"] = self.lexical.source  # "store": STORE/lexical; "built": here
        method, weight = self.method, self.weight
        if method == "convex" and weight is None:
            weight, curve = self._fit(task.dataset)
            if weight is None:
                method = "rrf"
                self.fusion["note"] = "no validation split to fit the weight on: RRF instead"
            else:
                self.fusion.update(fitted_on="tuning", tuning_ndcg10=curve)
        self.fusion.update(method=method, weight=weight)
        self.dense.prepare(task)

    def _fit(self, data: datasets.Dataset):
        if "tuning" not in data.splits():
            return None, None
        task = datasets.eval_task(data, "tuning")
        self.dense.prepare(task)
        rows = np.arange(len(task))
        fitted = fusion.fit_on_judged(
            self.dense.scores(task, rows),
            self.lexical.scores(task, rows),
            task.query_ids,
            task.exclude,
            task.qrels,
            data.item_ids,
        )
        return fitted["weight"], fitted["tuning_ndcg10"]

    def item_vectors(self) -> np.ndarray | None:
        return self.dense.item_vectors()

    def scores(self, task, rows):
        dense, lexical = self.dense.scores(task, rows), self.lexical.scores(task, rows)
        return fusion.fuse(dense, lexical, self.fusion["method"], self.fusion["weight"])


def load_ranker(model: str) -> Ranker:
    """``bm25``, ``popularity``, ``zero-shot``, ``ease``, a RecBole peer (``sasrec``,
    ``gru4rec``, ``lightgcn``, ``bpr``, ``itemknn``; see :mod:`kuberank.components.peers`) or a
    model directory."""
    if model == "bm25":
        return BM25Ranker()
    if model == "popularity":
        return PopularityRanker()
    if model == "zero-shot":
        return ModelRanker(base_model_path(), name="zero-shot")
    if model == "ease":
        return EASERanker()
    if model in PEERS:
        # local: components/peers.py imports this module (Ranker, EASERanker)
        from kuberank.components.peers import RecBoleRanker

        return RecBoleRanker(model)
    path = Path(model)
    if path.exists():
        return ModelRanker(str(path))
    raise KuberankError(
        f"--model: {model!r} is neither a baseline ({', '.join(BASELINES)}), a peer "
        f"({', '.join(PEERS)}) nor a directory"
    )


RERANKINGS = KINDS  # the served API's names (kuberank/reranking.py)
RERANK_OPTIONS = {
    "mmr_lambda": "--mmr-lambda",
    "calibration": "--calibration",
    "tail_boost": "--tail-boost",
}


def rank(
    ranker: Ranker,
    task: datasets.EvalTask,
    depth: int = RUN_DEPTH,
    batch_size: int = 256,
    reranking: tuple[str, float] | None = None,
    popularity: tuple[np.ndarray, int] | None = None,
) -> dict[str, list[str]]:
    """The run: query id -> ranked item ids (full ranking over all items, seen items excluded);
    ``reranking``: one of :data:`RERANKINGS` with its parameter, re-ordering each list's top
    100 (:func:`reranker`, with the training ``popularity`` where already counted)."""
    ranker.prepare(task)
    rerank = None
    if reranking is not None:
        rerank = reranker(ranker, task, reranking[0], popularity)
    item_ids = np.asarray(task.dataset.item_ids, dtype=object)
    run: dict[str, list[str]] = {}
    starts = range(0, len(task), batch_size)
    for start in bar(starts, desc=f"rank ({ranker.name})", total=len(starts), unit="batch"):
        rows = np.arange(start, min(start + batch_size, len(task)))
        block = ranker.scores(task, rows)
        for offset, row in enumerate(rows):
            top = top_k(block[offset], task.exclude[row], depth)
            if rerank is not None:
                scores = np.asarray(block[offset])[top]
                kind, value = reranking
                top = top[rerank.order(kind, value, top, scores, task.histories[row])]
            run[task.query_ids[row]] = item_ids[top].tolist()
    return run


def reranker(
    ranker: Ranker,
    task: datasets.EvalTask,
    kind: str,
    popularity: tuple[np.ndarray, int] | None = None,
) -> Reranker:
    """What the re-ranking ``kind`` (kuberank/reranking.py) needs of the items, built after
    ``ranker.prepare``; it re-orders each list's top 100 (MMR all of them, calibration
    greedily its first 10):

    - ``mmr_lambda``: the item vectors of :func:`mmr_vectors`;
    - ``calibration``: the genre distributions (the dataset needs a ``genres`` attribute);
    - ``tail_boost``: whether each item is in the long tail of the training interactions
      (``popularity``: :func:`kuberank.beyond_accuracy.train_popularity`, counted here when
      not given)."""
    data = task.dataset
    if kind == "mmr_lambda":
        return Reranker(vectors=mmr_vectors(ranker, data))
    if kind == "calibration":
        return Reranker(groups=item_groups(data, "--calibration"))
    if kind == "tail_boost":
        if popularity is None:
            popularity = beyond_accuracy.train_popularity(data)
        return Reranker(tail=longtail.long_tail(popularity[0]))
    raise KuberankError(f"re-ranking: one of {', '.join(RERANKINGS)}, got {kind!r}")


def item_groups(data: datasets.Dataset, option: str) -> np.ndarray:
    """The items' genre distributions (kuberank/calibration.py), or a clear error naming
    ``option`` when the dataset has no ``genres`` attribute."""
    if CALIBRATION_ATTRIBUTE not in data.items:
        raise KuberankError(
            f"{option}: calibrates to the {CALIBRATION_ATTRIBUTE!r} of the user's history; "
            f"{data.name} has no such item attribute"
        )
    return group_matrix(list(data.items[CALIBRATION_ATTRIBUTE]))[1]


def mmr_vectors(ranker: Ranker, data: datasets.Dataset) -> np.ndarray:
    """The item vectors MMR compares, as serving does: a dense model's own item vectors (its
    index's), after ``prepare``; for rankers without any (baselines, peers) the base encoder's
    (:func:`kuberank.beyond_accuracy.item_embeddings`)."""
    own = ranker.item_vectors()
    return own if own is not None else beyond_accuracy.item_embeddings(data)


RETRIEVALS = ("dense", "bm25", "hybrid")


def retrieval_ranker(model: str | Ranker, retrieval: str | None, fusion_method: str = "convex"):
    """The ranker of ``model`` under ``--retrieval``: ``dense`` (the model alone), ``bm25``
    (the lexical baseline alone) or ``hybrid`` (both fused, :class:`HybridRanker`). Unset, a
    model store's lexical index decides (hybrid where fusion beat dense on validation), and
    its recorded fusion is used; anything else is dense."""
    if retrieval not in (None, *RETRIEVALS):
        raise KuberankError(f"--retrieval: one of {', '.join(RETRIEVALS)}, got {retrieval!r}")
    stored, index = None, None
    if isinstance(model, str) and retrieval != "dense" and is_store(model):
        lexical = Path(store_path(model, LEXICAL_DIR))
        if lexical.is_dir() or retrieval == "hybrid":  # names `kuberank index` when absent
            stored = read_meta(lexical / META_FILE)["fusion"]
            retrieval = retrieval or stored["default"]
            if retrieval != "dense":  # BM25 loaded only where it ranks
                index = LexicalIndex.load(lexical)
    if retrieval == "bm25":
        return BM25Ranker(index)
    ranker = load_ranker(model) if isinstance(model, str) else model
    if retrieval == "hybrid":
        if isinstance(ranker, (BM25Ranker, PopularityRanker, EASERanker)) or ranker.name in PEERS:
            raise KuberankError(
                f"--retrieval hybrid: fuses BM25 with a dense model; {ranker.name} is not one"
            )
        return HybridRanker(ranker, fusion_method, stored=stored, lexical=index)
    return ranker


def calibration_metric(data: datasets.Dataset, task: datasets.EvalTask, run: dict) -> dict:
    """``miscalibration@10`` (kuberank/calibration.py) where the items have genres and the
    rows have histories, else nothing."""
    if CALIBRATION_ATTRIBUTE not in data.items or not any(len(h) for h in task.histories):
        return {}
    groups = item_groups(data, "miscalibration")
    row = {iid: i for i, iid in enumerate(data.item_ids)}
    lists = [[row[i] for i in run[q][:10]] for q in task.query_ids]
    return {"miscalibration@10": miscalibration(lists, task.histories, groups, 10)}


def evaluate(
    dataset: datasets.Dataset | str,
    model: str | Ranker,
    split: str = "test",
    retrieval: str | None = None,
    fusion_method: str = "convex",
    mmr_lambda: float | None = None,
    per_query: bool = False,
    calibration: float | None = None,
    tail_boost: float | None = None,
) -> dict:
    """Metrics of ``model`` on ``split`` of ``dataset`` (see :mod:`kuberank.metrics`);
    ``retrieval`` as in :func:`retrieval_ranker` (default: the model as given);
    at most one re-ranking of each list's top 100 (:func:`reranker`): ``mmr_lambda`` (MMR),
    ``calibration`` (lambda of Steck's calibration to the history's genres) or ``tail_boost``
    (beta of the long-tail boost);
    ``per_query``: also every judged query's nDCG@10 (``per_query_ndcg@10``, for paired tests,
    :mod:`kuberank.significance`)."""
    started = time.perf_counter()
    data = datasets.load(dataset) if isinstance(dataset, str) else dataset
    task = datasets.eval_task(data, split)
    if len(task) == 0:
        raise KuberankError(f"split {split!r} of {data.name} has no judged queries")
    chosen = {
        kind: value
        for kind, value in zip(RERANKINGS, (mmr_lambda, calibration, tail_boost), strict=True)
        if value is not None
    }
    for kind, value in chosen.items():
        if not 0.0 <= value <= 1.0:
            raise KuberankError(f"{RERANK_OPTIONS[kind]}: {value} is not in [0, 1]")
    if len(chosen) > 1:
        raise KuberankError(
            "one re-ranking at a time: --mmr-lambda, --calibration or --tail-boost, got "
            + ", ".join(RERANK_OPTIONS[k] for k in chosen)
        )
    if "calibration" in chosen:
        item_groups(data, "--calibration")  # before any model work
    ranker = retrieval_ranker(model, retrieval, fusion_method)
    popularity = beyond_accuracy.train_popularity(data)  # the boost's and the metrics' once
    run = rank(ranker, task, reranking=next(iter(chosen.items()), None), popularity=popularity)
    result = metrics.evaluate_run(run, task.qrels)
    # coverage@10, gini@10, ild@10, ...
    result.update(beyond_accuracy.evaluate_run(data, run, popularity=popularity))
    result.update(calibration_metric(data, task, run))
    if isinstance(ranker, HybridRanker):
        result["fusion"] = ranker.fusion
    if per_query:
        result["per_query_ndcg@10"] = significance.per_query_metric(run, task.qrels, "ndcg@10")
    result.update(
        model=ranker.name,
        dataset=data.name,
        split=split,
        items=len(data.items),
        **chosen,
        seconds=round(time.perf_counter() - started, 2),
    )
    return result


def parse_baselines(text: str) -> list[str]:
    """``"popularity, ease"`` -> ``["popularity", "ease"]`` (empty entries dropped)."""
    return [b.strip() for b in text.split(",") if b.strip()]


def quality_report(rows: list[dict], split: str, dataset: str) -> str:
    """The evaluate step's Markdown: the fine-tuned model against the baselines."""
    return "\n".join(
        [
            f"# Quality on {dataset} ({split} split)",
            "",
            "Full ranking over all items; each user's seen items are excluded.",
            "",
            format_table(rows, QUALITY_COLUMNS),
            "",
        ]
    )


@step_component()
def evaluate_model_op(
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    scores: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.Markdown],
    split: str = "test",
    baselines: str = "popularity,ease,zero-shot",
) -> float:
    """The fine-tuned model against the baselines on ``split``; the model's metrics are logged,
    the table of all rows is the Markdown report. Returns the model's nDCG@10."""
    import json

    from kuberank import datasets
    from kuberank.components.evaluate import evaluate, parse_baselines, quality_report

    data = datasets.load(f"prepared:{dataset.path}")
    rows = [evaluate(data, name, split) for name in parse_baselines(baselines)]
    tuned = evaluate(data, model.path, split)
    tuned["model"] = "fine-tuned"
    rows.append(tuned)
    for name, value in tuned.items():
        if isinstance(value, (int, float)):
            scores.log_metric(name, value)
    with open(report.path, "w") as fh:
        fh.write(quality_report(rows, split, data.name))
    report.metadata["rows"] = json.loads(json.dumps(rows, default=str))
    return float(tuned["ndcg@10"])
