"""kuberank: real-time search and recommendation ranking with pretrained transformers."""

from kuberank import runtime as _runtime

__version__ = "0.1.0"

# Before anything imports ray or transformers: offline models, Ray on loopback.
_runtime.configure()
