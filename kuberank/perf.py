"""Throughput and FLOP measurements shared by the demo and ``make bench``."""

from __future__ import annotations

import time

import numpy as np


def encoder_throughput(encoder, texts: list[str], batch: int, seconds: float = 6.0) -> dict:
    """Texts per second and per-call latency of ``encoder.encode`` at a fixed batch size,
    cycling through ``texts`` for about ``seconds`` (after one warm-up call)."""
    encoder.encode(texts[:batch], batch_size=batch)
    done, started, latencies = 0, time.perf_counter(), []
    while time.perf_counter() - started < seconds:
        start = done % len(texts)
        chunk = texts[start : start + batch] or texts[:batch]
        t0 = time.perf_counter()
        encoder.encode(chunk, batch_size=batch)
        latencies.append(time.perf_counter() - t0)
        done += len(chunk)
    elapsed = time.perf_counter() - started
    return {
        "texts/s": done / elapsed,
        "p50 ms": 1000 * float(np.median(latencies)),
        "p95 ms": 1000 * float(np.percentile(latencies, 95)),
    }


def matmul_peak_flops(size: int = 1024, repeats: int = 10) -> float:
    """This machine's fp32 matrix-multiply rate (FLOP/s) with torch, all threads."""
    import torch  # local: heavy, only this measurement needs it

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def encoder_flops(config: dict, tokens: float, seq: int) -> float:
    """Forward FLOPs of a BERT encoder for ``tokens`` tokens in sequences of length ``seq``:
    the Q/K/V/output projections, the feed-forward block and the attention products."""
    h, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    per_token = layers * (2 * 4 * h * h + 2 * 2 * h * ffn + 2 * 2 * seq * h)
    return float(per_token * tokens)
