"""Serving policies (kuberank.serving.policies): the policy file and its checks, the blocklist,
blocked query terms and caps on the request path, ``kuberank policy set|check``, and the served
apps (colocated with Triton, split with the in-process encoder) counting every decision and
refusing a bad policy at load while the old version keeps serving (slow)."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter

import numpy as np
import pytest
from fixtures import QUERIES
from test_app import post_admitted as post
from test_app import serving  # noqa: F401
from test_filters import attributed_store  # noqa: F401

from kuberank.cli import main
from kuberank.serving import policies
from kuberank.serving.policies import BlockedQuery, PolicyError, PolicyRules
from kuberank.store import POLICY

# the attributed fixture index: d1..d6, topics alternate tech (d1, d3, d5) and life (d2, d4, d6)
TOPIC = {"d1": "tech", "d2": "life", "d3": "tech", "d4": "life", "d5": "tech", "d6": "life"}


class _Index:  # what a Policy reads from an ItemIndex: rows of ids, attributes
    ids = ["r0", "r1", "r2", "r3", "r4", "r5"]
    attributes = {
        "fields": {"topic": "string", "tags": "strings"},
        "values": {
            "topic": ["tech", "life", "tech", "tech", "tech", None],
            "tags": [["a", "b"], ["a"], ["b"], [], ["a"], ["c"]],
        },
    }

    def rows_of(self, ids):
        known = [self.ids.index(i) for i in ids if i in self.ids]
        return np.array(known, dtype=np.int64), [i for i in ids if i not in self.ids]


def _arranged(rules: dict) -> policies.Policy:
    parsed = PolicyRules.model_validate(rules)
    return policies.arrange(parsed, 1, policies.fingerprint(parsed), _Index(), "test")


def _stored(rules: dict, version: int = 1) -> str:
    parsed = PolicyRules.model_validate(rules)
    body = {"format": policies.POLICY_FORMAT, "version": version}
    return json.dumps({**body, "fingerprint": policies.fingerprint(parsed), **rules})


# --------------------------------------------------------------------------- the file


@pytest.mark.parametrize(
    "text, field",
    [
        ("{not json", "body"),
        ("[]", "body"),
        ('{"blocked_items": "d1"}', "blocked_items"),
        ('{"caps": {"topic": 0}}', "caps.topic"),
        ('{"caps": {"topic": 1.5}}', "caps.topic"),
        ('{"on_blocked_term": "warn"}', "on_blocked_term"),
        ('{"blocked_terms": ["  "]}', "blocked_terms.0"),
        ('{"blocklist": ["d1"]}', "blocklist"),
    ],
)
def test_a_policy_that_does_not_parse_names_the_field(text, field):
    with pytest.raises(PolicyError) as caught:
        policies.parse_rules(text, "p.json")
    assert caught.value.field == field and str(caught.value).startswith(f"p.json: {field}")


def test_a_stored_policy_is_versioned_and_fingerprinted():
    rules, version, fp = policies.parse_stored(_stored({"blocked_items": ["r1"]}, 3), "s")
    assert rules.blocked_items == ["r1"] and version == 3 and len(fp) == 16
    other = policies.fingerprint(PolicyRules(blocked_items=["r2"]))
    assert fp != other and fp == policies.fingerprint(PolicyRules(blocked_items=["r1"]))
    edited = json.loads(_stored({"blocked_items": ["r1"]}))
    edited["blocked_items"] = ["r2"]  # by hand: the fingerprint no longer matches
    for broken, field in [
        (edited, "fingerprint"),
        ({**json.loads(_stored({})), "format": "x"}, "format"),
        ({**json.loads(_stored({})), "version": 0}, "version"),
    ]:
        with pytest.raises(PolicyError) as caught:
            policies.parse_stored(json.dumps(broken), "s")
        assert caught.value.field == field


def test_a_cap_on_an_attribute_the_index_does_not_hold_is_refused():
    with pytest.raises(PolicyError) as caught:
        _arranged({"caps": {"rating": 0.5}})
    assert caught.value.field == "caps.rating" and "holds: tags, topic" in caught.value.problem


# --------------------------------------------------------------------------- the parts


def test_blocked_terms_reject_or_filter_whole_words_in_any_case():
    reject = _arranged({"blocked_terms": ["casino", "free  money"]})
    assert reject.screen("casinos near me") == ("casinos near me", None)  # a whole word only
    for query in ("Casino night", "get FREE\tmoney now", "free money"):
        with pytest.raises(BlockedQuery):
            reject.screen(query)
    cut = _arranged({"blocked_terms": ["casino", "free money"], "on_blocked_term": "filter"})
    assert cut.screen("best CASINO games, free money") == ("best games,", "filtered")
    assert cut.screen("casino free money !") == (None, "filtered")  # nothing left to search
    assert cut.screen("pasta") == ("pasta", None)


def test_caps_take_the_next_best_item_whose_groups_have_room():
    order = np.arange(6)  # candidates r0..r5, best first
    cands = np.arange(6)
    # topic tech: r0, r2, r3, r4; 0.3 of k=5 -> ceil(1.5) = 2 per topic
    top, displaced = _arranged({"caps": {"topic": 0.3}}).cap(cands, order, 5)
    assert top.tolist() == [0, 1, 2, 5] and displaced == 2  # r3, r4 out; r5 (no topic) in
    # ceil(0.3 * 10) is 3 (r0, r2, r3), not 4 (float rounding would take r4 too)
    assert _arranged({"caps": {"topic": 0.3}}).cap(cands, order, 10)[0].tolist() == [0, 1, 2, 3, 5]
    # a list attribute caps each value it holds: tags a (r0, r1, r4), b (r0, r2); 1 per value
    top, displaced = _arranged({"caps": {"tags": 0.5}}).cap(cands, order, 2)
    assert top.tolist() == [0, 3] and displaced == 1
    # the candidates' order decides, not the rows
    top, _ = _arranged({"caps": {"topic": 0.5}}).cap(cands, np.array([4, 3, 1, 0]), 2)
    assert top.tolist() == [4, 1]


# --------------------------------------------------------------------------- a real index


def _with_policy(store, tmp_path, rules: dict, name="store"):
    copy = tmp_path / name
    shutil.copytree(store, copy, symlinks=True)
    policy = tmp_path / f"{name}-policy.json"
    policy.write_text(json.dumps(rules))
    assert main(["policy", "set", "--model-store", str(copy), "--file", str(policy)]) == 0
    return copy


def _run(pipe, query, k, history=(), mmr_lambda=None, retrieval="dense"):
    from kuberank.serving.pipeline import PipelineRequest
    from kuberank.serving.settings import Settings

    request = PipelineRequest(query, list(history), None, k, query is None, retrieval=retrieval)
    request.reranking = None if mmr_lambda is None else ("mmr_lambda", mmr_lambda)
    [result], _ = pipe.run([request], None, Settings(candidates=2, rank_all_max=5000))
    return result[0], request.decisions


def test_blocklist_and_caps_on_the_request_path(attributed_store, tmp_path):  # noqa: F811
    from kuberank.serving.encoders import QueryEncoding
    from kuberank.serving.pipeline import load_pipeline
    from kuberank.serving.settings import Settings

    plain = load_pipeline(str(attributed_store), QueryEncoding("", Settings()))
    assert plain.index.policy is None
    ranked, decisions = _run(plain, QUERIES["q1"], 6)
    assert ranked[0] == "d1" and decisions == {
        ("blocked_items", "removed"): 0,
        ("caps", "displaced"): 0,
    }
    store = _with_policy(attributed_store, tmp_path, {"blocked_items": ["d1", "zz"]})
    pipe = load_pipeline(str(store), QueryEncoding("", Settings()))
    assert pipe.index.policy.info()["version"] == 1
    # candidates=2: retrieval widens past the blocked row, so k items still come back
    ids, decisions = _run(pipe, QUERIES["q1"], 5)
    assert ids == [i for i in ranked if i != "d1"] and decisions[("blocked_items", "removed")] == 1
    # a blocked item that would not have been among the candidates is not counted
    assert _run(pipe, QUERIES["q1"], 1)[0] == ranked[1:2]  # d1 was the best: counted
    far, decisions = _run(pipe, QUERIES["q5"], 1)
    assert far != ["d1"] and decisions[("blocked_items", "removed")] == (
        "d1" in _run(plain, QUERIES["q5"], 2)[0]
    )
    # a recommendation (every item ranked): the blocked item was a candidate
    rec, decisions = _run(pipe, None, 3, history=["d2"])
    assert "d1" not in rec and len(rec) == 3 and decisions[("blocked_items", "removed")] == 1
    # bm25 and hybrid retrieval (serving/hybrid.py) exclude and count it the same way
    for retrieval in ("bm25", "hybrid"):
        fused_plain, _ = _run(plain, QUERIES["q1"], 1, retrieval=retrieval)
        fused, decisions = _run(pipe, QUERIES["q1"], 1, retrieval=retrieval)
        assert fused != ["d1"] and decisions[("blocked_items", "removed")] == (
            fused_plain == ["d1"]
        ), (retrieval, fused_plain, fused)
        fused, decisions = _run(pipe, QUERIES["q1"], 5, retrieval=retrieval)
        assert "d1" not in fused and len(fused) == 5
        assert decisions[("blocked_items", "removed")] == 1, retrieval

    capped = load_pipeline(
        str(_with_policy(attributed_store, tmp_path, {"caps": {"topic": 0.5}}, "capped")),
        QueryEncoding("", Settings()),
    )
    displaced = 0
    for query, history in [(QUERIES["q1"], ()), (QUERIES["q3"], ()), (None, ["d1"])]:
        for mmr_lambda in (None, 0.5):
            ids, decisions = _run(capped, query, 4, history, mmr_lambda)
            displaced += decisions[("caps", "displaced")]
            uncapped, _ = _run(plain, query, 4, history, mmr_lambda)
            topics = Counter(TOPIC[i] for i in ids)
            assert len(ids) == 4 and max(topics.values()) <= 2, (ids, topics)
            assert decisions[("caps", "displaced")] == len(set(uncapped) - set(ids))
            kept = [i for i in uncapped if i in ids]
            assert ids[: len(kept)] == kept or mmr_lambda is not None  # F's order, capped
    assert displaced > 0  # the caps did move items


def test_a_policy_that_cannot_be_served_refuses_the_store(attributed_store, tmp_path):  # noqa: F811
    from kuberank.serving.app import build_app
    from kuberank.serving.loading import load_checked_index

    bad = tmp_path / "bad"
    shutil.copytree(attributed_store, bad, symlinks=True)
    (bad / POLICY).write_text('{"format": "kuberank-policy/1", "version": 1, ')
    with pytest.raises(PolicyError, match="policy.json: body: not valid JSON"):
        load_checked_index(str(bad))
    with pytest.raises(PolicyError, match="body"):
        build_app({"model_store": str(bad), "triton_url": ""})
    rules = PolicyRules.model_validate({"caps": {"rating": 0.5}})
    (bad / POLICY).write_text(
        json.dumps(
            {
                "format": "kuberank-policy/1",
                "version": 1,
                "fingerprint": policies.fingerprint(rules),
                **rules.model_dump(),
            }
        )
    )
    with pytest.raises(PolicyError, match="caps.rating: the index holds no attribute 'rating'"):
        load_checked_index(str(bad))


def test_policy_cli_writes_versions_and_checks(attributed_store, tmp_path, capsys):  # noqa: F811
    store = tmp_path / "store"
    shutil.copytree(attributed_store, store, symlinks=True)
    args = ["--model-store", str(store)]
    assert main(["policy", "check", *args]) == 2
    assert "the store has no policy" in capsys.readouterr().err
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    first.write_text(json.dumps({"blocked_items": ["d1"], "caps": {"topic": 0.5}}))
    second.write_text(json.dumps({"blocked_terms": ["casino"], "on_blocked_term": "filter"}))
    versions = []
    for file in (first, first, second, first):
        assert main(["policy", "set", *args, "--file", str(file), "--json"]) == 0
        versions.append(json.loads(capsys.readouterr().out)["version"])
    assert versions == [1, 1, 2, 3]  # the same rules keep their version
    assert main(["policy", "check", *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith("policy version 3, fingerprint ") and "caps topic 0.5" in out
    stored = json.loads((store / POLICY).read_text())
    assert stored["version"] == 3 and stored["blocked_items"] == ["d1"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"caps": {"genres": 0.2}}))
    for action in ("check", "set"):
        assert main(["policy", action, *args, "--file", str(bad)]) == 2
        assert "caps.genres: the index holds no attribute 'genres'" in capsys.readouterr().err
    assert json.loads((store / POLICY).read_text()) == stored  # nothing written


# --------------------------------------------------------------------------- served (slow)


def _decisions(base: str) -> dict:
    from kuberank.serving.launcher import http_json
    from kuberank.serving.metrics import metric_sum, parse_metrics

    status, text = http_json("GET", base + "/metrics")
    samples = parse_metrics(text)
    name = "kuberank_policy_decisions_total"
    return {d: metric_sum(samples, name, policy=d[0], action=d[1]) for d in policies.DECISIONS}


def _ready(base: str, version: int, timeout: float = 90.0) -> dict:
    from kuberank.serving.launcher import http_json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = http_json("GET", base + "/readyz", timeout=2)
            if status == 200 and (body.get("policy") or {}).get("version") == version:
                return body
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{base}/readyz: no policy version {version} after {timeout}s")


@pytest.mark.slow
def test_served_policies_count_reload_and_refuse(serving, attributed_store, tmp_path):  # noqa: F811
    from ray import serve

    from kuberank.serving.app import build_app
    from kuberank.serving.launcher import http_json

    store = _with_policy(
        attributed_store,
        tmp_path,
        {"blocked_items": ["d1"], "blocked_terms": ["casino"], "caps": {"topic": 0.5}},
    )
    one = {"num_replicas": 1}
    apps = {
        # colocated, queries encoded by the session's tritonserver (the same exported model)
        "/polt": {
            "model_store": str(store),
            "triton_url": serving["triton"].grpc_url,
            "triton_fallback": "error",
            "deployments": {"Ingress": one},
        },
        # the stages as separate deployments, queries encoded in process
        "/pols": {
            "model_store": str(store),
            "triton_url": "",
            "colocate": False,
            "deployments": {n: one for n in ("Ingress", "QueryEncoder", "Retriever", "Ranker")},
        },
    }
    try:
        for prefix, args in apps.items():
            serve.run(build_app(args), name=prefix[1:], route_prefix=prefix, blocking=False)
        for prefix in apps:
            base = serving["base"] + prefix
            ready = _ready(base, 1)
            assert (
                ready["policy"]["fingerprint"]
                == json.loads((store / POLICY).read_text())["fingerprint"]
            )
            before = _decisions(base)
            status, body = post(serving, prefix + "/search", {"query": QUERIES["q1"], "k": 4})
            assert status == 200, body
            ids = [item["id"] for item in body["items"]]
            assert len(ids) == 4 and "d1" not in ids, ids  # d1 is q1's best document
            assert max(Counter(TOPIC[i] for i in ids).values()) <= 2, ids
            status, body = post(serving, prefix + "/recommend", {"history": ["d2"], "k": 4})
            ids = [item["id"] for item in body["items"]]
            assert status == 200 and len(ids) == 4 and not {"d1", "d2"} & set(ids), body
            assert max(Counter(TOPIC[i] for i in ids).values()) <= 2, ids
            status, body = post(serving, prefix + "/search", {"query": "Casino pasta"})
            assert status == 422 and body["error"]["details"][0]["field"] == "query", body
            after = _decisions(base)
            assert after[("blocked_terms", "rejected")] - before[("blocked_terms", "rejected")] == 1
            # d1: a candidate of the search and of the recommendation (every item ranked)
            assert after[("blocked_items", "removed")] - before[("blocked_items", "removed")] == 2
            assert after[("caps", "displaced")] >= before[("caps", "displaced")]

        # a new policy version, reloaded in place with the model (the same store, revision 1)
        rules = tmp_path / "v2.json"
        rules.write_text(json.dumps({"blocked_terms": ["casino"], "on_blocked_term": "filter"}))
        assert main(["policy", "set", "--model-store", str(store), "--file", str(rules)]) == 0
        for prefix, args in apps.items():
            serve.run(
                build_app({**args, "revision": 1}),
                name=prefix[1:],
                route_prefix=prefix,
                blocking=False,
            )
        for prefix in apps:
            base = serving["base"] + prefix
            _ready(base, 2)
            before = _decisions(base)
            status, cut = post(serving, prefix + "/search", {"query": "casino pasta", "k": 2})
            status2, plain = post(serving, prefix + "/search", {"query": "pasta", "k": 2})
            assert status == status2 == 200 and cut["items"] == plain["items"], (cut, plain)
            status, body = post(serving, prefix + "/search", {"query": "CASINO!", "k": 2})
            assert status == 200 and body["items"] == [], body
            status, body = post(serving, prefix + "/search", {"query": QUERIES["q1"], "k": 1})
            assert status == 200 and body["items"][0]["id"] == "d1", body  # no longer blocked
            after = _decisions(base)
            assert after[("blocked_terms", "filtered")] - before[("blocked_terms", "filtered")] == 2

        # a policy that does not parse refuses the version; the old one keeps serving
        (store / POLICY).write_text('{"format": "kuberank-policy/1", ')
        for prefix, args in apps.items():
            with pytest.raises(PolicyError, match="not valid JSON"):
                build_app({**args, "revision": 2})
            status, ready = http_json("GET", serving["base"] + prefix + "/readyz")
            assert status == 200 and ready["policy"]["version"] == 2, ready
            status, body = post(serving, prefix + "/search", {"query": "casino pasta", "k": 2})
            assert status == 200 and body["items"], body
    finally:
        for prefix in apps:
            serve.delete(prefix[1:])
