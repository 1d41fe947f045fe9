"""Parley pool simulator: N simulated vLLM servers routed by the real router.

A discrete-event model of a pool of vLLM servers, driven by the production routing and
fairness code (`inference.router`'s policy classes, `BackendView`, `RouteRequest`,
`prefix_blocks`, `PrefixIndex`; `inference.fairness.FairQueue`), so what it measures
is what production runs. Seeded and deterministic: the same arguments print the same
numbers (whatever PYTHONHASHSEED and --jobs). docs/benchmarks.md has the results.

    python tests/bench/poolsim.py --quick --json   # 16 backends, ~30 s on 2 cores
    python tests/bench/poolsim.py                  # 16 and 64 backends, longer runs, a
                                                   # longdoc load sweep and 2 more seeds;
                                                   # writes bench-results/poolsim.json

One vLLM server (the V1 scheduler with chunked prefill and prefix caching):

- Continuous batching in steps. A step takes every decoding sequence (one token each),
  then the partial prefills already admitted, then the waiting queue in FCFS order,
  until `max_num_batched_tokens` (8192) tokens or `max_num_seqs` (256) sequences; a
  prompt longer than what is left of the budget is prefilled in chunks over several
  steps. A waiting request is admitted only when its KV blocks fit; the head of the
  queue blocks the rest (FCFS). The first token comes at the end of the step that
  finishes the prefill.
- Step time = a + b*P + c*sum(chunk * context) + d*D + e*K: P prefill tokens in the
  step, each chunk weighted by the mean context its tokens attend to (the brief's
  c*P*ctx), D decoding sequences, K context tokens those sequences read. The constants
  (`Engine`) are for an 8B dense model of the Llama-3.1-8B shape (32 layers, 32 query
  and 8 KV heads of 128, bf16: 128 KiB of KV per token) on one H100 80GB. They are
  derived from peak rates and typical efficiencies, not measured: the shape, not
  precision.
    a = 6 ms     per step: reading 16 GB of weights at ~3 TB/s, plus scheduling
    b = 30 us    per prefill token: 16 GFLOP at ~550 TFLOP/s (~33k tokens/s)
    c = 1 ns     per prefill token per context token: 4*32*32*128 = 0.5 MFLOP of
                 attention at ~500 TFLOP/s; 128k tokens from scratch take ~12 s
    d = 80 us    per decoding sequence: sampling, its share of the batched GEMMs
    e = 40 ns    per context token a decoding sequence reads: 128 KiB at ~3.3 TB/s.
                 An addition to the brief's formula: without it a 100k-token decode
                 would cost as much as a 1k-token one. When every running request
                 shares its head (system prompt and document) and there are at least
                 8 of them, the head is read once per step (vLLM's cascade attention).
- KV cache: 25,000 blocks of 16 tokens (400k tokens, ~49 GiB: what 80 GB leaves at
  gpu_memory_utilization 0.9 after the weights), max_model_len 262,144 (a long-context
  variant, so the 200k-token documents fit). Blocks are keyed by a hash chain of their
  16-token (64-character) contents, salted by the tenant (vLLM's cache_salt); a
  request's leading blocks found in the cache skip their prefill (the last prompt token
  is always computed). A request holds blocks for its prompt and its whole answer from
  admission (a simplification: no preemption); full blocks join the cache as their
  chunk is computed (the answer's at the end); unreferenced cached blocks are evicted
  least recently used first, a finished request's tail first.

The pool, as production sees it:

- Tokens are characters / 4. Prompts are real message lists (system prompt, document,
  earlier turns, the new user turn), rendered with a chat template for the server's
  block hashes, and given to the real `prefix_blocks` (salted with the tenant id) for
  the router's affinity keys.
- The router sees one `BackendView` per server: `inflight` is exact and current (the
  platform's own count of open calls); `running`, `waiting` and `kv_usage` are what the
  last scrape of /metrics saw, refreshed every second of simulated time.
- Admission as inference.admission does it: the pool is saturated when the calls in
  flight reach `max_inflight` (64, PARLEY_BACKEND_MAX_INFLIGHT's default) times the
  backends; then calls wait in the real `FairQueue` (VTC), and each completion admits
  the next one. A call charges its tenant (prompt and completion tokens) when it ends.

Workloads, per 16 backends (loads scale with the pool). All from the seed, the same
sessions for every policy; a session's next turn comes a think time after its previous
answer, so slow service slows the session down:

- `chat`: multi-turn chat, 8 tenants with 3 shared system prompts each (300-2500
  tokens), 1-12 turns per session; about 60% of what the pool can serve.
- `longdoc`: long-document Q&A, 16 tenants with 3 documents each (20k-200k tokens,
  log-uniform), document popularity Zipf(1) across tenants; sessions of 1-16 questions
  (mean ~5.7) about one document, so many users and follow-ups per document. The
  default load (1 session/s: ~5.7 questions/s) is one where `prefix` (affinity only)
  is saturated; the full run sweeps 0.125x to 2x of it.
- `noisy`: chat with four quiet tenants at one rate and a noisy tenant at 10x that
  (the noisy tenant alone is more than the pool serves); `quiet_alone` is the first
  quiet tenant's very same sessions with nobody else. fairness.quiet_tenant_p90_ratio
  is that tenant's p90 TTFT under `noisy` over its p90 under `quiet_alone`.

Metrics over the calls that arrive after the warm-up and before the end of the load;
a call still without a first token when the simulation stops (a drain period after the
load) counts with the time it had waited, a lower bound, and as `unfinished`. TTFT:
arrival at the pool to the first token, FairQueue wait included. Throughput: tokens
generated per second during the measured window. Cache hit rate: prompt tokens served
from the prefix cache over prompt tokens.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import heapq
import itertools
import math
import os
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from itertools import compress, filterfalse, repeat, takewhile
from operator import eq, not_, sub
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "platform") not in sys.path:
    sys.path.insert(0, str(ROOT / "platform"))

from results import result_write  # noqa: E402

from inference.fairness import FairQueue  # noqa: E402
from inference.router import (  # noqa: E402
    DEFAULT_POLICY,
    POLICIES,
    BackendView,
    Policy,
    RouteRequest,
    make_policy,
    prefix_blocks,
)

MODEL = "llama-3.1-8b-instruct"
CHARS_PER_TOKEN = 4
GENERATION_PROMPT = "<|assistant|>\n"
END_OF_TURN = "<|end|>\n"


# ---------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class Engine:
    """One vLLM server: an 8B model on one H100 80GB (see the module docstring)."""

    step_fixed_s: float = 6e-3  # a
    prefill_token_s: float = 3.0e-5  # b
    attention_s: float = 1.0e-9  # c, per prefill token x context token
    decode_seq_s: float = 8e-5  # d
    kv_read_s: float = 4e-8  # e, per context token of a decoding sequence
    cascade_min_requests: int = 8  # shared-prefix KV read once per step (see below)
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    block_tokens: int = 16
    kv_blocks: int = 25_000
    max_model_len: int = 262_144


@dataclass(frozen=True)
class PoolConfig:
    scrape_interval_s: float = 1.0
    max_inflight: int = 64  # per backend (PARLEY_BACKEND_MAX_INFLIGHT's default)


# ------------------------------------------------------------------------------ text


class TextSource:
    """Deterministic filler text: slices of one long random-word string."""

    def __init__(self, seed: int, size: int = 1_200_000) -> None:
        rng = random.Random(f"text:{seed}")
        letters = "etaoinshrdlucmfwypvbgkjqxz"
        vocab = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(4000)]
        words = rng.choices(vocab, k=size // 5)
        self.pool = " ".join(words)[:size]

    def make(self, rng: random.Random, tokens: int, tag: str) -> str:
        chars = max(tokens * CHARS_PER_TOKEN, len(tag) + 1)
        body = chars - len(tag)
        start = rng.randrange(0, len(self.pool) - body)
        return tag + self.pool[start : start + body]


def message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def render(msg: dict[str, str]) -> str:
    """The simulated chat template; the prompt ends with GENERATION_PROMPT, so a turn's
    prompt followed by its answer and END_OF_TURN renders the next turn's history."""
    return f"<|{msg['role']}|>\n{msg['content']}{END_OF_TURN}"


# ------------------------------------------------------------------ KV block hashes


@dataclass(frozen=True)
class Chain:
    """Hashes of the full KV blocks of some rendered text, plus the unfinished tail."""

    hashes: tuple[bytes, ...]
    last: bytes
    tail: str
    chars: int

    @classmethod
    def start(cls, salt: str) -> Chain:
        return cls((), hashlib.blake2b(f"salt:{salt}".encode(), digest_size=8).digest(), "", 0)

    def extend(self, text: str, block_chars: int) -> Chain:
        buffer = self.tail + text
        full = len(buffer) // block_chars
        last = self.last
        new = []
        for i in range(full):
            chunk = buffer[i * block_chars : (i + 1) * block_chars]
            last = hashlib.blake2b(last + chunk.encode(), digest_size=8).digest()
            new.append(last)
        return Chain(
            self.hashes + tuple(new), last, buffer[full * block_chars :], self.chars + len(text)
        )


# -------------------------------------------------------------------------- workload


@dataclass
class Turn:
    user: dict[str, str]
    answer: dict[str, str]
    think_s: float  # after the previous answer, before this question


@dataclass
class Script:
    tenant: str
    start: float
    head_key: str  # names `head` for the memos: system prompt (and document)
    head: tuple[dict[str, str], ...]
    turns: list[Turn]


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # chat | longdoc
    duration_s: float
    warmup_s: float
    drain_s: float
    tenants: tuple[tuple[str, float], ...]  # (tenant, sessions per second)
    docs_per_tenant: int = 0
    sessions_per_s: float = 0.0  # longdoc: sessions pick a document, and so a tenant
    zipf_s: float = 1.0
    measure_tenant: str | None = None  # report this tenant's TTFT separately
    seed_offset: int = 0  # a variant with other documents, sessions and texts


def lognormal_int(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(math.exp(rng.gauss(math.log(median), sigma))))))


def chat_scripts(scenario: Scenario, seed: int, text: TextSource) -> list[Script]:
    scripts = []
    for tenant, rate in scenario.tenants:
        # Each tenant's stream has its own generator, so `quiet_alone` replays exactly
        # the quiet tenant's sessions of `noisy`.
        rng = random.Random(f"{seed}:chat:{tenant}")
        systems = [
            message(
                "system",
                text.make(rng, rng.randint(300, 2500), f"[{tenant} assistant {i}] "),
            )
            for i in range(3)
        ]
        t = 0.0
        n = 0
        while True:
            t += rng.expovariate(rate)
            if t >= scenario.duration_s:
                break
            choice = rng.randrange(len(systems))
            turns = []
            for k in range(min(12, 1 + int(rng.expovariate(1 / 3.0)))):
                user = message(
                    "user",
                    text.make(rng, lognormal_int(rng, 80, 0.8, 8, 1500), f"[{tenant} s{n} q{k}] "),
                )
                answer = message(
                    "assistant",
                    text.make(rng, lognormal_int(rng, 200, 0.6, 16, 1500), f"[a{n}.{k}] "),
                )
                turns.append(Turn(user, answer, 0.0 if k == 0 else 2.0 + rng.expovariate(1 / 8.0)))
            scripts.append(Script(tenant, t, f"{tenant}:sys{choice}", (systems[choice],), turns))
            n += 1
    return scripts


def longdoc_scripts(scenario: Scenario, seed: int, text: TextSource) -> list[Script]:
    rng = random.Random(f"{seed}:longdoc")
    docs: list[tuple[str, str, tuple[dict[str, str], ...]]] = []
    for tenant, _ in scenario.tenants:
        system = message("system", text.make(rng, 300, f"[{tenant} document assistant] "))
        for d in range(scenario.docs_per_tenant):
            tokens = int(math.exp(rng.uniform(math.log(20_000), math.log(200_000))))
            doc = message("system", text.make(rng, tokens, f"Document {tenant}/{d}:\n"))
            docs.append((tenant, f"{tenant}:doc{d}", (system, doc)))
    rng.shuffle(docs)  # popularity rank independent of tenant and size
    weights = list(itertools.accumulate(1 / (r + 1) ** scenario.zipf_s for r in range(len(docs))))
    total_rate = scenario.sessions_per_s
    scripts = []
    t = 0.0
    n = 0
    while True:
        t += rng.expovariate(total_rate)
        if t >= scenario.duration_s:
            break
        tenant, key, head = rng.choices(docs, cum_weights=weights)[0]
        turns = []
        for k in range(min(16, 1 + int(rng.expovariate(1 / 5.0)))):
            user = message(
                "user", text.make(rng, lognormal_int(rng, 30, 0.6, 6, 400), f"[u{n} q{k}] ")
            )
            answer = message(
                "assistant", text.make(rng, lognormal_int(rng, 150, 0.5, 16, 1000), f"[a{n}.{k}] ")
            )
            turns.append(Turn(user, answer, 0.0 if k == 0 else 3.0 + rng.expovariate(1 / 12.0)))
        scripts.append(Script(tenant, t, key, head, turns))
        n += 1
    return scripts


# ------------------------------------------------------------------------ simulation


@dataclass(eq=False)
class Request:
    tenant: str
    messages: list[dict[str, str]]
    stable_key: str | None  # the head's key when the stable part is exactly the head
    arrival: float
    prompt_tokens: int
    total_tokens: int  # prompt + answer: the KV the request holds
    prompt_blocks: int  # full KV blocks of the prompt
    conversation: Chain  # block hashes of prompt + answer
    session: LiveSession
    head_key: str
    head_tokens: int  # the head (system prompt, document) in whole KV blocks
    route_blocks: tuple[int, ...] | None = None
    backend: int = -1
    queued: bool = False
    dispatched: float | None = None
    admitted: float | None = None
    first_token: float | None = None
    done: float | None = None
    hit_tokens: int = 0
    # on the server
    computed: int = 0
    refs: list[bytes] = field(default_factory=list)
    private: int = 0
    registered: int = 0
    failed_epoch: int = -1
    shares_head: bool = False
    decode_from: int = 0

    @property
    def out_tokens(self) -> int:
        return self.total_tokens - self.prompt_tokens


@dataclass(eq=False)
class LiveSession:
    script: Script
    chain: Chain
    messages: list[dict[str, str]]
    head_tokens: int
    turn: int = 0


class Server:
    """One simulated vLLM server (see the module docstring)."""

    def __init__(self, sim: Simulation, index: int) -> None:
        self.sim = sim
        self.engine = sim.engine
        self.index = index
        self.id = f"vllm-{index:02d}"
        self.cached: dict[bytes, None] = {}  # block hashes in the cache
        self.acquired: Counter[bytes] = Counter()
        self.released: Counter[bytes] = Counter()
        # Cached, unreferenced blocks, each with the stamp of its release; the freed_*
        # lists hold releases in order (the LRU order), stale entries for revived ones.
        self.free: dict[bytes, int] = {}
        self.freed_blocks: list[bytes] = []
        self.freed_stamps: list[int] = []
        self.freed_from = 0
        self.stamp = 0
        self.referenced = 0  # blocks held by requests (cached or private)
        self.kv_epoch = 0  # bumped whenever blocks are released
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.decoding: list[tuple[int, int, Request]] = []  # (last step, seq, request)
        self.n_decoding = 0
        self.decode_base = 0  # sum over decoding requests of (prompt - first step)
        self.heads: dict[str, int] = {}  # running requests by head
        self.sharing: dict[str, int] = {}  # requests sharing a cached head's reference
        self.step_no = 0
        self.busy = False
        self._seq = itertools.count()

    # metrics as /metrics shows them
    def running(self) -> int:
        return len(self.prefilling) + self.n_decoding

    def kv_usage(self) -> float:
        return self.referenced / self.engine.kv_blocks

    def submit(self, request: Request) -> None:
        self.waiting.append(request)
        if not self.busy:
            self._start_step()

    # KV cache. A block's reference count is acquired[h] - released[h]; per-block work
    # goes through C-level iterators (takewhile, filter, map, Counter.update), since a
    # 200k-token document is 12,500 blocks. The requests that found a whole head
    # (system prompt and document) cached share one reference to its blocks, taken by
    # the first and given back by the last: the same counts, without touching every
    # block of the document on every call.
    def _admit(self, request: Request) -> bool:
        engine = self.engine
        hashes = request.conversation.hashes
        limit = min(request.prompt_blocks, len(hashes))
        head = request.head_tokens // engine.block_tokens
        sharing = self.sharing.get(request.head_key, 0)
        start = head if sharing else 0  # a shared head is cached and held
        found = tuple(takewhile(self.cached.__contains__, hashes[start:limit]))
        hit = start + len(found)
        joins = 0 < head <= hit
        if joins and not sharing:
            own, taken = hashes[head:hit], hashes[:hit]
        elif joins:
            own = taken = found
        else:
            own = taken = found  # start == 0
        blocks = -(-request.total_tokens // engine.block_tokens)
        new = blocks - hit
        free = self.free
        revived = list(filter(free.__contains__, taken))
        if new > engine.kv_blocks - self.referenced - len(revived):
            return False
        deque(map(free.__delitem__, revived), maxlen=0)
        self.acquired.update(taken)
        self.referenced += len(revived) + new
        excess = self.referenced + len(free) - engine.kv_blocks
        if excess > 0:
            self._evict(excess)
        if joins:
            self.sharing[request.head_key] = sharing + 1
        request.shares_head = joins
        request.refs = list(own)
        request.private = new
        request.registered = hit
        request.hit_tokens = min(hit * engine.block_tokens, request.prompt_tokens - 1)
        request.computed = request.hit_tokens
        request.admitted = self.sim.now
        self.heads[request.head_key] = self.heads.get(request.head_key, 0) + 1
        return True

    def _evict(self, count: int) -> None:
        """Drop the `count` least recently released unreferenced blocks."""
        free = self.free
        victims: list[bytes] = []
        while len(victims) < count:
            low = self.freed_from
            high = low + count - len(victims)
            blocks, stamps = self.freed_blocks[low:high], self.freed_stamps[low:high]
            self.freed_from = high
            # An entry whose stamp changed was revived (or released again) since.
            victims.extend(compress(blocks, map(eq, map(free.get, blocks), stamps)))
        if self.freed_from > 100_000 and self.freed_from * 2 > len(self.freed_blocks):
            del self.freed_blocks[: self.freed_from], self.freed_stamps[: self.freed_from]
            self.freed_from = 0
        for table in (free, self.cached, self.acquired, self.released):
            deque(map(dict.__delitem__, repeat(table), victims), maxlen=0)

    def _register(self, request: Request, upto: int) -> None:
        """Computed full blocks join the cache; one another request already cached
        stays private to this one (vLLM keeps the first)."""
        if upto <= request.registered:
            return
        fresh = list(
            filterfalse(
                self.cached.__contains__, request.conversation.hashes[request.registered : upto]
            )
        )
        self.cached.update(dict.fromkeys(fresh))
        self.acquired.update(fresh)
        request.refs.extend(fresh)
        request.private -= len(fresh)
        request.registered = upto

    def _release(self, request: Request) -> None:
        refs = request.refs
        if request.shares_head:
            left = self.sharing[request.head_key] - 1
            if left:
                self.sharing[request.head_key] = left
            else:  # the last one gives the head back
                del self.sharing[request.head_key]
                head = request.head_tokens // self.engine.block_tokens
                refs = list(request.conversation.hashes[:head]) + refs
        self.released.update(refs)
        counts = map(
            sub, map(self.acquired.__getitem__, refs), map(self.released.__getitem__, refs)
        )
        unreferenced = list(compress(refs, map(not_, counts)))
        # The tail goes first towards the eviction end, as vLLM frees blocks.
        unreferenced.reverse()
        stamps = range(self.stamp, self.stamp + len(unreferenced))
        self.stamp += len(unreferenced)
        self.free.update(zip(unreferenced, stamps, strict=True))
        self.freed_blocks.extend(unreferenced)
        self.freed_stamps.extend(stamps)
        self.referenced -= len(unreferenced) + request.private
        request.refs = []
        request.private = 0
        request.shares_head = False
        self.kv_epoch += 1

    # steps
    def _start_step(self) -> None:
        engine = self.engine
        budget = engine.max_num_batched_tokens - self.n_decoding
        chunks: list[tuple[Request, int]] = []
        for request in self.prefilling:
            if budget <= 0:
                break
            size = min(request.prompt_tokens - request.computed, budget)
            chunks.append((request, size))
            budget -= size
        waiting = self.waiting
        while waiting and budget > 0 and self.running() < engine.max_num_seqs:
            head = waiting[0]
            if head.failed_epoch == self.kv_epoch or not self._admit(head):
                head.failed_epoch = self.kv_epoch
                break
            waiting.popleft()
            self.prefilling.append(head)
            size = min(head.prompt_tokens - head.computed, budget)
            chunks.append((head, size))
            budget -= size
        if not chunks and not self.n_decoding:
            self.busy = False
            return
        self.busy = True
        self.step_no += 1
        prefill = sum(size for _, size in chunks)
        attention = sum(size * (r.computed + size / 2) for r, size in chunks)
        context = self.decode_base + self.n_decoding * self.step_no
        if (
            self.n_decoding > 1
            and len(self.heads) == 1
            and self.running() >= engine.cascade_min_requests
        ):
            # Cascade attention: every request shares the head, read once for all.
            context -= (self.n_decoding - 1) * self.sim.head_tokens[next(iter(self.heads))]
        duration = (
            engine.step_fixed_s
            + engine.prefill_token_s * prefill
            + engine.attention_s * attention
            + engine.decode_seq_s * self.n_decoding
            + engine.kv_read_s * context
        )
        self.sim.at(self.sim.now + duration, self._end_step, chunks)

    def _end_step(self, chunks: list[tuple[Request, int]]) -> None:
        sim = self.sim
        now = sim.now
        step = self.step_no
        produced = self.n_decoding
        decoding = self.decoding
        while decoding and decoding[0][0] <= step:
            _, _, request = heapq.heappop(decoding)
            self.n_decoding -= 1
            self.decode_base -= request.prompt_tokens - request.decode_from
            self._finish(request)
        block = self.engine.block_tokens
        finished_prefill = False
        for request, size in chunks:
            request.computed += size
            self._register(request, min(request.computed // block, request.prompt_blocks))
            if request.computed >= request.prompt_tokens:
                finished_prefill = True
                produced += 1
                request.first_token = now
                remaining = request.out_tokens - 1
                if remaining <= 0:
                    self._finish(request)
                else:
                    request.decode_from = step
                    self.n_decoding += 1
                    self.decode_base += request.prompt_tokens - step
                    heapq.heappush(decoding, (step + remaining, next(self._seq), request))
        if finished_prefill:
            self.prefilling = [r for r in self.prefilling if r.computed < r.prompt_tokens]
        sim.count_tokens(produced)
        self._start_step()

    def _finish(self, request: Request) -> None:
        request.done = self.sim.now
        left = self.heads[request.head_key] - 1
        if left:
            self.heads[request.head_key] = left
        else:
            del self.heads[request.head_key]
        self._register(request, len(request.conversation.hashes))
        self._release(request)
        self.sim.completed(request)


class Simulation:
    def __init__(
        self,
        scenario: Scenario,
        scripts: Sequence[Script],
        *,
        policy: str | Callable[[], Policy],
        backends: int,
        engine: Engine,
        pool: PoolConfig,
    ) -> None:
        self.scenario = scenario
        self.engine = engine
        self.pool = pool
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = itertools.count()
        self.servers = [Server(self, i) for i in range(backends)]
        self.views = [
            BackendView(id=s.id, models=frozenset({MODEL}), max_model_len=engine.max_model_len)
            for s in self.servers
        ]
        self.index_of = {s.id: s.index for s in self.servers}
        self.policy: Policy = make_policy(policy) if isinstance(policy, str) else policy()
        self.queue: FairQueue[Request] = FairQueue()
        self.capacity = pool.max_inflight * backends  # the pool's admission capacity
        self.inflight = 0
        self.scripts = scripts
        self.requests: list[Request] = []
        self.tokens_in_window = 0
        self.max_queue = 0
        self._head_chains: dict[str, Chain] = {}
        self.head_tokens: dict[str, int] = {}
        self._head_route_blocks: dict[str, tuple[int, ...]] = {}
        self.block_chars = engine.block_tokens * CHARS_PER_TOKEN

    def at(self, t: float, fn: Callable[[Any], None], arg: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, arg))

    def run(self) -> None:
        for script in self.scripts:
            self.at(script.start, self._session_start, script)
        self.at(0.0, self._scrape, None)
        end = self.scenario.duration_s + self.scenario.drain_s
        heap = self._heap
        while heap:
            t, _, fn, arg = heapq.heappop(heap)
            if t > end:
                break
            self.now = t
            fn(arg)
        self.now = end

    def count_tokens(self, n: int) -> None:
        if self.scenario.warmup_s <= self.now <= self.scenario.duration_s:
            self.tokens_in_window += n

    def _scrape(self, _: Any) -> None:
        for server, view in zip(self.servers, self.views, strict=True):
            view.running = float(server.running())
            view.waiting = float(len(server.waiting))
            view.kv_usage = server.kv_usage()
        self.at(self.now + self.pool.scrape_interval_s, self._scrape, None)

    # sessions
    def _session_start(self, script: Script) -> None:
        chain = self._head_chains.get(script.head_key)
        if chain is None:
            chain = Chain.start(script.tenant)
            for msg in script.head:
                chain = chain.extend(render(msg), self.block_chars)
            self._head_chains[script.head_key] = chain
        head_tokens = len(chain.hashes) * self.engine.block_tokens
        self.head_tokens[script.head_key] = head_tokens
        session = LiveSession(script, chain, list(script.head), head_tokens)
        self._ask(session)

    def _ask(self, session: LiveSession) -> None:
        turn = session.script.turns[session.turn]
        session.messages.append(turn.user)
        prompt = session.chain.extend(render(turn.user) + GENERATION_PROMPT, self.block_chars)
        conversation = prompt.extend(turn.answer["content"] + END_OF_TURN, self.block_chars)
        prompt_tokens = -(-prompt.chars // CHARS_PER_TOKEN)
        request = Request(
            tenant=session.script.tenant,
            messages=list(session.messages),
            stable_key=session.script.head_key if session.turn == 0 else None,
            arrival=self.now,
            prompt_tokens=prompt_tokens,
            total_tokens=max(-(-conversation.chars // CHARS_PER_TOKEN), prompt_tokens + 1),
            prompt_blocks=prompt.chars // self.block_chars,
            conversation=conversation,
            session=session,
            head_key=session.script.head_key,
            head_tokens=session.head_tokens,
        )
        self.requests.append(request)
        self._submit(request)

    def _next_turn(self, session: LiveSession) -> None:
        self._ask(session)

    # the pool: admission, routing, completion
    def _submit(self, request: Request) -> None:
        if self.inflight >= self.capacity or len(self.queue):
            request.queued = True
            self.queue.push(request.tenant, request)
            self.max_queue = max(self.max_queue, len(self.queue))
        else:
            self._dispatch(request)

    def _route_blocks(self, request: Request) -> tuple[int, ...]:
        key = request.stable_key
        if key is not None and key in self._head_route_blocks:
            return self._head_route_blocks[key]  # same input, same output: a pure function
        blocks = prefix_blocks(request.messages, salt=request.tenant)
        if key is not None:
            self._head_route_blocks[key] = blocks
        return blocks

    def _dispatch(self, request: Request) -> None:
        if request.route_blocks is None:
            request.route_blocks = self._route_blocks(request)
        choice = self.policy.choose(
            RouteRequest(
                model=MODEL,
                prefix_blocks=request.route_blocks,
                tenant_id=request.tenant,
                prompt_tokens=request.prompt_tokens,
            ),
            self.views,
        )
        if choice is None:
            raise RuntimeError("no backend can take the call")
        choice.inflight += 1
        self.inflight += 1
        request.backend = self.index_of[choice.id]
        request.dispatched = self.now
        self.servers[request.backend].submit(request)

    def completed(self, request: Request) -> None:
        view = self.views[request.backend]
        view.inflight -= 1
        self.inflight -= 1
        # As inference.admission: the call charges its tenant when it ends.
        self.queue.vtc.charge(
            request.tenant,
            prompt_tokens=request.prompt_tokens,
            completion_tokens=request.out_tokens,
        )
        while self.inflight < self.capacity and len(self.queue):
            popped = self.queue.pop()
            assert popped is not None
            self._dispatch(popped[1])
        session = request.session
        session.messages.append(session.script.turns[session.turn].answer)
        session.chain = request.conversation
        session.turn += 1
        if session.turn < len(session.script.turns):
            when = self.now + session.script.turns[session.turn].think_s
            if when < self.scenario.duration_s:
                self.at(when, self._next_turn, session)

    # results
    def metrics(self, tenant: str | None = None) -> dict[str, Any]:
        sc = self.scenario
        measured = [
            r
            for r in self.requests
            if sc.warmup_s <= r.arrival < sc.duration_s and (tenant is None or r.tenant == tenant)
        ]
        ttft = [
            (r.first_token if r.first_token is not None else self.now) - r.arrival for r in measured
        ]
        admitted = [r for r in measured if r.computed > 0 or r.first_token is not None]
        prompt = sum(r.prompt_tokens for r in admitted)
        out: dict[str, Any] = {
            "ttft_p50_s": percentile(ttft, 50),
            "ttft_p90_s": percentile(ttft, 90),
            "ttft_p99_s": percentile(ttft, 99),
            "ttft_mean_s": round(sum(ttft) / len(ttft), 4) if ttft else None,
            "requests": len(measured),
            "unfinished": sum(1 for r in measured if r.first_token is None),
            "queued_share": round(sum(r.queued for r in measured) / len(measured), 4)
            if measured
            else 0.0,
            "cache_hit_rate": round(sum(r.hit_tokens for r in admitted) / prompt, 4)
            if prompt
            else 0.0,
        }
        if tenant is None:
            out["throughput_tok_s"] = round(
                self.tokens_in_window / (sc.duration_s - sc.warmup_s), 1
            )
            out["max_fair_queue"] = self.max_queue
        return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (pos - low), 4)


# ------------------------------------------------------------------------- scenarios


QUIET = ("quiet-0", "quiet-1", "quiet-2", "quiet-3")


# Loads, per 16 backends (they scale with the pool). Sessions per second:
CHAT_SESSIONS = 6.0  # per chat tenant (8 tenants): about 60% of what the pool serves
QUIET_SESSIONS = 8.0  # per quiet tenant (4); the noisy tenant sends 10x that, which
# alone is more than the pool serves
LONGDOC_SESSIONS = 1.0  # all document tenants together; see docs/benchmarks.md
# (chat, noisy, quiet_alone) and longdoc: (duration, warm-up, drain) in seconds
QUICK_TIMES = ((60.0, 20.0, 30.0), (240.0, 60.0, 90.0))
LONGDOC_SWEEP = (0.125, 0.25, 0.5, 2.0)  # full run, 16 backends: longdoc at these x load
FULL_TIMES = ((180.0, 40.0, 60.0), (600.0, 120.0, 120.0))


def scenarios(
    backends: int, quick: bool, load: float = 1.0, extras: bool = False
) -> dict[str, Scenario]:
    """The four scenarios for a pool of `backends`; `load` scales chat and longdoc.
    `extras` adds longdoc at other loads (a sweep) and with other seeds."""
    scale = backends / 16
    chat_times, doc_times = QUICK_TIMES if quick else FULL_TIMES
    chat_tenants = tuple((f"chat-{i}", CHAT_SESSIONS * scale * load) for i in range(8))
    quiet_rate = QUIET_SESSIONS * scale
    noisy_tenants = (*((t, quiet_rate) for t in QUIET), ("noisy", 10 * quiet_rate))
    doc_tenants = tuple((f"docs-{i:02d}", 0.0) for i in range(round(16 * scale)))
    every = {
        "chat": Scenario("chat", "chat", *chat_times, chat_tenants),
        "longdoc": Scenario(
            "longdoc",
            "longdoc",
            *doc_times,
            doc_tenants,
            docs_per_tenant=3,
            zipf_s=1.0,
            sessions_per_s=LONGDOC_SESSIONS * scale * load,
        ),
        "noisy": Scenario("noisy", "chat", *chat_times, noisy_tenants, measure_tenant=QUIET[0]),
        "quiet_alone": Scenario(
            "quiet_alone",
            "chat",
            *chat_times,
            ((QUIET[0], quiet_rate),),
            measure_tenant=QUIET[0],
        ),
    }
    if extras:
        doc = every["longdoc"]
        for k in (1, 2):
            every[f"longdoc_seed+{k}"] = replace(doc, name=f"longdoc_seed+{k}", seed_offset=k)
        for x in LONGDOC_SWEEP:
            every[f"longdoc_x{x:g}"] = replace(
                doc, name=f"longdoc_x{x:g}", sessions_per_s=doc.sessions_per_s * x
            )
    return every


_TEXT: dict[int, TextSource] = {}


def run_one(
    scenario: Scenario, policy: str, backends: int, seed: int, engine: Engine, pool: PoolConfig
) -> dict[str, Any]:
    seed += scenario.seed_offset
    if seed not in _TEXT:
        _TEXT[seed] = TextSource(seed)
    text = _TEXT[seed]
    if scenario.kind == "chat":
        scripts = chat_scripts(scenario, seed, text)
    else:
        scripts = longdoc_scripts(scenario, seed, text)
    started = time.perf_counter()
    sim = Simulation(scenario, scripts, policy=policy, backends=backends, engine=engine, pool=pool)
    sim.run()
    result = sim.metrics()
    if scenario.measure_tenant:
        result["tenant"] = {scenario.measure_tenant: sim.metrics(scenario.measure_tenant)}
    result["wall_s"] = round(time.perf_counter() - started, 2)
    return result


def _job(args: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    key, scenario, policy, backends, seed, engine, pool = args
    return key, run_one(scenario, policy, backends, seed, engine, pool)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def goals(run: dict[str, Any], longdoc_name: str = "longdoc") -> dict[str, Any]:
    """The issue's goals, measured on this run."""
    longdoc = run["scenarios"][longdoc_name]["policies"]
    default, rr, prefix = longdoc[DEFAULT_POLICY], longdoc["round_robin"], longdoc["prefix"]
    p90_vs_rr = ratio(rr["ttft_p90_s"], default["ttft_p90_s"])
    p90_vs_prefix = ratio(prefix["ttft_p90_s"], default["ttft_p90_s"])
    throughput_vs_rr = ratio(default["throughput_tok_s"], rr["throughput_tok_s"])
    quiet = run["fairness"].get(DEFAULT_POLICY, {}).get("quiet_tenant_p90_ratio")
    return {
        "longdoc_p90_rr_over_default": {
            "value": p90_vs_rr,
            "goal": ">= 10",
            "met": bool(p90_vs_rr and p90_vs_rr >= 10),
        },
        "longdoc_p90_prefix_over_default": {
            "value": p90_vs_prefix,
            "goal": ">= 1.5",
            "met": bool(p90_vs_prefix and p90_vs_prefix >= 1.5),
        },
        "longdoc_throughput_default_over_rr": {
            "value": throughput_vs_rr,
            "goal": ">= 1.25",
            "met": bool(throughput_vs_rr and throughput_vs_rr >= 1.25),
        },
        "quiet_tenant_p90_ratio": {
            "value": quiet,
            "goal": "<= 2",
            "met": bool(quiet is not None and quiet <= 2),
        },
    }


def simulate(
    *,
    backend_counts: Sequence[int],
    policies: Sequence[str],
    quick: bool,
    seed: int,
    jobs: int,
    engine: Engine,
    pool: PoolConfig,
    load: float = 1.0,
    only: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    def chosen(backends: int) -> dict[str, Scenario]:
        every = scenarios(backends, quick, load, extras=not quick and backends == 16)
        return {k: v for k, v in every.items() if only is None or k in only}

    work = []
    for backends in backend_counts:
        for name, scenario in chosen(backends).items():
            for policy in policies:
                work.append(
                    ((backends, name, policy), scenario, policy, backends, seed, engine, pool)
                )
    # Longest first, so two workers finish together.
    work.sort(key=lambda w: (-w[3], not w[0][1].startswith("longdoc"), w[0][1] == "quiet_alone"))
    results: dict[tuple[Any, ...], dict[str, Any]] = {}
    started = time.perf_counter()
    if jobs <= 1:
        for item in work:
            key, result = _job(item)
            results[key] = result
            if progress:
                print(f"  {key}: {result['wall_s']} s", file=sys.stderr)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as executor:
            for key, result in executor.map(_job, work):
                results[key] = result
                if progress:
                    print(f"  {key}: {result['wall_s']} s", file=sys.stderr)
    out: dict[str, Any] = {
        "simulator": {
            "date": dt.date.today().isoformat(),
            "seed": seed,
            "quick": quick,
            "load": load,
            "engine": asdict(engine),
            "pool": asdict(pool),
            "wall_s": round(time.perf_counter() - started, 1),
            "cpus": os.cpu_count(),
        },
        "runs": {},
    }
    for backends in backend_counts:
        sc = chosen(backends)
        run: dict[str, Any] = {"backends": backends, "scenarios": {}, "fairness": {}}
        for name, scenario in sc.items():
            run["scenarios"][name] = {
                "duration_s": scenario.duration_s,
                "warmup_s": scenario.warmup_s,
                "seed": seed + scenario.seed_offset,
                "load": (
                    {"sessions_per_s": scenario.sessions_per_s, "tenants": len(scenario.tenants)}
                    if scenario.kind == "longdoc"
                    else {"sessions_per_s": dict(scenario.tenants)}
                ),
                "policies": {p: results[(backends, name, p)] for p in policies},
            }
        for p in policies if {"noisy", "quiet_alone"} <= set(sc) else ():
            quiet = QUIET[0]
            noisy = results[(backends, "noisy", p)]["tenant"][quiet]["ttft_p90_s"]
            alone = results[(backends, "quiet_alone", p)]["tenant"][quiet]["ttft_p90_s"]
            run["fairness"][p] = {
                "tenant": quiet,
                "quiet_alone_p90_s": alone,
                "quiet_noisy_p90_s": noisy,
                "quiet_tenant_p90_ratio": ratio(noisy, alone),
            }
        if set(POLICIES) <= set(policies) and "longdoc" in sc:
            run["goals"] = goals(run)
            for name in sc:
                if name.startswith("longdoc_"):
                    run.setdefault("goals_longdoc_variants", {})[name] = {
                        k: v for k, v in goals(run, name).items() if k.startswith("longdoc")
                    }
        out["runs"][str(backends)] = run
    return out


def _row(label: str, m: dict[str, Any]) -> str:
    throughput = m.get("throughput_tok_s")
    return (
        f"{label:<22}{m['ttft_p50_s']:>9.3f}{m['ttft_p90_s']:>9.3f}{m['ttft_p99_s']:>9.3f}"
        f"{'' if throughput is None else f'{throughput:.0f}':>10}{m['cache_hit_rate']:>7.3f}"
        f"{m['requests']:>7}{m['unfinished']:>7}{m['queued_share']:>8.3f}"
    )


def _load_text(load: dict[str, Any]) -> str:
    rates = load["sessions_per_s"]
    if not isinstance(rates, dict):
        return f"{rates:g} sessions/s over {load['tenants']} tenants"
    by_rate = Counter(rates.values())
    return (
        ", ".join(f"{n} tenant{'s' * (n > 1)} x {r:g}" for r, n in by_rate.items()) + " sessions/s"
    )


def table(result: dict[str, Any]) -> str:
    """The JSON as text: TTFT percentiles in seconds, throughput in tokens/s."""
    header = (
        f"{'policy':<22}{'p50':>9}{'p90':>9}{'p99':>9}{'tok/s':>10}{'hit':>7}"
        f"{'calls':>7}{'unfin':>7}{'queued':>8}"
    )
    lines = []
    for backends, run in result["runs"].items():
        lines.append(f"== {backends} backends")
        for name, scenario in run["scenarios"].items():
            lines.append(f"-- {name} (seed {scenario['seed']}, {_load_text(scenario['load'])})")
            lines.append(header)
            for policy, m in scenario["policies"].items():
                lines.append(_row(policy, m))
                for tenant, tm in m.get("tenant", {}).items():
                    if name == "noisy":
                        lines.append(_row(f"  {tenant}", tm))
        if run["fairness"]:
            lines.append("-- fairness: quiet tenant p90 TTFT alone, under the noisy tenant, ratio")
            for policy, f in run["fairness"].items():
                lines.append(
                    f"{policy:<22}{f['quiet_alone_p90_s']:>9.3f}{f['quiet_noisy_p90_s']:>9.3f}"
                    f"{f['quiet_tenant_p90_ratio']:>9.2f}"
                )
        for goal, g in run.get("goals", {}).items():
            verdict = "met" if g["met"] else "MISSED"
            lines.append(f"goal {goal}: {g['value']} (goal {g['goal']}) {verdict}")
        for name, variant in run.get("goals_longdoc_variants", {}).items():
            summary = ", ".join(
                f"{k.removeprefix('longdoc_')}={g['value']}" for k, g in variant.items()
            )
            lines.append(f"  {name}: {summary}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 backends, shorter runs")
    parser.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    parser.add_argument(
        "--out", help="write the JSON here (default for a full run: bench-results/poolsim.json)"
    )
    parser.add_argument(
        "--backends", type=int, nargs="+", help="backend counts (default 16, and 64 unless --quick)"
    )
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--load", type=float, default=1.0, help="scale the chat and longdoc loads")
    parser.add_argument("--max-inflight", type=int, default=PoolConfig.max_inflight)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--scenarios", nargs="+", help="run only these scenarios")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    backend_counts = args.backends or ([16] if args.quick else [16, 64])
    result = simulate(
        backend_counts=backend_counts,
        policies=args.policies,
        quick=args.quick,
        seed=args.seed,
        jobs=args.jobs,
        engine=Engine(),
        pool=replace(PoolConfig(), max_inflight=args.max_inflight),
        load=args.load,
        only=args.scenarios,
        progress=args.progress,
    )
    return result_write(
        "poolsim", result, out=args.out, quick=args.quick, as_json=args.json, table=table
    )


if __name__ == "__main__":
    sys.exit(main())
