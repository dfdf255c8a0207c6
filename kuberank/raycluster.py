"""Connecting to Ray: an existing cluster by address, or a local one bound to loopback."""

from __future__ import annotations

import os

from kuberank.errors import KuberankError

LOOPBACK = "127.0.0.1"
DEFAULT_OBJECT_STORE_BYTES = 512 * 1024 * 1024


def ensure_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int = DEFAULT_OBJECT_STORE_BYTES,
) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) if given, else start a local cluster on
    127.0.0.1 with a capped object store and no dashboard. No-op when already connected."""
    import ray  # local: heavy, only a Ray run needs it

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    ray.init(
        _node_ip_address=LOOPBACK,
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise KuberankError(f"local Ray bound {node_ip}, expected {LOOPBACK}")
