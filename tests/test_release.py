"""The pipeline's release step (pipelines/release.py): the canary values fit the chart's
schema. (publish_op runs in tests/test_pipeline.py's local pipeline run.)"""

import json
from pathlib import Path

import pytest

from kuberank.errors import KuberankError
from kuberank.pipelines import release

CHART = Path(__file__).resolve().parents[1] / "charts" / "kuberank"


def test_canary_values_fit_the_chart_schema():
    import jsonschema

    from kuberank.deploy.chart import deep_merge, load_values_files

    values = load_values_files(CHART / "values.yaml")
    deep_merge(values, release.canary_values("s3://kuberank-models/pipeline", 3, 10))
    jsonschema.validate(values, json.loads((CHART / "values.schema.json").read_text()))
    assert values["canary"]["modelStoreUri"] == "s3://kuberank-models/pipeline"
    with pytest.raises(KuberankError, match="canary_weight"):
        release.canary_values("s3://x", 1, 0)
