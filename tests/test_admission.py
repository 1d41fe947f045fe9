"""Fair admission to a saturated pool (inference.admission): FIFO within a tenant, VTC
across tenants, waiters that give up or die leave nothing behind; in both stores, and
across processes against the same Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from inference import admission as admission_module
from inference.admission import AdmissionTimeout, MemoryAdmission, RedisAdmission
from inference.types import InferenceError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["memory", "redis"])
def make_admission(request, settings, prefix):
    if request.param == "redis" and not settings.REDIS_URL:
        pytest.skip("no REDIS_URL: the embedded mode has no Redis")

    def make(lease_ttl_s=5.0):
        if request.param == "memory":
            return MemoryAdmission(lease_ttl_s=lease_ttl_s, poll_s=0.05)
        return RedisAdmission(
            settings.REDIS_URL, prefix=prefix, lease_ttl_s=lease_ttl_s, poll_s=0.05
        )

    return make


def new_tenant() -> str:
    return str(uuid.uuid4())


def until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


class Waiters:
    """Calls waiting in threads, queued one at a time so their arrival order is known.
    Each records its label when admitted, holds its slot briefly, charges its tokens."""

    def __init__(self, adm, capacity=1):
        self.adm, self.capacity = adm, capacity
        self.order: list[str] = []
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def add(self, label, tenant, *, completion_tokens=0, hold_s=0.01, weight=1.0, timeout=10):
        def run():
            try:
                with self.adm.admitted(
                    tenant_id=tenant, weight=weight, capacity=self.capacity, timeout_s=timeout
                ) as slot:
                    self.order.append(label)
                    time.sleep(hold_s)
                    slot.charge(completion_tokens=completion_tokens)
            except BaseException as exc:
                self.errors.append(exc)

        before = self.adm.waiting(tenant)
        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)
        until(lambda: self.adm.waiting(tenant) == before + 1)

    def join(self):
        for thread in self.threads:
            thread.join(timeout=20)
        assert not self.errors, self.errors


def test_a_quiet_tenant_is_not_stuck_behind_a_flood(make_admission):
    adm = make_admission()
    flood, quiet = new_tenant(), new_tenant()
    waiters = Waiters(adm)
    with adm.admitted(tenant_id=flood, weight=1, capacity=1, timeout_s=1) as running:
        for i in range(1, 6):
            waiters.add(f"F{i}", flood, completion_tokens=100)
        waiters.add("Q1", quiet, completion_tokens=100)
        running.charge(prompt_tokens=50, completion_tokens=100)
    waiters.join()
    # The flood's running call charged its tenant: the quiet tenant goes next, not last;
    # the flood's own calls keep their order.
    assert waiters.order == ["Q1", "F1", "F2", "F3", "F4", "F5"]
    assert adm.counter(flood) == 250 + 5 * 200
    assert adm.waiting() == 0 and adm.inflight() == 0


def test_first_in_first_out_within_a_tenant(make_admission):
    adm = make_admission()
    tenant = new_tenant()
    waiters = Waiters(adm)
    with adm.admitted(tenant_id=new_tenant(), weight=1, capacity=1, timeout_s=1):
        for i in range(8):
            waiters.add(f"A{i}", tenant, completion_tokens=10)
    waiters.join()
    assert waiters.order == [f"A{i}" for i in range(8)]


def test_weights_divide_the_charge(make_admission):
    adm = make_admission()
    light, heavy = new_tenant(), new_tenant()
    for tenant, weight in ((light, 1.0), (heavy, 4.0)):
        with adm.admitted(tenant_id=tenant, weight=weight, capacity=1, timeout_s=1) as slot:
            slot.charge(prompt_tokens=100, completion_tokens=50)
    assert (adm.counter(light), adm.counter(heavy)) == (200.0, 50.0)


def test_the_lift_rule(make_admission):
    adm = make_admission()
    busy, idle = new_tenant(), new_tenant()
    # `busy` was served a lot while nothing else waited; idleness earns `idle` no credit.
    with adm.admitted(tenant_id=busy, weight=1, capacity=1, timeout_s=1) as slot:
        slot.charge(completion_tokens=500)
    with adm.admitted(tenant_id=idle, weight=1, capacity=1, timeout_s=1):
        pass
    assert (adm.counter(busy), adm.counter(idle)) == (1000.0, 0.0)  # no one was backlogged

    waiters = Waiters(adm)
    with adm.admitted(tenant_id=busy, weight=1, capacity=1, timeout_s=1):
        waiters.add("B1", busy, completion_tokens=50)
        waiters.add("B2", busy, completion_tokens=50)
        waiters.add("I1", idle, completion_tokens=50)
        assert adm.counter(idle) == 1000.0  # lifted to the least backlogged counter
        waiters.add("I2", idle, completion_tokens=50)
    waiters.join()
    # From equal counters, equal charges alternate the tenants (without the lift, the
    # idle tenant's two calls would both go first).
    tenants = [label[0] for label in waiters.order]
    assert tenants[0] != tenants[1] != tenants[2] != tenants[3], waiters.order


def test_a_waiter_that_times_out_leaves_no_ticket(make_admission):
    adm = make_admission()
    tenant = new_tenant()
    with adm.admitted(tenant_id=new_tenant(), weight=1, capacity=1, timeout_s=1):
        started = time.monotonic()
        with (
            pytest.raises(AdmissionTimeout) as info,
            adm.admitted(tenant_id=tenant, weight=1, capacity=1, timeout_s=0.2),
        ):
            pytest.fail("admitted into a full pool")
        assert 0.2 <= time.monotonic() - started < 1.0
        assert info.value.code == "pool_busy" and isinstance(info.value, InferenceError)
        assert adm.waiting() == 0 and adm.waiting(tenant) == 0
    # Nobody is admitted in the ghost's place.
    assert adm.inflight() == 0
    if isinstance(adm, RedisAdmission):
        keys = {k for k in adm.redis.scan_iter(match=f"{adm.key}:*")}
        assert keys <= {f"{adm.key}:vtc", f"{adm.key}:seq"}, keys


def test_a_cancelled_waiter_leaves(make_admission):
    adm = make_admission()
    tenant, cancel = new_tenant(), threading.Event()
    threading.Timer(0.1, cancel.set).start()
    with adm.admitted(tenant_id=new_tenant(), weight=1, capacity=1, timeout_s=1):
        with (
            pytest.raises(InferenceError) as info,
            adm.admitted(
                tenant_id=tenant, weight=1, capacity=1, timeout_s=5, cancelled=cancel.is_set
            ),
        ):
            pytest.fail("admitted into a full pool")
        assert info.value.code == "cancelled"
        assert adm.waiting(tenant) == 0


def test_capacity_holds_under_concurrency(make_admission):
    adm = make_admission()
    level, peak, lock = [0], [0], threading.Lock()

    def worker(tenant):
        for _ in range(4):
            with adm.admitted(tenant_id=tenant, weight=1, capacity=2, timeout_s=10):
                with lock:
                    level[0] += 1
                    peak[0] = max(peak[0], level[0])
                time.sleep(0.005)
                with lock:
                    level[0] -= 1

    threads = [threading.Thread(target=worker, args=(new_tenant(),)) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert peak[0] == 2
    assert adm.inflight() == 0 and adm.waiting() == 0


def test_a_dead_waiter_and_a_dead_call_block_no_one(make_admission):
    adm = make_admission(lease_ttl_s=0.3)
    tenant = new_tenant()
    waiters = Waiters(adm)
    with adm.admitted(tenant_id=new_tenant(), weight=1, capacity=1, timeout_s=1):
        # Two tickets queued by a process that then died: nothing polls or renews them.
        assert not adm.enter(tenant_id=tenant, ticket="dead-1", capacity=1)
        assert not adm.enter(tenant_id=tenant, ticket="dead-2", capacity=1)
        time.sleep(0.2)
        waiters.add("W1", tenant, timeout=5)
        assert adm.waiting(tenant) == 3
        # The live waiter's polls renew its ticket and reclaim the dead ones before it.
        until(lambda: adm.waiting(tenant) == 1, timeout=2)
    waiters.join()
    assert waiters.order == ["W1"]

    # A call admitted in a process that died: its slot is never renewed, and lapses.
    assert adm.enter(tenant_id=new_tenant(), ticket="dead-3", capacity=1)
    started = time.monotonic()
    waiters.add("W2", tenant, timeout=5)
    waiters.join()
    assert waiters.order == ["W1", "W2"]
    assert 0.2 < time.monotonic() - started < 1.0
    assert adm.renew("dead-3") is False
    assert adm.inflight() == 0 and adm.waiting() == 0


def test_a_live_call_keeps_its_slot(make_admission):
    adm = make_admission(lease_ttl_s=0.3)
    with (
        adm.admitted(tenant_id=new_tenant(), weight=1, capacity=1, timeout_s=1),
        pytest.raises(AdmissionTimeout),
        adm.admitted(tenant_id=new_tenant(), weight=1, capacity=1, timeout_s=0.8),
    ):
        pass  # the first slot's lease (0.3 s) is renewed while it is held
    with adm.admitted(tenant_id=new_tenant(), weight=1, capacity=1, timeout_s=0.1):
        pass


def test_the_process_admission_follows_the_mode(settings):
    admission_module.admission.reset()
    try:
        expected = MemoryAdmission if settings.REDIS_URL is None else RedisAdmission
        assert isinstance(admission_module.admission(), expected)
        with admission_module.admitted(
            tenant_id=uuid.uuid4(), weight=1, capacity=1, timeout_s=1
        ) as slot:
            assert admission_module.admission().inflight() >= 1
            slot.charge(completion_tokens=1)
    finally:
        admission_module.admission.reset()


# --- across processes ----------------------------------------------------------------------

FLOOD = r"""
import json, os, sys, threading, time
sys.path[:0] = ["platform", "."]
os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings.test"
import django
django.setup()
from inference.admission import RedisAdmission

args = json.loads(sys.argv[1])
adm = RedisAdmission(args["url"], prefix=args["prefix"], lease_ttl_s=5, poll_s=0.05)
tenant = args["tenant"]
calls = []

def call(label):
    for _ in range(args["rounds"]):
        with adm.admitted(tenant_id=tenant, weight=1, capacity=args["capacity"],
                          timeout_s=20) as slot:
            started = time.time()
            time.sleep(args["hold_s"])
            slot.charge(prompt_tokens=20, completion_tokens=100)
            calls.append([label, started, time.time()])

barrier = adm.redis
barrier.incr(args["barrier"])
while int(barrier.get(args["barrier"])) < args["processes"]:
    time.sleep(0.002)
threads = []
for i in range(args["threads"]):
    before = adm.waiting(tenant)
    threads.append(threading.Thread(target=call, args=(f"F{i + 1}",)))
    threads[-1].start()
    while args["one_by_one"] and adm.waiting(tenant) == before:
        time.sleep(0.002)  # queue them in a known order
for thread in threads:
    thread.join()
print(json.dumps(sorted(calls, key=lambda c: c[1])), flush=True)
"""


def flood(settings, prefix, tenant, *, processes=1, one_by_one=False, **options):
    args = {
        "url": settings.REDIS_URL,
        "prefix": prefix,
        "tenant": tenant,
        "barrier": f"{prefix}:barrier",
        "processes": processes,
        "one_by_one": one_by_one,
        **options,
    }
    return subprocess.Popen(
        [sys.executable, "-c", FLOOD, json.dumps(args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def flood_result(proc) -> list[list]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_fair_admission_across_processes(settings, prefix):
    if not settings.REDIS_URL:
        pytest.skip("no REDIS_URL: the embedded mode has no Redis")
    adm = RedisAdmission(settings.REDIS_URL, prefix=prefix, lease_ttl_s=5, poll_s=0.05)
    flooder, quiet = new_tenant(), new_tenant()
    quiet_started: list[float] = []

    def quiet_call():
        with adm.admitted(tenant_id=quiet, weight=1, capacity=1, timeout_s=10):
            quiet_started.append(time.time())
            time.sleep(0.05)

    with adm.admitted(tenant_id=flooder, weight=1, capacity=1, timeout_s=1) as running:
        proc = flood(
            settings, prefix, flooder, one_by_one=True, threads=5, rounds=1, capacity=1, hold_s=0.03
        )
        until(lambda: adm.waiting(flooder) == 5, timeout=20)
        waiter = threading.Thread(target=quiet_call)
        waiter.start()
        until(lambda: adm.waiting(quiet) == 1)
        running.charge(completion_tokens=100)
    waiter.join(timeout=10)
    flooded = flood_result(proc)
    assert [label for label, *_ in flooded] == ["F1", "F2", "F3", "F4", "F5"]
    # The quiet tenant's call came before every waiting call of the flood.
    (quiet_at,) = quiet_started
    assert all(started > quiet_at for _label, started, _ended in flooded)
    assert adm.inflight() == 0 and adm.waiting() == 0


def test_capacity_holds_across_processes(settings, prefix):
    if not settings.REDIS_URL:
        pytest.skip("no REDIS_URL: the embedded mode has no Redis")
    procs = [
        flood(
            settings,
            prefix,
            new_tenant(),
            processes=2,
            threads=3,
            rounds=6,
            capacity=2,
            hold_s=0.01,
        )
        for _ in range(2)
    ]
    outputs = [flood_result(proc) for proc in procs]
    calls = [call for output in outputs for call in output]
    assert len(calls) == 36
    events = sorted([(s, 1) for _l, s, _e in calls] + [(e, -1) for _l, _s, e in calls])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 2  # the pool was full, never more than full
    # Both processes' calls ran side by side (VTC shared the pool between their tenants).
    first_end = min(output[-1][2] for output in outputs)
    assert all(output[0][1] < first_end for output in outputs)
