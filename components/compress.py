"""Compression step: distil -> prune -> int8, behind a quality gate.

Pure core: :func:`compress` (teacher model directory + dataset -> compressed model directory).

1. Distillation: the student keeps ``layers`` of the teacher's transformer layers, initialised
   from them, chosen by backward elimination (drop the layer whose loss keeps the untrained
   student's embeddings closest to the teacher's on the dataset's texts, repeat:
   :func:`choose_layers`). It then learns from the teacher on the dataset's own texts (items
   and queries): a cosine loss on the embeddings plus a KL loss on the in-batch score
   distributions.
2. Pruning: structured pruning of the feed-forward blocks (the intermediate neurons with the
   smallest weight norms go), followed by a short recovery round of the same distillation.
3. int8: ONNX Runtime dynamic quantisation, per channel (components/export.py).
4. Quality gate: the compressed model is accepted only if its nDCG@10 on the evaluation split is
   within ``max_ndcg_drop`` (absolute) of the teacher's; otherwise the step fails with both
   numbers and writes nothing, or, with ``keep_teacher`` (the pipeline's default), writes the
   teacher itself, fp32 and unchanged, with ``"compressed": false`` and every level's score in
   its report, so that a pipeline whose collection no level suits still ships its model.
   Every level tried records the queries it was measured on and the 95% paired bootstrap
   interval of its drop (:func:`drop_interval`); where that interval is wider than the allowed
   drop on either side (a dozen validation queries: int8 alone moved FAQ and CISI validation
   nDCG@10 by 0.016-0.017 while their test halves barely moved), the progress note says the
   split cannot resolve the margin. The gate still decides on the point estimate.

The amount of compression is a ladder of (layers, prune ratio) levels, tried most compressed
first (:data:`DEFAULT_LADDER`); the first level that passes the gate is written. One distilled
student per layer count is shared by the levels that prune it. A recommendation model may pass at
2 layers while a search model needs 4: the gate, not a guess, decides. ``--ladder`` pins the
levels; ``--layers`` / ``--prune-ratio`` make a ladder of one level (either, not both ways).

The output is a model directory like the teacher's (kuberank.json, scorer weights and a
tokenizer carried over) with the student's weights, plus ``onnx/model.int8.onnx``; ``kuberank
evaluate --model DIR`` scores it through ONNX Runtime.

Thin wrappers: the kfp component :func:`compress_op` and ``kuberank compress``.
"""

import contextlib
import copy
import dataclasses
import functools
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from kfp import dsl

from kuberank import datasets, significance, storage
from kuberank.components.evaluate import evaluate
from kuberank.components.export import export_onnx, optimize_onnx, quantize_int8
from kuberank.encoder import check_model_dir, mean_pool
from kuberank.errors import KuberankError
from kuberank.kfp_component import step_component
from kuberank.progress import bar, note
from kuberank.store import INT8_FILE, ONNX_DIR


def format_levels(tried: list[dict]) -> str:
    """The levels a ladder tried, as "2x0.5 0.5216, 6x0 0.8726" (layers x prune ratio, nDCG@10)."""
    return ", ".join(f"{t['layers']}x{t['prune_ratio']:g} {t['ndcg10']:.4f}" for t in tried)


class QualityGateError(KuberankError):
    """The compressed model lost more quality than allowed."""

    def __init__(
        self,
        teacher: float,
        student: float,
        allowed: float,
        split: str,
        tried: list | None = None,
        outcome: str = "nothing written",
    ):
        self.teacher, self.student, self.tried = teacher, student, list(tried or [])
        levels = format_levels(self.tried)
        super().__init__(
            f"quality gate failed on the {split} split: compressed nDCG@10 {student:.4f} vs teacher "
            f"{teacher:.4f} (drop {teacher - student:.4f} > allowed {allowed:.4f})"
            + (f"; levels tried (layers x prune ratio, nDCG@10): {levels}" if levels else "")
            + f"; {outcome}"
        )


# (student layers, share of feed-forward neurons pruned), most compressed first. Measured on
# MovieLens-100K (docs/benchmarks.md): 2 layers + 0.5 kept validation nDCG@10 within 0.006 of
# the 6-layer teacher at about 9x PyTorch fp32's batch-32 throughput; the last level (int8 only)
# keeps cosine ~0.99 to fp32 and passed the gate on MovieLens and CISI, but not on the FAQ
# collection (docs/evaluation.md: -0.017 on 60 validation queries).
DEFAULT_LADDER: tuple[tuple[int, float], ...] = ((2, 0.5), (3, 0.5), (3, 0.25), (4, 0.25), (6, 0.0))


def fit_default_ladder(depth: int) -> tuple[tuple[int, float], ...]:
    """:data:`DEFAULT_LADDER` for a teacher of ``depth`` layers: its int8-only level is the
    teacher's own depth (6 for MiniLM-L6), and levels deeper than a shallower teacher go."""
    *distilled, (_, last_ratio) = DEFAULT_LADDER
    return tuple((layers, ratio) for layers, ratio in distilled if layers <= depth) + (
        (depth, last_ratio),
    )


def parse_ladder(text: str | None) -> tuple[tuple[int, float], ...] | None:
    """``"2x0.5,3x0.25"`` -> ((2, 0.5), (3, 0.25)); empty or None -> None (the default ladder);
    a clear error naming ``--ladder``."""
    if not text:
        return None
    rungs = []
    for part in (p.strip() for p in str(text).split(",")):
        try:
            layers, ratio = part.lower().split("x")
            rungs.append((int(layers), float(ratio)))
        except ValueError:
            raise KuberankError(
                f"--ladder: {part!r} is not LAYERSxPRUNE_RATIO (e.g. 2x0.5,3x0.25)"
            ) from None
    return tuple(rungs)


def one_level(layers: int | None, prune_ratio: float | None) -> tuple[tuple[int, float]] | None:
    """The one-level ladder of ``--layers`` / ``--prune-ratio`` (the one not given: 3 layers,
    0.25 pruned); None when neither is given."""
    if layers is None and prune_ratio is None:
        return None
    return ((3 if layers is None else layers, 0.25 if prune_ratio is None else prune_ratio),)


@dataclasses.dataclass
class CompressConfig:
    model: str
    dataset: str
    out: str
    # (student layers, share of feed-forward neurons pruned) levels, most compressed first;
    # None: DEFAULT_LADDER fitted to the teacher's depth
    ladder: tuple[tuple[int, float], ...] | None = None
    epochs: int = 1
    recovery_epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-4
    temperature: float = 0.05
    max_length: int = 128
    int8: bool = True
    max_ndcg_drop: float = 0.01
    split: str | None = None  # default: validation where it exists, else test
    seed: int = 0
    keep_teacher: bool = False  # no level passes: write the teacher unchanged instead of failing

    def rungs(self, depth: int) -> list[tuple[int, float]]:
        """The (layers, prune ratio) levels to try on a teacher of ``depth`` layers, in order,
        checked."""
        if self.ladder is None or tuple(self.ladder) == DEFAULT_LADDER:  # as printed in --help
            return list(fit_default_ladder(depth))
        levels = [(int(a), float(b)) for a, b in self.ladder]
        if not levels:
            raise KuberankError("--ladder: no compression level given")
        for layers, ratio in levels:
            check_layers(depth, layers)
            if not 0 <= ratio < 1:
                raise KuberankError(
                    f"--ladder/--prune-ratio: prune ratio {ratio} (need 0 <= ratio < 1)"
                )
        return levels


FIDELITY_TEXTS = 256  # texts (a seeded sample) on which the candidate layer sets are compared


def check_layers(teacher_layers: int, keep: int) -> None:
    if not 1 <= keep <= teacher_layers:
        raise KuberankError(
            f"--ladder/--layers: {keep} layers; must be between 1 and the teacher's "
            f"{teacher_layers} layers"
        )


def make_student(teacher, layers: list[int]):
    """A copy of ``teacher`` with only the given layers (a smaller, valid BERT model)."""
    from torch import nn  # torch, transformers: heavy; loaded only when compressing

    student = copy.deepcopy(teacher)
    student.encoder.layer = nn.ModuleList([copy.deepcopy(teacher.encoder.layer[i]) for i in layers])
    student.config.num_hidden_layers = len(layers)
    return student


@contextlib.contextmanager
def _only_layers(model, layers: list[int]):
    """``model`` running only the given layers for the duration (restored after)."""
    from torch import nn

    full, depth = model.encoder.layer, model.config.num_hidden_layers
    model.encoder.layer = nn.ModuleList([full[i] for i in layers])
    model.config.num_hidden_layers = len(layers)
    try:
        yield model
    finally:
        model.encoder.layer, model.config.num_hidden_layers = full, depth


def _tokenize(tokenizer, texts: list[str], config: "CompressConfig"):
    return tokenizer(
        texts, padding=True, truncation=True, max_length=config.max_length, return_tensors="pt"
    )


def _embed(model, batch):
    import torch

    hidden = model(**batch).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


def choose_layers(
    teacher, tokenizer, texts: list[str], counts: list[int], config: "CompressConfig"
) -> dict[int, tuple[list[int], float | None]]:
    """For each layer count in ``counts``, the teacher layers its student starts from, and how
    close that untrained student's embeddings are to the teacher's (mean cosine over a seeded
    sample of ``texts``; None for the teacher's own depth). Backward elimination: from the
    teacher's layers, drop one layer at a time, the one whose loss keeps the student closest to
    the teacher, down to the smallest count. Which layers a student keeps decides how much
    distillation has to mend, so a measurement picks them, not a spacing rule."""
    import torch

    depth = teacher.config.num_hidden_layers
    for keep in counts:
        check_layers(depth, keep)
    if min(counts) == depth:  # the teacher's own depth only: nothing to choose
        return {depth: (list(range(depth)), None)}
    rng = np.random.default_rng(config.seed)
    sample = [texts[i] for i in rng.permutation(len(texts))[:FIDELITY_TEXTS]]
    batches = [
        _tokenize(tokenizer, sample[i : i + config.batch_size], config)
        for i in range(0, len(sample), config.batch_size)
    ]
    teacher.eval()
    current = list(range(depth))
    chosen: dict[int, tuple[list[int], float | None]] = {depth: (current, None)}
    with torch.no_grad():
        targets = [_embed(teacher, b) for b in batches]

        def fidelity(layers: list[int]) -> float:
            with _only_layers(teacher, layers) as student:  # no copy: nothing is trained here
                cosine = [(_embed(student, b) * t).sum(-1) for b, t in zip(batches, targets)]
            return float(torch.cat(cosine).mean())

        for size in range(depth - 1, min(counts) - 1, -1):
            options = [[layer for layer in current if layer != drop] for drop in current]
            scores = [fidelity(layers) for layers in options]
            best = int(np.argmax(scores))
            current = options[best]
            chosen[size] = (current, round(scores[best], 5))
    return {keep: chosen[keep] for keep in counts}


def prune_feed_forward(model, ratio: float) -> int:
    """Remove the ``ratio`` of intermediate neurons with the smallest weight norms from every
    feed-forward block (structured: the matrices shrink). Returns the new intermediate size."""
    import torch
    from torch import nn

    size = model.config.intermediate_size
    keep = max(1, int(round(size * (1 - ratio))))
    if ratio <= 0 or keep == size:
        return size
    for layer in model.encoder.layer:
        up, down = layer.intermediate.dense, layer.output.dense
        importance = up.weight.norm(dim=1) * down.weight.norm(dim=0)
        index = torch.sort(torch.topk(importance, keep).indices).values
        new_up = nn.Linear(up.in_features, keep)
        new_up.weight.data, new_up.bias.data = (
            up.weight.data[index].clone(),
            up.bias.data[index].clone(),
        )
        new_down = nn.Linear(keep, down.out_features)
        new_down.weight.data, new_down.bias.data = (
            down.weight.data[:, index].clone(),
            down.bias.data.clone(),
        )
        layer.intermediate.dense, layer.output.dense = new_up, new_down
    model.config.intermediate_size = keep
    return keep


def teacher_embeddings(teacher, tokenizer, texts: list[str], config: CompressConfig):
    """The teacher's normalised embedding of every text, computed once for all the distillation
    rounds of a ladder (mean pooling over the attention mask: a text's embedding does not
    depend on the batch it was padded in)."""
    import torch

    teacher.eval()
    with torch.no_grad():
        return torch.cat(
            [
                _embed(teacher, _tokenize(tokenizer, texts[i : i + config.batch_size], config))
                for i in bar(
                    range(0, len(texts), config.batch_size),
                    desc="teacher embeddings",
                    total=math.ceil(len(texts) / config.batch_size),
                    unit="batch",
                )
            ]
        )


def distil(
    targets, student, tokenizer, texts: list[str], config: CompressConfig, epochs: int, desc: str
) -> list[float]:
    """Train ``student`` to reproduce the teacher's embeddings of ``texts`` (``targets``, row
    per text: :func:`teacher_embeddings`) and their in-batch score distributions. Returns the
    mean loss per epoch."""
    import torch

    torch.manual_seed(config.seed)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr)
    batches = math.ceil(len(texts) / config.batch_size)
    losses = []
    for epoch in range(epochs):
        order = np.random.default_rng(config.seed + epoch).permutation(len(texts))
        total = 0.0
        for start in bar(
            range(0, len(texts), config.batch_size),
            desc=f"{desc} epoch {epoch + 1}/{epochs}",
            total=batches,
            unit="batch",
        ):
            rows = order[start : start + config.batch_size]
            batch = _tokenize(tokenizer, [texts[i] for i in rows], config)
            target = targets[torch.as_tensor(rows)]
            output = _embed(student, batch)
            cosine = (1 - (output * target).sum(-1)).mean()
            t_scores = target @ target.T / config.temperature
            s_scores = output @ output.T / config.temperature
            kl = torch.nn.functional.kl_div(
                torch.log_softmax(s_scores, -1),
                torch.log_softmax(t_scores, -1),
                log_target=True,
                reduction="batchmean",
            )
            loss = cosine + kl
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.item()
        losses.append(total / batches)
    student.eval()
    return losses


def training_texts(data: datasets.Dataset) -> list[str]:
    """The dataset's own texts: every item, plus the queries of the training split."""
    texts = list(data.item_texts)
    if data.kind == datasets.SEARCH and "train" in data.splits():
        texts += [t for t in datasets.eval_task(data, "train").texts if t]
    return texts


def drop_interval(teacher: dict, candidate: dict) -> dict:
    """How sure the gate can be of a drop: the judged queries it was measured on and the 95%
    paired bootstrap interval of teacher - candidate nDCG@10 over them
    (:func:`kuberank.significance.paired_test`; none for fewer than 2 queries)."""
    per_teacher, per_candidate = teacher["per_query_ndcg@10"], candidate["per_query_ndcg@10"]
    if len(set(per_teacher) & set(per_candidate)) < 2:  # paired_test would refuse
        return {"queries": len(per_teacher), "drop_ci95": None}
    test = significance.paired_test(per_teacher, per_candidate)
    return {"queries": test["queries"], "drop_ci95": [round(x, 4) for x in test["bootstrap_ci95"]]}


def resolution_note(interval: dict, allowed: float, split: str) -> str:
    """A warning when the split's queries are too few to tell a drop of ``allowed`` from
    noise (the 95% interval of the drop is wider than the allowed drop on either side)."""
    ci = interval["drop_ci95"]
    if ci is None or (ci[1] - ci[0]) / 2 <= allowed:
        return ""
    return (
        f" (95% interval of the drop [{ci[0]:+.4f}, {ci[1]:+.4f}] over {interval['queries']} "
        f"{split} queries: too few to resolve a drop of {allowed:g}; the gate decides on the "
        "point estimate)"
    )


def default_split(data: datasets.Dataset) -> str:
    return "validation" if "validation" in data.splits() else "test"


def compress(config: CompressConfig) -> dict:
    """Distil, prune and quantise ``config.model``; write ``config.out`` only if the quality
    gate passes. Returns the report (sizes, layers, both nDCG@10 values, timings)."""
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    teacher_dir = check_model_dir(config.model)
    data = datasets.load(config.dataset)
    split = config.split or default_split(data)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModel.from_pretrained(teacher_dir, add_pooling_layer=False)
    depth = teacher.config.num_hidden_layers
    levels = config.rungs(depth)  # a clear error before any training
    texts = training_texts(data)
    starts = choose_layers(teacher, tokenizer, texts, sorted({n for n, _ in levels}), config)
    teacher_eval = evaluate(data, str(teacher_dir), split, per_query=True)
    teacher_score = teacher_eval["ndcg@10"]
    distilled: dict[int, tuple] = {}  # layers -> (distilled student, its losses)
    # the teacher's embeddings of the texts, computed when a round first needs them
    targets = functools.cache(lambda: teacher_embeddings(teacher, tokenizer, texts, config))

    tried: list[dict] = []
    for layers, ratio in levels:
        chosen, fidelity = starts[layers]
        if layers not in distilled:
            student = make_student(teacher, chosen)
            losses = []
            if layers < depth and config.epochs > 0:  # the full depth is the teacher itself
                losses = distil(
                    targets(), student, tokenizer, texts, config, config.epochs, f"distil {layers}L"
                )
            distilled[layers] = (student, losses)
        base, losses = distilled[layers]
        student = copy.deepcopy(base)
        intermediate = prune_feed_forward(student, ratio)
        losses = list(losses)
        if ratio > 0 and config.recovery_epochs > 0:
            losses += distil(
                targets(), student, tokenizer, texts, config, config.recovery_epochs, "recover"
            )
        level = {
            "layers": chosen,
            "initial_fidelity": fidelity,
            "intermediate_size": intermediate,
            "prune_ratio": ratio,
            "distil_losses": [round(x, 5) for x in losses],
        }
        with tempfile.TemporaryDirectory(prefix="kuberank-compress-") as tmp:
            candidate = Path(tmp) / "model"
            sizes = _write_candidate(teacher_dir, student, tokenizer, candidate, config.int8)
            report = {"teacher": str(teacher_dir), **level, "int8": config.int8, **sizes}
            scored = evaluate(data, str(candidate), split, per_query=True)
            score = scored["ndcg@10"]
            interval = drop_interval(teacher_eval, scored)
            tried.append({"layers": len(chosen), "prune_ratio": ratio, "ndcg10": score, **interval})
            passed = teacher_score - score <= config.max_ndcg_drop
            note(
                f"compress: {len(chosen)} layers, prune {ratio:g}: nDCG@10 {score:.4f} vs teacher "
                f"{teacher_score:.4f} on {split} -> {'accepted' if passed else 'refused'}"
                + resolution_note(interval, config.max_ndcg_drop, split)
            )
            if not passed:
                continue
            report.update(
                compressed=True,
                split=split,
                teacher_ndcg10=teacher_score,
                compressed_ndcg10=score,
                ladder=tried,
                seconds=round(time.perf_counter() - started, 1),
            )
            _write_report(candidate, report, teacher_dir)
            with storage.atomic_dir(Path(config.out)) as out:
                shutil.copytree(candidate, out, dirs_exist_ok=True)
            return report
    best = max(tried, key=lambda t: t["ndcg10"])
    refused = QualityGateError(
        teacher_score,
        best["ndcg10"],
        config.max_ndcg_drop,
        split,
        tried,
        f"the teacher is written unchanged (fp32, {depth} layers)"
        if config.keep_teacher
        else "nothing written",
    )
    if not config.keep_teacher:
        raise refused
    note(f"compress: {refused}")
    report = {
        "teacher": str(teacher_dir),
        "compressed": False,
        "layers": list(range(depth)),
        "prune_ratio": 0.0,
        "int8": False,
        "split": split,
        "teacher_ndcg10": teacher_score,
        "compressed_ndcg10": teacher_score,
        "ladder": tried,
        "refused": str(refused),
        "seconds": round(time.perf_counter() - started, 1),
    }
    with storage.atomic_dir(Path(config.out)) as out:
        shutil.copytree(teacher_dir, out, dirs_exist_ok=True)
        _write_report(out, report, teacher_dir)
    return report


def _write_candidate(teacher_dir: Path, student, tokenizer, candidate: Path, int8: bool) -> dict:
    """The student as a model directory like the teacher's (plus its int8 ONNX); sizes."""
    shutil.copytree(
        teacher_dir,
        candidate,
        ignore=shutil.ignore_patterns("*.safetensors", "*.bin", ONNX_DIR, "item_tower"),
    )
    student.save_pretrained(candidate, safe_serialization=True)
    tokenizer.save_pretrained(candidate)
    if (teacher_dir / "scorer.safetensors").is_file():
        shutil.copy2(teacher_dir / "scorer.safetensors", candidate / "scorer.safetensors")
    sizes = {
        "teacher_bytes": _weights_bytes(teacher_dir),
        "student_bytes": _weights_bytes(candidate),
    }
    if int8:
        onnx_dir = candidate / ONNX_DIR
        onnx_dir.mkdir()
        fp32 = export_onnx(candidate, onnx_dir / "model.fp32.onnx")
        fused = onnx_dir / "model.fused.onnx"
        optimize_onnx(
            fp32,
            fused,
            num_heads=student.config.num_attention_heads,
            hidden_size=student.config.hidden_size,
        )
        quantize_int8(fused, onnx_dir / INT8_FILE, per_channel=True)
        for name in ("model.fp32.onnx", "model.fused.onnx"):
            (onnx_dir / name).unlink()
        sizes["int8_bytes"] = (onnx_dir / INT8_FILE).stat().st_size
    return sizes


def _write_report(model_dir: Path, report: dict, teacher_dir: Path) -> None:
    """The gated compression report in the model's kuberank.json (with its nDCG@10), or
    compression.json for a plain transformers directory."""
    from kuberank.model import MANIFEST, is_kuberank_model  # local: kuberank.model imports torch

    if is_kuberank_model(teacher_dir):
        doc = json.loads((teacher_dir / MANIFEST).read_text())
        doc["compression"] = report
        doc["base_model"] = str(teacher_dir)
        doc.setdefault("metrics", {})["ndcg@10"] = report["compressed_ndcg10"]
        (model_dir / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
    else:
        (model_dir / "compression.json").write_text(json.dumps(report, indent=2) + "\n")


def _weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def int8_encoder_path(model_dir: str) -> Path | None:
    """The int8 ONNX encoder of a compressed model directory, if it has one."""
    path = Path(model_dir) / ONNX_DIR / INT8_FILE
    return path if path.is_file() else None


@step_component()
def compress_op(
    model: dsl.Input[dsl.Model],
    dataset: dsl.Input[dsl.Dataset],
    compressed: dsl.Output[dsl.Model],
    ladder: str = "",
    max_ndcg_drop: float = 0.01,
    keep_teacher: bool = True,
):
    """kfp wrapper around :func:`compress`; ``ladder`` "" = the default levels ("2x0.5,3x0.25"
    pins others); ``keep_teacher``: no level passing the gate passes the teacher on (the run
    goes on) rather than failing the step; the gate's numbers become artifact metadata."""
    from kuberank.components.compress import CompressConfig, compress, parse_ladder

    report = compress(
        CompressConfig(
            model=model.path,
            dataset=f"prepared:{dataset.path}",
            out=compressed.path,
            ladder=parse_ladder(ladder),
            max_ndcg_drop=max_ndcg_drop,
            keep_teacher=keep_teacher,
        )
    )
    compressed.metadata.update(
        {
            k: report[k]
            for k in (
                "compressed",
                "teacher_ndcg10",
                "compressed_ndcg10",
                "split",
                "layers",
                "prune_ratio",
            )
        }
    )
