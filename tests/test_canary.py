"""kubectl-kuberank canary: the pure decision function, the merge patches, the CLI, and end to end
runs in which the state machine patches the chart's rendered HTTPRoute with
`kubectl patch --local` while its analysis queries a real Prometheus server that scrapes
synthetic kuberank exporters on loopback (a healthy, a failing and a slow canary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from kuberank.deploy import canary as kc
from kuberank.deploy import chart as kubechart
from tests.conftest import free_port, require_binary

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kuberank"
CANARY_VALUES = CHART / "ci" / "canary-values.yaml"


# --- decide(): metrics in, decision out ---------------------------------------------------------

HEALTHY = kc.Metrics(request_rate=50.0, error_rate=0.001, p99_seconds=0.095)


def test_healthy_canary_steps_up_then_promotes():
    d = kc.decide(kc.Metrics(5.0, 0.002, 0.097), HEALTHY, 10, (10, 25, 50, 100))
    assert (d.action, d.weight) == ("step", 25)
    assert "canary healthy" in d.reasons[0]
    assert kc.decide(kc.Metrics(5.0, 0.002, 0.097), HEALTHY, 50, (10, 25, 50, 100)).weight == 100
    d = kc.decide(kc.Metrics(50.0, 0.002, 0.097), HEALTHY, 100, (10, 25, 50, 100))
    assert (d.action, d.weight) == ("promote", 100)


def test_error_rate_above_ceiling_rolls_back():
    d = kc.decide(kc.Metrics(5.0, 0.2, 0.09), HEALTHY, 25)
    assert (d.action, d.weight) == ("rollback", 0)
    assert any("error rate 20.00% > 1.00%" in r for r in d.reasons)


def test_error_rate_relative_to_stable():
    # 0.8% is under the 1% ceiling but 0.7 points above a stable at 0.1%
    d = kc.decide(kc.Metrics(5.0, 0.008, 0.09), HEALTHY, 25)
    assert d.action == "rollback" and "exceeds stable 0.10%" in d.reasons[0]
    # the same canary next to an equally noisy stable is fine
    noisy = kc.Metrics(50.0, 0.007, 0.095)
    assert kc.decide(kc.Metrics(5.0, 0.008, 0.09), noisy, 25).action == "step"


def test_latency_regression_rolls_back():
    d = kc.decide(kc.Metrics(5.0, 0.0, 0.2), HEALTHY, 10)
    assert d.action == "rollback" and "1.25 x stable 95.0ms" in d.reasons[0]
    # within ratio + tolerance: 0.095 * 1.25 + 0.01 = 0.12875
    assert kc.decide(kc.Metrics(5.0, 0.0, 0.128), HEALTHY, 10).action == "step"
    d = kc.decide(kc.Metrics(5.0, 0.0, 0.9), kc.Metrics(50.0, 0.0, 0.8), 10)
    assert d.action == "rollback" and "canary p99 900.0ms > 500.0ms" in d.reasons[0]


def test_too_little_data_waits():
    assert kc.decide(kc.Metrics(None, None, None), HEALTHY, 10).action == "wait"
    d = kc.decide(kc.Metrics(0.05, 0.0, 0.1), HEALTHY, 10)
    assert (d.action, d.weight) == ("wait", 10) and "below 0.1 req/s" in d.reasons[0]
    assert kc.decide(kc.Metrics(5.0, 0.0, None), HEALTHY, 10).action == "wait"


def test_without_stable_traffic_absolute_thresholds_decide():
    none = kc.Metrics(None, None, None)
    assert kc.decide(kc.Metrics(5.0, 0.001, 0.3), none, 100).action == "promote"
    assert kc.decide(kc.Metrics(5.0, 0.05, 0.3), none, 100).action == "rollback"


def test_thresholds_are_configurable():
    strict = kc.Thresholds(max_error_rate=0.0005)
    assert (
        kc.decide(kc.Metrics(5.0, 0.001, 0.09), HEALTHY, 10, thresholds=strict).action == "rollback"
    )


def test_steps():
    assert kc.normalise_steps([50, 10]) == (10, 50, 100)
    assert kc.next_weight(10, (10, 50)) == 50
    assert kc.next_weight(100, (10, 50)) is None
    assert kc.next_weight(30, (10, 25, 50, 100)) == 50
    for bad in ([], [0, 50], [10, 150]):
        with pytest.raises(kc.CanaryError, match="--steps"):
            kc.normalise_steps(bad)


# --- the HTTPRoute patches ----------------------------------------------------------------------


def rendered_objects(release: str = "kuberank", **overrides) -> list[dict]:
    values = kubechart.load_values_files(CANARY_VALUES)
    kubechart.deep_merge(values, overrides)
    return kubechart.render(CHART, values, name=release, namespace="kuberank")


def write_manifests(path: Path, release: str = "kuberank", **overrides) -> Path:
    path.write_text(yaml.safe_dump_all(rendered_objects(release, **overrides), sort_keys=False))
    return path


def route_in(path: Path, name: str | None = None) -> dict:
    routes = [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "HTTPRoute"]
    return next(r for r in routes if name is None or r["metadata"]["name"] == name)


def weights(route: dict) -> dict[str, int]:
    return {r["name"]: r["weight"] for r in route["spec"]["rules"][0]["backendRefs"]}


def test_weights_patch_changes_only_the_kuberank_backends():
    route = next(o for o in rendered_objects() if o["kind"] == "HTTPRoute")
    route["spec"]["rules"].append({"backendRefs": [{"name": "legacy", "port": 80, "weight": 7}]})
    patch = kc.weights_patch(route, 30, kc.PROGRESSING, "why", (30, 100), now="T")
    assert patch["metadata"]["annotations"] == {
        kc.ANN_PHASE: "Progressing",
        kc.ANN_REASON: "why",
        kc.ANN_UPDATED: "T",
        kc.ANN_STEPS: "30,100",
    }
    rules = patch["spec"]["rules"]
    assert [r["weight"] for r in rules[0]["backendRefs"]] == [70, 30]
    assert rules[1] == {"backendRefs": [{"name": "legacy", "port": 80, "weight": 7}]}
    assert rules[0]["matches"] == route["spec"]["rules"][0]["matches"]
    assert route["spec"]["rules"][0]["backendRefs"][1]["weight"] == 10  # input untouched
    with pytest.raises(kc.CanaryError, match="between 0 and 100"):
        kc.weights_patch(route, 101, kc.PROGRESSING, "")


def test_route_without_canary_track_is_refused_with_a_clear_message(tmp_path):
    manifests = write_manifests(tmp_path / "all.yaml", canary={"enabled": False})
    assert kc.main(["canary", "status", "-f", str(manifests)]) == 2
    route = route_in(manifests)
    with pytest.raises(
        kc.CanaryError, match="no kuberank.io/canary-backend annotation.*canary.enabled=true"
    ):
        kc.current_weight(route)


# --- CLI ------------------------------------------------------------------------------------------


def test_console_script_entry_point_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "kuberank.deploy.canary", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "usage: kubectl kuberank" in out and "--kubeconfig" in out and "--context" in out
    for cmd in ("start", "status", "analyze", "promote", "rollback"):
        with pytest.raises(SystemExit) as exc:
            kc.main(["canary", cmd, "--help"])
        assert exc.value.code == 0
    start = kc.build_parser().parse_args(
        ["-n", "ns", "canary", "start", "--weight", "5", "--steps", "5,20"]
    )
    assert (start.namespace, start.weight, start.steps) == ("ns", 5, (5, 20, 100))
    late = kc.build_parser().parse_args(["canary", "status", "-n", "other", "--context", "c"])
    assert (late.namespace, late.context) == ("other", "c")


def test_pyproject_declares_the_kubectl_plugin():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kubectl-kuberank"] == "kuberank.deploy.canary:main"


def test_status_start_promote_rollback_on_a_manifest_file(tmp_path, capsys):
    manifests = write_manifests(tmp_path / "all.yaml")
    n_docs = len(list(yaml.safe_load_all(manifests.read_text())))
    assert kc.main(["canary", "status", "-f", str(manifests), "-o", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["canaryWeight"] == 10 and info["phase"] == "Idle"

    assert kc.main(["canary", "start", "-f", str(manifests), "--weight", "20", "--no-wait"]) == 0
    route = route_in(manifests)
    assert weights(route) == {"kuberank-serve-svc": 80, "kuberank-canary-serve-svc": 20}
    assert route["metadata"]["annotations"][kc.ANN_PHASE] == "Progressing"
    assert route["metadata"]["annotations"][kc.ANN_STEPS] == "20,25,50,100"
    assert len(list(yaml.safe_load_all(manifests.read_text()))) == n_docs  # other objects kept

    capsys.readouterr()
    assert kc.main(["canary", "start", "-f", str(manifests), "--weight", "20", "--no-wait"]) == 2
    assert "already progressing at 20%" in capsys.readouterr().err

    assert kc.main(["canary", "promote", "-f", str(manifests)]) == 0
    assert weights(route_in(manifests)) == {
        "kuberank-serve-svc": 0,
        "kuberank-canary-serve-svc": 100,
    }
    assert kc.main(["canary", "rollback", "-f", str(manifests)]) == 0
    route = route_in(manifests)
    assert weights(route) == {"kuberank-serve-svc": 100, "kuberank-canary-serve-svc": 0}
    assert route["metadata"]["annotations"][kc.ANN_PHASE] == "RolledBack"
    from kuberank.deploy import schema as kubeschema

    kubeschema.validate(route)  # still a valid HTTPRoute after the patches


def test_dry_run_prints_the_merge_patch_and_changes_nothing(tmp_path, capsys):
    manifests = write_manifests(tmp_path / "all.yaml")
    before = manifests.read_text()
    assert (
        kc.main(
            ["--dry-run", "-f", str(manifests), "canary", "start", "--weight", "25", "--no-wait"]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert manifests.read_text() == before
    assert "merge patch" in captured.err
    patch = json.loads(captured.out)
    # the printed patch is exactly what kubectl applies: feed it to `kubectl patch --local`
    single = tmp_path / "route.json"
    single.write_text(json.dumps(route_in(manifests)))
    kubectl = kc.find_kubectl()
    out = subprocess.run(
        [
            kubectl,
            "patch",
            "--local",
            "-f",
            str(single),
            "--type",
            "merge",
            "-p",
            json.dumps(patch),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    patched = json.loads(out.stdout)
    assert weights(patched) == {"kuberank-serve-svc": 75, "kuberank-canary-serve-svc": 25}
    assert patched["metadata"]["annotations"][kc.ANN_PHASE] == "Progressing"
    assert (
        patched["metadata"]["annotations"][kc.ANN_STABLE] == "kuberank-serve-svc"
    )  # merge kept it


def test_cluster_mode_goes_through_kubeconfig_and_context(tmp_path, capsys):
    """No API server runs here: point two kubeconfig contexts at closed loopback ports and check
    that kubectl is asked for the HTTPRoute on the server of the selected context."""
    port_a, port_b = free_port(), free_port()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "a",
                "clusters": [
                    {"name": n, "cluster": {"server": f"http://127.0.0.1:{p}"}}
                    for n, p in (("a", port_a), ("b", port_b))
                ],
                "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
                "contexts": [
                    {"name": n, "context": {"cluster": n, "user": "u", "namespace": "kuberank"}}
                    for n in ("a", "b")
                ],
            }
        )
    )
    code = kc.main(
        ["--kubeconfig", str(kubeconfig), "--context", "b", "-n", "prod", "canary", "status"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: get httproutes.gateway.networking.k8s.io failed:")
    assert f"127.0.0.1:{port_b}" in err and f"127.0.0.1:{port_a}" not in err


def test_analysis_without_prometheus_is_a_clear_error(tmp_path, capsys):
    manifests = write_manifests(tmp_path / "all.yaml")
    assert kc.main(["canary", "start", "-f", str(manifests), "--weight", "10"]) == 2
    assert "--prometheus-url" in capsys.readouterr().err
    dead = f"http://127.0.0.1:{free_port()}"
    assert kc.main(["canary", "analyze", "-f", str(manifests), "--prometheus-url", dead]) == 2
    assert f"cannot query Prometheus at {dead}" in capsys.readouterr().err


# --- end to end: real Prometheus scraping synthetic kuberank exporters ------------------------

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FAST = (0.0, 0.05, 0.5, 0.9, 0.995, 1.0, 1.0, 1.0, 1.0)  # p99 ~ 97 ms
SLOW = (0.0, 0.0, 0.0, 0.0, 0.05, 0.3, 0.6, 0.9, 1.0)  # p99 ~ 2.35 s
PROFILES = {  # (requests/s, 5xx fraction, latency CDF at BUCKETS)
    "healthy": (50.0, 0.001, FAST),
    "failing": (50.0, 0.20, FAST),
    "slow": (50.0, 0.0, SLOW),
}


def exposition(profile: str, elapsed: float) -> str:
    """kuberank's app metrics after ``elapsed`` seconds of steady traffic, in the text format."""
    rps, err, cdf = PROFILES[profile]
    n = rps * elapsed
    lines = [
        "# HELP kuberank_requests_total Requests by route and HTTP status.",
        "# TYPE kuberank_requests_total counter",
        f'kuberank_requests_total{{route="/search",status="200"}} {n * (1 - err):.3f}',
        f'kuberank_requests_total{{route="/search",status="503"}} {n * err:.3f}',
        "# HELP kuberank_request_latency_seconds Request latency.",
        "# TYPE kuberank_request_latency_seconds histogram",
    ]
    for le, frac in zip(BUCKETS, cdf, strict=True):
        lines.append(
            f'kuberank_request_latency_seconds_bucket{{route="/search",le="{le}"}} {n * frac:.3f}'
        )
    lines += [
        f'kuberank_request_latency_seconds_bucket{{route="/search",le="+Inf"}} {n:.3f}',
        f'kuberank_request_latency_seconds_sum{{route="/search"}} {n * 0.05:.3f}',
        f'kuberank_request_latency_seconds_count{{route="/search"}} {n:.3f}',
    ]
    return "\n".join(lines) + "\n"


class Exporter:
    def __init__(self, profile: str):
        self.profile = profile
        self.started = time.monotonic()
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = exposition(exporter.profile, time.monotonic() - exporter.started).encode()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


WINDOW = "5s"  # analysis window: 10 scrapes at 500 ms
# release -> (stable profile, canary profile)
RELEASES = {
    "good": ("healthy", "healthy"),
    "bad": ("healthy", "failing"),
    "slow": ("healthy", "slow"),
}


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    binary = require_binary("prometheus", "apt-get install prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    exporters: list[Exporter] = []
    proc = None
    try:
        targets = []
        for release, (stable, canary) in RELEASES.items():
            for track, profile in (("stable", stable), ("canary", canary)):
                exp = Exporter(profile)
                exporters.append(exp)
                # the labels the chart's ServiceMonitor gives the serve pods' series
                targets.append(
                    {
                        "targets": [f"127.0.0.1:{exp.port}"],
                        "labels": {
                            "namespace": "kuberank",
                            "service": f"{release}-kuberank-serve-metrics",
                            "track": track,
                        },
                    }
                )
        config = {
            "global": {"scrape_interval": "500ms", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "kuberank", "scrape_timeout": "450ms", "static_configs": targets}
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "prometheus.log", "w"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 60
        # ready, and samples cover the whole analysis window of every track of every release
        probe = f'count(count_over_time(kuberank_requests_total{{status="200"}}[{WINDOW}]) >= 9)'
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                result = _get_json(
                    f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": probe})
                )["data"]["result"]
                if result and int(float(result[0]["value"][1])) == 2 * len(RELEASES):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not get the exporters' data in 60 s"
            time.sleep(0.5)
        yield url
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for exp in exporters:
            exp.stop()


E2E = ["--interval", "1", "--window", WINDOW]


def test_queries_return_the_exporters_numbers(prometheus):
    prom = kc.Prometheus(prometheus)
    good = 'namespace="kuberank",service="good-kuberank-serve-metrics"'
    m = prom.metrics(good, "canary", WINDOW)
    assert m.request_rate == pytest.approx(50.0, rel=0.15)
    assert m.error_rate == pytest.approx(0.001, rel=0.15)
    assert 0.09 < m.p99_seconds < 0.1
    bad = prom.metrics(
        'namespace="kuberank",service="bad-kuberank-serve-metrics"', "canary", WINDOW
    )
    assert bad.error_rate == pytest.approx(0.2, rel=0.1)
    slow = prom.metrics(
        'namespace="kuberank",service="slow-kuberank-serve-metrics"', "canary", WINDOW
    )
    assert slow.p99_seconds > 2.0 and slow.error_rate == 0.0  # `or vector(0)`: no 5xx series is 0%
    nobody = prom.metrics('namespace="kuberank",service="nobody"', "canary", WINDOW)
    assert nobody == kc.Metrics(None, None, None)


def test_healthy_canary_is_stepped_up_and_promoted(prometheus, tmp_path, capsys):
    manifests = write_manifests(tmp_path / "good.yaml", release="good")
    code = kc.main(
        [
            "canary",
            "start",
            "-f",
            str(manifests),
            "--weight",
            "10",
            "--steps",
            "10,50,100",
            "--prometheus-url",
            prometheus,
            *E2E,
        ]
    )
    log = capsys.readouterr().err
    assert code == 0, log
    route = route_in(manifests)
    assert weights(route) == {"good-kuberank-serve-svc": 0, "good-kuberank-canary-serve-svc": 100}
    assert route["metadata"]["annotations"][kc.ANN_PHASE] == "Promoted"
    assert (
        "at 10% -> step 50%" in log
        and "at 50% -> step 100%" in log
        and "at 100% -> promote 100%" in log
    )


def test_failing_canary_is_rolled_back(prometheus, tmp_path, capsys):
    manifests = write_manifests(tmp_path / "bad.yaml", release="bad")
    code = kc.main(
        [
            "canary",
            "start",
            "-f",
            str(manifests),
            "--weight",
            "10",
            "--prometheus-url",
            prometheus,
            *E2E,
        ]
    )
    log = capsys.readouterr().err
    assert code == 1, log
    route = route_in(manifests)
    assert weights(route) == {"bad-kuberank-serve-svc": 100, "bad-kuberank-canary-serve-svc": 0}
    ann = route["metadata"]["annotations"]
    assert ann[kc.ANN_PHASE] == "RolledBack"
    assert "canary error rate 20" in ann[kc.ANN_REASON]
    assert "at 10% -> rollback 0%" in log


def test_slow_canary_is_rolled_back_on_latency(prometheus, tmp_path, capsys):
    manifests = write_manifests(tmp_path / "slow.yaml", release="slow")
    assert kc.main(["canary", "start", "-f", str(manifests), "--weight", "25", "--no-wait"]) == 0
    # the step-by-step mode (e.g. a CronJob): analyze, then analyze --apply
    assert (
        kc.main(
            [
                "canary",
                "analyze",
                "-f",
                str(manifests),
                "--prometheus-url",
                prometheus,
                "--window",
                WINDOW,
                "-o",
                "json",
            ]
        )
        == 1
    )
    report = json.loads(capsys.readouterr().out)
    assert report["decision"]["action"] == "rollback"
    assert report["canary"]["p99_seconds"] > 2.0 and report["stable"]["p99_seconds"] < 0.1
    assert weights(route_in(manifests))["slow-kuberank-canary-serve-svc"] == 25  # not applied yet
    assert (
        kc.main(
            [
                "canary",
                "analyze",
                "-f",
                str(manifests),
                "--prometheus-url",
                prometheus,
                "--window",
                WINDOW,
                "--apply",
            ]
        )
        == 1
    )
    route = route_in(manifests)
    assert weights(route) == {"slow-kuberank-serve-svc": 100, "slow-kuberank-canary-serve-svc": 0}
    assert "p99" in route["metadata"]["annotations"][kc.ANN_REASON]


def test_canary_without_metrics_is_rolled_back_after_inconclusive_analyses(
    prometheus, tmp_path, capsys
):
    manifests = write_manifests(
        tmp_path / "nobody.yaml", release="nobody"
    )  # no exporter has its labels
    code = kc.main(
        [
            "canary",
            "start",
            "-f",
            str(manifests),
            "--weight",
            "10",
            "--prometheus-url",
            prometheus,
            "--interval",
            "0.2",
            "--window",
            WINDOW,
            "--max-inconclusive",
            "2",
        ]
    )
    assert code == 1
    route = route_in(manifests)
    assert weights(route)["nobody-kuberank-canary-serve-svc"] == 0
    assert route["metadata"]["annotations"][kc.ANN_REASON].startswith("no verdict after 2 analyses")
    assert capsys.readouterr().err.count("-> wait") == 2


# --- cluster mode through real kubectl against a minimal loopback API endpoint ----------------


def _merge_patch(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


class TinyAPIServer:
    """Just enough of the Kubernetes API for `kubectl get/patch httproutes...`: legacy discovery
    and GET/PATCH (merge patch) of HTTPRoutes kept in memory. Not a Kubernetes API server: it
    stands in for the cluster so that the plugin's real kubectl invocations can be observed."""

    GROUP = "gateway.networking.k8s.io"

    def __init__(self, routes: list[dict]):
        self.routes = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in routes}
        self.requests: list[tuple[str, str, str]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route_key(self):
                parts = urllib.parse.urlparse(self.path).path.strip("/").split("/")
                # apis/<group>/v1/namespaces/<ns>/httproutes/<name>
                if (
                    len(parts) == 7
                    and parts[:3] == ["apis", api.GROUP, "v1"]
                    and parts[5] == "httproutes"
                ):
                    return parts[4], parts[6]
                return None

            def do_GET(self):  # noqa: N802
                path = urllib.parse.urlparse(self.path).path.rstrip("/")
                api.requests.append(("GET", path, ""))
                if path == "/api":
                    return self._send(
                        200,
                        {
                            "kind": "APIVersions",
                            "versions": ["v1"],
                            "serverAddressByClientCIDRs": [],
                        },
                    )
                if path == "/apis":
                    gv = {"groupVersion": f"{api.GROUP}/v1", "version": "v1"}
                    return self._send(
                        200,
                        {
                            "kind": "APIGroupList",
                            "apiVersion": "v1",
                            "groups": [
                                {"name": api.GROUP, "versions": [gv], "preferredVersion": gv}
                            ],
                        },
                    )
                if path == "/api/v1":
                    return self._send(
                        200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": []}
                    )
                if path == f"/apis/{api.GROUP}/v1":
                    return self._send(
                        200,
                        {
                            "kind": "APIResourceList",
                            "apiVersion": "v1",
                            "groupVersion": f"{api.GROUP}/v1",
                            "resources": [
                                {
                                    "name": "httproutes",
                                    "singularName": "httproute",
                                    "namespaced": True,
                                    "kind": "HTTPRoute",
                                    "verbs": ["get", "list", "patch", "update", "watch"],
                                }
                            ],
                        },
                    )
                key = self._route_key()
                if key in api.routes:
                    return self._send(200, api.routes[key])
                return self._send(
                    404,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "reason": "NotFound",
                        "code": 404,
                        "message": f"{path} not found",
                    },
                )

            def do_PATCH(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                ctype = self.headers.get("Content-Type", "")
                api.requests.append(("PATCH", urllib.parse.urlparse(self.path).path, ctype))
                key = self._route_key()
                if key not in api.routes or ctype != "application/merge-patch+json":
                    return self._send(
                        415,
                        {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "status": "Failure",
                            "code": 415,
                            "message": f"unsupported {ctype}",
                        },
                    )
                api.routes[key] = _merge_patch(api.routes[key], json.loads(body))
                return self._send(200, api.routes[key])

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def test_cluster_mode_gets_and_merge_patches_the_route_through_kubectl(tmp_path, capsys):
    route = next(o for o in rendered_objects() if o["kind"] == "HTTPRoute")
    api = TinyAPIServer([route])
    try:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "test",
                    "clusters": [{"name": "test", "cluster": {"server": api.url}}],
                    "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
                    "contexts": [
                        {
                            "name": "test",
                            "context": {"cluster": "test", "user": "u", "namespace": "default"},
                        }
                    ],
                }
            )
        )
        base = ["--kubeconfig", str(kubeconfig), "--context", "test", "-n", "kuberank"]
        assert kc.main([*base, "canary", "start", "--weight", "30", "--no-wait"]) == 0
        live = api.routes[("kuberank", "kuberank")]
        assert weights(live) == {"kuberank-serve-svc": 70, "kuberank-canary-serve-svc": 30}
        assert live["metadata"]["annotations"][kc.ANN_PHASE] == "Progressing"
        assert live["metadata"]["annotations"][kc.ANN_STABLE] == "kuberank-serve-svc"
        assert kc.main([*base, "canary", "rollback"]) == 0
        assert weights(api.routes[("kuberank", "kuberank")])["kuberank-canary-serve-svc"] == 0
        capsys.readouterr()
        assert kc.main([*base, "canary", "status", "-o", "json"]) == 0
        assert json.loads(capsys.readouterr().out)["phase"] == "RolledBack"
        path = f"/apis/{TinyAPIServer.GROUP}/v1/namespaces/kuberank/httproutes/kuberank"
        patches = [r for r in api.requests if r[0] == "PATCH"]
        assert patches == [("PATCH", path, "application/merge-patch+json")] * 2
        assert ("GET", path, "") in api.requests
        # the wrong namespace is an error that names the route
        assert kc.main(["--kubeconfig", str(kubeconfig), "canary", "status"]) == 2
        assert "not found" in capsys.readouterr().err.lower()
    finally:
        api.stop()


def test_kubectl_finds_and_runs_the_plugin(tmp_path):
    """`kubectl kuberank ...` through kubectl's plugin mechanism, with a console-script shim
    like the one pip generates for the `kubectl-kuberank` entry point."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "kubectl-kuberank"
    shim.write_text(
        f"#!{sys.executable}\nimport sys\nfrom kuberank.deploy.canary import main\nsys.exit(main())\n"
    )
    shim.chmod(0o755)
    manifests = write_manifests(tmp_path / "all.yaml")
    env = {**os.environ, "PATH": f"{bindir}:/usr/bin:/bin"}
    kubectl = kc.find_kubectl()
    listed = subprocess.run(
        [kubectl, "plugin", "list"], capture_output=True, text=True, env=env, timeout=60
    )
    assert str(shim) in listed.stdout
    proc = subprocess.run(
        [kubectl, "kuberank", "canary", "status", "-f", str(manifests), "-o", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["canaryWeight"] == 10
