"""Fine-tuning for search collections (:class:`SearchTask`): the text towers with an
in-batch-negative contrastive loss (InfoNCE with temperature; other positives of the same
query are masked out of the negatives), optionally one BM25 hard negative per pair and
in-domain pairs from the documents (kuberank/corpus_pairs.py); where the collection has
validation queries (``dev.tsv``, or those held out by :mod:`kuberank.datasets`), the epoch
kept is the best by validation nDCG@10. The learning rate warms up over the first 10% of the
steps, then decays linearly."""

from __future__ import annotations

import random

import numpy as np

from kuberank import datasets
from kuberank.components.training import TrainingTask, TwoTower, build_towers, replay_sample
from kuberank.corpus_pairs import corpus_pairs
from kuberank.errors import KuberankError
from kuberank.lexical import LexicalIndex
from kuberank.metrics import evaluate_run


def search_examples(data: datasets.Dataset, split: str = "train") -> dict:
    """(query, positive document) pairs of ``split``, with every query's positive set."""
    if split not in data.splits():
        raise KuberankError(
            f"{data.name}: the {split} split is empty (no judged queries): nothing to train on"
        )
    task = datasets.eval_task(data, split)
    index_of = {iid: i for i, iid in enumerate(data.item_ids)}
    pairs = [(q, index_of[d]) for q, qid in enumerate(task.query_ids) for d in task.qrels[qid]]
    if not pairs:
        raise KuberankError(
            f"{data.name}: the {split} split has no (query, relevant document) pair: nothing to train on"
        )
    return {"queries": [t or "" for t in task.texts], "pairs": pairs}


def bm25_hard_negatives(
    data: datasets.Dataset, examples: dict, depth: int = 20, index=None
) -> list[int]:
    """For each pair, one of the three best-ranked BM25 documents of ``data`` that is not
    relevant to its query (``examples``: query texts and (query, document row) pairs);
    ``index``: ``data``'s :class:`kuberank.lexical.LexicalIndex` when one is built already.
    Only the queries of the pairs are scored."""
    if index is None:
        index = LexicalIndex.build(data.item_ids, data.item_texts)
    positives: dict[int, set[int]] = {}
    for q, d in examples["pairs"]:
        positives.setdefault(q, set()).add(d)
    scores = dict(
        zip(positives, index.scores([examples["queries"][q] for q in positives]), strict=True)
    )
    best: dict[int, list[int]] = {}
    for q in positives:
        order = np.argsort(-scores[q], kind="stable")[: depth + len(positives[q])]
        best[q] = [int(d) for d in order if d not in positives[q]][:depth] or [int(order[-1])]
    rng = random.Random(0)
    return [rng.choice(best[q][:3]) for q, _ in examples["pairs"]]


def warmup_linear(total_steps: int, warmup: float = 0.1):
    warm = max(1, int(total_steps * warmup))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return schedule


class SearchTask(TrainingTask):
    kind = datasets.SEARCH
    defaults = {"epochs": 2, "batch_size": 32, "lr": 5e-5}

    def prepare(self, data: datasets.Dataset, config, init_model: str) -> dict:
        examples = search_examples(data)
        doc_texts = list(data.item_texts)
        lexical = None
        if config.hard_negatives:  # one BM25 index of the documents for both kinds of pairs
            lexical = LexicalIndex.build(data.item_ids, data.item_texts)
        hard = bm25_hard_negatives(data, examples, index=lexical) if lexical is not None else None
        mask_pairs, adapted = [], {}
        if config.corpus_pairs > 0:  # in-domain pairs from the documents themselves
            titles, bodies = data.item_titles_and_bodies()
            limit = max(1, round(config.corpus_pairs * len(examples["pairs"])))
            extra, adapted = corpus_pairs(titles, bodies, seed=config.seed, limit=limit)
            if extra and not adapted["title"]:
                print(f"{data.name}: the documents have no titles: corpus pairs by cropping")
            offset_q, offset_d = len(examples["queries"]), len(doc_texts)
            examples["queries"] += [q for q, _, _ in extra]
            doc_texts += [positive for _, positive, _ in extra]
            examples["pairs"] += [(offset_q + i, offset_d + i) for i in range(len(extra))]
            # the whole document a pair was cut from is no negative of its query either
            mask_pairs = [(offset_q + i, row) for i, (_, _, row) in enumerate(extra)]
            if hard is not None:
                hard += bm25_hard_negatives(
                    data, {"queries": examples["queries"], "pairs": mask_pairs}, index=lexical
                )
        replayed = 0
        previous = (
            replay_sample(config.warm_start, config.replay_fraction, config.seed)
            if config.warm_start
            else None
        )
        if previous is not None and previous.kind == self.kind:
            old = search_examples(previous)
            chosen = random.Random(config.seed).sample(
                range(len(old["pairs"])), int(len(old["pairs"]) * config.replay_fraction)
            )
            # Replayed pairs point into the previous collection: its queries and texts follow ours.
            offset_q, offset_d = len(examples["queries"]), len(doc_texts)
            examples["queries"] += old["queries"]
            examples["pairs"] += [
                (old["pairs"][i][0] + offset_q, old["pairs"][i][1] + offset_d) for i in chosen
            ]
            doc_texts += previous.item_texts
            if hard is not None:
                old_hard = bm25_hard_negatives(previous, old)
                hard += [old_hard[i] + offset_d for i in chosen]
            replayed = len(chosen)
        loop = dict(
            queries=examples["queries"],
            pairs=examples["pairs"],
            doc_texts=doc_texts,
            n_rows=len(examples["pairs"]),
            replayed_rows=replayed,
            mask_pairs=mask_pairs,
            corpus_pairs_used=adapted,
        )
        if hard is not None:
            loop["hard_negatives"] = hard
        if "validation" in data.splits():  # the checkpoint kept is the best on these queries
            task = datasets.eval_task(data, "validation")
            index_of = {iid: i for i, iid in enumerate(data.item_ids)}
            loop["validation"] = {
                "queries": [t or "" for t in task.texts],
                "relevant": [
                    {index_of[d]: int(rel) for d, rel in task.qrels[qid].items()}
                    for qid in task.query_ids
                ],
                "n_docs": len(data.item_ids),
            }
        return loop

    def setup(self, config: dict):
        return _setup(config)

    def schedule(self, total_steps: int):
        return warmup_linear(total_steps)

    def restore(self, state: dict, loop: dict, query_tower, item_tower):
        towers = TwoTower.module(query_tower, item_tower)
        towers.load_state_dict(state)
        query_tower = towers.query_tower
        trainable = sum(p.numel() for p in query_tower.parameters() if p.requires_grad)
        total = sum(p.numel() for p in query_tower.parameters())
        return query_tower, towers.item_tower, None, trainable, total


def _setup(config: dict):
    import torch  # torch: heavy; loaded only when training

    tokenizer, query_tower, item_tower = build_towers(config)
    model = TwoTower.module(query_tower, item_tower)
    queries, pairs = config["queries"], config["pairs"]
    doc_texts, hard = config["doc_texts"], config.get("hard_negatives")
    positives = {(q, d) for q, d in pairs} | {(q, d) for q, d in config.get("mask_pairs", [])}

    def tokenize(texts, max_length, device):
        batch = tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {k: v.to(device) for k, v in batch.items()}

    def step(model, index, device):
        batch_pairs = [pairs[i] for i in index]
        docs = [d for _, d in batch_pairs]
        if hard:
            docs += [hard[i] for i in index]
        q_vecs, d_vecs = model(
            tokenize([queries[q] for q, _ in batch_pairs], config["query_max_length"], device),
            tokenize([doc_texts[d] for d in docs], config["max_length"], device),
        )
        logits = q_vecs @ d_vecs.T / config["temperature"]
        # Another positive of the same query is no negative: mask it out.
        mask = torch.tensor(
            [
                [j != i and (q, d) in positives for j, d in enumerate(docs)]
                for i, (q, _) in enumerate(batch_pairs)
            ],
            device=logits.device,
        )
        logits = logits.masked_fill(mask, float("-inf"))
        labels = torch.arange(len(batch_pairs), device=logits.device)
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    validate = None
    if config.get("validation"):
        validation = config["validation"]
        docs = doc_texts[: validation["n_docs"]]  # replayed documents follow: not judged here

        def encode(model, tower, texts, max_length):
            device = next(model.parameters()).device
            out = [
                model.embed(tower, tokenize(texts[i : i + 64], max_length, device)).float().cpu()
                for i in range(0, len(texts), 64)
            ]
            return torch.cat(out)

        def validate(model):
            item_tower = model.item_tower if model.item_tower is not None else model.query_tower
            model.eval()
            with torch.no_grad():
                q = encode(
                    model, model.query_tower, validation["queries"], config["query_max_length"]
                )
                d = encode(model, item_tower, docs, config["max_length"])
            scores = (q @ d.T).numpy()
            run = {
                str(r): [str(i) for i in np.argsort(-scores[r], kind="stable")[:100]]
                for r in range(len(scores))
            }
            qrels = {
                str(r): {str(i): rel for i, rel in relevant.items()}
                for r, relevant in enumerate(validation["relevant"])
            }
            result = evaluate_run(run, qrels, cutoffs=(10,))
            model.train()
            return {"val_ndcg@10": result["ndcg@10"], "val_hit@10": result["hit@10"]}

    params = [p for p in model.parameters() if p.requires_grad]
    return step, model, params, {"validate": validate}
