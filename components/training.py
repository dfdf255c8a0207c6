"""What both fine-tuning tasks share: the :class:`TrainingTask` interface that
components/finetune.py drives (one implementation per dataset kind:
components/finetune_search.py, components/finetune_recommendation.py), the text towers
(:func:`build_towers`, :class:`TwoTower`) and the previous model's data for replay."""

from __future__ import annotations

import copy
from pathlib import Path

from kuberank import datasets
from kuberank.encoder import mean_pool


class TrainingTask:
    """One kind of fine-tuning (search or recommendation) behind the one training loop.

    - ``kind``: the dataset kind it trains on; ``defaults``: epochs, batch size and learning
      rate where the command line leaves them unset;
    - :meth:`prepare` (driver): the task's part of the workers' config, from the data: its
      training rows (``n_rows``), and ``validation`` where the best epoch is chosen on it;
    - :meth:`setup` (on every worker): ``(step, model, params, validate)``, where
      ``step(model, rows, device)`` is one batch's loss and ``validate(model)`` (or None) the
      validation metrics of an epoch;
    - :meth:`schedule`: the learning-rate multiplier per optimiser step;
    - :meth:`restore` (driver): the trained modules from the chosen checkpoint's state, with
      the number of trainable and total parameters.
    """

    kind: str
    defaults: dict

    def prepare(self, data: datasets.Dataset, config, init_model: str) -> dict:
        raise NotImplementedError

    def setup(self, config: dict):
        raise NotImplementedError

    def schedule(self, total_steps: int):
        return lambda step: 1.0

    def restore(self, state: dict, loop: dict, query_tower, item_tower):
        raise NotImplementedError


def build_towers(config: dict):
    import torch  # torch, transformers, peft, kuberank.model (torch): heavy; when training
    from transformers import AutoModel, AutoTokenizer

    from kuberank.model import item_tower_path

    source = config["init_model"]
    tokenizer = AutoTokenizer.from_pretrained(source)
    query_tower = AutoModel.from_pretrained(source, add_pooling_layer=False)
    item_tower = None
    if config["towers"] == "separate":
        separate = item_tower_path(source)
        item_tower = (
            AutoModel.from_pretrained(separate, add_pooling_layer=False)
            if separate != Path(source)
            else copy.deepcopy(query_tower)
        )
    if config["lora"]:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config["lora_rank"],
            lora_alpha=2 * config["lora_rank"],
            target_modules=["query", "key", "value", "dense"],
            lora_dropout=0.0,
        )
        query_tower = get_peft_model(query_tower, lora)
        if item_tower is not None:
            item_tower = get_peft_model(item_tower, lora)
    torch.manual_seed(config["seed"])
    return tokenizer, query_tower, item_tower


class TwoTower:
    """Builds the torch module holding both towers (a class so it pickles for Ray)."""

    @staticmethod
    def module(query_tower, item_tower):
        from torch import nn

        class _TwoTower(nn.Module):
            def __init__(self):
                super().__init__()
                self.query_tower = query_tower
                self.item_tower = item_tower

            def embed(self, tower, batch):
                hidden = tower(**batch).last_hidden_state
                return nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)

            def forward(self, queries, docs):
                item_tower = self.item_tower if self.item_tower is not None else self.query_tower
                return self.embed(self.query_tower, queries), self.embed(item_tower, docs)

        return _TwoTower()


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def replay_sample(previous_model: str, fraction: float, seed: int) -> datasets.Dataset | None:
    """The data a previous model was trained on, for replay during a warm start."""
    from kuberank.model import is_kuberank_model, read_info

    if fraction <= 0 or not is_kuberank_model(previous_model):
        return None  # a plain encoder has no training data to replay
    spec = read_info(previous_model).dataset.get("spec")
    if not spec:
        return None
    return datasets.load(spec)
