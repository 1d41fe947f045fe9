"""The websocket endpoint `/ws/v1/`: thin transport over chat services and run logs.

Bad input answers with an `error` frame and the socket stays open. A run's
events are relayed from its event log; closing the socket never stops a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.core.exceptions import ValidationError

from chat import protocol
from chat.choices import ModelNotFound
from chat.models import Run
from chat.notify import conversation_group
from chat.relay import LogTrimmed, run_relay
from chat.selectors import run_get
from chat.services.runs import RunNotQueued, chat_send, run_cancel, run_regenerate
from chat.tickets import TicketRefused, socket_credentials, ticket_redeem
from config import inputs
from documents.notify import documents_group
from tenants.access import SESSION_TENANT_KEY, Actor, NotFound, actor_for_user, require_scope
from tenants.models import ApiKey
from tenants.notify import api_key_group, tenant_group, user_group
from tenants.rls import in_tenant, tenant_scope

logger = logging.getLogger(__name__)

# Close codes (the application range 4000-4999), and the codes of the `error` frame
# that tells a refused handshake why (docs/protocol.md, Connecting).
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
UNAUTHENTICATED = "unauthenticated"
FORBIDDEN = "forbidden"

OWN_RUNS_KEPT = 32


class ClientGone(Exception):
    """The socket's client left (a reload, a closed tab) while a frame was being sent:
    a normal end, not a failure."""


class AccessRefused(Exception):
    """A refused handshake: the close code (4401 / 4403) and the `error` frame's code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.error = FORBIDDEN if code == CLOSE_FORBIDDEN else UNAUTHENTICATED


class FrameBucket:
    """Token bucket of one socket: `rate` frames per second, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.at = float(burst), time.monotonic()

    def take(self) -> float:
        """0 when the frame may pass, else the seconds until one would."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class ChatConsumer(AsyncWebsocketConsumer):
    actor: Actor | None = None

    async def connect(self) -> None:
        self.relays: dict[str, asyncio.Task[None]] = {}
        # The runs this socket started, latest last: what services tell the member's
        # sockets of them is not sent back here; a few suffice (it follows at once).
        self.own_runs: dict[str, None] = {}
        self.bucket = FrameBucket(settings.PARLEY_WS_FRAMES_PER_S, settings.PARLEY_WS_FRAME_BURST)
        self.groups: list[str] = []
        try:
            self.actor = await database_sync_to_async(self.find_actor)()
            if self.actor is None:
                raise AccessRefused(
                    CLOSE_UNAUTHENTICATED,
                    "Sign in, or connect with an API key or a websocket ticket.",
                )
        except AccessRefused as refusal:
            # Accepted, then closed: a close before accepting reaches the client as
            # HTTP 403, without the code (which only the origin check answers).
            self.actor = None
            await self.accept()
            await self.send_frame(protocol.error_frame(refusal.error, refusal.message))
            await self.close(code=refusal.code)
            return
        self.groups = [tenant_group(self.actor.tenant_id)]
        if self.actor.api_key is not None:
            self.groups.append(api_key_group(self.actor.api_key.id))
        elif self.actor.user is not None:
            self.groups.append(user_group(self.actor.tenant_id, self.actor.user.pk))
        if self.actor.user is not None:
            self.groups.append(conversation_group(self.actor.tenant_id, self.actor.user.pk))
            if self.actor.has_scope("documents"):
                self.groups.append(documents_group(self.actor.tenant_id, self.actor.user.pk))
        for group in self.groups:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()

    def find_actor(self) -> Actor | None:
        """The ticket in the query string, else the API key of the `Authorization: Bearer`
        header (it needs the `chat` scope), else the session's member. A socket that
        presents a ticket or a key (chat.tickets.socket_credentials, which also decided
        that its origin went unchecked) is never signed in by its session cookie."""
        from django.core.exceptions import PermissionDenied

        from tenants.services.api_keys import ApiKeyRefused, api_key_authenticate

        credentials = socket_credentials(self.scope)
        if credentials.ticket is not None:
            try:
                return ticket_redeem(credentials.ticket)
            except TicketRefused as exc:
                code = CLOSE_FORBIDDEN if exc.forbidden else CLOSE_UNAUTHENTICATED
                raise AccessRefused(code, exc.message) from None
        if credentials.api_key is not None:
            try:
                key_actor = api_key_authenticate(credentials.api_key)
                require_scope(key_actor, ApiKey.Scope.CHAT)
            except ApiKeyRefused as exc:
                code = CLOSE_FORBIDDEN if exc.forbidden else CLOSE_UNAUTHENTICATED
                raise AccessRefused(code, exc.message) from None
            except PermissionDenied as exc:
                raise AccessRefused(CLOSE_FORBIDDEN, str(exc)) from None
            return key_actor
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            return None
        session = self.scope.get("session")
        tenant_id = session.get(SESSION_TENANT_KEY) if session is not None else None
        with tenant_scope(user_id=user.pk):
            actor = actor_for_user(user, tenant_id=tenant_id)
        if actor is not None and not actor.tenant.is_active:
            raise AccessRefused(CLOSE_FORBIDDEN, f"{actor.tenant.name} is suspended.")
        return actor

    async def access_revoked(self, event: dict[str, Any]) -> None:
        """The tenant was suspended, the key revoked or the member removed: say so, close."""
        await self.send_frame(protocol.error_frame(event["code"], event["message"]))
        await self.close(code=CLOSE_FORBIDDEN)

    async def frame_forward(self, event: dict[str, Any]) -> None:
        """A frame a service sent to this member's sockets (`chat.notify.frame_send`),
        unless it tells of a run this socket started (`unless_run`)."""
        if event.get("unless_run") in self.own_runs:
            return
        await self.send_frame(event["frame"])

    async def disconnect(self, code: int) -> None:
        for task in getattr(self, "relays", {}).values():
            task.cancel()
        for group in getattr(self, "groups", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def send_frame(self, frame: dict[str, Any]) -> None:
        try:
            await self.send(text_data=json.dumps(frame))
        except OSError as exc:  # uvicorn's ClientDisconnected, a reset connection
            raise ClientGone from exc

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        raw = text_data if text_data is not None else bytes_data
        client_id = None
        try:
            wait = self.bucket.take()
            if wait:
                raise protocol.FrameError(
                    protocol.RATE_LIMITED,
                    f"Too many frames: at most {settings.PARLEY_WS_FRAMES_PER_S:g} per second "
                    f"(bursts of {settings.PARLEY_WS_FRAME_BURST}); this one was dropped. "
                    f"Retry in {wait:.1f} s.",
                    _client_id_of(raw),
                )
            frame = protocol.parse(raw, max_bytes=settings.PARLEY_WS_MAX_FRAME_BYTES)
            client_id = frame.get("client_id")
            value = protocol.check(frame)
            # The frame table names the method that answers each type.
            await getattr(self, protocol.FRAMES[frame["type"]].handler)(value)
        except protocol.FrameError as exc:
            await self.send_frame(protocol.error_frame(exc.code, exc.message, exc.client_id))
        except ClientGone:
            logger.info("websocket client left while its frame was answered")
        except Exception:
            logger.exception("websocket frame failed")
            await self.send_frame(
                protocol.error_frame(
                    protocol.INTERNAL_ERROR, "The server could not handle this frame.", client_id
                )
            )

    async def on_ping(self, ping: protocol.Ping) -> None:
        await self.send_frame(
            {"type": "pong", **({"client_id": ping.client_id} if ping.client_id else {})}
        )

    async def call_service(
        self, fn: Any, frame_client_id: str | None, not_found: str, /, **kwargs: Any
    ) -> Any:
        """Run a chat service in the actor's tenant; its refusals become `error` frames
        (`not_found` says what was not found: another tenant's object is not found too)."""
        assert self.actor is not None
        client_id = frame_client_id
        try:
            return await database_sync_to_async(in_tenant)(
                self.actor.tenant_id, fn, actor=self.actor, **kwargs
            )
        except NotFound:
            raise protocol.FrameError(protocol.NOT_FOUND, not_found, client_id) from None
        except ModelNotFound as exc:  # (a ValidationError, with its own code)
            raise protocol.FrameError(
                protocol.MODEL_NOT_FOUND, " ".join(exc.messages), client_id
            ) from None
        except ValidationError as exc:
            raise protocol.FrameError(
                protocol.INVALID_FRAME, " ".join(exc.messages), client_id
            ) from None
        except RunNotQueued as exc:
            raise protocol.FrameError(protocol.UNAVAILABLE, str(exc), client_id) from None

    async def on_chat_send(self, send: protocol.ChatSend) -> None:
        kwargs: dict[str, Any] = {}
        if send.document_ids:
            kwargs["document_ids"] = list(send.document_ids)
        if send.has_parent:
            kwargs["parent_message_id"] = send.parent_message_id
        not_found = (
            "No such conversation or parent message."
            if send.has_parent
            else "No such conversation."
        )
        if send.document_ids:
            not_found = f"{not_found[:-1]}, or no such document."
        # An agent is one the tenant enabled ("<plugin>.<agent>"); absent keeps the
        # conversation's agent, "none" returns it to plain chat (chat_send).
        if send.agent:
            kwargs["agent"] = send.agent
            not_found = f"{not_found[:-1]}, or no agent named {send.agent!r} is enabled."
        run = await self.call_service(
            chat_send,
            send.client_id,
            not_found,
            content=send.content,
            conversation_id=send.conversation_id,
            model=send.model,
            client_id=send.client_id or "",
            **kwargs,
        )
        await self.started(run, send.client_id)

    async def on_regenerate(self, regenerate: protocol.Regenerate) -> None:
        run = await self.call_service(
            run_regenerate,
            regenerate.client_id,
            "No such message.",
            message_id=regenerate.message_id,
            model=regenerate.model,
            client_id=regenerate.client_id or "",
        )
        await self.started(run, regenerate.client_id)

    async def started(self, run: Run, client_id: str | None) -> None:
        """`run.started`, then the run's events from the first (a retried send with the
        same client id gets the first run's frames again, not a second run)."""
        frame = protocol.run_started_frame(run, client_id=client_id)
        self.own_runs[frame["run_id"]] = None
        while len(self.own_runs) > OWN_RUNS_KEPT:
            del self.own_runs[next(iter(self.own_runs))]
        await self.send_frame(frame)
        await self.attach(run, after=0)

    async def on_cancel(self, ref: protocol.RunRef) -> None:
        run = await self.call_service(run_cancel, ref.client_id, "No such run.", run_id=ref.run_id)
        frame: dict[str, Any] = {
            "type": "run.cancelling",
            "run_id": str(run.id),
            "state": run.state,
        }
        if ref.client_id:
            frame["client_id"] = ref.client_id
        await self.send_frame(frame)

    async def on_attach(self, ref: protocol.RunRef) -> None:
        run = await self.call_service(run_get, ref.client_id, "No such run.", run_id=ref.run_id)
        await self.attach(run, after=ref.after, coalesce=ref.coalesce)

    async def attach(self, run: Run, *, after: int, coalesce: bool = False) -> None:
        run_id = str(run.id)
        task = self.relays.pop(run_id, None)
        if task is not None:  # attach again: the new cursor replaces the old relay
            task.cancel()
        self.relays[run_id] = asyncio.ensure_future(self.relay(run, after, coalesce))

    async def relay(self, run: Run, after: int, coalesce: bool) -> None:
        """Send the run's frames after `after` (chat.relay.run_relay); a trimmed log
        ends with the terminal frame rebuilt from the stored run."""
        run_id = str(run.id)
        try:
            async for item in run_relay(run, after=after, coalesce=coalesce):
                if isinstance(item, LogTrimmed):
                    await self.send_frame(_terminal_from_row(item.run))
                elif item is not None:
                    await self.send_frame(item)
        except asyncio.CancelledError:
            raise
        except ClientGone:  # the run goes on; the client reattaches after a reload
            logger.info("websocket client left while run %s was relayed", run_id)
        except Exception:
            logger.exception("relaying run %s failed", run_id)
            with contextlib.suppress(Exception):  # the socket may be the thing that broke
                await self.send_frame(
                    protocol.error_frame(
                        protocol.INTERNAL_ERROR, f"Lost the event stream of run {run_id}."
                    )
                )
        finally:
            if self.relays.get(run_id) is asyncio.current_task():
                self.relays.pop(run_id, None)


def _terminal_from_row(run: Run) -> dict[str, Any]:
    """The terminal frame of a run whose event log was trimmed, rebuilt from its row;
    `trimmed` says the earlier frames can no longer be replayed (read the message)."""
    frame: dict[str, Any] = {
        "run_id": str(run.id),
        "seq": run.last_seq,
        "message_id": str(run.assistant_message_id) if run.assistant_message_id else None,
        "trimmed": True,
    }
    if run.state == Run.State.SUCCEEDED:
        usage = {
            "prompt_tokens": run.prompt_tokens,
            "completion_tokens": run.completion_tokens,
            "total_tokens": run.prompt_tokens + run.completion_tokens,
        }
        return {"type": "run.done", "finish_reason": run.finish_reason, "usage": usage, **frame}
    return {"type": "run.error", "code": run.error_code, "message": run.error_message, **frame}


def _client_id_of(raw: str | bytes | None) -> str | None:
    """The client id of a frame that is dropped unparsed (rate limited), if cheaply found."""
    if raw is None or len(raw) > 4096:
        return None
    try:
        frame = inputs.json_loads(raw)  # depth-bounded, no NUL: echoed back as it is
    except inputs.InvalidInput:
        return None
    value = frame.get("client_id") if isinstance(frame, dict) else None
    return value if isinstance(value, str) and len(value) <= 100 else None
