"""The ranking app's settings (kuberank.serving.settings, no Ray needed): bad values are refused
naming the field, and the colocated pipeline's batch streams and ONNX Runtime threads follow
the cores the replica may use, a container's CPU limit included."""

import pytest

from kuberank.errors import KuberankError
from kuberank.serving import settings
from kuberank.serving.encoders import QueryEncoding


def test_cores_follow_a_cgroup_cpu_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(settings.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cpu_max = tmp_path / "cpu.max"
    for text, cores in (("max 100000", 4), ("150000 100000", 2), ("50000 100000", 1)):
        cpu_max.write_text(text + "\n")
        assert settings.usable_cores(str(cpu_max)) == cores
    assert settings.usable_cores(str(tmp_path / "absent")) == 4


def test_batch_streams_and_onnx_threads(monkeypatch):
    monkeypatch.setattr(settings, "usable_cores", lambda: 4)
    colocated = settings.Settings()
    assert colocated.batch_streams() == 4
    assert QueryEncoding("", colocated, colocated.batch_streams()).onnx_threads() == 1
    two = settings.Settings(pipeline_workers=2)
    assert two.batch_streams() == 2 and QueryEncoding("", two, 2).onnx_threads() == 2
    assert QueryEncoding("", settings.Settings(onnx_threads=3), 2).onnx_threads() == 3
    # the QueryEncoder deployment runs one batch at a time on every core
    assert QueryEncoding("", settings.Settings(colocate=False)).onnx_threads() == 4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pipeline_workers": -1}, "pipeline_workers"),
        ({"switch_interval_s": -0.001}, "switch_interval_s"),
        ({"pipeline_batch": (0, 0.002)}, "pipeline_batch"),
        ({"onnx_precision": "fp16"}, "onnx_precision"),
        ({"deployments": {"Nope": {}}}, "deployments"),
        ({"mmr_lambda": 1.5}, "mmr_lambda"),
        ({"mmr_lambda": 0.5, "calibration": 0.5}, "mmr_lambda and calibration"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(KuberankError, match=field):
        settings.Settings(**kwargs)


@pytest.mark.parametrize("name", settings.BATCHES)
def test_every_batch_setting_is_checked(name):
    with pytest.raises(KuberankError, match=name):
        settings.Settings(**{name: (32, -0.001)})
    assert getattr(settings.Settings(**{name: ["8", "0.5"]}), name) == (8, 0.5)
