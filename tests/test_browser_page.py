"""The pages hold up in headless Chromium against the embedded default: the API docs
render offline under the strict Content Security Policy (Swagger UI served by Parley,
from npm, nothing from a CDN); a long conversation keeps the composer, the status and
Stop in view (the thread scrolls, not the page); the sidebar's "⋯" menus close on
Escape, on a click elsewhere and after their action, and never cover another row's.

(The page's CSP forbids eval, so waits poll `page.evaluate`: tests.test_browser.)"""

from __future__ import annotations

import os
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import embedded_manage
from tests.test_browser import (
    ANSWER_TIMEOUT_MS,
    CHROMIUM,
    CHROMIUM_ARGS,
    LONG_PROMPT,
    log_in,
    send,
    streamed_at_least,
    wait_until,
)

pytestmark = [pytest.mark.embedded, pytest.mark.llm]

VIEWPORT = {"width": 1280, "height": 800}


@pytest.fixture
def page():
    """A page of headless Chromium at 1280x800 (as tests.test_browser's), failing the
    test on any uncaught error in the page."""
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), f"Chromium not found at {CHROMIUM} (see tests.test_browser)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        context = browser.new_context(viewport=VIEWPORT)
        errors: list[str] = []
        context.on("page", lambda tab: tab.on("pageerror", lambda exc: errors.append(str(exc))))
        yield context.new_page()
        browser.close()
        assert not errors, errors


def watch_console(page) -> dict[str, list[str]]:
    """From now on, note the page's console errors, its CSP violations and every
    request it makes."""
    seen: dict[str, list[str]] = {"errors": [], "violations": [], "requests": []}
    page.on("console", lambda m: m.type == "error" and seen["errors"].append(m.text))
    page.on("request", lambda request: seen["requests"].append(request.url))
    # (an init script runs outside the page's CSP, before the page's own scripts)
    page.add_init_script(
        """document.addEventListener('securitypolicyviolation', (e) => {
            (window.__violations = window.__violations || [])
                .push(`${e.violatedDirective} ${e.blockedURI}`);
        });"""
    )
    return seen


# --- the API docs ---------------------------------------------------------------


def test_the_api_docs_render_offline_under_the_csp(embedded_server, page):
    base, _ = embedded_server
    seen = watch_console(page)
    log_in(page, base)  # (the docs need no login; "Try it out" uses the session)
    response = page.goto(f"{base}/api/v1/docs")
    assert response is not None and response.status == 200
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp

    schema = httpx.get(f"{base}/api/v1/openapi.json", timeout=10).json()
    operations = sum(
        1
        for methods in schema["paths"].values()
        for method in methods
        if method in {"get", "put", "post", "delete", "patch", "head", "options"}
    )
    assert operations > 10
    wait_until(
        page,
        "(n) => document.querySelectorAll('#swagger-ui .opblock').length >= n",
        timeout=30,
        arg=operations,
    )
    assert page.locator("#swagger-ui .opblock").count() == operations
    assert "Parley API" in page.inner_text("#swagger-ui .info .title")
    # One operation opens, its responses (the documented errors too) shown.
    first = page.locator("#swagger-ui .opblock").first
    first.locator(".opblock-summary").click()
    first.locator(".responses-wrapper").wait_for()
    assert first.locator("tr.response[data-code='401']").count() == 1
    page.wait_for_timeout(500)  # (late errors)
    assert page.evaluate("window.__violations || []") == []
    assert seen["errors"] == []

    # "Try it out" calls the API with the member's session, and the CSRF token a write
    # needs: deleting a conversation that does not exist answers 404, not 403.
    for operation, parameter, status in (
        ("tenant-tenants_api_tenant_tenant_get", None, "200"),
        ("conversations-chat_api_conversations_delete", str(uuid.uuid4()), "404"),
    ):
        block = page.locator(f"#operations-{operation}")
        if block.locator(".opblock-body").count() == 0:
            block.locator(".opblock-summary").click()
        block.locator("button.try-out__btn").click()
        if parameter:
            block.locator("tr[data-param-name=conversation_id] input").fill(parameter)
        block.locator("button.execute").click()
        shown = block.locator(".live-responses-table tbody .response-col_status").first
        shown.wait_for(timeout=10_000)
        assert shown.inner_text().strip() == status, block.locator(
            ".live-responses-table"
        ).inner_text()

    assert page.evaluate("window.__violations || []") == []
    # (Chromium logs the deliberate 404 as a failed load: nothing else.)
    assert all("status of 404" in error for error in seen["errors"]), seen["errors"]
    # Everything came from Parley itself: no CDN, nothing remote.
    origins = {urlsplit(url).netloc for url in seen["requests"] if url.startswith("http")}
    assert origins == {urlsplit(base).netloc}, origins
    assert any("/static/parley/vendor/swagger-ui/" in url for url in seen["requests"])


# --- a long conversation --------------------------------------------------------

SEED_LONG_CONVERSATION = """
from chat.models import Conversation
from tenants.models import Tenant, User
from tenants.rls import operator_scope
from tests.factories import ConversationFactory, MessageFactory

with operator_scope():
    tenant, user = Tenant.objects.get(slug="demo"), User.objects.get(username="demo")
    for n in (1, 2):
        other = ConversationFactory(tenant=tenant, user=user, title=f"Menu row {n}")
        MessageFactory(conversation=other, content=f"Row {n}.")
    c = ConversationFactory(tenant=tenant, user=user, title="Forty messages")
    parent = None
    for n in range(40):
        role = "user" if n % 2 == 0 else "assistant"
        text = f"Message {n + 1}. " + "A line of conversation to fill the thread. " * 6
        if parent is None:
            parent = MessageFactory(conversation=c, role=role, content=text)
        else:
            parent = MessageFactory(parent=parent, role=role, content=text)
    Conversation.objects.filter(id=c.id).update(current_leaf=parent)
    print(c.id)
"""


@pytest.fixture
def long_conversation(embedded_server) -> str:
    _, var = embedded_server
    return embedded_manage(var, "shell", "-c", SEED_LONG_CONVERSATION).split()[-1]


def box(page, selector: str) -> dict[str, float]:
    found = page.locator(selector).bounding_box()
    assert found is not None, f"{selector} is not shown"
    return found


def in_view(found: dict[str, float]) -> bool:
    return (
        found["x"] >= 0
        and found["y"] >= 0
        and found["x"] + found["width"] <= VIEWPORT["width"]
        and found["y"] + found["height"] <= VIEWPORT["height"]
    )


def page_scrolls(page) -> dict[str, Any]:
    return page.evaluate(
        """() => {
            const root = document.scrollingElement, list = document.getElementById('messages');
            return {page: root.scrollHeight > root.clientHeight, pageTop: root.scrollTop,
                    thread: list.scrollHeight > list.clientHeight,
                    threadAtEnd: list.scrollHeight - list.scrollTop - list.clientHeight < 2};
        }"""
    )


def test_a_long_conversation_keeps_the_composer_status_and_stop_in_view(
    embedded_server, page, long_conversation
):
    base, _ = embedded_server
    log_in(page, base)
    page.goto(f"{base}/c/{long_conversation}/")
    page.wait_for_selector("#messages li.assistant[data-id]")
    assert page.locator("#messages li.message").count() == 40

    # The thread is what scrolls, opened at its end; the page does not.
    scrolls = page_scrolls(page)
    assert scrolls == {"page": False, "pageTop": 0, "thread": True, "threadAtEnd": True}
    for selector in ("#composer", "#prompt", "#send", "#status", "#conversation-title"):
        assert in_view(box(page, selector)), selector
    assert in_view(box(page, "#messages li.message >> nth=-1"))
    # Scrolling the page with the wheel over the thread moves the thread, not the page.
    end = page.evaluate("document.getElementById('messages').scrollTop")
    page.mouse.move(700, 300)
    page.mouse.wheel(0, -600)
    wait_until(
        page,
        "(end) => document.getElementById('messages').scrollTop < end - 300",
        timeout=10,
        arg=end,
    )
    assert page.evaluate("document.scrollingElement.scrollTop") == 0
    assert in_view(box(page, "#composer"))

    # An answer streams: Stop and the status show, in view, and the thread follows it.
    page.evaluate(
        "() => { const l = document.getElementById('messages'); l.scrollTop = l.scrollHeight; }"
    )
    wait_until(page, "() => !document.getElementById('send').disabled", timeout=30)
    send(page, LONG_PROMPT)
    streamed_at_least(page, 40)
    assert page.is_visible("#stop")
    for selector in ("#stop", "#composer", "#status"):
        assert in_view(box(page, selector)), selector
    assert in_view(box(page, "#messages li[data-run-id]"))
    scrolls = page_scrolls(page)
    assert not scrolls["page"] and scrolls["pageTop"] == 0
    page.click("#stop")
    page.wait_for_selector("#messages li.assistant.failed[data-id]", timeout=ANSWER_TIMEOUT_MS)
    assert page.is_hidden("#stop")
    assert page.inner_text("#status") != ""
    assert in_view(box(page, "#status")) and in_view(box(page, "#composer"))
    assert not page_scrolls(page)["page"]


# --- the "⋯" menus --------------------------------------------------------------


def open_menus(page) -> int:
    return page.locator("#conversation-list details.menu[open]").count()


def hit(page, selector: str) -> bool:
    """Whether a click at the middle of `selector` lands on it (nothing covers it)."""
    return page.evaluate(
        """(selector) => {
            const node = document.querySelector(selector), r = node.getBoundingClientRect();
            const top = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
            return node === top || node.contains(top);
        }""",
        selector,
    )


def test_the_conversation_menus_close_and_never_cover_another_row(
    embedded_server, page, long_conversation
):
    base, _ = embedded_server
    log_in(page, base)
    page.goto(f"{base}/c/{long_conversation}/")
    page.wait_for_selector("#messages li.assistant[data-id]")
    rows = page.locator("#conversation-list li[data-conversation-id]")
    assert rows.count() >= 3
    first, second = rows.nth(0), rows.nth(1)
    second_summary = "#conversation-list li[data-conversation-id]:nth-child(2) summary"

    # Escape closes it, and gives the focus back to its "⋯".
    first.locator("summary").click()
    assert first.locator(".menu-items").is_visible()
    page.keyboard.press("Escape")
    assert open_menus(page) == 0
    assert page.evaluate("document.activeElement.tagName") == "SUMMARY"

    # Open, it covers no other row's "⋯": a click there opens that menu and closes this one.
    first.locator("summary").click()
    assert hit(page, second_summary)
    page.click(second_summary)
    assert second.locator("details.menu").get_attribute("open") is not None
    assert first.locator("details.menu").get_attribute("open") is None
    assert open_menus(page) == 1

    # A click elsewhere (the thread, the composer) closes it.
    page.click("#conversation-title")
    assert open_menus(page) == 0
    second.locator("summary").click()
    page.click("#prompt")
    assert open_menus(page) == 0

    # After its action: an export (the download starts and the menu closes) ...
    first.locator("summary").click()
    with page.expect_download() as download:
        first.locator("a[data-export=markdown]").click()
    assert download.value.suggested_filename.endswith(".md")
    wait_until(
        page, "() => !document.querySelector('#conversation-list details.menu[open]')", timeout=5
    )
    # ... and a rename (its form shows; the menu is gone).
    first.locator("summary").click()
    first.locator("button[data-action=rename]").click()
    assert first.locator("form.rename input").is_visible()
    assert open_menus(page) == 0
    first.locator("form.rename input").press("Escape")
    assert first.locator("form.rename").count() == 0
