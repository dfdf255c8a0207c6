"""kubectl-kuberank: canary rollouts of kuberank through Gateway API HTTPRoute weights.

Installed as the console script ``kubectl-kuberank``, so ``kubectl kuberank ...`` finds it::

    kubectl kuberank -n kuberank canary start --weight 10 --prometheus-url http://prometheus:9090
    kubectl kuberank -n kuberank canary status
    kubectl kuberank -n kuberank canary analyze [--apply]
    kubectl kuberank -n kuberank canary promote | rollback

The chart's HTTPRoute carries two backends, the stable and the canary RayService's serve
Services, named by the route's annotations ``kuberank.io/stable-backend`` and
``kuberank.io/canary-backend``. ``canary start`` sets the canary's weight, then walks the
steps (default 10, 25, 50, 100): after each step it waits ``--interval`` seconds, queries
Prometheus for both tracks' error rate and p99 latency over ``--window`` and either moves to
the next step, promotes (canary at 100%), or rolls back (canary at 0%) on its own. The
decision is the pure function :func:`decide`.

Metrics are selected by the ``track`` label (``stable`` / ``canary``), which the chart's
ServiceMonitors copy from the pods' ``kuberank.io/track`` label, plus the matchers in the
route's ``kuberank.io/metrics-selector`` annotation (namespace and service).

State lives on the route itself (annotations ``kuberank.io/canary-phase``, ``-steps``,
``-reason``, ``-updated``), so any machine with the kubeconfig can resume or inspect a rollout.
Every change is one JSON merge patch of the HTTPRoute; ``--dry-run`` prints it instead of
applying it (for GitOps repositories). Cluster access goes through ``kubectl`` with the usual
``--kubeconfig`` / ``--context`` / ``--namespace``; ``--file`` works on a manifest file instead
(``kubectl patch --local``), e.g. the rendered chart in a GitOps repository.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ANN_STABLE = "kuberank.io/stable-backend"
ANN_CANARY = "kuberank.io/canary-backend"
ANN_SELECTOR = "kuberank.io/metrics-selector"
ANN_PHASE = "kuberank.io/canary-phase"
ANN_STEPS = "kuberank.io/canary-steps"
ANN_REASON = "kuberank.io/canary-reason"
ANN_UPDATED = "kuberank.io/canary-updated"

IDLE, PROGRESSING, PROMOTED, ROLLED_BACK = "Idle", "Progressing", "Promoted", "RolledBack"
PROMOTE, STEP, ROLLBACK, WAIT = "promote", "step", "rollback", "wait"
DEFAULT_STEPS = (10, 25, 50, 100)
ROUTE_RESOURCE = "httproutes.gateway.networking.k8s.io"


class CanaryError(RuntimeError):
    """A user-facing failure; main() prints it and exits with status 2."""


# --- decision (pure) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Metrics:
    """One track's traffic over the analysis window (None: no data)."""

    request_rate: float | None  # requests per second
    error_rate: float | None  # fraction of responses with a 5xx status
    p99_seconds: float | None  # 99th percentile request latency


@dataclass(frozen=True)
class Thresholds:
    max_error_rate: float = 0.01  # absolute ceiling for the canary's 5xx ratio
    max_error_rate_increase: float = 0.005  # allowed excess over the stable's 5xx ratio
    max_p99_seconds: float = 0.5  # absolute ceiling for the canary's p99
    max_p99_ratio: float = 1.25  # allowed canary p99 / stable p99 ...
    p99_tolerance_seconds: float = 0.010  # ... plus this slack (noise at tiny latencies)
    min_request_rate: float = 0.1  # below this the canary's numbers mean nothing


@dataclass(frozen=True)
class Decision:
    action: str  # promote | step | rollback | wait
    weight: int  # the canary weight after the decision
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {"action": self.action, "weight": self.weight, "reasons": list(self.reasons)}


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    if unit == "%":
        return f"{x * 100:.2f}%"
    if unit == "s":
        return f"{x * 1000:.1f}ms"
    return f"{x:.3g}"


def normalise_steps(steps: Sequence[int]) -> tuple[int, ...]:
    """Strictly increasing weights in 1..100, ending at 100."""
    out = sorted({int(s) for s in steps})
    if not out or out[0] < 1 or out[-1] > 100:
        raise CanaryError(f"--steps must be weights between 1 and 100, got {list(steps)}")
    if out[-1] != 100:
        out.append(100)
    return tuple(out)


def next_weight(current: int, steps: Sequence[int]) -> int | None:
    """The first step above ``current``; None when the canary already takes 100%."""
    return next((s for s in normalise_steps(steps) if s > current), None)


def decide(
    canary: Metrics,
    stable: Metrics,
    current_weight: int,
    steps: Sequence[int] = DEFAULT_STEPS,
    thresholds: Thresholds = Thresholds(),
) -> Decision:
    """Metrics in, decision out: roll back an unhealthy canary, otherwise go one step further
    (promote after the last step); wait when the canary has too little traffic to judge."""
    t = thresholds
    if canary.request_rate is None or canary.request_rate < t.min_request_rate:
        return Decision(
            WAIT,
            current_weight,
            (
                f"canary traffic {_fmt(canary.request_rate)} req/s is below {t.min_request_rate} req/s",
            ),
        )
    failures: list[str] = []
    err = canary.error_rate if canary.error_rate is not None else 0.0
    if err > t.max_error_rate:
        failures.append(f"canary error rate {_fmt(err, '%')} > {_fmt(t.max_error_rate, '%')}")
    if stable.error_rate is not None and err > stable.error_rate + t.max_error_rate_increase:
        failures.append(
            f"canary error rate {_fmt(err, '%')} exceeds stable {_fmt(stable.error_rate, '%')} "
            f"by more than {_fmt(t.max_error_rate_increase, '%')}"
        )
    if canary.p99_seconds is None:
        return Decision(WAIT, current_weight, ("no canary latency samples yet",))
    if canary.p99_seconds > t.max_p99_seconds:
        failures.append(
            f"canary p99 {_fmt(canary.p99_seconds, 's')} > {_fmt(t.max_p99_seconds, 's')}"
        )
    if stable.p99_seconds is not None:
        limit = stable.p99_seconds * t.max_p99_ratio + t.p99_tolerance_seconds
        if canary.p99_seconds > limit:
            failures.append(
                f"canary p99 {_fmt(canary.p99_seconds, 's')} > {t.max_p99_ratio} x stable "
                f"{_fmt(stable.p99_seconds, 's')} + {_fmt(t.p99_tolerance_seconds, 's')}"
            )
    if failures:
        return Decision(ROLLBACK, 0, tuple(failures))
    healthy = (
        f"canary healthy: error rate {_fmt(err, '%')} (stable {_fmt(stable.error_rate, '%')}), "
        f"p99 {_fmt(canary.p99_seconds, 's')} (stable {_fmt(stable.p99_seconds, 's')})"
    )
    nxt = next_weight(current_weight, steps)
    if nxt is None:
        return Decision(PROMOTE, 100, (healthy,))
    return Decision(STEP, nxt, (healthy,))


# --- Prometheus ---------------------------------------------------------------------------------


def track_queries(selector: str, track: str, window: str) -> dict[str, str]:
    """PromQL for one track: request rate, 5xx ratio, p99 latency."""
    sel = ",".join(s for s in (selector.strip().strip(","), f'track="{track}"') if s)
    total = f"sum(rate(kuberank_requests_total{{{sel}}}[{window}]))"
    errors = f'sum(rate(kuberank_requests_total{{{sel},status=~"5.."}}[{window}]))'
    return {
        "request_rate": total,
        "error_rate": f"({errors} or vector(0)) / {total}",
        "p99_seconds": (
            "histogram_quantile(0.99, sum by (le) "
            f"(rate(kuberank_request_latency_seconds_bucket{{{sel}}}[{window}])))"
        ),
    }


class Prometheus:
    def __init__(self, url: str, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def query(self, promql: str) -> float | None:
        """An instant query returning one number (None for an empty result or NaN)."""
        endpoint = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(endpoint, timeout=self.timeout) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise CanaryError(f"Prometheus at {self.url} rejected {promql!r}: {detail}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise CanaryError(f"cannot query Prometheus at {self.url}: {exc}") from exc
        if body.get("status") != "success":
            raise CanaryError(f"Prometheus query failed: {body.get('error', body)}")
        result = body["data"]["result"]
        if not result:
            return None
        if len(result) > 1:
            raise CanaryError(f"query returned {len(result)} series, expected one: {promql}")
        value = float(result[0]["value"][1])
        return None if math.isnan(value) or math.isinf(value) else value

    def metrics(self, selector: str, track: str, window: str) -> Metrics:
        values = {k: self.query(q) for k, q in track_queries(selector, track, window).items()}
        return Metrics(**values)


# --- the HTTPRoute ----------------------------------------------------------------------------


def _annotations(route: dict[str, Any]) -> dict[str, str]:
    return route.get("metadata", {}).get("annotations") or {}


def backends(route: dict[str, Any]) -> tuple[str, str]:
    ann = _annotations(route)
    name = route.get("metadata", {}).get("name")
    stable, canary = ann.get(ANN_STABLE), ann.get(ANN_CANARY)
    if not stable:
        raise CanaryError(
            f"HTTPRoute {name} has no {ANN_STABLE} annotation (not rendered by the kuberank chart?)"
        )
    if not canary:
        raise CanaryError(
            f"HTTPRoute {name} has no {ANN_CANARY} annotation: deploy the canary track first "
            "(helm upgrade ... --set canary.enabled=true)"
        )
    return stable, canary


def current_weight(route: dict[str, Any]) -> int:
    """The canary's share in percent (from the first rule that routes to both backends)."""
    stable, canary = backends(route)
    for rule in route.get("spec", {}).get("rules", []):
        refs = {r["name"]: r.get("weight", 1) for r in rule.get("backendRefs", [])}
        if stable in refs and canary in refs:
            total = refs[stable] + refs[canary]
            return 0 if total == 0 else round(100 * refs[canary] / total)
    raise CanaryError(
        f"HTTPRoute {route['metadata']['name']}: no rule has both backends {stable} and {canary}"
    )


def phase(route: dict[str, Any]) -> str:
    return _annotations(route).get(ANN_PHASE, IDLE)


def route_steps(route: dict[str, Any]) -> tuple[int, ...]:
    raw = _annotations(route).get(ANN_STEPS)
    return normalise_steps([int(s) for s in raw.split(",")]) if raw else DEFAULT_STEPS


def weights_patch(
    route: dict[str, Any],
    weight: int,
    new_phase: str,
    reason: str,
    steps: Sequence[int] | None = None,
    now: str | None = None,
) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that gives the canary ``weight`` percent.

    A merge patch replaces lists wholesale, so the patch carries every rule; only the weights
    of the two kuberank backends change."""
    if not 0 <= weight <= 100:
        raise CanaryError(f"--weight must be between 0 and 100, got {weight}")
    stable, canary = backends(route)
    rules = json.loads(json.dumps(route["spec"]["rules"]))
    touched = False
    for rule in rules:
        names = {r["name"] for r in rule.get("backendRefs", [])}
        if {stable, canary} <= names:
            touched = True
            for ref in rule["backendRefs"]:
                if ref["name"] == stable:
                    ref["weight"] = 100 - weight
                elif ref["name"] == canary:
                    ref["weight"] = weight
    if not touched:
        raise CanaryError(
            f"HTTPRoute {route['metadata']['name']}: no rule has both backends {stable} and {canary}"
        )
    annotations = {
        ANN_PHASE: new_phase,
        ANN_REASON: reason[:1000],
        ANN_UPDATED: now or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if steps is not None:
        annotations[ANN_STEPS] = ",".join(str(s) for s in steps)
    return {"metadata": {"annotations": annotations}, "spec": {"rules": rules}}


# --- cluster access through kubectl -------------------------------------------------------------


def find_kubectl(explicit: str | None = None) -> str:
    candidates = [
        explicit,
        os.environ.get("KUBECTL"),
        shutil.which("kubectl"),
        str(Path(sys.executable).with_name("kubectl")),
    ]
    for c in candidates:
        if c and (shutil.which(c) or Path(c).is_file()):
            return c
    raise CanaryError("kubectl not found: install it or pass --kubectl PATH")


class RouteStore:
    """Reads and patches one HTTPRoute, in a cluster (kubectl get/patch) or in a manifest file
    (kubectl patch --local)."""

    def __init__(
        self,
        route: str | None,
        *,
        kubectl: str,
        kubeconfig: str | None = None,
        context: str | None = None,
        namespace: str | None = None,
        file: str | None = None,
        request_timeout: str = "30s",
    ):
        self.name = route
        self.kubectl = kubectl
        self.file = Path(file) if file else None
        self.flags: list[str] = []
        if kubeconfig:
            self.flags += ["--kubeconfig", kubeconfig]
        if context:
            self.flags += ["--context", context]
        if namespace:
            self.flags += ["--namespace", namespace]
        self.request_timeout = request_timeout
        if self.file is None and not self.name:
            self.name = "kuberank"

    def describe(self) -> str:
        where = f"file {self.file}" if self.file else "cluster"
        return f"HTTPRoute {self.name or '<the only one>'} ({where})"

    def _run(self, args: list[str], stdin: str | None = None) -> str:
        cmd = [self.kubectl, *args]
        try:
            proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CanaryError(f"kubectl failed to run: {exc}") from exc
        if proc.returncode != 0:
            raise CanaryError(
                f"{' '.join(args[:2])} failed: {proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc.stdout

    # file mode
    def _file_docs(self) -> list[Any]:
        assert self.file is not None
        try:
            return list(yaml.safe_load_all(self.file.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            raise CanaryError(f"cannot read {self.file}: {exc}") from exc

    def _file_index(self, docs: list[Any]) -> int:
        hits = [
            i
            for i, d in enumerate(docs)
            if isinstance(d, dict)
            and d.get("kind") == "HTTPRoute"
            and (self.name is None or d.get("metadata", {}).get("name") == self.name)
        ]
        if len(hits) != 1:
            what = f"named {self.name}" if self.name else "(pass --route NAME)"
            raise CanaryError(f"{self.file}: expected one HTTPRoute {what}, found {len(hits)}")
        return hits[0]

    def get(self) -> dict[str, Any]:
        if self.file is not None:
            docs = self._file_docs()
            route = docs[self._file_index(docs)]
            self.name = route["metadata"]["name"]
            return route
        out = self._run(
            [
                "get",
                ROUTE_RESOURCE,
                self.name,
                "-o",
                "json",
                f"--request-timeout={self.request_timeout}",
                *self.flags,
            ]
        )
        return json.loads(out)

    def patch(self, patch: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps(patch, separators=(",", ":"))
        if self.file is None:
            out = self._run(
                [
                    "patch",
                    ROUTE_RESOURCE,
                    self.name,
                    "--type",
                    "merge",
                    "-p",
                    body,
                    "-o",
                    "json",
                    f"--request-timeout={self.request_timeout}",
                    *self.flags,
                ]
            )
            return json.loads(out)
        docs = self._file_docs()
        index = self._file_index(docs)
        with tempfile.TemporaryDirectory(prefix="kuberank-canary-") as tmp:
            single = Path(tmp) / "route.json"
            single.write_text(json.dumps(docs[index]))
            out = self._run(
                ["patch", "--local", "-f", str(single), "--type", "merge", "-p", body, "-o", "json"]
            )
        patched = json.loads(out)
        docs[index] = patched
        text = yaml.safe_dump_all(docs, sort_keys=False)
        tmp_path = self.file.with_name(f".{self.file.name}.tmp")
        tmp_path.write_text(text)
        tmp_path.replace(self.file)  # atomic: a reader sees the old or the new file
        return patched


# --- the state machine --------------------------------------------------------------------------


@dataclass
class Rollout:
    store: RouteStore
    prometheus: Prometheus | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    window: str = "5m"
    selector: str | None = None
    dry_run: bool = False
    out: Callable[[str], None] = print
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)

    def _apply(self, route: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        if self.dry_run:
            self.log(
                f"# dry run: merge patch for {self.store.describe()} (kubectl patch --type merge -p ...)"
            )
            self.out(json.dumps(patch, indent=2))
            merged = json.loads(json.dumps(route))
            merged.setdefault("metadata", {}).setdefault("annotations", {}).update(
                patch["metadata"]["annotations"]
            )
            merged["spec"]["rules"] = patch["spec"]["rules"]
            return merged
        return self.store.patch(patch)

    def set_weight(
        self, weight: int, new_phase: str, reason: str, steps: Sequence[int] | None = None
    ) -> dict[str, Any]:
        route = self.store.get()
        return self._apply(route, weights_patch(route, weight, new_phase, reason, steps))

    def start(self, weight: int, steps: Sequence[int], force: bool = False) -> dict[str, Any]:
        route = self.store.get()
        current = phase(route)
        if current == PROGRESSING and not force:
            raise CanaryError(
                f"a canary is already progressing at {current_weight(route)}% on HTTPRoute "
                f"{route['metadata']['name']}: promote or roll it back first, or pass --force"
            )
        if not 1 <= weight <= 100:
            raise CanaryError(f"--weight must be between 1 and 100, got {weight}")
        steps = normalise_steps([*steps, weight])
        steps = tuple(s for s in steps if s >= weight)
        patch = weights_patch(route, weight, PROGRESSING, f"started at {weight}%", steps)
        self.log(
            f"canary: {self.store.describe()} -> {weight}% (steps {','.join(map(str, steps))})"
        )
        return self._apply(route, patch)

    def selector_for(self, route: dict[str, Any]) -> str:
        if self.selector is not None:
            return self.selector
        return _annotations(route).get(ANN_SELECTOR, "")

    def analyze(self, route: dict[str, Any] | None = None) -> tuple[Decision, Metrics, Metrics]:
        if self.prometheus is None:
            raise CanaryError("analysis needs --prometheus-url (or KUBERANK_PROMETHEUS_URL)")
        route = route or self.store.get()
        sel = self.selector_for(route)
        canary = self.prometheus.metrics(sel, "canary", self.window)
        stable = self.prometheus.metrics(sel, "stable", self.window)
        decision = decide(
            canary, stable, current_weight(route), route_steps(route), self.thresholds
        )
        return decision, canary, stable

    def apply_decision(self, route: dict[str, Any], decision: Decision) -> dict[str, Any]:
        reason = "; ".join(decision.reasons)
        if decision.action == ROLLBACK:
            return self._apply(route, weights_patch(route, 0, ROLLED_BACK, reason))
        if decision.action == PROMOTE:
            return self._apply(route, weights_patch(route, 100, PROMOTED, reason))
        if decision.action == STEP:
            return self._apply(route, weights_patch(route, decision.weight, PROGRESSING, reason))
        return route

    def run(
        self, interval: float, max_inconclusive: int, sleep: Callable[[float], None] = time.sleep
    ) -> str:
        """Analyse every ``interval`` seconds and act until the canary is promoted or rolled back.
        Returns the final phase."""
        waits = 0
        while True:
            sleep(interval)
            route = self.store.get()
            if phase(route) != PROGRESSING:
                self.log(f"canary: phase is {phase(route)} (changed elsewhere); stopping")
                return phase(route)
            decision, canary, stable = self.analyze(route)
            self.log(
                f"canary: at {current_weight(route)}% -> {decision.action}"
                f"{'' if decision.action == WAIT else f' {decision.weight}%'}: {'; '.join(decision.reasons)}"
            )
            if decision.action == WAIT:
                waits += 1
                if waits >= max_inconclusive:
                    reason = f"no verdict after {waits} analyses: {'; '.join(decision.reasons)}"
                    self._apply(route, weights_patch(route, 0, ROLLED_BACK, reason))
                    return ROLLED_BACK
                continue
            waits = 0
            new = self.apply_decision(route, decision)
            if phase(new) in (PROMOTED, ROLLED_BACK):
                return phase(new)


# --- CLI ---------------------------------------------------------------------------------------


def _status_dict(route: dict[str, Any]) -> dict[str, Any]:
    ann = _annotations(route)
    stable, canary = backends(route)
    return {
        "route": route["metadata"]["name"],
        "namespace": route["metadata"].get("namespace"),
        "stable": stable,
        "canary": canary,
        "canaryWeight": current_weight(route),
        "phase": ann.get(ANN_PHASE, IDLE),
        "steps": list(route_steps(route)),
        "reason": ann.get(ANN_REASON, ""),
        "updated": ann.get(ANN_UPDATED, ""),
        "metricsSelector": ann.get(ANN_SELECTOR, ""),
    }


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g = parser.add_argument_group("cluster access")
    g.add_argument(
        "--kubeconfig",
        default=d(None),
        help="kubeconfig file (default: kubectl's: $KUBECONFIG or ~/.kube/config)",
    )
    g.add_argument("--context", default=d(None), help="kubeconfig context")
    g.add_argument("-n", "--namespace", default=d(None), help="namespace of the HTTPRoute")
    g.add_argument(
        "--route",
        default=d(None),
        help="HTTPRoute name (default: kuberank; with --file, the only HTTPRoute in it)",
    )
    g.add_argument(
        "-f",
        "--file",
        default=d(None),
        help="work on a manifest file instead of the cluster (kubectl patch --local; the file is rewritten)",
    )
    g.add_argument(
        "--kubectl",
        default=d(None),
        help="kubectl binary (default: $KUBECTL, PATH, next to python)",
    )
    g.add_argument(
        "--dry-run",
        action="store_true",
        default=d(False),
        help="print each JSON merge patch instead of applying it",
    )


def _analysis_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("analysis")
    g.add_argument(
        "--prometheus-url",
        default=os.environ.get("KUBERANK_PROMETHEUS_URL"),
        help="Prometheus base URL (default: $KUBERANK_PROMETHEUS_URL)",
    )
    g.add_argument("--window", default="5m", help="PromQL range for rates and p99 (default 5m)")
    g.add_argument(
        "--selector",
        default=None,
        help="extra PromQL label matchers, e.g. 'namespace=\"kuberank\"' (default: the route's "
        f"{ANN_SELECTOR} annotation)",
    )
    t = Thresholds()
    g.add_argument(
        "--max-error-rate",
        type=float,
        default=t.max_error_rate,
        help=f"canary 5xx ratio ceiling (default {t.max_error_rate})",
    )
    g.add_argument(
        "--max-error-rate-increase",
        type=float,
        default=t.max_error_rate_increase,
        help=f"allowed 5xx ratio above the stable's (default {t.max_error_rate_increase})",
    )
    g.add_argument(
        "--max-p99",
        type=float,
        default=t.max_p99_seconds,
        help=f"canary p99 ceiling in seconds (default {t.max_p99_seconds})",
    )
    g.add_argument(
        "--max-p99-ratio",
        type=float,
        default=t.max_p99_ratio,
        help=f"allowed canary/stable p99 ratio (default {t.max_p99_ratio})",
    )
    g.add_argument(
        "--p99-tolerance",
        type=float,
        default=t.p99_tolerance_seconds,
        help=f"seconds of p99 slack on top of the ratio (default {t.p99_tolerance_seconds})",
    )
    g.add_argument(
        "--min-request-rate",
        type=float,
        default=t.min_request_rate,
        help=f"canary req/s needed for a verdict (default {t.min_request_rate})",
    )


def _steps(text: str) -> tuple[int, ...]:
    try:
        return normalise_steps([int(s) for s in text.split(",") if s.strip()])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--steps wants comma-separated integers, got {text!r}"
        ) from exc
    except CanaryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl kuberank",
        description="Canary rollouts of kuberank: shift the HTTPRoute's stable/canary weights "
        "with automated Prometheus analysis.",
    )
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="group", required=True, metavar="{canary}")
    canary = sub.add_parser(
        "canary", help="canary rollouts", description="Canary rollouts on the kuberank HTTPRoute."
    )
    _common(canary, suppress=True)
    cmds = canary.add_subparsers(
        dest="command", required=True, metavar="{start,status,analyze,promote,rollback}"
    )

    start = cmds.add_parser(
        "start",
        help="send --weight %% to the canary, then step up with analysis",
        description="Set the canary's weight, then (unless --no-wait) analyse every "
        "--interval seconds and step up, promote, or roll back automatically.",
    )
    _common(start, suppress=True)
    start.add_argument(
        "--weight", type=int, required=True, help="first canary weight in percent (1-100)"
    )
    start.add_argument(
        "--steps",
        type=_steps,
        default=DEFAULT_STEPS,
        help="weights to walk through, comma-separated (default 10,25,50,100)",
    )
    start.add_argument(
        "--interval", type=float, default=300.0, help="seconds between analyses (default 300)"
    )
    start.add_argument(
        "--max-inconclusive",
        type=int,
        default=6,
        help="roll back after this many analyses in a row without a verdict (default 6)",
    )
    start.add_argument(
        "--no-wait",
        action="store_true",
        help="only set the first weight; drive the rest with `analyze --apply` (e.g. from a CronJob)",
    )
    start.add_argument(
        "--force", action="store_true", help="restart even if a canary is progressing"
    )
    _analysis_args(start)

    status = cmds.add_parser(
        "status",
        help="show weights and rollout phase",
        description="Show the route's weights and rollout state.",
    )
    _common(status, suppress=True)
    status.add_argument("-o", "--output", choices=["text", "json"], default="text")

    analyze = cmds.add_parser(
        "analyze",
        help="query Prometheus and print the decision",
        description="Compare the canary's and the stable's error rate and p99 latency "
        "and print the decision (promote / step / rollback / wait); --apply acts on it.",
    )
    _common(analyze, suppress=True)
    analyze.add_argument("--apply", action="store_true", help="apply the decision to the route")
    analyze.add_argument("-o", "--output", choices=["text", "json"], default="text")
    _analysis_args(analyze)

    promote = cmds.add_parser(
        "promote",
        help="send 100%% to the canary now",
        description="Send all traffic to the canary (no analysis).",
    )
    _common(promote, suppress=True)
    rollback = cmds.add_parser(
        "rollback",
        help="send 100%% to the stable now",
        description="Send all traffic back to the stable track.",
    )
    _common(rollback, suppress=True)
    return parser


def _thresholds(args: argparse.Namespace) -> Thresholds:
    return Thresholds(
        max_error_rate=args.max_error_rate,
        max_error_rate_increase=args.max_error_rate_increase,
        max_p99_seconds=args.max_p99,
        max_p99_ratio=args.max_p99_ratio,
        p99_tolerance_seconds=args.p99_tolerance,
        min_request_rate=args.min_request_rate,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except CanaryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: the route keeps its current weights and phase; continue with "
            "`canary analyze --apply` or `canary start --force`, or undo with `canary rollback`",
            file=sys.stderr,
        )
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    store = RouteStore(
        args.route,
        kubectl=find_kubectl(args.kubectl),
        kubeconfig=args.kubeconfig,
        context=args.context,
        namespace=args.namespace,
        file=args.file,
    )
    rollout = Rollout(store, dry_run=args.dry_run)
    if hasattr(args, "prometheus_url"):
        rollout.prometheus = Prometheus(args.prometheus_url) if args.prometheus_url else None
        rollout.thresholds = _thresholds(args)
        rollout.window = args.window
        rollout.selector = args.selector

    if args.command == "status":
        info = _status_dict(store.get())
        if args.output == "json":
            print(json.dumps(info, indent=2))
        else:
            print(
                f"route   {info['namespace'] or '-'}/{info['route']}\nphase   {info['phase']}\n"
                f"weights stable {info['stable']} {100 - info['canaryWeight']}% | canary {info['canary']} "
                f"{info['canaryWeight']}%\nsteps   {','.join(map(str, info['steps']))}\n"
                f"reason  {info['reason'] or '-'}\nupdated {info['updated'] or '-'}"
            )
        return 0
    if args.command == "promote":
        rollout.set_weight(100, PROMOTED, "promoted by hand")
        print(
            "canary promoted: 100% of traffic on the canary"
            + (" (dry run)" if args.dry_run else "")
        )
        return 0
    if args.command == "rollback":
        rollout.set_weight(0, ROLLED_BACK, "rolled back by hand")
        print(
            "canary rolled back: 100% of traffic on the stable"
            + (" (dry run)" if args.dry_run else "")
        )
        return 0
    if args.command == "analyze":
        route = store.get()
        decision, canary, stable = rollout.analyze(route)
        if args.output == "json":
            print(
                json.dumps(
                    {
                        "decision": decision.as_dict(),
                        "canary": asdict(canary),
                        "stable": asdict(stable),
                    },
                    indent=2,
                )
            )
        else:
            print(
                f"decision {decision.action} -> canary {decision.weight}%\n"
                + "\n".join(f"  {r}" for r in decision.reasons)
            )
        if args.apply:
            if phase(route) != PROGRESSING:
                raise CanaryError(
                    f"--apply needs a progressing canary (phase is {phase(route)}); run `canary start`"
                )
            rollout.apply_decision(route, decision)
        return 1 if decision.action == ROLLBACK else 0
    if args.command == "start":
        if rollout.prometheus is None and not args.no_wait:
            raise CanaryError(
                "canary start analyses between steps: pass --prometheus-url (or --no-wait)"
            )
        rollout.start(args.weight, args.steps, force=args.force)
        if args.no_wait or args.dry_run:
            return 0
        final = rollout.run(args.interval, args.max_inconclusive)
        print(f"canary {final}: " + _status_dict(store.get())["reason"])
        return 0 if final == PROMOTED else 1
    raise CanaryError(f"unknown command {args.command}")  # pragma: no cover - argparse guards


if __name__ == "__main__":
    sys.exit(main())
