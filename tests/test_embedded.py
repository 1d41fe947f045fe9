"""Smoke test of the embedded default: what `make run` starts, with no server installed.

Runs `manage.py migrate`, `seed_demo` and `serve` in a fresh process without
DATABASE_URL or REDIS_URL (SQLite under a temporary var/, in-memory event log,
in-process tasks, the local SmolLM2 server started by `serve`), logs in like a
browser and completes one streamed chat turn over a real websocket.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3

import httpx
import pytest
from websockets.asyncio.client import connect

pytestmark = [pytest.mark.embedded, pytest.mark.llm]


def login(base: str) -> str:
    with httpx.Client(base_url=base, follow_redirects=False) as client:
        page = client.get("/accounts/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        response = client.post(
            "/accounts/login/",
            data={
                "csrfmiddlewaretoken": token,
                "username": "demo",
                "password": "parley-demo",
            },
        )
        assert response.status_code == 302, response.text
        chat = client.get("/")
        assert chat.status_code == 200
        assert re.search(r"/static/parley/chat\.[0-9a-f]{12}\.js", chat.text), chat.text
        return client.cookies["sessionid"]


def test_static_files_are_served_compressed_and_cached_by_content(embedded_server):
    """`serve` collects the static files under names that carry their content's hash:
    served compressed and cached for a year; a new build has new names."""
    base, _ = embedded_server
    with httpx.Client(base_url=base) as client:
        page = client.get("/accounts/login/").text
        (css,) = re.findall(r"/static/parley/parley\.[0-9a-f]{12}\.css", page)
        response = client.get(css, headers={"Accept-Encoding": "gzip"})
        assert response.status_code == 200
        assert response.headers["Content-Encoding"] == "gzip"
        cache = response.headers["Cache-Control"]
        assert "immutable" in cache and int(re.search(r"max-age=(\d+)", cache).group(1)) >= 31536000
        # The file by its plain name is still there (for what names no hash), briefly cached.
        plain = client.get("/static/parley/parley.css")
        assert plain.status_code == 200 and "immutable" not in plain.headers["Cache-Control"]


def test_embedded_default_streams_a_chat_turn(embedded_server):
    base, var = embedded_server
    session = login(base)

    async def turn() -> list[dict]:
        ws_url = base.replace("http", "ws") + "/ws/v1/"
        async with connect(
            ws_url,
            origin=base,
            additional_headers={
                "Cookie": f"sessionid={session}",
            },
        ) as socket:
            await socket.send(json.dumps({"type": "chat.send", "content": "Say hello in French."}))
            frames = []
            while True:
                frame = json.loads(await asyncio.wait_for(socket.recv(), 120))
                frames.append(frame)
                if frame["type"] in ("run.done", "run.error", "error"):
                    return frames

    frames = asyncio.run(turn())
    assert frames[0]["type"] == "run.started"
    assert frames[-1]["type"] == "run.done", frames[-1]
    run_frames = frames[1:]
    assert [f["seq"] for f in run_frames] == list(range(1, len(run_frames) + 1))
    streamed = "".join(f["delta"] for f in run_frames if f["type"] == "token")
    assert streamed

    with sqlite3.connect(var / "parley.sqlite3") as db:
        (stored,) = db.execute(
            "SELECT content FROM chat_message WHERE id = ?",
            (frames[-1]["message_id"].replace("-", ""),),
        ).fetchone()
    assert stored == streamed
