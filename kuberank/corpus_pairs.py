"""In-domain training pairs from a collection's own documents (no judgements needed).

Fine-tuning on a hundred judged queries teaches little about a collection's vocabulary; its
documents can teach more. Each document gives one (pseudo query, positive text) pair:

- ``title``: the title as the query and the body (the text without the title) as the positive,
  where the document has both (as in SPECTER's and E5's title-abstract pairs);
- ``crop``: otherwise two independent random spans of the body (Izacard et al. 2022,
  Contriever): a short one as the query and a longer one as the positive. Documents shorter
  than ``MIN_CROP_WORDS`` give nothing.

The pairs are mixed with the judged ones by :mod:`kuberank.components.finetune`.
"""

from __future__ import annotations

import random

MIN_BODY_WORDS = 8
MIN_CROP_WORDS = 24
QUERY_SPAN = (8, 32)  # words of a cropped query
POSITIVE_SPAN = (32, 128)  # words of a cropped positive


def _span(words: list[str], low: int, high: int, rng: random.Random) -> str:
    length = min(len(words), rng.randint(low, high))
    start = rng.randint(0, len(words) - length)
    return " ".join(words[start : start + length])


def corpus_pairs(
    titles: list[str], bodies: list[str], seed: int = 0, limit: int | None = None
) -> tuple[list[tuple[str, str, int]], dict[str, int]]:
    """``(query, positive, document row)`` per usable document (at most ``limit``, a seeded
    sample) and how many of each kind (``title``, ``crop``)."""
    rng = random.Random(seed)
    pairs, kinds = [], {"title": 0, "crop": 0}
    for row, (title, body) in enumerate(zip(titles, bodies, strict=True)):
        title, words = str(title or "").strip(), str(body or "").split()
        if title and len(words) >= MIN_BODY_WORDS:
            pairs.append((title, " ".join(words), row))
            kinds["title"] += 1
        elif len(words) >= MIN_CROP_WORDS:
            query = _span(words, *QUERY_SPAN, rng)
            positive = _span(words, *POSITIVE_SPAN, rng)
            pairs.append((query, positive, row))
            kinds["crop"] += 1
    if limit is not None and len(pairs) > limit:
        pairs = rng.sample(pairs, limit)
        kinds = {k: sum(1 for q, p, r in pairs if _kind(titles[r], q) == k) for k in kinds}
    return pairs, kinds


def _kind(title: str, query: str) -> str:
    return "title" if str(title or "").strip() == query else "crop"
