"""Documents on the chat page, in headless Chromium against Parley in embedded mode with
a scripted model (tests.synthetic) as its only backend: a file is uploaded from the
composer and its chip shows the upload and the reading until it is ready (sending
waits for it); the question goes with it (`document_ids`), the page says how the model
reads it and why, and the answer shows its verified quotation with a link to its page
and its fabricated one flagged, not as a quotation; the link opens the page with the
quotation highlighted and scrolled into view; a reload shows the same; an edited
question reads the same document. A renamed
executable is refused with the server's reason, and cannot go with a message.

(The page's CSP forbids eval, so waits poll `page.evaluate`: tests.test_browser.)"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import embedded_serving
from tests.synthetic import SyntheticServer
from tests.test_browser import log_in, page, wait_for_answer, wait_until  # noqa: F401

pytestmark = [pytest.mark.embedded]

# Page 2 puts its clause after enough lines that the viewer must scroll to show it; the
# document and the answer hold markup, which must show as text.
FILLER = "Markup such as <img src=x> is text here.\n" + "".join(
    f"Schedule item {n}: one chair, one table and a lamp of brass, found in good order.\n"
    for n in range(1, 41)
)
CLAUSE = (
    "Termination. Either party may end this lease by giving three months' notice in "
    "writing. The deposit of two months' rent is returned within thirty days."
)
LEASE = (
    "This lease is made between Northwind Properties (the landlord) and Ada Lovelace "
    "(the tenant) for the flat at 12 Analytical Street.\f" + FILLER + CLAUSE + "\n"
)
QUOTE = "Either party may end this lease by giving three months' notice in writing."
FABRICATED = "the deposit is returned within ten days of moving out"
# The model also writes a citation marker of its own: it must not become a link.
FORGED = "Rent is one pound a year [p. 2](#cite-1)."
ANSWER = f'{FORGED} The lease says: "{QUOTE}" It also says "{FABRICATED}". See <b>Termination</b>.'


@pytest.fixture(scope="module")
def parley(tmp_path_factory) -> Iterator[tuple[str, SyntheticServer]]:
    """Parley in embedded mode (`serve --backend`): its model answers every question
    with ANSWER, a few words at a time."""
    words = ANSWER.split(" ")
    pieces = [w + " " for w in words[:-1]] + [words[-1]]
    model = SyntheticServer(pieces=pieces, delay_s=0.08).start()
    var = tmp_path_factory.mktemp("documents-ui") / "var"
    try:
        with embedded_serving(var, "--backend", model.url, timeout_s=60) as (base, _):
            yield base, model
    finally:
        model.stop()


def record_chip_states(tab) -> None:
    """From now on, note every state an attachment chip shows (window.__chips)."""
    tab.evaluate("""() => {
        window.__chips = [];
        const note = () => {
            for (const s of document.querySelectorAll('#attachments .chip-state')) {
                const last = window.__chips[window.__chips.length - 1];
                if (s.textContent && s.textContent !== last) window.__chips.push(s.textContent);
            }
        };
        new MutationObserver(note).observe(document.getElementById('attachments'),
                   {childList: true, subtree: true, characterData: true, attributes: true});
    }""")


def shown_answer(tab) -> dict:
    return tab.evaluate("""() => {
        const item = [...document.querySelectorAll('#messages li.assistant')].pop();
        const body = item.querySelector('.body');
        return {
            text: body.textContent,
            links: [...body.querySelectorAll('a.cite')].map(a => [a.textContent, a.dataset.cite]),
            flagged: [...body.querySelectorAll('.unverified')].map(s => s.textContent),
            footer: item.querySelector('.documents-footer')?.textContent ?? '',
        };
    }""")


def open_citation(tab) -> dict:
    """Click the answer's citation; the page viewer as it then shows."""
    tab.locator("#messages li.assistant a.cite").last.click()
    tab.wait_for_selector("#page-viewer[open] mark.quoted", timeout=10_000)
    return tab.evaluate("""() => {
        const viewer = document.getElementById('page-viewer');
        const text = viewer.querySelector('.page-text'), mark = text.querySelector('mark');
        const box = text.getBoundingClientRect(), at = mark.getBoundingClientRect();
        return {
            title: viewer.querySelector('.viewer-title').textContent,
            page: text.textContent,
            quoted: mark.textContent,
            scrolled: text.scrollTop > 0,
            inView: at.top >= box.top && at.bottom <= box.bottom,
        };
    }""")


def test_upload_ask_and_open_a_citations_page(parley, page):  # noqa: F811
    base, model = parley
    log_in(page, base)
    record_chip_states(page)

    # The upload is held on its way: the chip shows it, and the message waits for it.
    held = []
    page.route("**/api/v1/documents", lambda route: held.append(route))
    page.set_input_files(
        "#attach-file",
        files=[{"name": "lease.txt", "mimeType": "text/plain", "buffer": LEASE.encode()}],
    )
    wait_until(page, "() => document.querySelectorAll('#attachments .chip.uploading').length")
    page.fill("#prompt", "How do I end the lease?")
    page.click("#send")
    assert "is not ready yet" in page.inner_text("#status")
    assert page.locator("#messages li.user").count() == 0
    assert page.input_value("#prompt") == "How do I end the lease?"
    deadline = time.monotonic() + 10
    while not held:
        assert time.monotonic() < deadline, "the upload never started"
        page.wait_for_timeout(50)
    held[0].continue_()
    page.unroute("**/api/v1/documents")

    # It is read (the socket's document.updated frames, or the API), then ready.
    page.wait_for_selector("#attachments .chip.ready", timeout=30_000)
    states = page.evaluate("window.__chips")
    assert states[0].startswith("Uploading") and states[-1] == "Ready", states
    assert any(s.startswith(("Reading pages", "Indexing passages")) for s in states), states
    assert page.inner_text("#attachments .chip .chip-title") == "lease.txt"
    assert page.inner_text("#status") == ""  # the block is lifted

    # Sent with the document: how the model reads it shows while the answer streams.
    page.click("#send")
    reading = page.wait_for_selector("#messages li[data-run-id] .progress.documents")
    assert reading is not None
    reason = reading.text_content() or ""
    assert reason.startswith("Read whole: “lease.txt” fits in the model's context"), reason
    assert page.locator("#attachments .chip").count() == 0
    wait_for_answer(page)
    assert page.inner_text("#messages li.user ul.attached") == "lease.txt"
    # The model read the document in its prompt.
    system = model.bodies[-1]["messages"][0]["content"]
    assert '<document title="lease.txt"' in system and CLAUSE in system

    shown = shown_answer(page)
    assert shown["links"] == [["p. 2", "1"]], shown
    assert f'"{QUOTE}" (p. 2)' in shown["text"], shown
    # The fabricated quotation is flagged, and not shown as a quotation.
    assert shown["flagged"] == [f"unverified{FABRICATED}"], shown
    assert f'"{FABRICATED}' not in shown["text"]
    assert "Quotes: 1 verified, 1 unverified" in shown["footer"]
    assert "Read whole" in shown["footer"]
    assert shown["text"].startswith(FORGED) and shown["text"].endswith("See <b>Termination</b>.")
    assert page.locator("#messages b, #messages img").count() == 0

    # The citation opens its page, the quotation highlighted and scrolled into view.
    viewer = open_citation(page)
    assert viewer["title"] == "lease.txt, p. 2"
    # (the server's match may leave out the quotation's closing full stop)
    assert QUOTE.startswith(viewer["quoted"]) and len(viewer["quoted"]) >= len(QUOTE) - 1
    assert viewer["page"] == FILLER + CLAUSE + "\n"
    assert viewer["scrolled"] and viewer["inView"], viewer
    assert page.locator("#page-viewer img").count() == 0
    page.keyboard.press("Escape")
    wait_until(page, "() => !document.getElementById('page-viewer').open", timeout=5)

    # After a reload the stored answer reads the same, its citation opens the same page.
    page.reload()
    page.wait_for_selector("#messages li.assistant a.cite")
    assert shown_answer(page) == shown
    assert page.inner_text("#messages li.user ul.attached") == "lease.txt"
    viewer = open_citation(page)
    assert QUOTE.startswith(viewer["quoted"]) and viewer["inView"]
    page.click("#page-viewer button[data-action=close-viewer]")
    wait_until(page, "() => !document.getElementById('page-viewer').open", timeout=5)

    # An edited question reads the documents the original carried.
    asked = len(model.bodies)
    page.click("#messages li.user button[data-action=edit]")
    page.fill("#messages li.user form.editor textarea", "How much notice ends the lease?")
    page.click("#messages li.user form.editor button[type=submit]")
    wait_until(page, "(n) => document.querySelectorAll('#messages li.user').length === 1", arg=1)
    wait_for_answer(page)
    assert len(model.bodies) == asked + 1
    assert CLAUSE in model.bodies[-1]["messages"][0]["content"]
    assert page.inner_text("#messages li.user .body") == "How much notice ends the lease?"
    assert page.inner_text("#messages li.user ul.attached") == "lease.txt"


def test_a_refused_upload_shows_the_servers_reason(parley, page):  # noqa: F811
    base, _ = parley
    log_in(page, base)
    page.set_input_files(
        "#attach-file",
        files=[
            {
                "name": "report.pdf",
                "mimeType": "application/pdf",
                "buffer": b"\x7fELF\x02\x01\x01" + bytes(200),
            }
        ],
    )
    page.wait_for_selector("#attachments .chip.refused", timeout=15_000)
    reason = page.inner_text("#attachments .chip-error")
    assert reason.startswith("This file is an ELF executable, not a document."), reason
    # It cannot go with a message; once removed, nothing is attached.
    page.fill("#prompt", "What does the report say?")
    page.click("#send")
    assert "“report.pdf” cannot be attached" in page.inner_text("#status")
    assert page.locator("#messages li.user").count() == 0
    page.click("#attachments button[data-action=detach]")
    assert page.locator("#attachments .chip").count() == 0
    assert page.is_hidden("#attachments")


def test_progress_comes_from_the_api_when_the_socket_says_nothing(parley, page):  # noqa: F811
    """The socket's `document.updated` frames are dropped on their way: the chip asks
    the API how far the document is, and gets to ready all the same."""
    base, _ = parley

    def without_document_frames(ws) -> None:
        server = ws.connect_to_server()
        ws.on_message(lambda message: server.send(message))
        server.on_message(
            lambda message: None if "document.updated" in str(message) else ws.send(message)
        )

    page.route_web_socket("**/ws/v1/", without_document_frames)
    asked = []
    page.on(
        "request",
        lambda request: (
            request.method == "GET"
            and "/api/v1/documents/" in request.url
            and asked.append(request.url)
        ),
    )
    log_in(page, base)
    page.set_input_files(
        "#attach-file",
        files=[{"name": "notes.md", "mimeType": "text/markdown", "buffer": b"# Notes\n\nShort."}],
    )
    page.wait_for_selector("#attachments .chip.ready", timeout=30_000)
    document_id = page.get_attribute("#attachments .chip", "data-document-id")
    assert asked and all(url.endswith(f"/api/v1/documents/{document_id}") for url in asked)
