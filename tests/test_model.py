"""F's scorer (kuberank.model.Scorer): the serving shortcut of item behaviour vectors kept per
model gives the scores of computing them per request."""

import torch

from kuberank.model import Scorer, ScorerConfig


def test_kept_item_behaviour_vectors_give_the_same_scores():
    torch.manual_seed(0)
    cfg = ScorerConfig(
        n_items=50, n_users=3, text_dim=16, dim=8, use_behaviour=True, use_collaborative=True
    )
    scorer = Scorer(cfg).eval()
    with torch.no_grad():
        for table in (scorer.item_id, scorer.user_cf, scorer.item_cf, scorer.item_bias):
            table.weight.normal_(0, 0.5)
    text = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
    items = torch.arange(50)
    candidates = torch.tensor([3, 7, 11, 40, 49])
    history = torch.tensor([[-1, 2, 5, 9]])
    args = {
        "query": text[[20]],
        "history": history,
        "history_text": text[history.clamp(min=0)],
        "users": torch.tensor([1]),
    }
    with torch.no_grad():
        kept = scorer.behaviour_vectors(text, items)
        direct = scorer(text[candidates], candidates, **args)
        shortcut = scorer(text[candidates], candidates, item_behaviour=kept[candidates], **args)
        no_behaviour = scorer(text[candidates], candidates, **{**args, "history": None})
    assert torch.allclose(direct, shortcut, atol=1e-6)
    assert not torch.allclose(direct, no_behaviour)  # the behaviour term is in play
