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


def test_terms_are_the_weighted_parts_of_the_score():
    from kuberank.model import TERMS

    torch.manual_seed(1)
    cfg = ScorerConfig(
        n_items=20, n_users=2, text_dim=16, dim=8, use_behaviour=True, use_collaborative=True
    )
    scorer = Scorer(cfg).eval()
    with torch.no_grad():
        for table in (scorer.item_id, scorer.user_cf, scorer.item_cf, scorer.item_bias):
            table.weight.normal_(0, 0.5)
        scorer.user_cf.weight[-1].zero_()  # the unknown user's row, as a trained model keeps it
    text = torch.nn.functional.normalize(torch.randn(20, 16), dim=-1)
    items = torch.arange(20)
    history = torch.tensor([[-1, 2, 5], [4, 6, 8]])
    args = {
        "query": text[[10, 11]],
        "history": history,
        "history_text": text[history.clamp(min=0)],
        "users": torch.tensor([0, 2]),  # user 2: the unknown user's zero row
    }
    with torch.no_grad():
        parts = scorer.terms(text, items, **args)
        score = scorer(text, items, **args)
    assert set(TERMS) <= set(parts)
    assert torch.allclose(sum(parts[t] for t in TERMS), score, atol=1e-5)
    w = scorer.term_weights.detach()
    assert torch.allclose(parts["relevance"], w[0] * text[[10, 11]] @ text.T, atol=1e-5)
    # the attention over the real history items sums to 1, padding gets none
    assert torch.allclose(parts["attention"].sum(1), torch.ones(2, 20), atol=1e-6)
    assert torch.all(parts["attention"][0, 0] == 0)
    assert torch.allclose(parts["contribution"].sum(1), parts["behaviour"], atol=1e-5)
    # the unknown user's collaborative term is w_cf times the item bias alone
    bias = scorer.item_bias.weight[:20, 0].detach()
    assert torch.allclose(parts["collaborative"][1], w[2] * bias, atol=1e-6)
    # a model without a term, or an input without it, leaves the term out
    with torch.no_grad():
        only_query = scorer.terms(text, items, query=text[[10]])
    assert set(only_query) == {"relevance"}
