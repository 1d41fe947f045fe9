"""The router's decisions on constructed states (inference.router is pure: no database,
no I/O), and a smoke run of the pool simulator that drives it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from inference.router import (
    BLOCK_CHARS,
    DEFAULT_POLICY,
    DEGRADED,
    DOWN,
    DRAINING,
    HEALTHY,
    POLICIES,
    BackendView,
    LeastLoaded,
    PrefixAffinityLoadAware,
    PrefixIndex,
    PrefixOnly,
    RoundRobin,
    RouteRequest,
    make_policy,
    prefix_blocks,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "llama"
SYSTEM = {"role": "system", "content": "You answer questions about the handbook. " * 40}


def views(*ids: str, **fields) -> list[BackendView]:
    return [BackendView(id=i, models=frozenset({MODEL}), **fields) for i in ids]


def conversation(*turns: str, system: dict[str, str] = SYSTEM) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [system, *({"role": roles[i % 2], "content": t} for i, t in enumerate(turns))]


def route(messages, *, tenant: str = "t1", **kw) -> RouteRequest:
    return RouteRequest(
        model=MODEL, prefix_blocks=prefix_blocks(messages, salt=tenant), tenant_id=tenant, **kw
    )


def pick(policy, request: RouteRequest, pool: list[BackendView]) -> str:
    chosen = policy.choose(request, pool)
    assert chosen is not None
    return chosen.id


def dispatch(policy, request: RouteRequest, pool: list[BackendView]) -> BackendView:
    """Choose, and count the call in flight as the pool does."""
    chosen = policy.choose(request, pool)
    assert chosen is not None
    chosen.inflight += 1
    return chosen


# --- prefix blocks ----------------------------------------------------------------------


def test_prefix_blocks_exclude_the_last_user_turn() -> None:
    first = prefix_blocks(conversation("What is the leave policy?"), salt="t1")
    other = prefix_blocks(conversation("Who approves expenses? " * 30), salt="t1")
    assert first and first == other
    assert len(first) == len(f"\x1esystem\x1f{SYSTEM['content']}") // BLOCK_CHARS


def test_prefix_blocks_chain_a_shared_prefix() -> None:
    a = prefix_blocks(conversation("q1 " * 200, "answer one " * 100, "next"), salt="t1")
    b = prefix_blocks(conversation("q1 " * 200, "a different answer " * 60, "next"), salt="t1")
    shared = 0
    while shared < min(len(a), len(b)) and a[shared] == b[shared]:
        shared += 1
    # The system prompt and the identical first question are whole blocks in common...
    common_chars = len(f"\x1esystem\x1f{SYSTEM['content']}\x1euser\x1f{'q1 ' * 200}")
    assert shared >= common_chars // BLOCK_CHARS - 1
    # ...and once the texts part, no later block matches: each hash covers its prefix.
    assert shared < min(len(a), len(b))
    assert not set(a[shared:]) & set(b[shared:])


def test_prefix_blocks_an_early_change_changes_every_block() -> None:
    edited = {"role": "system", "content": "X" + SYSTEM["content"][1:]}
    assert edited["content"] != SYSTEM["content"]
    a = prefix_blocks(conversation("q", "a", "q2"), salt="t1")
    b = prefix_blocks(conversation("q", "a", "q2", system=edited), salt="t1")
    assert len(a) == len(b) > 2
    assert not set(a) & set(b)


def test_prefix_blocks_are_salted_by_tenant() -> None:
    messages = conversation("hello")
    a, b = prefix_blocks(messages, salt="tenant-a"), prefix_blocks(messages, salt="tenant-b")
    assert len(a) == len(b) > 0
    assert not set(a) & set(b)


def test_short_prompts_have_no_blocks() -> None:
    assert prefix_blocks([{"role": "user", "content": "hi"}]) == ()


# --- affinity ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PrefixOnly, PrefixAffinityLoadAware])
def test_the_same_prefix_goes_back_to_the_same_backend(cls) -> None:
    policy = cls(index=PrefixIndex())
    pool = views("a", "b", "c", "d")
    first = dispatch(policy, route(conversation("first user's question")), pool)
    # Another user, same system prompt: the least loaded backends are the others now.
    second = dispatch(policy, route(conversation("another question")), pool)
    # A follow-up turn extends the prefix and still finds it.
    follow_up = dispatch(
        policy, route(conversation("first user's question", "an answer " * 30, "more?")), pool
    )
    assert second.id == first.id == follow_up.id
    assert first.inflight == 3


def test_different_tenants_identical_prompts_do_not_share_affinity() -> None:
    policy = PrefixAffinityLoadAware(index=PrefixIndex())
    pool = views("a", "b", "c")
    held = dispatch(policy, route(conversation("q"), tenant="tenant-a"), pool)
    # The same tenant comes back to it although it is now the most loaded...
    assert policy.choose(route(conversation("q2"), tenant="tenant-a"), pool) is held
    # ...another tenant's identical prompt has no affinity there: least loaded instead.
    other = policy.choose(route(conversation("q2"), tenant="tenant-b"), pool)
    assert other is not None and other.id != held.id
    assert other.load() < held.load()


def test_overloaded_affine_backend_spills_to_a_partial_prefix_holder() -> None:
    policy = PrefixAffinityLoadAware(index=PrefixIndex())
    long_thread = conversation("q1 " * 300, "a1 " * 300, "q2")
    full = prefix_blocks(long_thread, salt="t1")
    partial = prefix_blocks(conversation("q1 " * 300, "other"), salt="t1")
    assert full[: len(partial)] == partial and len(full) > len(partial)
    policy.index.record(full, "affine")
    policy.index.record(partial, "partial")
    pool = views("affine", "partial", "idle")
    by_id = {v.id: v for v in pool}
    by_id["partial"].inflight = 1
    threshold = policy.overload_factor * by_id["idle"].load() + policy.overload_slack
    request = RouteRequest(model=MODEL, prefix_blocks=full, tenant_id="t1")

    by_id["affine"].inflight = int(threshold)  # at the threshold: keeps the call
    assert policy.choose(request, pool) is by_id["affine"]

    by_id["affine"].inflight = int(threshold) + 20  # far more loaded than the least
    chosen = policy.choose(request, pool)
    # Not the least loaded ("idle") either: the partial holder is not overloaded.
    assert chosen is by_id["partial"]


def test_spill_over_goes_to_the_least_loaded_when_no_one_else_holds_a_prefix() -> None:
    policy = PrefixAffinityLoadAware(index=PrefixIndex())
    request = route(conversation("q"))
    policy.index.record(request.prefix_blocks, "affine")
    pool = views("affine", "b", "c")
    by_id = {v.id: v for v in pool}
    by_id["affine"].inflight = 100
    by_id["b"].inflight = 2
    assert policy.choose(request, pool) is by_id["c"]


def test_prefix_only_ignores_load() -> None:
    policy = PrefixOnly(index=PrefixIndex())
    request = route(conversation("q"))
    policy.index.record(request.prefix_blocks, "hot")
    pool = views("hot", "cold")
    pool[0].inflight, pool[0].waiting, pool[0].kv_usage = 500, 100, 1.0
    assert policy.choose(request, pool) is pool[0]


def test_the_router_records_where_it_sent_a_prefix() -> None:
    policy = PrefixAffinityLoadAware(index=PrefixIndex())
    request = route(conversation("q"))
    chosen = policy.choose(request, views("a", "b"))
    assert chosen is not None
    assert policy.index.matches(request.prefix_blocks) == {chosen.id: len(request.prefix_blocks)}


# --- load -------------------------------------------------------------------------------


def test_load_grows_with_each_signal() -> None:
    base = BackendView(id="x").load()
    assert BackendView(id="x", inflight=3).load() > base
    assert BackendView(id="x", running=3).load() > base
    assert BackendView(id="x", waiting=3).load() > BackendView(id="x", running=3).load()
    assert BackendView(id="x", kv_usage=0.99).load() > BackendView(id="x", kv_usage=0.5).load()
    busy = {"inflight": 4}
    assert BackendView(id="x", state=DEGRADED, **busy).load() > BackendView(id="x", **busy).load()
    assert BackendView(id="x", weight=2, **busy).load() < BackendView(id="x", **busy).load()


def test_exact_inflight_and_scraped_running_are_not_added() -> None:
    # The platform's own calls show up in the scrape too: the larger one counts.
    assert (
        BackendView(id="x", inflight=5, running=5).load() == BackendView(id="x", inflight=5).load()
    )


# --- what is never chosen ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(POLICIES))
def test_draining_down_and_circuit_open_backends_are_never_chosen(name: str) -> None:
    policy = make_policy(name)
    pool = [
        BackendView(id="draining", state=DRAINING, models=frozenset({MODEL})),
        BackendView(id="down", state=DOWN, models=frozenset({MODEL})),
        BackendView(id="open", circuit_open=True, models=frozenset({MODEL})),
        BackendView(id="busy", inflight=50, models=frozenset({MODEL})),
    ]
    request = route(conversation("q"))
    for backend in ("draining", "down", "open"):  # even holding the prefix
        getattr(policy, "index", PrefixIndex()).record(request.prefix_blocks, backend)
    chosen = {pick(policy, request, pool) for _ in range(12)}
    assert chosen == {"busy"}
    pool[-1].state = DOWN
    assert policy.choose(request, pool) is None


@pytest.mark.parametrize("name", list(POLICIES))
def test_degraded_backends_still_serve(name: str) -> None:
    policy = make_policy(name)
    pool = [BackendView(id="d", state=DEGRADED), BackendView(id="h", state=HEALTHY, inflight=1)]
    assert {pick(policy, RouteRequest(model=MODEL), pool) for _ in range(6)} <= {"d", "h"}
    pool[1].state = DOWN
    assert policy.choose(RouteRequest(model=MODEL), pool) is pool[0]


@pytest.mark.parametrize("name", list(POLICIES))
def test_only_backends_serving_the_model(name: str) -> None:
    policy = make_policy(name)
    pool = [
        BackendView(id="m1-only", models=frozenset({"m1"})),
        BackendView(id="m2-only", models=frozenset({"m2"}), inflight=30),
        BackendView(id="any", models=frozenset(), inflight=30),  # no list: serves all
    ]
    request = RouteRequest(model="m2", prefix_blocks=(1, 2, 3), tenant_id="t")
    getattr(policy, "index", PrefixIndex()).record(request.prefix_blocks, "m1-only")
    chosen = Counter(pick(policy, request, pool) for _ in range(20))
    assert "m1-only" not in chosen and chosen
    pool[2].models = frozenset({"m1"})
    assert policy.choose(RouteRequest(model="m3"), pool[:2]) is None


@pytest.mark.parametrize("name", list(POLICIES))
def test_exclude_is_failover(name: str) -> None:
    policy = make_policy(name)
    pool = views("a", "b", "c")
    pool[1].inflight = pool[2].inflight = 40
    request = route(conversation("q"), exclude=frozenset({"a"}))
    getattr(policy, "index", PrefixIndex()).record(request.prefix_blocks, "a")
    assert all(pick(policy, request, pool) != "a" for _ in range(10))
    everyone = route(conversation("q"), exclude=frozenset({"a", "b", "c"}))
    assert policy.choose(everyone, pool) is None


@pytest.mark.parametrize("name", list(POLICIES))
def test_a_prompt_longer_than_the_model_takes_goes_elsewhere(name: str) -> None:
    pool = [BackendView(id="short", max_model_len=4096), BackendView(id="long", inflight=30)]
    policy = make_policy(name)
    for _ in range(4):
        assert policy.choose(RouteRequest(model=MODEL, prompt_tokens=5000), pool) is pool[1]
    assert policy.choose(RouteRequest(model=MODEL, prompt_tokens=5000), pool[:1]) is None


# --- round robin and least loaded -------------------------------------------------------


def test_round_robin_follows_weights() -> None:
    policy = RoundRobin()
    pool = [BackendView(id="big", weight=2), BackendView(id="small"), BackendView(id="other")]
    counts = Counter(pick(policy, RouteRequest(model=MODEL), pool) for _ in range(400))
    assert counts == {"big": 200, "small": 100, "other": 100}


def test_round_robin_takes_turns() -> None:
    policy = RoundRobin()
    pool = views("a", "b", "c")
    picks = [pick(policy, RouteRequest(model=MODEL), pool) for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_least_loaded_per_unit_of_weight() -> None:
    pool = [BackendView(id="big", weight=2, inflight=3), BackendView(id="small", inflight=2)]
    assert LeastLoaded().choose(RouteRequest(model=MODEL), pool) is pool[0]
    pool[0].inflight = 5
    assert LeastLoaded().choose(RouteRequest(model=MODEL), pool) is pool[1]


def test_make_policy() -> None:
    assert DEFAULT_POLICY == "prefix_load"
    assert isinstance(make_policy("prefix_load"), PrefixAffinityLoadAware)
    assert isinstance(make_policy("round_robin"), RoundRobin)
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("random")


def test_make_policy_uses_the_index_it_is_given() -> None:
    shared = PrefixIndex()
    policy = make_policy("prefix_load", shared)
    assert getattr(policy, "index", None) is shared


# --- the prefix index -------------------------------------------------------------------


def test_prefix_index_is_a_bounded_lru() -> None:
    index = PrefixIndex(capacity=4)
    index.record((1, 2), "a")
    index.record((3, 4), "b")
    index.record((1,), "c")  # block 1 is used again: now the most recent
    index.record((5,), "d")  # over capacity: the least recently used (block 2) goes
    assert len(index) == 4
    assert index.matches((1, 2)) == {"a": 1, "c": 1}
    assert index.matches((3, 4)) == {"b": 2}
    index.record((6, 7), "e")  # blocks 3 and 4 are now the oldest
    assert index.matches((3, 4)) == {}
    assert index.matches((6, 7)) == {"e": 2}


def test_prefix_index_matches_are_chained() -> None:
    index = PrefixIndex()
    index.record((1, 2, 3), "a")
    index.record((1, 2), "b")
    assert index.matches((1, 2, 3, 4)) == {"a": 3, "b": 2}
    assert index.matches((9, 2, 3)) == {}  # the first block differs: nothing matches


def test_forget_backend() -> None:
    index = PrefixIndex()
    index.record((1, 2, 3), "a")
    index.record((1,), "b")
    index.forget_backend("a")
    assert index.matches((1, 2, 3)) == {"b": 1}
    assert len(index) == 1  # blocks only "a" held are gone


# --- the simulator ----------------------------------------------------------------------

METRICS = {"ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "throughput_tok_s", "cache_hit_rate"}


@pytest.mark.bench_smoke
def test_poolsim_quick_prints_every_policy() -> None:
    done = subprocess.run(
        [sys.executable, "tests/bench/poolsim.py", "--quick", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    run = result["runs"]["16"]
    assert set(run["scenarios"]) == {"chat", "longdoc", "noisy", "quiet_alone"}
    for name, scenario in run["scenarios"].items():
        assert set(scenario["policies"]) == set(POLICIES), name
        for policy, metrics in scenario["policies"].items():
            assert set(metrics) >= METRICS, (name, policy)
            assert metrics["requests"] > 0, (name, policy)
            assert all(metrics[k] is not None and metrics[k] >= 0 for k in METRICS)
    assert set(run["fairness"]) == set(POLICIES)
    for fairness in run["fairness"].values():
        assert fairness["quiet_tenant_p90_ratio"] > 0
    assert set(run["goals"]) >= {"quiet_tenant_p90_ratio", "longdoc_p90_rr_over_default"}
