"""A websocket handshake the server refuses (docs/protocol.md, Connecting): it is
accepted, gets one `error` frame saying why, and is closed with 4401 or 4403."""

from __future__ import annotations

from typing import Any

from tests.conftest import ws_connect


async def ws_refusal(user=None, **kwargs: Any) -> tuple[dict[str, Any], int]:
    """The `error` frame and the close code of a refused handshake (asserts that it
    was refused that way, not opened for use nor refused before accepting)."""
    connected, _, socket = await ws_connect(user, **kwargs)
    assert connected, "refused before the handshake completed (HTTP 403), without a code"
    frame = await socket.receive(timeout=5)
    assert frame["type"] == "error", frame
    closed = await socket.communicator.receive_output(timeout=5)
    assert closed["type"] == "websocket.close", closed
    return frame, closed["code"]
