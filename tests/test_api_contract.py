"""The HTTP API against its own OpenAPI schema.

Fast: the request models and the schema agree on what is valid, judged by a JSON Schema
validator of another engine (jsonschema_rs, Rust, ECMA-262 patterns; schemathesis's own).

Slow: schemathesis (``--checks all``: no 5xx, every status, content type, header and body
documented, schema-valid requests accepted and schema-invalid ones refused) with a fixed seed,
against the served apps of tests/test_app.py: ``main`` (a search model, the colocated request
path) and ``rec`` (a recommendation model with users, the stages as deployments). Any finding
fails the test with schemathesis's report."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require
from test_app import serving  # noqa: F401 - the shared session fixture

from kuberank.serving import app, http_api

CONFIG = Path(__file__).with_name("schemathesis.toml")  # seed, examples, the by-design 503


def schemathesis_run(base: str, tmp_path: Path) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).with_name("schemathesis")
    require(cli.exists(), "schemathesis not installed (pip install -e '.[dev]')")
    command = [
        str(cli),
        "--no-color",
        "--config-file",
        str(CONFIG),
        "run",
        f"{base}/openapi.json",
        "--url",
        base,
        "--checks",
        "all",
        # a deeper run by hand, e.g. KUBERANK_SCHEMATHESIS_ARGS="--seed 7 --max-time 120"
        *shlex.split(os.environ.get("KUBERANK_SCHEMATHESIS_ARGS", "")),
    ]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}
    # cwd: where schemathesis writes anything it keeps
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


def validator(name: str):
    rs = pytest.importorskip("jsonschema_rs")  # installed with schemathesis (dev extras)
    components = app.api.openapi()["components"]  # the request models refer to Filter & co
    return rs.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": components}
    )


def test_blank_query_is_the_same_in_the_schema_and_the_server():
    import sys

    pattern = validator("SearchRequest")
    for code in range(sys.maxunicode + 1):
        c = chr(code)
        if 0xD800 <= code <= 0xDFFF:  # surrogates: not in a JSON text the server decodes
            continue
        blank = c.isspace()
        assert (http_api._NOT_BLANK.search(c) is None) == blank, hex(code)
        if blank or code < 0x100:
            assert pattern.is_valid({"query": c}) is not blank, hex(code)
    assert pattern.is_valid({"query": " \u3000x "}) and not pattern.is_valid({"query": "\x1e\n"})


BODIES = [
    ("SearchRequest", {"query": "pasta"}),
    ("SearchRequest", {"query": "pasta", "k": 3.0, "deadline_ms": 20.0}),  # JSON integers
    ("SearchRequest", {"query": "pasta", "k": 2.5}),
    ("SearchRequest", {"query": "pasta", "k": "3"}),
    ("SearchRequest", {"query": "pasta", "k": True}),
    ("SearchRequest", {"query": "pasta", "deadline_ms": 0}),
    ("SearchRequest", {"query": "pasta", "history": [], "user_id": None}),
    ("SearchRequest", {"query": "pasta", "colour": "red"}),
    ("RecommendRequest", {"history": ["d1"]}),
    ("RecommendRequest", {"user_id": "u0"}),
    ("RecommendRequest", {"user_id": "u0", "history": []}),
    ("RecommendRequest", {"history": ["d1"], "user_id": None}),
    ("RecommendRequest", {}),
    ("RecommendRequest", {"history": []}),
    ("RecommendRequest", {"history": [], "user_id": None, "k": 10}),
    ("RecommendRequest", {"user_id": ""}),
    ("SearchRequest", {"query": "pasta", "explain": True, "filter": {"exclude": ["d1"]}}),
    ("SearchRequest", {"query": "pasta", "explain": 1}),
    ("SearchRequest", {"query": "pasta", "filter": {"include": ["d1"], "exclude": ["d2"]}}),
    ("SearchRequest", {"query": "pasta", "filter": {"include": None, "exclude": []}}),
    ("SearchRequest", {"query": "pasta", "filter": {"include": []}}),
    ("SearchRequest", {"query": "pasta", "filter": {"colour": "red"}}),
    ("SearchRequest", {"query": "pasta", "filter": {"where": {"year": {"gte": 1990}}}}),
    ("SearchRequest", {"query": "pasta", "filter": {"where": {"year": {}}}}),
    ("SearchRequest", {"query": "pasta", "filter": {"where": {"g": {"in": ["a"], "lt": 1}}}}),
    ("RecommendRequest", {"history": ["d1"], "filter": {"where": {"genres": {"in": []}}}}),
]


@pytest.mark.parametrize(("model", "body"), BODIES)
def test_request_models_accept_exactly_what_the_schema_does(model, body):
    from pydantic import ValidationError

    try:
        getattr(app, model).model_validate(body, from_attributes=True)
        accepted = True
    except ValidationError:
        accepted = False
    assert accepted == validator(model).is_valid(body)


def test_schema_documents_statuses_headers_and_media_types():
    paths = app.api.openapi()["paths"]
    for route in ("/search", "/recommend"):
        responses = paths[route]["post"]["responses"]
        assert {"200", "400", "404", "413", "422", "503"} <= set(responses)
        assert responses["503"]["headers"]["Retry-After"]["required"] is True
    metrics = paths["/metrics"]["get"]["responses"]["200"]
    assert set(metrics["content"]) == {"text/plain"} and "Prometheus" in metrics["description"]


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["", "/rec"], ids=["search-colocated", "recommend-split"])
def test_schemathesis_finds_nothing(serving, prefix, tmp_path):  # noqa: F811
    done = schemathesis_run(serving["base"] + prefix, tmp_path)
    report = done.stdout + done.stderr
    print(report)
    assert done.returncode == 0, report
