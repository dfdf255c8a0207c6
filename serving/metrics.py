"""Prometheus metrics of the ranking app, and a scraper for Triton's own metrics.

Names are a contract with the chart (PrometheusRule, Grafana dashboard) and the canary tooling
(kuberank/deploy/canary.py):

- ``kuberank_requests_total{route,status}``            counter, status = HTTP code
- ``kuberank_request_latency_seconds{route}``          histogram, buckets up to 2.5 s
- ``kuberank_stage_latency_seconds{stage}``            histogram, stage = the name of each stage of
  serving/stages.py's STAGES (encode|retrieve|rank) and its extras: lexical (BM25 + fusion of a
  bm25/hybrid /search, serving/hybrid.py; a part of retrieve)
- ``kuberank_batch_size{stage}``                       histogram, the batch each request ran in
- ``kuberank_queue_seconds{stage}``                    histogram, wait in a replica before its batch
- ``kuberank_errors_total{stage,kind}``                counter, failures per stage and cause
- ``kuberank_shed_total{reason}``                      counter, 503s of admission: reason =
  queue (estimated wait over the budget, at arrival) | expired (deadline passed while queued)
- ``kuberank_admitted_latency_seconds``                histogram, admitted requests, arrival to
  answer
- ``kuberank_encoder_fallback_total``                  counter, Triton failures served in process
- ``kuberank_model_info{version,fingerprint,kind}``    gauge = 1 for the model being served
- ``kuberank_policy_decisions_total{policy,action}``   counter, the serving policy's decisions
  (serving/policies.py DECISIONS): blocked_terms rejected|filtered (queries), blocked_items
  removed (blocked items that would have been candidates), caps displaced (items a cap moved
  out of the top k)

Every series also carries ``replica`` (the Ingress replica): Prometheus scrapes ``/metrics``
through the Serve proxy, which picks one replica per scrape, and per-replica series keep
``rate()`` correct when there are several.
"""

from __future__ import annotations

import os
import urllib.request

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kuberank.serving.admission import SHED_REASONS
from kuberank.serving.policies import DECISIONS

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class AppMetrics:
    """One registry per Ingress replica (never the process-global one: several apps in one
    test process must not collide)."""

    def __init__(self, replica: str | None = None):
        self.replica = replica or f"{os.getpid()}"
        self.registry = CollectorRegistry()
        self._children: dict = {}
        labels = ["replica"]
        self.requests = Counter(
            "kuberank_requests_total",
            "HTTP requests by route and status code",
            ["route", "status", *labels],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kuberank_request_latency_seconds",
            "Request latency in the app",
            ["route", *labels],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "kuberank_stage_latency_seconds",
            "Latency of a stage as the ingress sees it (call + queue + work)",
            ["stage", *labels],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "kuberank_batch_size",
            "Size of the batch each request ran in",
            ["stage", *labels],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue = Histogram(
            "kuberank_queue_seconds",
            "Time a request waited in a replica before its batch ran",
            ["stage", *labels],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "kuberank_errors_total",
            "Failures by stage and cause",
            ["stage", "kind", *labels],
            registry=self.registry,
        )
        self.shed_total = Counter(
            "kuberank_shed_total",
            "Requests answered 503 by admission, by reason (queue: estimated wait over the "
            "budget at arrival; expired: the deadline passed while queued)",
            ["reason", *labels],
            registry=self.registry,
        )
        self.admitted = Histogram(
            "kuberank_admitted_latency_seconds",
            "Latency of admitted requests from arrival to answer",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.fallback = Counter(
            "kuberank_encoder_fallback_total",
            "Query batches encoded in process because Triton failed",
            labels,
            registry=self.registry,
        )
        self.model = Gauge(
            "kuberank_model_info",
            "The model being served (value 1)",
            ["version", "fingerprint", "kind", *labels],
            registry=self.registry,
        )

        self.policy = Counter(
            "kuberank_policy_decisions_total",
            "Decisions of the serving policy, by policy and action",
            ["policy", "action", *labels],
            registry=self.registry,
        )

        for reason in SHED_REASONS:  # zero from the start, so rate() sees the first shed
            self._child(self.shed_total, reason)
        for policy, action in DECISIONS:
            self._child(self.policy, policy, action)

    def _child(self, metric, *labels: str):
        """``metric.labels(*labels, replica)``, memoised: the hot path observes about ten
        samples a request, and the label lookup costs as much as the observation."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels, self.replica)
        return child

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self._child(self.requests, route, str(status)).inc()
        self._child(self.latency, route).observe(seconds)

    def observe_stage(
        self,
        stage: str,
        seconds: float,
        batch_size: int | None = None,
        queue_s: float | None = None,
    ) -> None:
        self._child(self.stage, stage).observe(seconds)
        if batch_size is not None:
            self._child(self.batch, stage).observe(batch_size)
        if queue_s is not None:
            self._child(self.queue, stage).observe(max(0.0, queue_s))

    def error(self, stage: str, kind: str) -> None:
        self.errors.labels(stage, kind, self.replica).inc()

    def shed(self, reason: str) -> None:
        self._child(self.shed_total, reason).inc()

    def observe_admitted(self, seconds: float) -> None:
        self._child(self.admitted).observe(seconds)

    def encoder_fallbacks(self, count: int) -> None:
        if count:
            self.fallback.labels(self.replica).inc(count)

    def policy_decisions(self, decisions: dict | None) -> None:
        """Count ``{(policy, action): n}`` (serving/policies.py DECISIONS)."""
        for (policy, action), count in (decisions or {}).items():
            if count:
                self._child(self.policy, policy, action).inc(count)

    def set_model(self, version: str, fingerprint: str, kind: str) -> None:
        self.model.clear()
        self.model.labels(version, fingerprint, kind, self.replica).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


_REPLICA: AppMetrics | None = None


def replica_metrics() -> AppMetrics:
    """The metrics of this process's Ingress replica (created on first use)."""
    global _REPLICA
    if _REPLICA is None:
        _REPLICA = AppMetrics()
    return _REPLICA


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{label="v",...}': value} (labels sorted), for tests and the
    bench."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def metric_sum(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def scrape(url: str, timeout: float = 2.0) -> dict[str, float]:
    """Fetch and parse a Prometheus endpoint (loopback URLs only in tests and the bench)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return parse_metrics(resp.read().decode())


def triton_summary(samples: dict[str, float], model: str = "encoder") -> dict[str, float]:
    """Triton's own counters for ``model``: requests, executions (batches), average batch size,
    average queue time per request."""
    requests = metric_sum(samples, "nv_inference_request_success", model=model)
    inferences = metric_sum(samples, "nv_inference_count", model=model)
    executions = metric_sum(samples, "nv_inference_exec_count", model=model)
    queue_us = metric_sum(samples, "nv_inference_queue_duration_us", model=model)
    return {
        "requests": requests,
        "executions": executions,
        "avg_batch": inferences / executions if executions else 0.0,
        "avg_queue_ms": queue_us / requests / 1000 if requests else 0.0,
    }


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}
