"""kuberank.serving.http_api: the FastAPI app the Ingress serves (the request and error schema
are tested against the served schema in tests/test_api_contract.py)."""

from kuberank.serving import http_api
from kuberank.serving.json_routes import JsonRoutes


def test_limits_and_metrics_wrap_the_json_fast_path():
    """Starlette runs the last added middleware outermost: body limits, metrics and the JSON
    500 must see the fast path's requests too."""
    order = [m.cls for m in http_api.new_api().user_middleware]
    assert order.index(http_api.LimitsAndMetrics) < order.index(JsonRoutes)
