"""In-domain pairs from documents: title -> body where there is a title, random crops else."""

from kuberank.corpus_pairs import MIN_CROP_WORDS, corpus_pairs


def test_titles_pair_with_their_bodies_and_untitled_documents_are_cropped():
    long_body = " ".join(f"w{i}" for i in range(200))
    titles = ["A title", "", "", "Short"]
    bodies = ["one two three four five six seven eight nine", long_body, "too short", "x"]
    pairs, kinds = corpus_pairs(titles, bodies, seed=1)
    assert kinds == {"title": 1, "crop": 1}
    (q0, p0, r0), (q1, p1, r1) = pairs
    assert (q0, r0) == ("A title", 0) and p0.startswith("one two")
    assert r1 == 1 and 8 <= len(q1.split()) <= 32 and 32 <= len(p1.split()) <= 128
    assert q1 in long_body and p1 in long_body
    assert corpus_pairs(titles, bodies, seed=1) == (pairs, kinds)  # seeded
    assert len(" ".join(["w"] * (MIN_CROP_WORDS - 1)).split()) < MIN_CROP_WORDS


def test_limit_samples_and_recounts():
    titles = [f"t{i}" for i in range(10)]
    bodies = ["a b c d e f g h i"] * 10
    pairs, kinds = corpus_pairs(titles, bodies, seed=0, limit=3)
    assert len(pairs) == 3 and kinds == {"title": 3, "crop": 0}
