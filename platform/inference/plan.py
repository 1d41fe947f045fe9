"""One LLM call's plan: every decision the pool makes for a call, and no I/O.

Both drivers step through it, in this order, each with its own I/O: inference.pool on
threads (Celery workers, the embedded server), inference.apool on an event loop (the
OpenAI-compatible API).

1. **open** (`CallPlan(...)`): backends are configured; the model is the request's or
   the pool's default, and the tenant's plan allows it; what the call reserves
   (inference.tokens), the pool's capacity for admission, the route (prefix blocks of
   the stable prompt, the prompt's estimate).
2. **limits, admit** (inference.store, one step): the call is held under the
   tenant's, user's and key's limits with its estimate reserved, and takes a slot of
   the pool, or waits its turn (VTC) while the pool is saturated.
3. **pick** (`pick`, `attempt`): the router's choice among the backends the call has
   not tried, from this process's view of the load (inference.load.LoadBoard). The
   first pick is made before step 2, whose one store step then also takes the
   backend's in-flight lease when the call is admitted at once (a call admitted later
   picks again).
4. **on failure** (`failed`, `exhausted`): before the first token, the failure counts
   against the backend's circuit, the backend is marked degraded, and the call backs
   off (exponential, full jitter) and picks again, up to PARLEY_FAILOVER_ATTEMPTS;
   after it, the call ends with the error (the caller keeps the partial text).
5. **settle** (`settle`): the backend's usage, else the prompt as
   estimated and a token per delta (nothing for a call that streamed nothing), goes to
   the ledger, the limits and the tenant's fairness counter; every lease is given back.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, replace

from django.conf import settings

from config.singleton import process_singleton
from inference.backends import backend_views
from inference.backends import forget_cache as forget_backends
from inference.breaker import CircuitBreaker
from inference.ledger import UsageRow
from inference.limits import CallIdentity
from inference.load import load_board
from inference.models import Backend
from inference.router import (
    ROUTABLE_STATES,
    BackendView,
    Policy,
    PrefixIndex,
    RouteRequest,
    candidates,
    make_policy,
    prefix_blocks,
)
from inference.selectors import default_model
from inference.tokens import estimate_tokens, prompt_tokens_estimate
from inference.types import (
    ChatRequest,
    InferenceError,
    StreamEvent,
    StreamFinished,
    StreamStarted,
    token_count,
)
from tenants.quotas import Limits

logger = logging.getLogger(__name__)

# --- what this process learns: the routing policy (its prefix index), the circuits ---

_policy: tuple[str, Policy] | None = None
_policy_lock = threading.Lock()


def policy() -> Policy:
    """The routing policy of PARLEY_ROUTING_POLICY, with this process's prefix index."""
    global _policy
    name = settings.PARLEY_ROUTING_POLICY
    with _policy_lock:
        if _policy is None or _policy[0] != name:
            _policy = (name, make_policy(name, PrefixIndex()))
        return _policy[1]


@process_singleton
def breaker() -> CircuitBreaker:
    return CircuitBreaker(
        threshold=settings.PARLEY_BREAKER_THRESHOLD,
        cooldown_s=settings.PARLEY_BREAKER_COOLDOWN_S,
    )


def forget() -> None:
    """Forget what this process learned (rows, affinity, circuits, load): for tests and
    `serve`, which change the configured backends at run time."""
    global _policy
    forget_backends()
    with _policy_lock:
        _policy = None
    breaker.reset()
    load_board.reset()


# --- one call ------------------------------------------------------------------------


@dataclass(frozen=True)
class Settlement:
    """What a call used, as it is booked: tokens and the ledger's outcome."""

    prompt_tokens: int
    completion_tokens: int
    outcome: str  # completed, partial (failed mid-stream) or failed (nothing produced)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class CallPlan:
    """The decisions of one call (see the module's steps). `limits`: the tenant's, for
    a tenant's call (None for a call of no tenant: no limits, no admission, no ledger)."""

    def __init__(self, request: ChatRequest, *, rows: list[Backend], limits: Limits | None):
        if not settings.PARLEY_BACKENDS and not rows:
            raise InferenceError(
                "no_backend", "No inference backend is configured (set PARLEY_BACKENDS)."
            )
        self.request = request
        self.rows = rows
        self.model = request.model or default_model(rows)
        self.limits = limits if request.tenant_id else None
        self.identity: CallIdentity | None = None
        if self.limits is not None:
            if not self.limits.allows_model(self.model):
                raise InferenceError(
                    "model_not_allowed", f"Your plan does not include the model {self.model!r}."
                )
            self.identity = CallIdentity(
                request.tenant_id,
                user_id=request.user_id or None,
                api_key_id=request.api_key_id or None,
            )
        self.estimate = token_count(
            estimate_tokens(
                messages=request.messages, max_tokens=request.max_tokens or 0, tools=request.tools
            )
        )
        routable = [row for row in rows if row.state in ROUTABLE_STATES]
        self.capacity = settings.PARLEY_BACKEND_MAX_INFLIGHT * max(
            1, round(sum(row.weight for row in routable))
        )
        self.route = RouteRequest(
            model=self.model,
            prefix_blocks=prefix_blocks(request.messages, salt=request.tenant_id),
            tenant_id=request.tenant_id,
            prompt_tokens=prompt_tokens_estimate(request.messages, request.tools),
        )
        self.tried: set[str] = set()
        self.attempts = 0
        self.current = ""  # the backend of the attempt under way
        self.produced = False  # by the attempt under way
        self.last_error: InferenceError | None = None
        self.backend = ""  # where the answer came from (the last StreamStarted)
        self.deltas = 0
        self.finished: StreamFinished | None = None

    @property
    def weight(self) -> float:
        """The tenant's share of a saturated pool (its plan's fairness weight)."""
        return self.limits.fairness_weight if self.limits is not None else 1.0

    # --- pick ----------------------------------------------------------------------

    def pick(self) -> BackendView | None:
        """The backend for the next attempt: the routing policy's choice among those
        this call has not tried, from this process's view of the load; None once the
        attempts are spent or no backend is left."""
        if self.attempts >= settings.PARLEY_FAILOVER_ATTEMPTS:
            return None
        board = load_board()
        views = backend_views(
            self.rows, breaker=breaker(), inflight=board.inflight(), metrics=board.metrics()
        )
        route = replace(self.route, exclude=frozenset(self.tried))
        if not candidates(route, views):
            return None
        return policy().choose(route, views)

    def attempt(self, backend: str) -> float:
        """The call goes to `backend` next: the seconds to wait before it (none for the
        first attempt; then exponential backoff with full jitter)."""
        self.tried.add(backend)
        self.current, self.produced = backend, False
        self.attempts += 1
        if self.attempts == 1:
            return 0.0
        return random.uniform(0, min(1.0, 0.05 * 2 ** (self.attempts - 1)))  # noqa: S311

    def observe(self, event: StreamEvent) -> StreamEvent:
        """An event of the attempt under way, on its way to the caller."""
        if isinstance(event, StreamStarted):
            self.backend = event.backend
            return event
        self.produced = True
        if isinstance(event, StreamFinished):
            self.finished = event
            breaker().record_success(self.current)
        else:
            self.deltas += 1
        return event

    # --- on failure ----------------------------------------------------------------------

    def failed(self, exc: InferenceError) -> None:
        """The attempt under way failed. Raises `exc` when the call may not move on (it
        produced something, or no other backend can do better); else the failure counts
        against the backend's circuit (the driver marks it degraded) and the call picks
        again."""
        if self.produced or not exc.retryable:
            raise exc
        logger.warning("backend %s failed before the first token: %s", self.current, exc)
        breaker().record_failure(self.current)
        self.last_error = exc

    def exhausted(self) -> InferenceError:
        """The error of a call that no backend answered."""
        if self.last_error is not None:
            return self.last_error
        routable = [r for r in self.rows if r.state in ROUTABLE_STATES]
        if not routable:
            return InferenceError("no_backend", "No healthy inference backend is available.")
        if not any(self.model in r.served_models for r in routable):
            return InferenceError("model_not_found", f"No backend serves the model {self.model!r}.")
        return InferenceError("no_backend", f"Every backend serving {self.model!r} is unavailable.")

    # --- settle ----------------------------------------------------------------------------

    def settlement(self) -> Settlement:
        """What the call used: the backend's usage when it sent it; else the prompt as
        estimated and a token per delta (a partial call); nothing for a call that
        streamed nothing."""
        if self.finished is not None:
            usage = self.finished.usage
            return Settlement(usage.prompt_tokens, usage.completion_tokens, "completed")
        if not self.deltas:
            return Settlement(0, 0, "failed")
        prompt = prompt_tokens_estimate(self.request.messages, self.request.tools)
        return Settlement(prompt, self.deltas, "partial")

    def settle(self, *, admitted: bool) -> tuple[Settlement, UsageRow | None]:
        """What the call used, and its ledger row (see `usage_row`)."""
        settlement = self.settlement()
        return settlement, self.usage_row(settlement, admitted=admitted)

    def usage_row(self, settlement: Settlement, *, admitted: bool) -> UsageRow | None:
        """The call's row of its tenant's usage ledger; None for a call that is not
        booked (of no tenant, or never admitted: it used nothing)."""
        if self.identity is None or not admitted:
            return None
        return UsageRow(
            tenant_id=self.identity.tenant_id,
            user_id=self.identity.user_id,
            api_key_id=self.identity.api_key_id,
            model=self.model,
            backend=self.backend,
            prompt_tokens=settlement.prompt_tokens,
            completion_tokens=settlement.completion_tokens,
            reserved_tokens=self.estimate,
            outcome=settlement.outcome,
            purpose=self.request.purpose,
            reference=self.request.reference,
        )
