"""kuberank/store.py: the model store's layout names live there and nowhere else."""

import ast
from pathlib import Path

from kuberank import store

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kuberank", "components", "serving", "pipelines")

# (file, enclosing function or "<module>", literal): the same words used for something that is
# not a path in the store. Each entry says what it is; anything else is a layout name spelled
# outside kuberank/store.py and fails test_no_layout_name_is_spelled_outside_the_store_module.
NOT_LAYOUT = {
    # CLI subcommand names (`kuberank edge`, `kuberank index`)
    ("kuberank/cli/__init__.py", "build_parser", "edge"),
    ("kuberank/cli/__init__.py", "build_parser", "index"),
    # a table's first column: the model's name in a quality report
    ("kuberank/report.py", "format_table", "model"),
    # progress labels
    ("components/edge.py", "EdgeRanker.embed", "edge"),
    ("components/export.py", "export_model", "onnx"),
    # scratch directories outside any store (compress's candidate, a training run's output)
    ("components/compress.py", "compress", "model"),
    ("components/finetune.py", "_write_model", "model"),
    ("pipelines/rayjob.py", "finetune_rayjob_op", "/model"),
    # score terms and metric stage labels
    ("serving/explain.py", "<module>", "lexical"),
    # kfp task and output artifact names of the pipeline graph
    ("pipelines/pipeline.py", "<module>", "index"),
    ("pipelines/local.py", "_headline", "model"),
    ("pipelines/local.py", "_headline", "index"),
    ("pipelines/local.py", "run_local", "model"),
    # serving's triton_fallback setting: "onnx" = encode in process (ONNX Runtime)
    ("serving/settings.py", "Settings", "onnx"),
    ("serving/settings.py", "Settings.__post_init__", "onnx"),
    ("serving/encoders.py", "QueryEncoding.needs_local", "onnx"),
    ("serving/encoders.py", "QueryEncoding.after_failure", "onnx"),
    # the lexical stage's metric label
    ("serving/stages.py", "Retrieve.extras", "lexical"),
}
NOT_YET: set[str] = set()


def layout_literals(source: str, names=store.LAYOUT_NAMES):
    """(enclosing function, literal) for each string constant that is a layout name or begins a
    path with one (``"onnx/model.onnx"``, ``"/edge"``). Dict keys, subscripts and ``.get()``
    keys are left out: they are manifest and JSON fields, not paths."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def enclosing(node) -> str:
        scopes = []
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                scopes.append(node.name)
        return ".".join(reversed(scopes)) or "<module>"

    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        value = node.value
        if not any(value in (n, f"/{n}") or value.startswith(f"{n}/") for n in names):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Dict) and node in parent.keys:
            continue
        if isinstance(parent, ast.Subscript) and parent.slice is node:
            continue
        if (
            isinstance(parent, ast.Call)
            and isinstance(parent.func, ast.Attribute)
            and parent.func.attr in ("get", "setdefault", "pop")
            and parent.args
            and parent.args[0] is node
        ):
            continue
        found.append((enclosing(node), value))
    return found


def test_the_scan_finds_a_layout_name_in_a_path_and_not_in_a_manifest_key():
    source = (
        "def f(root, manifest):\n"
        "    a = root / 'onnx' / 'model.onnx'\n"
        '    b = f"{root}/triton-local"\n'
        "    c = 'onnx/model.onnx (fp32)'\n"
        "    return manifest['onnx'], manifest.get('edge'), {'model': 1}\n"
    )
    assert sorted(layout_literals(source)) == [
        ("f", "/triton-local"),
        ("f", "onnx"),
        ("f", "onnx/model.onnx (fp32)"),
    ]


def test_no_layout_name_is_spelled_outside_the_store_module():
    spelled, allowed_seen = [], set()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "kuberank/store.py" or rel in NOT_YET:
                continue
            for scope, value in layout_literals(path.read_text()):
                key = (rel, scope, value)
                if key in NOT_LAYOUT:
                    allowed_seen.add(key)
                else:
                    spelled.append(key)
    assert spelled == [], "use the kuberank.store constants instead"
    assert allowed_seen == NOT_LAYOUT, "stale NOT_LAYOUT entries"


# the constants that name a layout entry (EDGE_DIR, MANIFEST, ...)
LAYOUT_CONSTANTS = {
    name
    for name, value in vars(store).items()
    if name.isupper() and isinstance(value, str) and value in store.LAYOUT_NAMES
}


def uri_joins(source: str) -> list[str]:
    """The layout constants an f-string puts after a ``/`` (``f"{store}/{EDGE_DIR}"``): a
    part's URI built by hand instead of with store_path (which knows local paths and s3://)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.JoinedStr):
            continue
        for before, part in zip(node.values, node.values[1:], strict=False):
            if (
                isinstance(before, ast.Constant)
                and str(before.value).endswith("/")
                and isinstance(part, ast.FormattedValue)
                and isinstance(part.value, ast.Name)
                and part.value.id in LAYOUT_CONSTANTS
            ):
                found.append(part.value.id)
    return found


def test_no_module_builds_a_store_part_uri_by_hand():
    assert uri_joins(
        'a = f"{store.rstrip(\'/\')}/{LEXICAL_DIR}"\nb = f"{ONNX_DIR}/x"\nc = root / EDGE_DIR\n'
    ) == ["LEXICAL_DIR"]
    found = {
        path.relative_to(ROOT).as_posix(): joins
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.relative_to(ROOT).as_posix() != "kuberank/store.py"
        and (joins := uri_joins(path.read_text()))
    }
    assert found == {}, "use kuberank.store.store_path (or ModelStore.uri_of / local)"


def test_only_the_store_module_spells_the_manifest_file_name():
    # issue 14's acceptance: docstrings and help texts included
    root = Path(__file__).resolve().parents[1]
    spelled = [
        str(path.relative_to(root))
        for folder in ("kuberank", "components", "serving", "pipelines")
        for path in (root / folder).rglob("*.py")
        if store.MANIFEST in path.read_text()
    ]
    assert spelled == ["kuberank/store.py"]


def test_layout_names_are_distinct_and_the_triton_parts_are_exported():
    assert len(set(store.LAYOUT_NAMES)) == len(store.LAYOUT_NAMES)
    assert all("." not in part for part in store.EXPORT_PARTS)
    assert set(store.TRITON_PARTS) <= set(store.EXPORT_PARTS)


def test_a_store_opened_once_gives_its_manifest_parts_and_checked_index(tmp_path_factory):
    import json
    import shutil

    import pytest
    from test_index import serving_store

    from kuberank.errors import KuberankError
    from kuberank.item_index import IndexMismatchError

    root, _, _ = serving_store(tmp_path_factory)
    opened = store.ModelStore(root)
    manifest = json.loads((root / store.MANIFEST).read_text())
    assert opened.manifest == manifest and opened.version == str(manifest.get("version", "0"))
    index = opened.checked_index()
    assert index.meta["embedding_fingerprint"] == opened.embedding_fingerprint
    assert index.meta["model_fingerprint"] == opened.model_fingerprint
    assert opened.local(store.INDEX_DIR) == root / store.INDEX_DIR
    assert store.ModelStore("s3://b/p/").uri_of(store.INDEX_DIR, "x") == "s3://b/p/index/x"

    copy = tmp_path_factory.mktemp("other") / "store"
    shutil.copytree(root, copy, symlinks=True)
    other = store.ModelStore(copy)
    assert other.manifest == manifest  # read once: later writes do not change an opened store
    (copy / store.MANIFEST).write_text(
        json.dumps({**manifest, "embedding": {"fingerprint": "another"}})
    )
    assert other.embedding_fingerprint == manifest["embedding"]["fingerprint"]
    with pytest.raises(IndexMismatchError, match="embedded by another encoder"):
        store.ModelStore(copy).checked_index()
    with pytest.raises(IndexMismatchError, match="embedded by another encoder"):
        store.ModelStore(copy).index_summary()  # the same refusal, from index.json alone
    assert opened.index_summary().meta == index.meta
    with pytest.raises(KuberankError):
        _ = store.ModelStore(tmp_path_factory.mktemp("empty")).manifest
