"""The Virtual Token Counter and the fair queue (inference.fairness is pure: no database)."""

from __future__ import annotations

from collections import Counter

import pytest

from inference.fairness import INPUT_COST, OUTPUT_COST, FairQueue, VirtualTokenCounter


def test_charges_weigh_completion_tokens_more() -> None:
    vtc = VirtualTokenCounter()
    vtc.charge("a", prompt_tokens=100)
    vtc.charge("b", completion_tokens=100)
    assert vtc.counter("a") == 100 * INPUT_COST
    assert vtc.counter("b") == 100 * OUTPUT_COST
    assert vtc.counter("b") > vtc.counter("a")
    assert vtc.counter("never-seen") == 0


def test_picks_the_least_served_tenant() -> None:
    vtc = VirtualTokenCounter()
    vtc.charge("a", prompt_tokens=500)
    vtc.charge("b", prompt_tokens=100)
    vtc.charge("c", prompt_tokens=300)
    assert vtc.pick({"a", "b", "c"}) == "b"
    assert vtc.pick({"a", "c"}) == "c"
    vtc.charge("b", completion_tokens=1000)
    assert vtc.pick({"a", "b", "c"}) == "c"


def test_ties_are_broken_by_tenant_id() -> None:
    assert VirtualTokenCounter().pick({"t2", "t1", "t3"}) == "t1"


def test_weights_divide_the_charge() -> None:
    weights = {"gold": 4.0, "free": 1.0}
    vtc = VirtualTokenCounter(weight_of=lambda t: weights[t])
    vtc.charge("gold", prompt_tokens=400)
    vtc.charge("free", prompt_tokens=400)
    assert vtc.counter("gold") == pytest.approx(vtc.counter("free") / 4)


def test_an_idle_tenant_gets_no_credit() -> None:
    vtc = VirtualTokenCounter()
    vtc.charge("busy", prompt_tokens=10_000)
    vtc.charge("other", prompt_tokens=12_000)
    # "idle" was away while the others were served; it comes back lifted to the
    # smallest counter among the backlogged, not to zero.
    vtc.lift("idle", backlogged={"busy", "other"})
    assert vtc.counter("idle") == vtc.counter("busy")
    # The lift never lowers a counter.
    vtc.charge("heavy", prompt_tokens=50_000)
    vtc.lift("heavy", backlogged={"busy", "other"})
    assert vtc.counter("heavy") == 50_000 * INPUT_COST
    # With nobody backlogged there is nothing to catch up with.
    vtc.lift("alone", backlogged=set())
    assert vtc.counter("alone") == 0


def test_fair_queue_lifts_a_tenant_that_becomes_backlogged() -> None:
    queue: FairQueue[int] = FairQueue()
    queue.vtc.charge("flood", prompt_tokens=1_000_000)
    queue.push("flood", 1)
    queue.push("quiet", 2)  # quiet arrives while flood is backlogged: lifted to it
    assert queue.vtc.counter("quiet") == queue.vtc.counter("flood")
    queue.push("quiet", 3)  # already backlogged: no second lift
    assert queue.vtc.counter("quiet") == queue.vtc.counter("flood")


def test_fair_queue_is_fifo_within_a_tenant() -> None:
    queue: FairQueue[str] = FairQueue()
    for item in ("a1", "a2", "a3"):
        queue.push("a", item)
    assert len(queue) == 3 and queue.backlogged() == {"a"}
    assert [queue.pop() for _ in range(3)] == [("a", "a1"), ("a", "a2"), ("a", "a3")]
    assert queue.pop() is None and len(queue) == 0 and queue.backlogged() == set()


def serve(queue: FairQueue, served: list, cost: int = 1000) -> None:
    tenant, item = queue.pop()
    served.append((tenant, item))
    queue.vtc.charge(tenant, prompt_tokens=cost, completion_tokens=cost // 4)


def test_a_flooding_tenant_cannot_starve_a_quiet_one() -> None:
    """A saturated pool serving one call per tick: the flooder queues 2,000 calls up
    front and 10 more every tick; the quiet tenant sends one call every 5 ticks. Every
    quiet call is served within two ticks of its arrival, and the flooder gets the
    rest of the capacity."""
    queue: FairQueue[tuple[str, int]] = FairQueue()
    for i in range(2000):
        queue.push("flood", ("flood", i))
    served: list = []
    waits = []
    arrivals: dict[int, int] = {}
    for tick in range(1000):
        for i in range(10):
            queue.push("flood", ("flood", 2000 + tick * 10 + i))
        if tick % 5 == 0:
            arrivals[tick] = tick
            queue.push("quiet", ("quiet", tick))
        serve(queue, served)
        if served[-1][0] == "quiet":
            waits.append(tick - served[-1][1][1])
    shares = Counter(tenant for tenant, _ in served)
    assert shares["quiet"] == len(arrivals)  # every quiet call was served...
    assert max(waits) <= 2  # ...promptly
    assert shares["flood"] == 1000 - len(arrivals)  # and the pool never idled


def test_backlogged_tenants_share_by_weight() -> None:
    weights = {"gold": 3.0, "free": 1.0}
    queue: FairQueue[int] = FairQueue(vtc=VirtualTokenCounter(weight_of=lambda t: weights[t]))
    for i in range(1000):
        queue.push("gold", i)
        queue.push("free", i)
    served: list = []
    for _ in range(400):
        serve(queue, served)
    shares = Counter(tenant for tenant, _ in served)
    assert shares["gold"] == pytest.approx(300, abs=2)
    assert shares["free"] == pytest.approx(100, abs=2)


def test_equal_tenants_alternate() -> None:
    queue: FairQueue[int] = FairQueue()
    for i in range(10):
        queue.push("a", i)
        queue.push("b", i)
    served: list = []
    for _ in range(10):
        serve(queue, served)
    assert Counter(t for t, _ in served) == {"a": 5, "b": 5}
    assert OUTPUT_COST > INPUT_COST
