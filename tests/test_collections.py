"""benchmarks/collections.py: the Debtags collection generated from apt's package lists, and the FAQ
collection from the Perl, Python and Debian FAQs."""

import json
import shutil

import pytest
from conftest import require

from benchmarks.collections import debtags
from kuberank import datasets


def _lists(tmp_path, tagged: int = 12):
    lists = tmp_path / "lists"
    lists.mkdir(parents=True)
    packages, translations = [], []
    for i in range(tagged):
        tags = "game::puzzle, role::program" + (", works-with-format::pdf" if i < 10 else "")
        packages.append(
            f"Package: pkg{i:02d}\nTag: {tags}\nDescription: puzzle {i}\nDescription-md5: m{i}\n"
        )
        translations.append(
            f"Package: pkg{i:02d}\nDescription-md5: m{i}\nDescription-en: puzzle {i}\n"
            f" A long text about puzzle {i}.\n .\n Second paragraph.\n"
        )
    packages.append("Package: untagged\nDescription: nothing\n")
    (lists / "h_debian_dists_x_main_binary-amd64_Packages").write_text("\n".join(packages))
    (lists / "h_debian_dists_x_main_i18n_Translation-en").write_text("\n".join(translations))
    return lists


def test_debtags_is_a_beir_collection_of_tagged_packages(tmp_path):
    require(shutil.which("/usr/lib/apt/apt-helper"), "apt's apt-helper reads the lists (Debian)")
    made = debtags(tmp_path / "out", lists=str(_lists(tmp_path)))
    # both tags have 10..400 packages: two queries; role:: is no topical facet
    assert made == {"docs": 12, "with_long_text": 12, "queries": 2, "qrels": 22}
    queries = [json.loads(x) for x in (tmp_path / "out" / "queries.jsonl").read_text().splitlines()]
    assert {q["text"] for q in queries} == {"game puzzle", "file format pdf"}
    doc = json.loads((tmp_path / "out" / "corpus.jsonl").read_text().splitlines()[0])
    assert (
        doc["title"] == "puzzle 0"
        and doc["text"] == "A long text about puzzle 0.\nSecond paragraph."
    )
    data = datasets.load(f"beir:{tmp_path / 'out'}")
    assert len(data.items) == 12 and len(data.qrels) == 22


def test_debtags_sample_keeps_every_relevant_package(tmp_path):
    require(shutil.which("/usr/lib/apt/apt-helper"), "apt's apt-helper reads the lists (Debian)")
    made = debtags(tmp_path / "out", lists=str(_lists(tmp_path, 14)), max_queries=1, max_docs=5)
    assert made["queries"] == 1 and made["docs"] == made["qrels"] >= 10
    again = debtags(tmp_path / "again", lists=str(_lists(tmp_path / "x", 14)), max_queries=1)
    assert again["queries"] == 1
    with pytest.raises(SystemExit, match="no Packages list"):
        debtags(tmp_path / "none", lists=str(tmp_path / "empty"))


# --------------------------------------------------------------------------- faq

PERLFAQ = """=head1 NAME

perlfaq4 - Data Manipulation

=head2 How do I round a number?

Use C<sprintf()> or L<POSIX/floor>; see L<the manual|perlfunc/sprintf>.

    printf("%.2f", 3.14159);

=over 4

=item * C<< $a <=> $b >> compares numbers, E<lt> is less.

=back

=head2 Rounding in general

Not a question, so no query.
"""

PYFAQ = """:tocdepth: 2

=======
General
=======

Why is Python slow?
-------------------

Use :func:`sum` and ``numpy``; see `the docs <https://example.org>`_::

   total = sum(xs)

.. _faq-label:

How do I exit?
--------------

Call :func:`sys.exit`.
"""

DEBFAQ = """Table of Contents

    1.1. What is this FAQ?

1. Definitions

1.1.\xa0What is this FAQ?

    A list of questions.

1.2.\xa0Debian claims to update a running program; how is
this accomplished?

    Daemons restart.

1.2.1.\xa0start-stop-daemon

    It stops daemons.

1.3.\xa0Authors

    People.
"""


def _faq_debs(root):
    import gzip

    pod = root / "usr/share/perl/5.36.0/pod"
    pod.mkdir(parents=True)
    (pod / "perlfaq4.pod").write_text(PERLFAQ)
    (pod / "perlfaq.pod").write_text("=head2 Not a part?\n\nThe index.\n")
    rst = root / "usr/share/doc/python3.11/html/_sources/faq"
    rst.mkdir(parents=True)
    (rst / "general.rst.txt").write_text(PYFAQ)
    (rst / "index.rst.txt").write_text("Index?\n------\n\nnothing\n")
    deb = root / "usr/share/doc/debian/FAQ"
    deb.mkdir(parents=True)
    with gzip.open(deb / "debian-faq.en.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write(DEBFAQ)
    return root


def test_faq_pairs_each_question_with_its_own_answer(tmp_path):
    from benchmarks.collections import faq

    made = faq(tmp_path / "out", _faq_debs(tmp_path / "debs"))
    assert made == {"docs": 5, "queries": 5, "by_source": {"perl": 1, "python": 2, "debian": 2}}
    out = tmp_path / "out"
    queries = {
        q["_id"]: q["text"]
        for q in map(json.loads, (out / "queries.jsonl").read_text().split("\n")[:-1])
    }
    docs = {
        d["_id"]: d for d in map(json.loads, (out / "corpus.jsonl").read_text().split("\n")[:-1])
    }
    assert sorted(queries.values()) == [
        "Debian claims to update a running program; how is this accomplished?",
        "How do I exit?",
        "How do I round a number?",
        "What is this FAQ?",
        "Why is Python slow?",
    ]
    perl = docs["a-perl4-001"]
    assert perl["title"] == ""  # the question is the heading: never in the document
    assert "Use sprintf() or POSIX/floor; see the manual." in perl["text"]
    assert 'printf("%.2f", 3.14159);' in perl["text"] and "$a <=> $b compares" in perl["text"]
    assert (
        "< is less" in perl["text"]
        and "=over" not in perl["text"]
        and "Not a question" not in perl["text"]
    )
    python = [d["text"] for i, d in docs.items() if i.startswith("a-python")]
    assert (
        python[0].startswith("Use sum and numpy; see the docs::") and "faq-label" not in python[0]
    )
    assert python[1] == "Call sys.exit."
    debian = {i: d["text"] for i, d in docs.items() if i.startswith("a-debian")}
    assert debian == {
        "a-debian-1.1": "A list of questions.",
        "a-debian-1.2": "Daemons restart.\n1.2.1. start-stop-daemon\n It stops daemons.",
    }
    qrels = (out / "qrels" / "test.tsv").read_text().split("\n")[1:-1]
    assert sorted(qrels) == sorted(f"q-{i[2:]}\t{i}\t1" for i in docs)
    data = datasets.load(f"beir:{out}")
    assert len(data.items) == 5


def test_faq_names_a_source_it_found_nothing_in(tmp_path):
    from benchmarks.collections import faq

    debs = _faq_debs(tmp_path / "debs")
    shutil.rmtree(debs / "usr/share/doc/debian")
    with pytest.raises(SystemExit, match="no questions found for debian"):
        faq(tmp_path / "out", debs)
