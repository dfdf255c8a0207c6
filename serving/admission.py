"""Deadline-aware admission: shed a request at once (503) when it cannot be answered within its
latency budget, instead of queueing it.

Every request gets a budget: ``Settings.latency_budget_ms`` by default, or the smaller
``deadline_ms`` the client sends. The Ingress asks :meth:`Admission.check` before it queues a
request; the estimate of the time ahead of it is Little's law on measured service times,

    wait = ahead x T(B) / B / servers + T(own batch)

where ``ahead`` is the requests queued or running in front of it, ``T(n)`` the time of a batch of
``n`` (a fixed cost plus a cost per request, fitted to the recent batches with exponentially
weighted moments), ``B`` the largest batch (what a queue that long is served in), and
``servers`` the batches that run side by side. Past the
budget the answer is 503 with Retry-After, before any work. A request that waited in the queue
until its budget passed is dropped when its batch forms, before compute starts (CoDel's sojourn-time rule
on the request's own deadline, :meth:`expired`).

The limit on queued requests is therefore adaptive: budget x measured throughput, i.e. it grows
when batches are fast or large and shrinks when the replica is slowed (a noisy neighbour, a
longer query mix, Triton's latency), with no fixed number to tune per machine. The alternatives
considered: a fixed ``max_queued_requests`` (Serve's) is one number that is right on one machine
for one model; Envoy's adaptive concurrency filter and Netflix's gradient limiter infer a limit
from a latency *gradient* against a minimum RTT sampled in periodic probe windows, which adds
latency spikes and needs traffic shaping, while a ranking request has an absolute deadline;
CoDel drops on sojourn time alone and so only acts after a request waited its budget: here it is
the second line behind the estimate, not the first.

Work-conserving: fewer requests ahead than the servers' next batches are always admitted (the
``floor``): under a storm of requests the replica's event loop spends CPU answering 503s, the
batches it measures slow down, and an estimate alone would then shed requests while the batch
worker idles.

The check runs twice: in the HTTP middleware before the body is read (:func:`gate`, on the
default budget; a client's deadline is never larger, so what it sheds the handler would too), so
a shed request costs the replica no parsing, and in the handler on the request's own budget.

Pure Python, no Serve: the colocated Ingress feeds it its batches; the split path (stages as
deployments) feeds it each request's latency over the requests in flight (servers = 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

# The default latency budget of a request (Settings.latency_budget_ms); kuberank/config.py
# holds it because the export's Triton repository uses it too (its queue timeout).
from kuberank.config import DEFAULT_BUDGET_MS  # noqa: F401

SHED_REASONS = ("queue", "expired")


class Overloaded(Exception):
    """The request was shed: ``reason`` is "queue" (the estimated wait exceeds the budget, at
    arrival) or "expired" (its deadline passed while it waited, before compute)."""

    def __init__(self, reason: str, wait_s: float, budget_s: float):
        self.reason, self.wait_s, self.budget_s = reason, wait_s, budget_s
        what = "estimated wait" if reason == "queue" else "waited"
        super().__init__(
            f"overloaded: {what} {wait_s * 1000:.0f} ms exceeds the latency budget of "
            f"{budget_s * 1000:.0f} ms; retry later"
        )

    @property
    def retry_after_s(self) -> int:
        """Whole seconds for Retry-After (at least 1)."""
        return max(1, math.ceil(self.wait_s))


class Admission:
    """The estimate of the wait ahead of a request, from the service times of recent batches.

    ``alpha``: the weight of the newest batch in the moving means. Until the first batch is
    measured every request is admitted (``expired`` still bounds their wait). Updated from
    worker threads and read on the event loop: each update is a float assignment (atomic under
    the GIL), and a momentarily stale mean only moves one estimate."""

    def __init__(
        self,
        budget_s: float,
        servers: int = 1,
        alpha: float = 0.2,
        enabled: bool = True,
        floor: int = 1,
        max_batch: int = 1,
    ):
        if budget_s <= 0 or servers < 1 or not 0 < alpha <= 1 or floor < 1 or max_batch < 1:
            raise ValueError(
                "need budget_s > 0, servers >= 1, 0 < alpha <= 1, floor >= 1 and max_batch >= 1"
            )
        self.budget_s, self.servers, self.alpha = float(budget_s), int(servers), float(alpha)
        self.enabled = bool(enabled)
        # work-conserving: fewer than ``floor`` requests ahead (the servers' next batches) are
        # always admitted, so a replica never idles while it sheds; the service times it
        # measures under overload include the CPU that answering 503s takes from it
        self.floor = int(floor)
        self.max_batch = int(max_batch)
        # moving moments of (batch size n, batch seconds t): T(n) = overhead + per_item * n
        self._n = self._t = self._nn = self._nt = 0.0
        self._seen = False

    def batch_time(self, size: int) -> float:
        """The fitted seconds of a batch of ``size``: a fixed cost plus a cost per request (a
        least-squares line through the recent batches; while their sizes hardly vary, all of
        it per request, which over-estimates larger batches: the safe side)."""
        if not self._seen:
            return 0.0
        var = self._nn - self._n * self._n
        per_item = self._t / max(self._n, 1e-9)
        if var > 0.25:
            per_item = min(per_item, max(0.0, (self._nt - self._n * self._t) / var))
        overhead = max(0.0, self._t - per_item * self._n)
        return overhead + per_item * size

    @property
    def item_s(self) -> float:
        """Seconds per request in a full batch."""
        return self.batch_time(self.max_batch) / self.max_batch

    def budget(self, deadline_ms: float | None) -> float:
        """A request's budget in seconds: the client's ``deadline_ms`` when smaller."""
        if deadline_ms is None:
            return self.budget_s
        return min(self.budget_s, float(deadline_ms) / 1000.0)

    def estimate(self, ahead: int) -> float:
        """Seconds until a request with ``ahead`` requests in front of it is answered: the
        full batches ahead, spread over the servers, then its own batch."""
        queued = ahead * self.item_s / self.servers
        return queued + self.batch_time(min(self.max_batch, ahead + 1))

    def check(self, ahead: int, budget_s: float) -> None:
        """Raise :class:`Overloaded` ("queue") when the estimate exceeds ``budget_s``."""
        if not self.enabled or ahead < self.floor:
            return
        wait = self.estimate(ahead)
        if wait > budget_s:
            raise Overloaded("queue", wait, budget_s)

    def expired(self, waited_s: float, budget_s: float) -> Overloaded | None:
        """An :class:`Overloaded` ("expired") for a request that already waited its whole
        budget before its batch could start (CoDel's sojourn rule); None while it has not."""
        if not self.enabled or waited_s <= budget_s:
            return None
        return Overloaded("expired", waited_s, budget_s)

    def observe(self, size: int, seconds: float) -> None:
        """One batch of ``size`` requests took ``seconds`` of one server."""
        if size < 1 or seconds < 0:
            return
        n, t = float(size), float(seconds)
        if not self._seen:
            self._n, self._t, self._nn, self._nt, self._seen = n, t, n * n, n * t, True
            return
        a = self.alpha
        self._n += a * (n - self._n)
        self._t += a * (t - self._t)
        self._nn += a * (n * n - self._nn)
        self._nt += a * (n * t - self._nt)


# The process's gate (one Ingress replica per process): the HTTP middleware asks it before it
# reads a request's body. Serve pickles the deployment class by value, so the gate lives here,
# in a module imported by reference.
_gate: Callable[[], None] | None = None


def set_gate(check: Callable[[], None] | None) -> None:
    """``check()`` raises :class:`Overloaded` when this replica sheds a request now."""
    global _gate
    _gate = check


def gate() -> Overloaded | None:
    """The shed decision for a request arriving now, on the default budget; None: admit."""
    if _gate is None:
        return None
    try:
        _gate()
    except Overloaded as exc:
        return exc
    return None
