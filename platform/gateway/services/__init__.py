"""The OpenAI-compatible API's services: who calls (`callers`), what they ask
(`parameters`), the completion started on the pool and relayed (`relay`), and the
models they may ask for (`models`).

A call is authenticated by a tenant's API key (`Authorization: Bearer prk_...`, with
the `chat` scope), validated, and streamed from the inference pool through
`inference.apool.chat_stream`: the same limits (tenant, API key), fair admission,
routing, failover and usage ledger as every other LLM call of the platform. The key
is the caller: its own limits (PARLEY_KEY_*) and the tenant's plan apply, and the
ledger records the key.
"""

from gateway.errors import ApiError
from gateway.services.callers import auth_cache_clear, caller_authenticate, caller_cached
from gateway.services.models import agent_models, models_answer, models_list
from gateway.services.parameters import CompletionParams, completion_params_parse
from gateway.services.relay import Completion, completion_start

__all__ = [
    "ApiError",
    "Completion",
    "CompletionParams",
    "agent_models",
    "auth_cache_clear",
    "caller_authenticate",
    "caller_cached",
    "completion_params_parse",
    "completion_start",
    "models_answer",
    "models_list",
]
