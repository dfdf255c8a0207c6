"""The pipeline's last steps: ``publish`` checks the model store and writes STORE/release.json,
the record deploys read (:func:`publish_op`, :func:`release_record`); ``canary`` turns the
release into the chart's canary values and optionally sets the first weight
(:func:`canary_op`, :func:`canary_values`)."""

import json
import time

from kfp import dsl

from kuberank.errors import KuberankError
from kuberank.kfp_component import step_component


def release_record(manifest: dict, index_meta: dict, store: str, quality: dict) -> dict:
    """What ``publish`` writes to STORE/release.json: the served version and its evidence."""
    return {
        "format": "kuberank-release/1",
        "store": store,
        "version": manifest.get("version"),
        "model_fingerprint": (manifest.get("model") or {}).get("fingerprint"),
        "embedding_fingerprint": (manifest.get("embedding") or {}).get("fingerprint"),
        "triton": {
            k: (manifest.get("triton") or {}).get(k)
            for k in ("repository", "local_repository", "encoder_backend", "precision")
        },
        "index": {k: index_meta.get(k) for k in ("count", "dim", "kind", "ann", "edge_items")},
        "compression": (manifest.get("model") or {}).get("compression"),
        "parity": manifest.get("parity"),
        "sizes": manifest.get("sizes"),
        "quality": quality,
        "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def release_report(release: dict) -> str:
    """The publish step's Markdown: what was published, sizes, parity, compression."""
    lines = [
        f"# Release {release['version']} -> {release['store']}",
        "",
        f"- model fingerprint `{release['model_fingerprint']}`",
        f"- embedding fingerprint `{release['embedding_fingerprint']}`",
        f"- Triton: {release['triton']}",
        f"- index: {release['index']}",
        "",
        "## Sizes (bytes)",
        "",
        "| part | bytes |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in (release.get("sizes") or {}).items()]
    lines += ["", "## Parity", "", "```json", json.dumps(release.get("parity"), indent=2), "```"]
    if release.get("compression"):
        comp = release["compression"]
        lines += [
            "",
            "## Compression",
            "",
            "| teacher nDCG@10 | compressed nDCG@10 | layers | int8 bytes |",
            "|---|---|---|---|",
            f"| {comp.get('teacher_ndcg10')} | {comp.get('compressed_ndcg10')} | "
            f"{comp.get('layers')} | {comp.get('int8_bytes')} |",
        ]
    return "\n".join(lines) + "\n"


def canary_values(store: str, version, weight: int) -> dict:
    """Helm values that add the new model as the chart's canary track (``helm upgrade -f``)."""
    if not 1 <= weight <= 100:
        raise KuberankError(f"canary_weight: must be between 1 and 100, got {weight}")
    del version  # recorded in the values artifact's metadata; the chart reads the store's manifest
    return {"canary": {"enabled": True, "weight": weight, "modelStoreUri": store}}


@step_component()
def publish_op(
    store: str,
    index_fingerprint: str,
    scores: dsl.Input[dsl.Metrics],
    release: dsl.Output[dsl.Artifact],
    report: dsl.Output[dsl.Markdown],
):
    """Check the store is complete and consistent (manifest, Triton repositories, an index
    embedded by this encoder, the one the index step reported, an edge bundle holding its
    items), then write STORE/release.json:
    the record deploys read. (The join of the two branches is this string, not the index
    artifact: kfp's local runner resolves ``dsl.OneOf`` for parameters only.)"""
    import json
    import tempfile
    from pathlib import Path

    from kuberank.components.edge import BUNDLE_FILE
    from kuberank.pipelines.release import release_record, release_report
    from kuberank.storage import publish
    from kuberank.store import EDGE_DIR, INDEX_DIR, RELEASE_FILE, TRITON_PARTS, ModelStore

    opened = ModelStore(store)
    manifest = opened.manifest
    meta = opened.checked_index().meta
    if meta["embedding_fingerprint"] != index_fingerprint:
        raise ValueError(
            f"{opened.uri_of(INDEX_DIR)}: embedding {meta['embedding_fingerprint']}, the index "
            f"step built {index_fingerprint}: another run wrote the store meanwhile"
        )
    for part in TRITON_PARTS:
        if not (opened.local(part) / "query_encoder" / "config.pbtxt").is_file():
            raise FileNotFoundError(
                f"{opened.uri_of(part)}: no query_encoder ensemble; export did not finish"
            )
    edge = json.loads((opened.local(EDGE_DIR) / BUNDLE_FILE).read_text())
    if edge.get("items") != meta["count"] or edge.get("fingerprint") != index_fingerprint:
        raise ValueError(
            f"{opened.uri_of(EDGE_DIR)}: {edge.get('items')} items of embedding "
            f"{edge.get('fingerprint')}, the index holds {meta['count']} of {index_fingerprint}; "
            "the index step did not finish"
        )
    quality = {k: v for k, v in scores.metadata.items() if isinstance(v, (int, float))}
    record = release_record(manifest, meta, store, quality)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / RELEASE_FILE
        path.write_text(json.dumps(record, indent=2) + "\n")
        publish(path, opened.uri_of(RELEASE_FILE))
    Path(release.path).write_text(json.dumps(record, indent=2) + "\n")
    release.metadata.update(
        {
            "store": store,
            "version": record["version"],
            "embedding_fingerprint": record["embedding_fingerprint"],
        }
    )
    Path(report.path).write_text(release_report(record))


@step_component()
def canary_op(
    release: dsl.Input[dsl.Artifact],
    values: dsl.Output[dsl.Artifact],
    weight: int = 10,
    namespace: str = "",
    kubectl_args: str = "",
):
    """Helm values adding the release as the chart's canary track (apply them with ``helm
    upgrade -f`` or a GitOps repository). With ``namespace`` set, also set the HTTPRoute's first
    canary weight there (``kubectl kuberank canary start --no-wait``; the analysis loop continues
    from ``kubectl kuberank canary analyze --apply``)."""
    import json
    import shlex
    from pathlib import Path

    import yaml

    from kuberank.deploy import canary
    from kuberank.pipelines.release import canary_values

    record = json.loads(Path(release.path).read_text())
    Path(values.path).write_text(
        yaml.safe_dump(canary_values(record["store"], record["version"], weight))
    )
    values.metadata.update(
        {"store": record["store"], "version": record["version"], "weight": weight}
    )
    if namespace:
        code = canary.main(
            [
                *shlex.split(kubectl_args),
                "-n",
                namespace,
                "canary",
                "start",
                "--weight",
                str(weight),
                "--no-wait",
            ]
        )
        if code != 0:
            raise RuntimeError(f"kubectl kuberank canary start exited with {code}")
