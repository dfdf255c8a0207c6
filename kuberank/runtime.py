"""Process-wide settings every entry point applies before heavy imports."""

from __future__ import annotations

import os

DEFAULTS = {
    # Models come from installed packages; nothing is fetched from a hub at run time.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",  # loading without the unused pooler is expected
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # kuberank draws its own bars
    # Ray: never bind an external address, no usage reporting.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def configure() -> None:
    """Set the defaults above unless the user already chose a value."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
