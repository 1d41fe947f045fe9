"""The chat page in headless Chromium against the embedded default: log in, send a
message, watch the answer stream, reload and find it stored; resume an answer after a
reload mid-stream; stop one; regenerate, edit and switch branches; rename, search and
delete conversations from the sidebar.

The page's Content Security Policy forbids eval, which Playwright's string predicates
need (`wait_for_function`): waits poll `page.evaluate` instead."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any

import pytest

from tests.conftest import embedded_manage

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
# Greedy decoding (the embedded server's PARLEY_TEMPERATURE=0) makes SmolLM2 write a
# long story here: several hundred tokens, time enough to interrupt it.
LONG_PROMPT = "Write a long story about a brave knight and a dragon."
ANSWER_TIMEOUT_MS = 180_000


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
        # One context, as one browser profile: a second tab (`page.context.new_page()`)
        # shares the session.
        context = browser.new_context()
        errors: list[str] = []
        context.on("page", lambda tab: tab.on("pageerror", lambda exc: errors.append(str(exc))))
        page = context.new_page()
        yield page
        browser.close()
        assert not errors, errors


def log_in(page, base: str) -> None:
    page.goto(f"{base}/")
    page.fill("input[name=username]", "demo")
    page.fill("input[name=password]", "parley-demo")
    page.click("button[type=submit]")
    page.wait_for_selector("#prompt")


def wait_until(page, predicate: str, timeout: float = 120, arg: Any = None) -> Any:
    """Poll a JavaScript function until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(predicate, arg)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        page.wait_for_timeout(100)  # (not time.sleep: this lets Playwright handle events)


def send(page, content: str) -> None:
    page.fill("#prompt", content)
    page.click("#send")


def wait_for_answer(page) -> None:
    """Until no answer streams and the thread shows the stored messages again."""
    page.wait_for_selector("#messages li.assistant[data-id]", timeout=ANSWER_TIMEOUT_MS)
    wait_until(
        page,
        "() => !document.querySelector('#messages li[data-run-id], #messages li.pending')",
        timeout=ANSWER_TIMEOUT_MS / 1000,
    )


def streamed_at_least(page, chars: int) -> None:
    wait_until(
        page,
        """(chars) => {
            const body = document.querySelector('#messages li[data-run-id] .body');
            return body && body.innerText.length >= chars;
        }""",
        arg=chars,
    )


def record_streamed_texts(page) -> None:
    """From now on, note every text the streaming answer shows (window.__seen): its
    text as rendered (innerText: an answer is Markdown, its paragraphs are blocks)."""
    page.evaluate("""() => {
        window.__seen = [];
        const note = () => {
            const body = document.querySelector('#messages li[data-run-id] .body');
            if (body && body.innerText) window.__seen.push(body.innerText);
        };
        note();
        new MutationObserver(note).observe(document.getElementById('messages'),
                   {childList: true, subtree: true, characterData: true});
    }""")


def squeezed(text: str) -> str:
    """The text without its white space."""
    return re.sub(r"\s+", "", text)


def api(page, method: str, path: str) -> dict[str, Any]:
    """Call the REST API with the page's session (GET needs no CSRF token)."""
    return page.evaluate(
        """async ([method, path]) => {
            const response = await fetch('/api/v1/' + path, {method});
            return {status: response.status,
                    body: response.status === 200 ? await response.json() : null};
        }""",
        [method, path],
    )


def conversation_id(page) -> str:
    assert "/c/" in page.url, page.url
    return page.url.rstrip("/").rsplit("/", 1)[-1]


def stored_branch(page) -> list[dict[str, Any]]:
    """The current branch as the REST API has it: (role, content, id) root first."""
    tree = api(page, "GET", f"conversations/{conversation_id(page)}/messages")["body"]
    messages = {m["id"]: m for m in tree["messages"]}
    return [messages[step["message_id"]] for step in tree["branch"]]


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

    record_streamed_texts(page)
    send(page, "Count from 1 to 20, separated by spaces.")
    page.wait_for_selector("#status:has-text('tokens')", timeout=ANSWER_TIMEOUT_MS)
    wait_for_answer(page)

    answer = page.inner_text("#messages li.assistant .body")
    seen = page.evaluate("window.__seen")
    assert answer.strip()
    # Streamed: the answer grew through several partial texts, each (as rendered, its
    # spacing aside: a Markdown list's items join as they arrive) the start of the answer.
    assert len(set(seen)) >= 5, seen
    assert all(squeezed(answer).startswith(squeezed(text)) for text in seen), seen
    assert seen[-1] == answer
    assert "/c/" in page.url
    # The new conversation is in the sidebar, marked as the open one, titled.
    current = page.locator(f"#conversation-list li[data-conversation-id='{conversation_id(page)}']")
    assert "current" in (current.get_attribute("class") or "")
    titles = page.evaluate(
        "() => [document.title, document.querySelector('#conversation-list li.current a.title')"
        ".textContent, document.getElementById('conversation-title').textContent]"
    )
    assert titles[0] == f"{titles[1]} · Parley" and titles[1] == titles[2] != ""

    page.reload()
    page.wait_for_selector("#messages li.assistant")
    assert page.inner_text("#messages li.user .body") == "Count from 1 to 20, separated by spaces."
    assert page.inner_text("#messages li.assistant .body") == answer


def test_a_reload_mid_stream_resumes_the_answer(embedded_server, page):
    base, _ = embedded_server
    log_in(page, base)
    send(page, LONG_PROMPT)
    streamed_at_least(page, 40)

    page.reload()
    page.wait_for_selector("#prompt")
    live = page.evaluate("() => JSON.parse(document.getElementById('parley-chat').textContent)")
    assert len(live["runs"]) == 1, "the answer ended before the reload"
    record_streamed_texts(page)
    wait_for_answer(page)

    stored = stored_branch(page)
    assert [m["role"] for m in stored] == ["user", "assistant"]
    answer = stored[-1]["content"]
    assert page.inner_text("#messages li.assistant .body") == answer
    seen = page.evaluate("window.__seen")
    # It kept streaming after the reload (from the first event again, attached after 0),
    # every text it showed a prefix of the stored answer: nothing doubled, nothing lost.
    assert len(set(seen)) >= 5, seen
    assert all(answer.startswith(text) for text in seen), seen
    assert max(seen, key=len) == answer
    assert page.is_hidden("#stop")


def test_lost_connections_neither_repeat_a_send_nor_lose_or_double_text(embedded_server, page):
    """The socket drops twice: right after the message went out (its answer not seen
    yet), then mid-stream after frames were lost on the way. The page sends the message
    again with the same client id (one run, not two) and re-attaches after the last
    event it got."""
    base, _ = embedded_server
    sockets: list[tuple[Any, Any]] = []  # (the page's side, the server's side)
    to_server: list[dict[str, Any]] = []
    forwarded: list[int] = []  # seq of every run event the page was given
    lose = {"frames": True}

    def route(ws):
        server = ws.connect_to_server()
        sockets.append((ws, server))

        def up(message):
            to_server.append(json.loads(message))
            server.send(message)

        def down(message):
            if lose["frames"] or sockets[-1][0] is not ws:
                return
            frame = json.loads(message)
            if "seq" in frame:
                forwarded.append(frame["seq"])
            ws.send(message)

        ws.on_message(up)
        server.on_message(down)

    def drop(pair):
        for side in pair:
            side.close(code=4000, reason="test: connection lost")

    page.route_web_socket(re.compile(r"/ws/v1/"), route)
    log_in(page, base)
    wait_until(page, "() => !document.getElementById('send').disabled")
    record_streamed_texts(page)
    send(page, LONG_PROMPT)
    # The send reaches the server; everything it answers is lost, then the socket drops.
    deadline = time.monotonic() + 30
    while not any(f["type"] == "chat.send" for f in to_server):
        assert time.monotonic() < deadline, "the page sent no chat.send"
        page.wait_for_timeout(100)
    page.wait_for_timeout(1500)
    drop(sockets[-1])
    lose["frames"] = False
    streamed_at_least(page, 40)
    # The send went again with its client id and got the first run's events.
    sends = [f for f in to_server if f["type"] == "chat.send"]
    assert len(sends) == 2 and sends[0]["client_id"] == sends[1]["client_id"]

    # Mid-stream: frames lost, then the socket drops again.
    lose["frames"] = True
    page.wait_for_timeout(1000)
    got = max(forwarded)
    shown = page.inner_text("#messages li[data-run-id] .body")
    drop(sockets[-1])
    lose["frames"] = False
    wait_for_answer(page)

    attaches = [f for f in to_server if f["type"] == "run.attach"]
    assert attaches and attaches[-1]["after"] == got > 1
    stored = stored_branch(page)
    answer = stored[-1]["content"]
    assert page.inner_text("#messages li.assistant .body") == answer
    assert answer.startswith(shown) and len(answer) > len(shown)
    seen = page.evaluate("window.__seen")
    assert all(answer.startswith(text) for text in seen), seen
    assert max(seen, key=len) == answer
    runs = api(page, "GET", f"conversations/{conversation_id(page)}/runs")["body"]
    assert len(runs) == 1 and runs[0]["state"] == "succeeded"


def test_a_second_tab_lists_the_new_conversation_and_streams_its_next_answer(embedded_server, page):
    """Two tabs of one member: the conversation started in the first appears in the
    second's sidebar; opened there, it streams the answer to a message sent from the
    first tab and ends with the stored answer, as the first tab shows it."""
    base, _ = embedded_server
    log_in(page, base)
    other = page.context.new_page()
    other.goto(f"{base}/")
    other.wait_for_selector("#prompt")

    send(page, "Say hello in one short sentence.")
    wait_for_answer(page)
    conversation = conversation_id(page)
    listed = f"#conversation-list li[data-conversation-id='{conversation}']"
    other.wait_for_selector(listed, timeout=10_000)
    # Titled as in the first tab (the first line, or the automatic title once it comes).
    title = f"{listed} a.title"
    deadline = time.monotonic() + 30
    while other.inner_text(title) != page.inner_text(title):
        assert time.monotonic() < deadline, (other.inner_text(title), page.inner_text(title))
        other.wait_for_timeout(100)
    assert other.inner_text(title).strip()

    other.click(f"{listed} a.title")
    other.wait_for_selector("#messages li.assistant[data-id]")
    record_streamed_texts(other)
    send(page, "Count from 1 to 20, separated by spaces.")
    other.wait_for_selector("#messages li[data-run-id]", timeout=30_000)
    wait_for_answer(page)
    wait_for_answer(other)

    stored = stored_branch(page)
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    answer = stored[-1]["content"]
    assert other.locator("#messages li.assistant .body").last.inner_text() == answer
    assert other.locator("#messages li.user .body").last.inner_text() == stored[2]["content"]
    seen = other.evaluate("window.__seen")
    assert len(set(seen)) >= 3, seen  # streamed there, not only fetched at the end
    assert all(answer.startswith(text) for text in seen), seen
    assert other.is_enabled("#send")


SEED_AGENT_ANSWER = """
from chat.models import Conversation
from tenants.models import Tenant, User
from tenants.rls import operator_scope
from tests.factories import ConversationFactory, MessageFactory, tool_step

with operator_scope():
    tenant, user = Tenant.objects.get(slug="demo"), User.objects.get(username="demo")
    c = ConversationFactory(tenant=tenant, user=user, title="Stored tool calls")
    q = MessageFactory(conversation=c, content="6 x 7?")
    a = MessageFactory(
        parent=q, role="assistant", content="It is 42.",
        steps=[
            tool_step("c1", "calculate", {"expression": "6*7"},
                      result="42 <img src=x onerror=alert(1)>"),
            tool_step("c2", "date_shift", {"days": 1}, error="The call did not finish."),
        ],
    )
    Conversation.objects.filter(id=c.id).update(current_leaf=a)
    print(c.id)
"""


def test_an_agents_stored_tool_calls_show_with_its_answer(embedded_server, page):
    """A stored answer shows its tool calls as the stream did (text only), in order."""
    base, var = embedded_server
    seeded = embedded_manage(var, "shell", "-c", SEED_AGENT_ANSWER)
    log_in(page, base)
    page.goto(f"{base}/c/{seeded.split()[-1]}/")  # (after the shell's own notes)
    answer = page.locator("#messages li.assistant")
    answer.wait_for()
    tools = answer.locator(".steps details.tool")
    assert tools.count() == 2
    assert tools.nth(0).get_attribute("class") == "tool done"
    assert tools.nth(0).locator(".tool-name").inner_text() == "calculate"
    tools.nth(0).locator("summary").click()
    assert tools.nth(0).locator(".tool-arguments").inner_text() == '{\n  "expression": "6*7"\n}'
    assert tools.nth(0).locator(".tool-result").inner_text() == "42 <img src=x onerror=alert(1)>"
    assert page.locator("#messages img").count() == 0
    assert tools.nth(1).get_attribute("class") == "tool failed"
    tools.nth(1).locator("summary").click()
    assert tools.nth(1).locator(".tool-error").inner_text() == "The call did not finish."
    assert answer.locator(".body").inner_text() == "It is 42."


def test_stop_keeps_the_partial_answer_and_says_why(embedded_server, page):
    base, _ = embedded_server
    log_in(page, base)
    send(page, LONG_PROMPT)
    streamed_at_least(page, 20)
    assert page.is_disabled("#send")
    page.click("#stop")

    page.wait_for_selector("#messages li.assistant.failed[data-id]", timeout=30_000)
    partial = page.inner_text("#messages li.assistant .body")
    assert page.inner_text("#messages li.assistant .note").startswith("Stopped")
    stored = stored_branch(page)
    assert stored[-1]["role"] == "assistant" and stored[-1]["content"] == partial
    assert partial.strip()
    runs = api(page, "GET", f"conversations/{conversation_id(page)}/runs")["body"]
    assert (runs[0]["state"], runs[0]["error_code"]) == ("cancelled", "cancelled")
    assert page.is_hidden("#stop") and page.is_enabled("#send")

    page.reload()
    page.wait_for_selector("#messages li.assistant.failed")
    assert page.inner_text("#messages li.assistant .body") == partial
    assert page.inner_text("#messages li.assistant .note").startswith("Stopped")


def test_regenerate_edit_and_switch_branches(embedded_server, page):
    base, _ = embedded_server
    log_in(page, base)
    send(page, "Say hello in one short sentence.")
    wait_for_answer(page)
    answer = page.locator("#messages li.assistant")
    first_id, first_text = answer.get_attribute("data-id"), answer.locator(".body").inner_text()
    assert answer.locator(".switcher").count() == 0

    # Regenerate: a second answer, shown as 2/2.
    answer.locator("button[data-action=regenerate]").click()
    page.wait_for_selector("#messages li.assistant .position:text-is('2/2')")
    wait_for_answer(page)
    second_id = answer.get_attribute("data-id")
    assert second_id != first_id
    assert [m["id"] for m in stored_branch(page)][-1] == second_id

    # Back to the first answer with the switcher.
    answer.locator("button[data-action=previous]").click()
    page.wait_for_selector("#messages li.assistant .position:text-is('1/2')")
    assert answer.get_attribute("data-id") == first_id
    assert answer.locator(".body").inner_text() == first_text
    assert answer.locator("button[data-action=previous]").is_disabled()
    assert [m["id"] for m in stored_branch(page)][-1] == first_id

    # Edit the question: a sibling question, answered in its own branch.
    question = page.locator("#messages li.user")
    question.locator("button[data-action=edit]").click()
    page.fill("#messages li.user .editor textarea", "Say goodbye in one short sentence.")
    page.click("#messages li.user .editor button[type=submit]")
    page.wait_for_selector("#messages li.user .position:text-is('2/2')")
    wait_for_answer(page)
    assert question.locator(".body").inner_text() == "Say goodbye in one short sentence."
    edited = stored_branch(page)
    assert edited[0]["content"] == "Say goodbye in one short sentence."
    assert edited[-1]["id"] not in (first_id, second_id)

    # The branch the member is on survives a reload. Back on the first question, the
    # newest answer under it shows.
    page.reload()
    page.wait_for_selector("#messages li.user .position:text-is('2/2')")
    question.locator("button[data-action=previous]").click()
    page.wait_for_selector("#messages li.user .position:text-is('1/2')")
    assert question.locator(".body").inner_text() == "Say hello in one short sentence."
    assert answer.get_attribute("data-id") == second_id
    assert answer.locator(".position").inner_text() == "2/2"


def test_rename_search_and_delete_from_the_sidebar(embedded_server, page):
    base, _ = embedded_server
    log_in(page, base)
    send(page, "Tell me one fact about llamas.")
    wait_for_answer(page)
    cid = conversation_id(page)
    # A second tab (same session) on the same conversation follows what this one does.
    browser = page.context.browser
    other = browser.new_context(storage_state=page.context.storage_state()).new_page()
    other.goto(page.url)
    other.wait_for_selector("#messages li.assistant[data-id]")

    entry = page.locator(f"#conversation-list li[data-conversation-id='{cid}']")
    entry.locator("summary").click()
    entry.locator("button[data-action=rename]").click()
    entry.locator("form.rename input").fill("Camelid <b>notes</b>")
    entry.locator("form.rename input").press("Enter")
    page.wait_for_selector(f"#conversation-list li[data-conversation-id='{cid}'] a.title:visible")
    assert entry.locator("a.title").inner_text() == "Camelid <b>notes</b>"  # text, not markup
    # Both tabs hear of it (conversation.updated): sidebar, heading, window title.
    renamed = "() => document.title === 'Camelid <b>notes</b> · Parley'"
    wait_until(page, renamed, timeout=15)
    assert page.inner_text("#conversation-title") == "Camelid <b>notes</b>"
    wait_until(other, renamed, timeout=15)
    other_entry = other.locator(f"#conversation-list li[data-conversation-id='{cid}'] a.title")
    assert other_entry.inner_text() == "Camelid <b>notes</b>"
    assert other.inner_text("#conversation-title") == "Camelid <b>notes</b>"
    assert api(page, "GET", f"conversations/{cid}")["body"]["title"] == "Camelid <b>notes</b>"

    # Writes need the CSRF token, which the page sends; without it the API refuses.
    refused = page.evaluate(
        """async (path) => (await fetch('/api/v1/' + path, {method: 'PATCH',
            headers: {'Content-Type': 'application/json'},
            body: JSON.stringify({title: 'No token'})})).status""",
        f"conversations/{cid}",
    )
    assert refused == 403
    for fmt, needle in (("markdown", "## Assistant"), ("json", '"parent_id"')):
        href = entry.locator(f"a[data-export={fmt}]").get_attribute("href")
        status, disposition, body = page.evaluate(
            """async (href) => { const r = await fetch(href);
                return [r.status, r.headers.get('content-disposition'), await r.text()]; }""",
            href,
        )
        assert status == 200 and disposition.startswith("attachment"), (status, disposition)
        assert needle in body and "llamas" in body

    page.fill("#search-q", "llamas")
    hit = page.locator(f"#search-hits li[data-conversation-id='{cid}']")
    hit.wait_for()
    assert hit.locator("a").inner_text() == "Camelid <b>notes</b>"
    assert "llamas" in hit.locator(".snippet").inner_text().lower()
    assert page.is_hidden("#conversation-list")
    page.fill("#search-q", "zebrafish quasar")
    page.wait_for_selector("#search-summary:text-is('No conversation matches.')")
    page.fill("#search-q", "")
    page.wait_for_selector("#conversation-list", state="visible")

    # Delete asks first: declining keeps it.
    page.once("dialog", lambda dialog: dialog.dismiss())
    entry.locator("summary").click()
    entry.locator("button[data-action=delete]").click()
    assert api(page, "GET", f"conversations/{cid}")["status"] == 200
    page.once("dialog", lambda dialog: dialog.accept())
    entry.locator("summary").click()
    with page.expect_navigation():
        entry.locator("button[data-action=delete]").click()
    # It was the open conversation: back to a new chat, without it in the list.
    assert page.url == f"{base}/"
    assert page.locator(f"#conversation-list li[data-conversation-id='{cid}']").count() == 0
    assert api(page, "GET", f"conversations/{cid}")["status"] == 404
    # The other tab had it open too: it leaves it.
    wait_until(other, "() => location.pathname === '/'", timeout=15)
    other.close()


def test_pick_an_agent_for_a_conversation_and_back_to_plain_chat(embedded_server, page):
    base, _ = embedded_server
    log_in(page, base)
    # The demo tenant has its built-in agents enabled (seed_demo): the picker shows.
    page.wait_for_selector("#composer .agent-choice", state="visible")
    options = page.eval_on_selector_all(
        "#agent option", "(options) => options.map((o) => [o.value, o.textContent])"
    )
    assert options == [
        ["", "Plain chat"],
        ["calculator.calculator", "Calculator"],
        ["coding.coder", "Coder"],
        ["docreview.reviewer", "Document reviewer"],
    ]
    assert page.input_value("#agent") == ""

    sent: list[dict[str, Any]] = []
    received: list[dict[str, Any]] = []
    page.on(
        "websocket",
        lambda ws: (
            ws.on("framesent", lambda payload: sent.append(json.loads(payload))),
            ws.on("framereceived", lambda payload: received.append(json.loads(payload))),
        ),
    )
    page.reload()  # (the socket opened after the listener)
    page.wait_for_selector("#composer .agent-choice", state="visible")
    page.select_option("#agent", "calculator.calculator")
    send(page, "What is 6 times 7? Use the calculate tool.")
    # The run ends, answered or with its reason shown (the small model may not manage tools).
    wait_until(
        page,
        """() => !document.querySelector('#messages li.streaming, #messages li.pending')
            && document.querySelector('#messages li.assistant[data-id], #messages li.failed')""",
        timeout=ANSWER_TIMEOUT_MS / 1000,
    )
    sends = [frame for frame in sent if frame["type"] == "chat.send"]
    assert [frame.get("agent") for frame in sends] == ["calculator.calculator"]
    ends = [frame["type"] for frame in received if frame["type"] in ("run.done", "run.error")]
    assert ends, received
    assert page.inner_text("#status") != ""
    # Tool steps (if the model called any) were shown as text, each named.
    shown = page.eval_on_selector_all(
        "#messages .tool .tool-name", "(nodes) => nodes.map((n) => n.textContent)"
    )
    for name in shown:
        assert name in {"calculate", "convert_units", "days_between", "date_shift"}, name
    calls = [
        name for frame in received if frame["type"] == "tool.start" for name in [frame["name"]]
    ]
    assert shown == calls
    stored = [s["name"] for m in stored_branch(page) for s in m.get("steps", [])]
    assert stored == calls

    # The conversation keeps its agent: a reload shows it picked, and the tool calls
    # stored with the answer.
    cid = conversation_id(page)
    page.reload()
    page.wait_for_selector("#composer .agent-choice", state="visible")
    assert page.input_value("#agent") == "calculator.calculator"
    assert (
        page.eval_on_selector_all(
            "#messages .tool.done .tool-name, #messages .tool.failed .tool-name",
            "(nodes) => nodes.map((n) => n.textContent)",
        )
        == calls
    )
    data = page.evaluate("() => JSON.parse(document.getElementById('parley-chat').textContent)")
    assert data["conversation"]["agent"] == "calculator.calculator"

    # Back to plain chat sends "none", which sticks too (the answer need not finish).
    sent.clear()
    page.select_option("#agent", "")
    send(page, "Say hi.")
    wait_until(page, "() => !document.querySelector('#messages li.pending:not(.assistant)')")
    if page.is_visible("#stop"):
        page.click("#stop")
    wait_until(
        page,
        "() => !document.querySelector('#messages li.streaming, #messages li.pending')",
        timeout=ANSWER_TIMEOUT_MS / 1000,
    )
    assert [f.get("agent") for f in sent if f["type"] == "chat.send"] == ["none"]
    page.reload()
    page.wait_for_selector("#composer .agent-choice", state="visible")
    assert conversation_id(page) == cid
    assert page.input_value("#agent") == ""
    data = page.evaluate("() => JSON.parse(document.getElementById('parley-chat').textContent)")
    assert data["conversation"]["agent"] is None


def test_the_model_picker_shows_the_pools_models_with_the_default_selected(embedded_server, page):
    base, _ = embedded_server
    log_in(page, base)
    page.wait_for_selector("#composer .model-choice", state="visible")
    choices = api(page, "GET", "models")
    assert choices["status"] == 200
    default = choices["body"]["default_model"]
    assert default and [m["id"] for m in choices["body"]["models"] if m["default"]] == [default]
    options = page.eval_on_selector_all(
        "#model option", "(options) => options.map((o) => [o.value, o.textContent])"
    )
    assert options == [
        [m["id"], f"{m['id']} (default)" if m["default"] else m["id"]]
        for m in choices["body"]["models"]
    ]
    assert page.input_value("#model") == default
    # Labelled: found by its label, as a screen reader names it.
    assert page.get_by_label("Model").evaluate("(select) => select.id") == "model"

    # What is sent carries the picked model; the conversation keeps it.
    sent: list[dict[str, Any]] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda p: sent.append(json.loads(p))))
    page.reload()  # (the socket opened after the listener)
    page.wait_for_selector("#composer .model-choice", state="visible")
    send(page, "Say hi.")
    wait_until(page, "() => !document.querySelector('#messages li.pending:not(.assistant)')")
    if page.is_visible("#stop"):
        page.click("#stop")
    wait_until(
        page,
        "() => !document.querySelector('#messages li.streaming, #messages li.pending')",
        timeout=ANSWER_TIMEOUT_MS / 1000,
    )
    assert [f.get("model") for f in sent if f["type"] == "chat.send"] == [default]
    page.reload()
    page.wait_for_selector("#composer .model-choice", state="visible")
    assert page.input_value("#model") == default
    data = page.evaluate("() => JSON.parse(document.getElementById('parley-chat').textContent)")
    assert data["conversation"]["model"] == default
