"""Progress bars for long work (stderr, so `--json` output on stdout stays clean)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("KUBERANK_PROGRESS", "1") != "0"


def bar(
    iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None, unit: str = "it"
):
    """A tqdm bar on stderr; KUBERANK_PROGRESS=0 turns bars off."""
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        file=sys.stderr,
        disable=not enabled(),
        dynamic_ncols=True,
        leave=False,
    )


def note(message: str) -> None:
    """One line of progress on stderr that does not break a bar being drawn."""
    tqdm.write(message, file=sys.stderr)
