"""Fine-tuning for interaction logs (:class:`RecommendationTask`): next-item prediction with a
(sampled) softmax over items trains F's behaviour and collaborative terms on top of the item
text vectors (kuberank/model.py); the epoch kept is chosen on the validation split only (best
checkpoint by validation nDCG@10). A warm start re-indexes the previous scorer's id tables and
replays a share of its users."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pandas as pd

from kuberank import datasets
from kuberank.components.training import TrainingTask, replay_sample
from kuberank.encoder import TextEncoder
from kuberank.errors import KuberankError
from kuberank.metrics import evaluate_run


def recommendation_examples(data: datasets.Dataset, max_history: int) -> dict:
    """Next-item examples from every user's training sequence: (user, target, history)."""
    index_of = {iid: i for i, iid in enumerate(data.item_ids)}
    train = data.interactions[data.interactions["split"] == "train"]
    users = sorted(data.interactions["user_id"].unique(), key=str)
    user_index = {u: i for i, u in enumerate(users)}
    sequences = {
        u: g["item_id"].map(index_of).to_numpy() for u, g in train.groupby("user_id", sort=False)
    }
    rows = [(user_index[u], t) for u, seq in sequences.items() for t in range(1, len(seq))]
    if not rows:
        raise KuberankError(
            f"{data.name}: the train split has no user with two or more interactions: nothing to train on"
        )
    return {
        "users": users,
        "sequences": {user_index[u]: seq for u, seq in sequences.items()},
        "rows": rows,
        "max_history": max_history,
    }


def recommendation_replay(
    data: datasets.Dataset, previous: datasets.Dataset, fraction: float, seed: int
) -> pd.DataFrame:
    """Training interactions of a random ``fraction`` of the previous data's users, limited to
    items still in the catalogue; replayed users get their own ids (``replay:<id>``) so old
    sequences never merge into current ones."""
    old = previous.interactions[previous.interactions["split"] == "train"]
    users = sorted(old["user_id"].unique(), key=str)
    keep = set(random.Random(seed).sample(users, int(len(users) * fraction)))
    rows = old[old["user_id"].isin(keep) & old["item_id"].isin(set(data.item_ids))]
    return rows.assign(user_id="replay:" + rows["user_id"].astype(str))


class RecommendationTask(TrainingTask):
    kind = datasets.RECOMMENDATION
    defaults = {"epochs": 4, "batch_size": 256, "lr": 3e-3}

    def prepare(self, data: datasets.Dataset, config, init_model: str) -> dict:
        # kuberank.model: heavy (torch); loaded only when training
        from kuberank.model import ScorerConfig, is_kuberank_model, item_tower_path

        train_data, replayed = data, 0
        if config.warm_start and config.replay_fraction > 0:
            previous = replay_sample(config.warm_start, config.replay_fraction, config.seed)
            if previous is not None and previous.kind == self.kind:
                replay = recommendation_replay(data, previous, config.replay_fraction, config.seed)
                train_data = dataclasses.replace(
                    data, interactions=pd.concat([data.interactions, replay], ignore_index=True)
                )
                replayed = len(replay)
        examples = recommendation_examples(train_data, max_history=config.max_history)
        encoder = TextEncoder(str(item_tower_path(init_model)))
        item_text = encoder.encode(data.item_texts, desc="encode items")
        scorer = ScorerConfig(
            n_items=len(data.items),
            n_users=len(examples["users"]),
            text_dim=encoder.dim,
            max_history=config.max_history,
            use_relevance=True,
            use_behaviour=True,
            use_collaborative=True,
        )
        task = datasets.eval_task(data, "validation")
        user_index = {u: i for i, u in enumerate(examples["users"])}
        item_index = {iid: i for i, iid in enumerate(data.item_ids)}
        validation = {
            "histories": task.histories,
            "exclude": task.exclude,
            "users": [user_index[u] for u in task.users],
            "targets": [item_index[next(iter(task.qrels[q]))] for q in task.query_ids],
        }
        warm = None
        if config.warm_start and is_kuberank_model(config.warm_start):
            warm = _warm_scorer_state(config.warm_start, data, examples["users"])
        return {
            "scorer": dataclasses.asdict(scorer),
            "item_text": item_text,
            "sequences": examples["sequences"],
            "rows": examples["rows"],
            "n_rows": len(examples["rows"]),
            "users": examples["users"],
            "validation": validation,
            "warm_scorer": warm,
            "replayed_rows": replayed,
        }

    def setup(self, config: dict):
        return _setup(config)

    def restore(self, state: dict, loop: dict, query_tower, item_tower):
        from kuberank.model import Scorer, ScorerConfig

        scorer = Scorer(ScorerConfig(**loop["scorer"]))
        scorer.load_state_dict(state)
        count = sum(p.numel() for p in scorer.parameters())
        return query_tower, item_tower, scorer, count, count


def _warm_scorer_state(previous: str, data: datasets.Dataset, users: list[str]) -> dict:
    """The previous scorer's parameters, with id tables re-indexed to this dataset's ids."""
    from kuberank.model import load_scorer, read_info

    info = read_info(previous)
    state = load_scorer(previous, info).state_dict()
    old_items = {iid: i for i, iid in enumerate(info.item_ids)}
    old_users = {u: i for i, u in enumerate(info.user_ids)}
    items_map = [old_items.get(i, info.scorer.n_items) for i in data.item_ids] + [
        info.scorer.n_items
    ]
    users_map = [old_users.get(u, info.scorer.n_users) for u in users] + [info.scorer.n_users]
    for key in ("item_id.weight", "item_cf.weight", "item_bias.weight"):
        state[key] = state[key][items_map]
    state["user_cf.weight"] = state["user_cf.weight"][users_map]
    return state


def _setup(config: dict):
    import torch

    from kuberank.model import Scorer, ScorerConfig, pad_histories

    cfg = ScorerConfig(**config["scorer"])
    scorer = Scorer(cfg)
    if config.get("warm_scorer"):
        own = scorer.state_dict()
        scorer.load_state_dict(
            {k: v for k, v in config["warm_scorer"].items() if own[k].shape == v.shape},
            strict=False,
        )
    item_text = torch.from_numpy(config["item_text"])
    all_items = torch.arange(cfg.n_items)
    sequences, rows = config["sequences"], config["rows"]

    def step(model, index, device):
        users = torch.tensor([rows[i][0] for i in index])
        targets = torch.tensor([sequences[rows[i][0]][rows[i][1]] for i in index])
        hist = torch.from_numpy(
            pad_histories([sequences[rows[i][0]][: rows[i][1]] for i in index], cfg.max_history)
        )
        if cfg.n_items <= config["negatives"]:
            candidates = all_items
        else:  # sampled softmax: the batch's targets plus shared uniform negatives
            sampled = torch.randint(0, cfg.n_items, (config["negatives"],))
            candidates = torch.unique(torch.cat([targets, sampled]))
        scores = model(
            item_text[candidates],
            candidates,
            history=hist,
            history_text=item_text[hist.clamp(min=0)],
            users=users,
        )
        # Seen items are never recommended: mask them (the target stays).
        seen = (hist[:, :, None] == candidates[None, None, :]).any(1)
        is_target = candidates[None, :] == targets[:, None]
        scores = scores.masked_fill(seen & ~is_target, float("-inf"))
        labels = is_target.float().argmax(1)
        return torch.nn.functional.cross_entropy(scores, labels)

    validate = None
    if config.get("validation"):
        validation = config["validation"]

        def validate(model):
            model.eval()
            with torch.no_grad():
                hist = torch.from_numpy(pad_histories(validation["histories"], cfg.max_history))
                scores = model(
                    item_text,
                    all_items,
                    history=hist,
                    history_text=item_text[hist.clamp(min=0)],
                    users=torch.tensor(validation["users"]),
                ).numpy()
            run = {}
            for row, exclude in enumerate(validation["exclude"]):
                scores[row, exclude] = -np.inf
                run[str(row)] = [str(i) for i in np.argsort(-scores[row], kind="stable")[:100]]
            qrels = {str(row): {str(t): 1} for row, t in enumerate(validation["targets"])}
            result = evaluate_run(run, qrels, cutoffs=(10,))
            model.train()
            return {"val_ndcg@10": result["ndcg@10"], "val_hit@10": result["hit@10"]}

    return step, scorer, [p for p in scorer.parameters() if p.requires_grad], {"validate": validate}
