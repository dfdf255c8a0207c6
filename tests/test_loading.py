"""What a replica reads from its model store at load (serving/loading.py): an absent part
means the store lacks it; a store that cannot be read is refused, never served without it."""

from __future__ import annotations

import numpy as np
import pytest

from kuberank.components import edge
from kuberank.errors import StorageError
from kuberank.serving.loading import read_model_tables
from kuberank.store import ModelStore


def test_a_store_without_a_model_serves_its_plain_encoder(tmp_path):
    tables, model_dir = read_model_tables(ModelStore(str(tmp_path)), "search")
    assert model_dir is None and tables.kind == "search" and tables.info is None


def test_an_unreadable_store_is_refused_not_served_without_its_parts(
    s3_endpoint, monkeypatch, tmp_path
):
    # only "not found" means absent: an unreachable S3 endpoint is an error
    monkeypatch.setenv("KUBERANK_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="s3://unreachable/store/model"):
        read_model_tables(ModelStore("s3://unreachable/store"), "search")
    with pytest.raises(StorageError, match="s3://unreachable/store/edge"):
        edge.index_store_bundle("s3://unreachable/store", np.zeros((1, 2)), ["a"], "f")
    # an absent edge bundle is just absent
    assert edge.index_store_bundle(str(tmp_path), np.zeros((1, 2)), ["a"], "f") is None
