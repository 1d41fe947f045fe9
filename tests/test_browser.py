"""The chat page in headless Chromium against the embedded default: log in, send a
message, watch the answer stream, reload and find it stored."""

from __future__ import annotations

import os
import shutil
from itertools import pairwise

import pytest

pytestmark = [pytest.mark.embedded, pytest.mark.llm]

CHROMIUM = os.environ.get("PARLEY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), (
        f"Chromium not found at {CHROMIUM}: `make test` installs it (Debian: apt-get install "
        "chromium), or set PARLEY_CHROMIUM"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        browser.close()
        assert not errors, errors


def test_log_in_send_and_watch_the_answer_stream(embedded_server, page):
    base, _ = embedded_server
    page.goto(f"{base}/")
    assert "/accounts/login/" in page.url

    page.fill("input[name=username]", "demo")
    page.fill("input[name=password]", "wrong")
    page.click("button[type=submit]")
    assert page.locator("[role=alert]").is_visible()

    page.fill("input[name=username]", "demo")
    page.fill("input[name=password]", "parley-demo")
    page.click("button[type=submit]")
    page.wait_for_selector("#prompt")

    # Record every text the answer shows while it streams.
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => {
            const answer = document.querySelector('#messages li.assistant');
            if (answer) window.__seen.push(answer.textContent);
        }).observe(document.getElementById('messages'),
                   {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#prompt", "Count from 1 to 20, separated by spaces.")
    page.click("#send")
    page.wait_for_selector("#status:has-text('tokens')", timeout=120_000)

    answer = page.inner_text("#messages li.assistant")
    seen = [text for text in page.evaluate("window.__seen") if text]
    assert answer.strip()
    # Streamed: the answer grew through several partial texts, each a prefix of the next.
    assert len(set(seen)) >= 5, seen
    assert all(b.startswith(a) for a, b in pairwise(seen))
    assert "/c/" in page.url

    page.reload()
    page.wait_for_selector("#messages li.assistant")
    assert page.inner_text("#messages li.user") == "Count from 1 to 20, separated by spaces."
    assert page.inner_text("#messages li.assistant") == answer
