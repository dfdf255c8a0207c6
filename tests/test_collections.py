"""benchmarks/collections.py: the Debtags collection generated from apt's package lists."""

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
