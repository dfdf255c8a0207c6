"""Helm chart helpers: the README parameter table from `## @param` comments, and offline rendering.

The chart documents every value in values.yaml with Bitnami-style comments::

    ## @section Triton Inference Server
    ## @param triton.replicaCount Number of Triton replicas

``python -m kuberank.deploy.chart readme charts/kuberank`` rewrites the table between the
``<!-- params:start -->`` and ``<!-- params:end -->`` markers of the chart's README.md;
``--check`` exits non-zero when the README is stale or a value has no ``@param`` (CI and
tests/test_chart.py run the check, so the table cannot drift from values.yaml).

Rendering goes through the real Helm library (PyPI ``helm-python-sdk``); nothing contacts a
cluster.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

START = "<!-- params:start -->"
END = "<!-- params:end -->"
_DIRECTIVE = re.compile(r"^\s*##\s*@(param|section|skip)\s+(.*?)\s*$")


class ChartDocError(ValueError):
    """values.yaml and its `## @param` comments disagree."""


@dataclass(frozen=True)
class Param:
    key: str
    description: str
    section: str


def parse_params(values_text: str) -> list[Param]:
    """The `## @param` entries of a values.yaml, in file order, with their section."""
    params: list[Param] = []
    section = ""
    for lineno, line in enumerate(values_text.splitlines(), 1):
        m = _DIRECTIVE.match(line)
        if not m:
            continue
        kind, rest = m.groups()
        if kind == "section":
            section = rest
        elif kind == "param":
            key, _, desc = rest.partition(" ")
            if not desc.strip():
                raise ChartDocError(f"values.yaml:{lineno}: @param {key} has no description")
            params.append(Param(key, desc.strip(), section))
        else:  # skip
            params.append(Param(rest.split()[0], "", section))
    return params


def lookup(values: dict[str, Any], key: str) -> Any:
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _leaves(values: Any, prefix: str = "") -> list[str]:
    if isinstance(values, dict) and values:
        out: list[str] = []
        for k, v in values.items():
            out.extend(_leaves(v, f"{prefix}.{k}" if prefix else k))
        return out
    return [prefix]


def check_coverage(values: dict[str, Any], params: list[Param]) -> list[str]:
    """Problems: @params naming no value, duplicates, and values no @param covers."""
    problems: list[str] = []
    seen: set[str] = set()
    for p in params:
        if p.key in seen:
            problems.append(f"@param {p.key} is documented twice")
        seen.add(p.key)
        try:
            lookup(values, p.key)
        except KeyError:
            problems.append(f"@param {p.key} names no value in values.yaml")
    for leaf in _leaves(values):
        parts = leaf.split(".")
        if not any(".".join(parts[:i]) in seen for i in range(1, len(parts) + 1)):
            problems.append(f"value {leaf} has no ## @param (document it or a parent key)")
    return problems


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        text = json.dumps(value) if value == "" else value
    else:
        text = json.dumps(value, separators=(",", ":"), sort_keys=False)
    return "`" + text.replace("|", "\\|") + "`"


def params_table(values_text: str) -> str:
    """Markdown tables (one per section) for the documented parameters."""
    values = yaml.safe_load(values_text) or {}
    params = parse_params(values_text)
    problems = check_coverage(values, params)
    if problems:
        raise ChartDocError("values.yaml documentation:\n  " + "\n  ".join(problems))
    lines: list[str] = []
    section = None
    for p in params:
        if not p.description:  # @skip
            continue
        if p.section != section:
            section = p.section
            if lines:
                lines.append("")
            lines += [f"### {section}", "", "| Name | Description | Value |", "| --- | --- | --- |"]
        desc = p.description.replace("|", "\\|")
        lines.append(f"| `{p.key}` | {desc} | {_format_value(lookup(values, p.key))} |")
    return "\n".join(lines) + "\n"


def readme_with_table(readme: str, table: str) -> str:
    if START not in readme or END not in readme:
        raise ChartDocError(f"README.md lacks the {START} / {END} markers")
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table}{END}{tail}"


def update_readme(chart_dir: str | Path, check: bool = False) -> bool:
    """Regenerate the README table; with ``check`` only report. True when up to date."""
    chart = Path(chart_dir)
    table = params_table((chart / "values.yaml").read_text())
    readme_path = chart / "README.md"
    current = readme_path.read_text()
    wanted = readme_with_table(current, table)
    if wanted == current:
        return True
    if not check:
        readme_path.write_text(wanted)
    return False


# ---------------------------------------------------------------------------------------------
# Rendering (offline, real Helm library)


def load_values_files(*paths: str | Path) -> dict[str, Any]:
    """Merge values files the way `helm -f a -f b` does (later files win, maps merge deeply)."""
    merged: dict[str, Any] = {}
    for p in paths:
        deep_merge(merged, yaml.safe_load(Path(p).read_text()) or {})
    return merged


def deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Merge ``src`` into ``dst`` in place (maps deeply, everything else replaced)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = v


def render(
    chart_dir: str | Path,
    values: dict[str, Any] | None = None,
    *,
    name: str = "kuberank",
    namespace: str = "kuberank",
) -> list[dict[str, Any]]:
    """Render the chart offline and return its Kubernetes objects (NOTES.txt excluded)."""
    import helm_python  # local: heavy, only rendering the chart needs it

    chart = helm_python.Chart.load(str(chart_dir))
    rendered = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    objects: list[dict[str, Any]] = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def render_notes(chart_dir: str | Path, values: dict[str, Any] | None = None, **kw: Any) -> str:
    import helm_python

    chart = helm_python.Chart.load(str(chart_dir))
    rendered = chart.render(
        values or {},
        name=kw.get("name", "kuberank"),
        namespace=kw.get("namespace", "kuberank"),
        is_install=True,
    )
    return next((t for k, t in rendered.items() if k.endswith("NOTES.txt")), "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kuberank.deploy.chart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    readme = sub.add_parser(
        "readme", help="regenerate (or --check) the chart README's parameter table"
    )
    readme.add_argument("chart", help="chart directory, e.g. charts/kuberank")
    readme.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    args = parser.parse_args(argv)
    try:
        fresh = update_readme(args.chart, check=args.check)
    except ChartDocError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check and not fresh:
        print(
            f"{args.chart}/README.md is stale: run python -m kuberank.deploy.chart readme {args.chart}",
            file=sys.stderr,
        )
        return 1
    print(f"{args.chart}/README.md is up to date" if fresh else f"updated {args.chart}/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
