"""Prefix (KV) cache of the local model server: reuse what llama.cpp already evaluated.

llama.cpp keeps one sequence in its context (the tokens it evaluated last), and
llama-cpp-python's `Llama.generate` already keeps the longest common prefix of that
sequence and the next prompt. One sequence is not enough: between two turns of a
conversation the platform asks the same server for the conversation's title, which
would replace the conversation in the context, so the next turn would prefill its
whole history again.

`PrefixCache` keeps a few more sequences in RAM, as llama.cpp's sequence state
(`llama_state_seq_get_data`: the KV cells of sequence 0, no logits): before the live
sequence loses more than a few tokens to a different prompt, it is snapshotted; before
a prompt is evaluated, the snapshot sharing the longest prefix with it is restored
when it shares more than the live sequence does. Snapshots are evicted least recently
used first, within a count and a byte budget.

It counts like vLLM's prefix cache (`vllm:prefix_cache_queries_total`,
`vllm:prefix_cache_hits_total`, in tokens): every prompt token is a query; a hit is a
prompt token whose KV was already there (live or restored).
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger("parley.local_server")

# A live sequence losing fewer tokens than this to the next prompt is not worth a
# snapshot (the next turn of the same conversation trims at most a token or two).
SNAPSHOT_MIN_LOSS = 32
# Sequences shorter than this are cheap to prefill again: no snapshot.
SNAPSHOT_MIN_TOKENS = 64


def common_prefix(a: np.ndarray | list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    left = np.asarray(a[:n], dtype=np.intc)
    right = np.asarray(b[:n], dtype=np.intc)
    differ = np.flatnonzero(left != right)
    return int(differ[0]) if differ.size else n


@dataclass
class Snapshot:
    tokens: np.ndarray  # the evaluated tokens, whose KV `state` holds
    state: bytes  # llama_state_seq_get_data of sequence 0
    used: float


class PrefixCache:
    """A few snapshots of llama.cpp's sequence 0, found by longest common prefix."""

    def __init__(self, llama: Any, *, max_sequences: int = 4, max_bytes: int = 1 << 30) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.llama = llama
        self.max_sequences = max_sequences
        self.max_bytes = max_bytes
        self.enabled = max_sequences > 0
        self.snapshots: OrderedDict[int, Snapshot] = OrderedDict()
        self._next_key = 0
        self.queries_total = 0  # prompt tokens looked up
        self.hits_total = 0  # of which were already evaluated
        self.restores_total = 0

    # --- the live sequence --------------------------------------------------------

    def live_tokens(self) -> np.ndarray:
        return self.llama.input_ids[: self.llama.n_tokens]

    def _snapshot_live(self) -> None:
        llama_cpp = self._llama_cpp
        ctx = self.llama._ctx.ctx
        tokens = self.live_tokens().copy()
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(ctx, buffer, size, 0)
        if not written:
            return
        state = bytes(memoryview(buffer)[:written])
        # A snapshot that is a prefix of the new one only wastes room.
        for key, snap in list(self.snapshots.items()):
            if len(snap.tokens) <= len(tokens) and common_prefix(
                tokens, snap.tokens.tolist()
            ) == len(snap.tokens):
                del self.snapshots[key]
        self.snapshots[self._next_key] = Snapshot(tokens, state, time.monotonic())
        self._next_key += 1
        while self.snapshots and (
            len(self.snapshots) > self.max_sequences
            or sum(len(s.state) for s in self.snapshots.values()) > self.max_bytes
        ):
            self.snapshots.popitem(last=False)

    def _restore(self, key: int) -> bool:
        llama_cpp = self._llama_cpp
        llama = self.llama
        snap = self.snapshots[key]
        memory = llama_cpp.llama_get_memory(llama._ctx.ctx)
        llama_cpp.llama_memory_clear(memory, True)
        buffer = (ctypes.c_uint8 * len(snap.state)).from_buffer_copy(snap.state)
        read = llama_cpp.llama_state_seq_set_data(llama._ctx.ctx, buffer, len(snap.state), 0)
        if not read:
            logger.warning("prefix cache: restoring a snapshot failed; prefilling instead")
            llama_cpp.llama_memory_clear(memory, True)
            llama.n_tokens = 0
            del self.snapshots[key]
            return False
        n = len(snap.tokens)
        llama.input_ids[:n] = snap.tokens
        llama.n_tokens = n
        # The logits are not part of the snapshot: Llama.generate evaluates at least
        # the prompt's last token again before sampling.
        llama._requires_eval = True
        snap.used = time.monotonic()
        self.snapshots.move_to_end(key)
        self.restores_total += 1
        return True

    # --- before a prompt ----------------------------------------------------------

    def prepare(self, prompt: list[int]) -> int:
        """Make the context hold the longest prefix of `prompt` available; return how
        many prompt tokens will not be evaluated again (counted as hits)."""
        live = self.live_tokens()
        reuse = common_prefix(live, prompt)
        if self.enabled:
            if len(live) >= SNAPSHOT_MIN_TOKENS and len(live) - reuse >= SNAPSHOT_MIN_LOSS:
                self._snapshot_live()
            best_key, best = None, reuse
            for key, snap in self.snapshots.items():
                shared = common_prefix(snap.tokens, prompt)
                if shared > best:
                    best_key, best = key, shared
            if best_key is not None and self._restore(best_key):
                reuse = best
        # Llama.generate evaluates the last prompt token again when the whole prompt
        # is cached (its logits are needed to sample).
        hits = min(reuse, len(prompt) - 1) if prompt else 0
        self.queries_total += len(prompt)
        self.hits_total += max(hits, 0)
        return max(hits, 0)
