"""The ranking app's settings (kuberank.serving.app, no Ray needed): bad values are refused
naming the field, and the colocated pipeline's batch streams and ONNX Runtime threads follow
the cores the replica may use, a container's CPU limit included."""

import pytest

from kuberank.errors import KuberankError
from kuberank.serving import app


def test_cores_follow_a_cgroup_cpu_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(app.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cpu_max = tmp_path / "cpu.max"
    for text, cores in (("max 100000", 4), ("150000 100000", 2), ("50000 100000", 1)):
        cpu_max.write_text(text + "\n")
        assert app.usable_cores(str(cpu_max)) == cores
    assert app.usable_cores(str(tmp_path / "absent")) == 4


def test_batch_streams_and_onnx_threads(monkeypatch):
    monkeypatch.setattr(app, "usable_cores", lambda: 4)
    colocated = app.Settings()
    assert colocated.batch_streams() == 4 and app.onnx_thread_count(0, 4) == 1
    assert app.Settings(pipeline_workers=2).batch_streams() == 2
    assert app.onnx_thread_count(0, 2) == 2 and app.onnx_thread_count(3, 2) == 3
    # split stages: the QueryEncoder runs one batch at a time on every core
    split = app.Settings(colocate=False, pipeline_workers=2)
    assert split.batch_streams() == 1 and app.onnx_thread_count(0, 1) == 4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pipeline_workers": -1}, "pipeline_workers"),
        ({"pipeline_batch": (0, 0.002)}, "pipeline_batch"),
        ({"onnx_precision": "fp16"}, "onnx_precision"),
        ({"deployments": {"Nope": {}}}, "deployments"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(KuberankError, match=field):
        app.Settings(**kwargs)
