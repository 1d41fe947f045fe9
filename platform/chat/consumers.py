"""The websocket endpoint `/ws/v1/`: thin transport over chat services and run logs.

Bad input answers with an `error` frame and the socket stays open. A run's
events are relayed from its event log; closing the socket never stops a run.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.core.exceptions import ValidationError

from chat import protocol
from chat.eventlog import event_log, run_log_key
from chat.models import Run
from chat.notify import conversation_group
from chat.runner import TERMINAL_EVENTS
from chat.services.runs import RunNotQueued, chat_send
from tenants.access import SESSION_TENANT_KEY, Actor, NotFound, actor_for_user
from tenants.notify import api_key_group, tenant_group, user_group
from tenants.rls import in_tenant, tenant_scope

logger = logging.getLogger(__name__)

# Close codes (the application range 4000-4999).
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403

RELAY_POLL_S = 15.0


class AccessRefused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _bearer_token(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


class ChatConsumer(AsyncWebsocketConsumer):
    actor: Actor | None = None

    async def connect(self) -> None:
        self.relays: dict[str, asyncio.Task[None]] = {}
        self.groups: list[str] = []
        refusal = None
        try:
            self.actor = await database_sync_to_async(self.find_actor)()
        except AccessRefused as exc:
            self.actor, refusal = None, exc
        if self.actor is None:
            # A refused handshake carries no frame; the close code says why.
            await self.close(code=refusal.code if refusal else CLOSE_UNAUTHENTICATED)
            return
        self.groups = [tenant_group(self.actor.tenant_id)]
        if self.actor.api_key is not None:
            self.groups.append(api_key_group(self.actor.api_key.id))
        elif self.actor.user is not None:
            self.groups.append(user_group(self.actor.tenant_id, self.actor.user.pk))
        if self.actor.user is not None:
            self.groups.append(conversation_group(self.actor.tenant_id, self.actor.user.pk))
        for group in self.groups:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()

    def find_actor(self) -> Actor | None:
        """The API key of the `Authorization: Bearer` header, else the session's member."""
        from tenants.services.api_keys import ApiKeyRefused, api_key_authenticate

        token = _bearer_token(self.scope)
        if token is not None:
            try:
                return api_key_authenticate(token)
            except ApiKeyRefused as exc:
                raise AccessRefused(CLOSE_UNAUTHENTICATED, exc.message) from None
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
        """A frame a service sent to this member's sockets (`chat.notify.frame_send`)."""
        await self.send_frame(event["frame"])

    async def disconnect(self, code: int) -> None:
        for task in getattr(self, "relays", {}).values():
            task.cancel()
        for group in getattr(self, "groups", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def send_frame(self, frame: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(frame))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        raw = text_data if text_data is not None else bytes_data
        client_id = None
        try:
            frame = protocol.parse(raw, max_bytes=settings.PARLEY_WS_MAX_FRAME_BYTES)
            client_id = frame.get("client_id")
            if frame["type"] == "ping":
                await self.send_frame(
                    {"type": "pong", **({"client_id": client_id} if client_id else {})}
                )
            elif frame["type"] == "chat.send":
                await self.on_chat_send(protocol.chat_send(frame))
        except protocol.FrameError as exc:
            await self.send_frame(protocol.error_frame(exc.code, exc.message, exc.client_id))
        except Exception:
            logger.exception("websocket frame failed")
            await self.send_frame(
                protocol.error_frame(
                    protocol.INTERNAL_ERROR, "The server could not handle this frame.", client_id
                )
            )

    async def on_chat_send(self, send: protocol.ChatSend) -> None:
        assert self.actor is not None
        try:
            run = await database_sync_to_async(in_tenant)(
                self.actor.tenant_id,
                chat_send,
                actor=self.actor,
                content=send.content,
                conversation_id=send.conversation_id,
                model=send.model,
                client_id=send.client_id or "",
            )
        except NotFound:
            raise protocol.FrameError(
                protocol.NOT_FOUND, "No such conversation.", send.client_id
            ) from None
        except ValidationError as exc:
            raise protocol.FrameError(
                protocol.INVALID_FRAME, " ".join(exc.messages), send.client_id
            ) from None
        except RunNotQueued:
            raise protocol.FrameError(
                protocol.UNAVAILABLE,
                "Your message is saved, but no worker could take the run right now; "
                "try again in a moment.",
                send.client_id,
            ) from None
        frame: dict[str, Any] = {
            "type": "run.started",
            "run_id": str(run.id),
            "conversation_id": str(run.conversation_id),
            "user_message_id": str(run.user_message_id),
        }
        if send.client_id:
            frame["client_id"] = send.client_id
        await self.send_frame(frame)
        self.attach(run, after=0)

    def attach(self, run: Run, *, after: int) -> None:
        run_id = str(run.id)
        if run_id in self.relays and not self.relays[run_id].done():
            return
        key = run_log_key(tenant_id=run.tenant_id, run_id=run.id)
        self.relays[run_id] = asyncio.ensure_future(self.relay(run_id, key, after))

    async def relay(self, run_id: str, key: str, after: int) -> None:
        """Send every event of the run after `after`, live, until its terminal event."""
        log = event_log()
        try:
            while True:
                events = await log.read(key, after, RELAY_POLL_S)
                for seq, event in events:
                    await self.send_frame({**event, "run_id": run_id, "seq": seq})
                    after = seq
                    if event.get("type") in TERMINAL_EVENTS:
                        return
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("relaying run %s failed", run_id)
            await self.send_frame(
                protocol.error_frame(
                    protocol.INTERNAL_ERROR, f"Lost the event stream of run {run_id}."
                )
            )
        finally:
            self.relays.pop(run_id, None)
