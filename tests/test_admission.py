"""Deadline-aware admission (serving/admission.py): the estimate of the wait ahead, the shed and
expiry decisions, and the budgets; pure, no Serve."""

import pytest

from kuberank.serving.admission import DEFAULT_BUDGET_MS, Admission, Overloaded


def test_admits_everything_until_a_batch_is_measured():
    adm = Admission(0.05, servers=1)
    assert adm.estimate(10_000) == 0.0
    adm.check(10_000, 0.05)  # no exception
    assert adm.expired(0.049, 0.05) is None


def test_estimate_is_littles_law_over_the_servers():
    adm = Admission(0.1, servers=2, max_batch=10)
    adm.observe(10, 0.02)  # a batch of 10 in 20 ms: 2 ms per request per server
    assert adm.item_s == pytest.approx(0.002) and adm.batch_time(10) == pytest.approx(0.02)
    # 40 ahead on 2 servers: 40 ms, then its own (full) batch: 20 ms
    assert adm.estimate(40) == pytest.approx(0.06)
    adm.check(40, 0.1)
    with pytest.raises(Overloaded) as shed:
        adm.check(200, 0.1)  # 200 ms + 20 ms
    assert shed.value.reason == "queue" and shed.value.wait_s == pytest.approx(0.22)
    assert "estimated wait 220 ms exceeds the latency budget of 100 ms" in str(shed.value)
    assert shed.value.retry_after_s == 1


def test_batches_amortise_a_fixed_cost():
    # T(n) = 4 ms + 1 ms x n: small batches at low load must not make a queue that will run
    # in full batches look slower than it is
    adm = Admission(0.1, servers=1, max_batch=16)
    for n in (1, 2, 3, 1, 4, 2, 1, 3, 2, 4) * 5:
        adm.observe(n, 0.004 + 0.001 * n)
    assert adm.batch_time(16) == pytest.approx(0.020, rel=0.02)
    assert adm.item_s == pytest.approx(0.020 / 16, rel=0.02)
    # 32 ahead: two full batches (40 ms), then its own full batch (20 ms)
    assert adm.estimate(32) == pytest.approx(0.06, rel=0.02)
    # admitted; per request alone (2.7 ms at these sizes: 48 x 2.7 = 130 ms) it would be shed
    adm.check(32, 0.1)


def test_same_sized_batches_count_all_of_it_per_request():
    adm = Admission(0.1, max_batch=16)
    for _ in range(10):
        adm.observe(1, 0.005)
    assert adm.batch_time(16) == pytest.approx(0.08)  # the safe side: no fixed cost assumed


def test_moving_means_follow_a_slower_replica():
    adm = Admission(0.1, servers=1, alpha=0.5)
    adm.observe(4, 0.004)
    before = adm.estimate(50)
    for _ in range(10):
        adm.observe(4, 0.04)  # ten times slower (a noisy neighbour)
    assert adm.item_s == pytest.approx(0.01, rel=0.01)
    assert adm.estimate(50) > 8 * before
    # the queue limit shrinks with it: the most requests ahead that still fit the budget
    fits = max(n for n in range(1000) if adm.estimate(n) <= 0.1)
    assert fits == 9  # 9 x 10 ms + its own 10 ms


def test_expired_is_the_requests_own_deadline():
    adm = Admission(0.1, servers=1)
    adm.observe(8, 0.016)
    assert adm.expired(0.1, 0.1) is None  # waited its budget, not more
    late = adm.expired(0.12, 0.1)
    assert isinstance(late, Overloaded) and late.reason == "expired"
    assert "waited 120 ms" in str(late)
    assert adm.expired(0.12, 0.02) is not None  # a client's smaller budget
    assert adm.expired(0.12, 0.5) is None


def test_the_next_batches_are_always_admitted():
    adm = Admission(0.01, servers=2, floor=32)
    adm.observe(1, 1.0)  # a batch slowed to a second (the loop answering a storm of 503s)
    adm.check(31, 0.01)  # the workers' next batches: admitted, or they would idle
    with pytest.raises(Overloaded):
        adm.check(32, 0.01)


def test_the_gate_is_the_replicas_check_on_the_default_budget():
    from kuberank.serving import admission

    adm = Admission(0.05, floor=1)
    adm.observe(10, 0.01)
    ahead = {"n": 0}
    admission.set_gate(lambda: adm.check(ahead["n"], adm.budget_s))
    try:
        assert admission.gate() is None
        ahead["n"] = 100  # 100 ms + 10 ms > 50 ms
        shed = admission.gate()
        assert isinstance(shed, Overloaded) and shed.reason == "queue"
    finally:
        admission.set_gate(None)
    assert admission.gate() is None


def test_client_deadline_only_lowers_the_budget():
    adm = Admission(DEFAULT_BUDGET_MS / 1000)
    assert adm.budget(None) == pytest.approx(DEFAULT_BUDGET_MS / 1000)
    assert adm.budget(20) == pytest.approx(0.02)
    assert adm.budget(60_000) == pytest.approx(DEFAULT_BUDGET_MS / 1000)


def test_disabled_admits_everything():
    adm = Admission(0.01, enabled=False)
    adm.observe(1, 1.0)
    adm.check(1000, 0.01)
    assert adm.expired(10.0, 0.01) is None


@pytest.mark.parametrize(
    "args", [(0, 1), (0.1, 0), (-1, 1), (0.1, 1, 0.2, True, 0), (0.1, 1, 0.2, True, 1, 0)]
)
def test_bad_arguments_are_refused(args):
    with pytest.raises(ValueError):
        Admission(*args)


def test_retry_after_rounds_the_wait_up():
    assert Overloaded("queue", 2.2, 0.1).retry_after_s == 3
    assert Overloaded("expired", 0.0, 0.1).retry_after_s == 1
