"""The Ray Serve ranking app, for real: a local Ray cluster on 127.0.0.1, Serve with three
applications of ``build_app`` (in-process ONNX Runtime; a recommendation model with users and
tight Ingress limits; Triton over gRPC), and HTTP on loopback.

``main`` and ``tri`` run the default colocated request path (one @serve.batch of encode + retrieve
+ rank in the Ingress); ``rec`` runs the stages as separate deployments.

Proves: answers equal the in-process core (encoder, exact retrieval, F), history is excluded
from recommendations, bad input gets clear 4xx JSON, the OpenAPI schema and metric names match
the chart and the canary tooling, a new model version is picked up in place without a failed
request, and a mismatched index is refused at start-up. ``serving`` is shared with
tests/test_reliability.py and tests/test_bench.py."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require
from fixtures import DOCS, QRELS, QUERIES
from test_index import serving_store

from kuberank.serving.launcher import http_json

pytestmark = pytest.mark.slow

REC_USERS = ["u0", "u1"]
_SERVING: dict = {}


def write_recommendation_store(store: Path, out: Path) -> Path:
    """A copy of ``store`` whose model is a recommendation scorer F with behaviour and
    collaborative terms over the index's items and two users (weights from a fixed seed:
    an untrained but complete model, written with kuberank.model's own types)."""
    import torch
    from safetensors.torch import save_file

    from kuberank.model import MANIFEST, MODEL_FORMAT, SCORER_FILE, ModelInfo, Scorer, ScorerConfig

    shutil.copytree(store, out, symlinks=True)
    model = out / "model"
    cfg = ScorerConfig(
        n_items=len(DOCS), n_users=len(REC_USERS), use_behaviour=True, use_collaborative=True
    )
    torch.manual_seed(0)
    scorer = Scorer(cfg)
    with torch.no_grad():
        scorer.item_bias.weight.normal_(0, 0.5)
    save_file({k: v.contiguous() for k, v in scorer.state_dict().items()}, str(model / SCORER_FILE))
    info = ModelInfo(
        kind="recommendation",
        base_model="all-MiniLM-L6-v2",
        scorer=cfg,
        item_ids=list(DOCS),
        user_ids=REC_USERS,
    )
    (model / MANIFEST).write_text(json.dumps({"format": MODEL_FORMAT, **dataclasses.asdict(info)}))
    return out


def _wait_ready(url: str, timeout: float = 120.0) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = http_json("GET", url, timeout=2)
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready after {timeout}s")


def deploy(name: str, prefix: str, args: dict) -> str:
    from ray import serve

    from kuberank.serving.app import build_app

    serve.run(build_app(args), name=name, route_prefix=prefix, blocking=False)
    return _wait_ready(f"{_SERVING['base']}{prefix.rstrip('/')}/readyz") and prefix.rstrip("/")


_ARTIFACTS: dict = {}


def _still_serving() -> bool:
    import ray

    if not ray.is_initialized():
        return False
    try:
        return http_json("GET", _SERVING["base"] + "/readyz", timeout=5)[0] == 200
    except Exception:
        return False


def serving_session(request, tmp_path_factory) -> dict:
    """Ray + Serve on 127.0.0.1 with the apps ``main`` (/), ``rec`` (/rec) and ``tri`` (/tri);
    started once per session, stopped at its end."""
    if "base" in _SERVING:
        if _still_serving():
            return _SERVING
        # Another module (Ray Train, Ray Data tests) shut Ray down in between: start afresh.
        _SERVING.pop("stop")()
        _SERVING.clear()
    from kuberank.serving.triton import TritonServer, find_tritonserver, free_port

    try:
        find_tritonserver()
    except Exception:
        require(False, "tritonserver not found (install nvidia-pytriton)")
    if not _ARTIFACTS:  # built once per session, reused if Serve has to be restarted
        store, model_dir, dataset = serving_store(tmp_path_factory)
        rec_store = write_recommendation_store(store, tmp_path_factory.mktemp("rec") / "store")
        _ARTIFACTS.update(store=store, model_dir=model_dir, dataset=dataset, rec_store=rec_store)
    store, model_dir, dataset, rec_store = (
        _ARTIFACTS[k] for k in ("store", "model_dir", "dataset", "rec_store")
    )
    triton = TritonServer(store / "triton-local")
    triton.start()
    import ray
    from ray import serve

    from kuberank.raycluster import ensure_ray

    def stop():
        try:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            triton.stop()

    request.session.addfinalizer(stop)
    _SERVING["stop"] = stop
    triton.wait_ready()
    from kuberank.serving.launcher import cluster_env

    with cluster_env():  # the same Serve switches as `kuberank serve`
        ensure_ray(num_cpus=2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    one = {"num_replicas": 1}
    _SERVING.update(
        base=f"http://127.0.0.1:{port}",
        store=store,
        model_dir=model_dir,
        dataset=dataset,
        rec_store=rec_store,
        triton=triton,
    )
    # main: the default colocated app (the Ingress runs encode + retrieve + rank; the stage
    # deployments exist at 0 replicas); rec: the stages as separate deployments (scale-out)
    _SERVING["main_args"] = {
        "model_store": str(store),
        "triton_url": "",
        "deployments": {"Ingress": one},
    }
    deploy("main", "/", _SERVING["main_args"])
    deploy(
        "rec",
        "/rec",
        {
            "model_store": str(rec_store),
            "triton_url": "",
            "colocate": False,
            "deployments": {
                "Ingress": one,
                "QueryEncoder": one,
                "Ranker": one,
                "Retriever": {"num_replicas": 2},
            },
        },
    )
    _SERVING["tri_args"] = {
        "model_store": str(store),
        "triton_url": triton.grpc_url,
        "triton_fallback": "onnx",
        "triton_timeout_s": 1.0,
        "deployments": {"Ingress": one},
    }
    deploy("tri", "/tri", _SERVING["tri_args"])
    return _SERVING


@pytest.fixture(scope="session")
def serving(request, tmp_path_factory):
    return serving_session(request, tmp_path_factory)


def post(serving, path: str, body=None, raw: bytes | None = None):
    return http_json("POST", serving["base"] + path, body, raw=raw, timeout=30)


def post_admitted(serving, path: str, body):
    """A POST that waits out admission's 503 (two cores, a cold replica), as clients do."""
    for _ in range(10):
        status, answer = post(serving, path, body)
        if status != 503:
            return status, answer
        time.sleep(0.5)
    return status, answer


def in_process(store: Path):
    from kuberank.serving.encoders import InProcessEncoder
    from kuberank.serving.loading import load_checked_index, read_model_tables
    from kuberank.serving.stages import RankerCore
    from kuberank.store import ModelStore, read_manifest

    manifest, index = load_checked_index(str(store))
    tables, model_dir = read_model_tables(ModelStore(str(store)), "search")
    return (
        InProcessEncoder(str(store), read_manifest(store)),
        index,
        RankerCore(index, tables, model_dir),
    )


def test_search_answers_equal_the_in_process_core(serving):
    from kuberank.store import read_manifest

    encoder, index, _ = in_process(serving["store"])
    version = str(read_manifest(serving["store"])["version"])
    for qid, text in QUERIES.items():
        status, body = post(serving, "/search", {"query": text, "k": 3})
        assert status == 200, body
        assert body["model_version"] == version and body["kind"] == "search"
        scores = index.embeddings @ encoder.encode([text])[0]
        expected = [index.ids[i] for i in np.argsort(-scores, kind="stable")[:3]]
        assert [item["id"] for item in body["items"]] == expected
        got = [item["score"] for item in body["items"]]
        assert got == sorted(got, reverse=True)
        assert np.allclose(got, np.sort(scores)[::-1][:3], atol=1e-5)
        assert body["items"][0]["id"] == QRELS[qid]  # the fixture's relevant document is first


def test_recommend_applies_F_and_excludes_history(serving):
    from kuberank.serving.stages import RankRequest

    _, index, ranker = in_process(serving["rec_store"])
    history = ["d1", "d3"]
    status, body = post(serving, "/rec/recommend", {"user_id": "u0", "history": history, "k": 4})
    assert status == 200, body
    ids = [item["id"] for item in body["items"]]
    assert len(ids) == 4 and not set(ids) & set(history)
    candidates = np.array([i for i in range(len(index)) if index.ids[i] not in history])
    rows, scores = ranker.rank(RankRequest(None, candidates, history, "u0", 4))
    assert ids == [index.ids[r] for r in rows]
    assert np.allclose([item["score"] for item in body["items"]], scores, atol=1e-5)
    # the user term matters: another user gets F's other collaborative scores
    status, other = post(serving, "/rec/recommend", {"user_id": "u1", "history": history, "k": 4})
    assert status == 200 and [i["score"] for i in other["items"]] != [
        i["score"] for i in body["items"]
    ]


BAD_REQUESTS = [
    ("/search", None, b"{not json", 400, "malformed JSON"),
    ("/search", {"query": "", "k": 3}, None, 422, "query"),
    ("/search", {"query": "   ", "k": 3}, None, 422, "query"),
    ("/search", {"query": "x" * 513}, None, 422, "query"),
    ("/search", {"query": "pasta", "k": 0}, None, 422, "k"),
    ("/search", {"query": "pasta", "k": 101}, None, 422, "k"),
    ("/search", {"query": "pasta", "k": "3"}, None, 422, "k"),
    ("/search", {"query": "pasta", "k": True}, None, 422, "k"),
    ("/search", {"query": "pasta", "k": 2.5}, None, 422, "k"),
    ("/search", {"query": 7}, None, 422, "query"),
    ("/search", {"query": "pasta", "colour": "red"}, None, 422, "colour"),
    ("/search", [1, 2], None, 422, "body"),
    ("/search", {"query": "pasta", "history": ["d1"] * 201}, None, 422, "history"),
    # well formed, about items the model does not know: 404 like an unknown user_id
    ("/search", {"query": "pasta", "history": ["nope"]}, None, 404, "history"),
    ("/search", {"query": "pasta", "history": ["d1", "nope"]}, None, 404, "nope"),
    ("/search", None, b'{"query": "' + b"x" * 70_000 + b'"}', 413, "body"),
    # a recommendation needs history or a user_id (the schema's anyOf)
    ("/recommend", {"history": []}, None, 422, "history"),
    ("/recommend", {"history": [], "user_id": None}, None, 422, "history"),
    ("/recommend", {"k": 3}, None, 422, "history"),
    ("/recommend", {"history": [1, 2]}, None, 422, "history"),
    ("/recommend", {"history": ["nope"]}, None, 404, "history"),
    # the only signal is a user the model does not know (a model without users knows none)
    ("/recommend", {"user_id": "stranger"}, None, 404, "user_id"),
    ("/rec/recommend", {"user_id": "stranger"}, None, 404, "user_id"),
    ("/rec/recommend", {"user_id": "stranger", "history": ["d1"]}, None, 404, "user_id"),
    ("/rec/recommend", {"user_id": "u0", "history": ["nope"]}, None, 404, "history"),
]


@pytest.mark.parametrize(("path", "body", "raw", "status", "mentions"), BAD_REQUESTS)
def test_bad_requests_get_clear_4xx_json(serving, path, body, raw, status, mentions):
    got, payload = post(serving, path, body, raw=raw)
    assert got == status, payload
    assert isinstance(payload, dict) and payload["error"]["status"] == status
    text = json.dumps(payload["error"])
    assert mentions in text, text


FAST_PATH_CASES = [
    ("/search", {"query": "pasta", "k": 3}, None),
    ("/rec/recommend", {"user_id": "u0", "history": ["d1", "d2"], "k": 4}, None),
    ("/rec/recommend", {"user_id": "u1", "k": 4}, None),  # a known user alone is enough
    ("/search", {"query": "pasta", "user_id": "anyone", "k": 2}, None),  # no users: ignored
    ("/search", {"query": "pasta", "k": 2.0, "deadline_ms": 5000.0}, None),  # JSON integers
    ("/search", None, b"null"),
    ("/search", None, b"\xff\xfe"),
    ("/search", None, b"\xff"),  # not UTF-8
    ("/search", None, b"[" * 40_000),  # nested past the JSON parser's recursion limit
    *[(path, body, raw) for path, body, raw, _, _ in BAD_REQUESTS if raw is None],
]


@pytest.mark.parametrize(("path", "body", "raw"), FAST_PATH_CASES)
def test_json_fast_path_answers_like_fastapi(serving, path, body, raw):
    """A JSON POST takes JsonRoutes (no FastAPI routing); a ``+json`` media type still goes
    through FastAPI. Both must give the same status, error and items."""
    fast = http_json("POST", serving["base"] + path, body, raw=raw, timeout=30)
    via_fastapi = http_json(
        "POST",
        serving["base"] + path,
        body,
        raw=raw,
        timeout=30,
        headers={"Content-Type": "application/vnd.kuberank+json"},
    )
    assert fast[0] == via_fastapi[0] and fast[0] < 500, (fast, via_fastapi)
    assert fast[1] == via_fastapi[1]  # the whole body: items and version, or the whole error


def test_fastapi_refusals_use_the_error_shape(serving):
    status, body = http_json("GET", serving["base"] + "/no-such-route")
    assert status == 404 and body["error"]["status"] == 404
    status, body = http_json("GET", serving["base"] + "/search")
    assert status == 405 and body["error"]["status"] == 405


def test_openapi_schema_and_health(serving):
    from kuberank.serving.http_api import NOT_BLANK

    status, schema = http_json("GET", serving["base"] + "/openapi.json")
    assert status == 200
    assert {"/search", "/recommend", "/healthz", "/readyz"} <= set(schema["paths"])
    search = schema["components"]["schemas"]["SearchRequest"]
    assert search["properties"]["k"]["maximum"] == 100 and search["additionalProperties"] is False
    assert "ErrorResponse" in schema["components"]["schemas"]
    # what the server requires is in the schema, where generators and clients see it
    assert search["properties"]["query"]["pattern"] == NOT_BLANK
    recommend = schema["components"]["schemas"]["RecommendRequest"]
    assert {tuple(c["required"]) for c in recommend["anyOf"]} == {("history",), ("user_id",)}
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    # the rest of the schema's contract: tests/test_api_contract.py
    assert http_json("GET", serving["base"] + "/healthz")[0] == 200
    assert http_json("GET", serving["base"] + "/readyz")[1]["status"] == "ready"


def test_metric_names_match_the_chart_and_canary(serving):
    from kuberank.serving.metrics import parse_metrics

    for _ in range(3):
        assert post(serving, "/search", {"query": "pasta", "k": 2})[0] == 200
    post(serving, "/search", {"query": ""})
    status, text = http_json("GET", serving["base"] + "/metrics")
    assert status == 200
    samples = parse_metrics(text)
    assert any(
        k.startswith("kuberank_requests_total{") and 'route="/search"' in k and 'status="200"' in k
        for k in samples
    )
    assert any(k.startswith("kuberank_requests_total{") and 'status="422"' in k for k in samples)
    assert any(
        k.startswith("kuberank_request_latency_seconds_bucket{") and 'le="2.5"' in k
        for k in samples
    )
    for stage in ("encode", "retrieve", "rank"):
        assert any(
            k.startswith("kuberank_stage_latency_seconds_bucket{") and f'stage="{stage}"' in k
            for k in samples
        ), stage
        assert any(
            k.startswith("kuberank_batch_size_count{") and f'stage="{stage}"' in k for k in samples
        )
        assert any(
            k.startswith("kuberank_queue_seconds_count{") and f'stage="{stage}"' in k
            for k in samples
        )
    # every kuberank_* series the chart's rules/dashboard and the canary analysis query exists
    root = Path(__file__).resolve().parent.parent
    used = set()
    for path in [
        *root.joinpath("charts/kuberank").rglob("*.yaml"),
        *root.joinpath("charts/kuberank").rglob("*.json"),
        root / "kuberank" / "deploy" / "canary.py",
    ]:
        used |= set(
            re.findall(r"\bkuberank_[a-z_]+(?:_total|_seconds_bucket|_seconds)\b", path.read_text())
        )
    exposed = {k.split("{")[0] for k in samples}
    assert used and used <= exposed, used - exposed


def test_mismatched_index_is_refused_at_start_up(serving, tmp_path):
    from kuberank.item_index import META_FILE, IndexMismatchError
    from kuberank.serving.app import build_app

    bad = tmp_path / "store"
    shutil.copytree(serving["store"], bad, symlinks=True)
    meta_file = bad / "index" / META_FILE
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "model_fingerprint": "0" * 32}))
    with pytest.raises(IndexMismatchError, match="model_fingerprint"):
        build_app({"model_store": str(bad), "triton_url": ""})


def test_new_model_version_is_picked_up_without_dropping_requests(serving, tmp_path):
    from ray import serve

    from kuberank.components.export import export_model
    from kuberank.serving.app import build_app  # noqa: I001
    from kuberank.serving.bench_load import Level, run_load

    v2 = tmp_path / "store"
    shutil.copytree(serving["store"], v2, symlinks=True)
    old = str(json.loads((v2 / "manifest.json").read_text())["version"])
    manifest = export_model(serving["model_dir"], v2, max_length=32)  # same model, next version
    assert str(manifest["version"]) != old
    seen: list[str] = []

    def body(i):
        return {"query": QUERIES[f"q{i % 6 + 1}"], "k": 2}

    result: dict = {}
    load = threading.Thread(
        target=lambda: result.update(
            run_load(serving["base"] + "/search", body, Level("closed", 4, 400, 60))
        )
    )
    load.start()
    try:
        args = {**serving["main_args"], "model_store": str(v2)}
        serve.run(build_app(args), name="main", route_prefix="/", blocking=False)
        import time

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, answer = post(serving, "/search", {"query": "pasta", "k": 1})
            assert status == 200, answer
            seen.append(answer["model_version"])
            if answer["model_version"] == str(manifest["version"]):
                break
            time.sleep(0.2)
    finally:
        load.join(timeout=90)
    assert seen[-1] == str(manifest["version"]), seen
    assert result["requests"] > 0 and result["errors"] == {}, result
    serving["store"] = v2  # later tests compare with the store being served
