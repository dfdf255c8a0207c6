"""Data preparation step: load a dataset spec, split it, write Parquet artifacts + manifest.

Pure core: :func:`prepare`. The leave-last-out split of interaction logs
(:func:`kuberank.datasets.assign_leave_last_out`) runs in-process for small inputs or on Ray
Data (Parquet in, Parquet out, one group per user) so the same code scales on a Ray cluster.
Thin wrappers: the kfp component :func:`data_prep_op` and ``kuberank data prep``.

Output directory (written to a temporary sibling, then renamed: never half-written)::

    items.parquet            item_id, text
    queries.parquet          query_id, text                      (search)
    qrels.parquet            query_id, item_id, relevance, split (search)
    interactions.parquet     user_id, item_id, timestamp, rating, query, split (recommendation)
    the manifest             format, name, kind, source, rows, content_hash, engine,
                             split (recommendation: the rule, tie-break, tied users)
"""

import datetime as _dt
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
from kfp import dsl

from kuberank import datasets, storage
from kuberank.errors import KuberankError
from kuberank.kfp_component import step_component
from kuberank.raycluster import ensure_ray

RAY_THRESHOLD_ROWS = 2_000_000  # engine="auto" uses Ray Data above this many interactions
ENGINES = ("auto", "local", "ray")


def split_on_ray(interactions: pd.DataFrame, ray_address: str | None = None) -> pd.DataFrame:
    """The leave-last-out split on Ray Data: Parquet in, one group per user, Parquet out.
    The rows' order in ``interactions`` is the log order (ties keep it, via ``_log_order``)."""
    import ray  # ray: heavy; loaded only for a split on Ray Data

    ensure_ray(ray_address)
    with tempfile.TemporaryDirectory(prefix="kuberank-prep-") as tmp:
        source, sink = Path(tmp) / "in", Path(tmp) / "out"
        source.mkdir()
        interactions.drop(columns=["split"], errors="ignore").assign(
            **{datasets.TIE_COLUMN: datasets.tie_keys(len(interactions))}
        ).to_parquet(source / "part-0.parquet", index=False)
        (
            ray.data.read_parquet(str(source))
            .groupby("user_id")
            .map_groups(datasets.assign_leave_last_out, batch_format="pandas")
            .write_parquet(str(sink))
        )
        result = pd.read_parquet(sink)
    # Re-apply on the whole table: same function, restores the canonical row order.
    result = datasets.assign_leave_last_out(result.drop(columns="split"))
    return result.drop(columns=datasets.TIE_COLUMN)


def prepare(
    spec: str,
    out: str,
    engine: str = "auto",
    ray_address: str | None = None,
    tie_break: str = "log",
    seed: int = 0,
) -> dict:
    """Load ``spec``, split it and write the artifacts to ``out`` (a directory or s3:// URI).
    ``tie_break``/``seed``: how timestamp ties in an interaction log are ordered (the log's
    own order by default; see :func:`kuberank.datasets.assign_leave_last_out`). Returns the
    manifest; a log whose timestamps are all equal is split by that order and says so (in the
    manifest and on stderr)."""
    if engine not in ENGINES:
        raise KuberankError(f"--engine: {engine!r} is not one of {', '.join(ENGINES)}")
    if tie_break != "log" and not spec_splits_fresh(spec):
        raise KuberankError(
            f"--tie-break: {spec!r} is already prepared and keeps its split; "
            "prepare the original log with --tie-break instead"
        )
    data = datasets.load(spec, tie_break=tie_break, seed=seed)
    used = "local"
    if data.kind == datasets.RECOMMENDATION and (
        engine == "ray" or (engine == "auto" and len(data.interactions) > RAY_THRESHOLD_ROWS)
    ):
        # The loaded rows are already in the chosen order: Ray keeps it as the log order.
        data.interactions = split_on_ray(data.interactions, ray_address)
        used = "ray"
    split_rule = None
    if data.kind == datasets.RECOMMENDATION and spec_splits_fresh(spec):
        split_rule = datasets.split_summary(data.interactions, tie_break, seed)
        if split_rule.get("note"):
            print(f"kuberank data prep: {split_rule['note']}", file=sys.stderr)
    local_out = (
        Path(tempfile.mkdtemp(prefix="kuberank-out-")) / "prepared"
        if storage.is_s3(out)
        else Path(out)
    )
    with storage.atomic_dir(local_out) as tmp:
        paths = []
        for name, table in data.tables().items():
            path = tmp / f"{name}.parquet"
            table.to_parquet(path, index=False)
            paths.append(path)
        manifest = {
            "format": datasets.MANIFEST_FORMAT,
            "version": 1,
            "name": data.name,
            "kind": data.kind,
            "spec": spec,
            "source": data.source,
            "rows": {name: len(table) for name, table in data.tables().items()},
            "splits": _split_counts(data),
            "content_hash": storage.sha256_files(paths),
            "engine": used,
            **({"split": split_rule} if split_rule else {}),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        storage.write_json(tmp / datasets.PREPARED_MANIFEST, manifest)
    if storage.is_s3(out):
        try:
            storage.publish(local_out, out)
        finally:
            shutil.rmtree(local_out.parent, ignore_errors=True)
    return manifest


def spec_splits_fresh(spec: str) -> bool:
    """Whether loading ``spec`` splits a log (a prepared dataset keeps its own split)."""
    return not (
        str(spec).startswith("prepared:")
        or (Path(str(spec)) / datasets.PREPARED_MANIFEST).is_file()
    )


def _split_counts(data: datasets.Dataset) -> dict[str, int]:
    if data.kind == datasets.SEARCH:
        return data.qrels.groupby("split")["query_id"].nunique().astype(int).to_dict()
    return data.interactions["split"].value_counts().astype(int).to_dict()


@step_component()
def data_prep_op(
    dataset_spec: str,
    prepared: dsl.Output[dsl.Dataset],
    engine: str = "auto",
    tie_break: str = "log",
    seed: int = 0,
):
    """kfp wrapper around :func:`prepare`; the manifest's counts become artifact metadata."""
    from kuberank.components.data_prep import prepare

    manifest = prepare(dataset_spec, prepared.path, engine=engine, tie_break=tie_break, seed=seed)
    prepared.metadata.update(
        {
            "kind": manifest["kind"],
            "rows": manifest["rows"],
            "content_hash": manifest["content_hash"],
        }
    )
