"""Rendered answers on the chat page, in headless Chromium against Parley in embedded
mode with a scripted model (tests.synthetic) as its only backend: Markdown (a table,
lists, a link, a fenced Python block) renders while it streams and after it is stored,
the same across a reload mid-stream; code is highlighted with its language shown and a
Copy button that copies it; hostile output (script, event handlers, `javascript:` and
`data:` links, SVG, a remote image) renders inert and loads nothing remote.

(The page's CSP forbids eval, so waits poll `page.evaluate`: tests.test_browser.)"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import embedded_serving
from tests.synthetic import SyntheticServer
from tests.test_browser import log_in, page, send, wait_for_answer, wait_until  # noqa: F401
from tests.test_browser_coding import hold_run_done
from tests.test_browser_page import watch_console

pytestmark = [pytest.mark.embedded]

CODE = 'def greet(name: str) -> str:\n    return f"Hello, {name}!"\n'
RENDERED = f"""## Rain by month

| Month | Rain (mm) |
|:------|----------:|
| Jan   | 78        |
| Feb   | 52        |

Things to know:

- it rains in **winter**
- see [the source](https://example.org/rain)

1. first
2. second

```python
{CODE}```

> Quoted, with `inline code`.

End of the answer."""

REMOTE = "203.0.113.9"
HOSTILE = f"""<script>window.__pwned=1</script>

<img src=x onerror="window.__pwned=1">

<svg onload="window.__pwned=1"><script>window.__pwned=1</script></svg>

[x](javascript:window.__pwned=1) and [y](data:text/html,<script>window.__pwned=1</script>)

![remote](http://{REMOTE}/a.png)

Still here."""


def pieces(text: str, size: int = 7) -> list[str]:
    """The text in small pieces, as a model streams it (Markdown cut mid-syntax)."""
    return [text[i : i + size] for i in range(0, len(text), size)]


@pytest.fixture(scope="module")
def parley() -> Iterator[tuple[str, SyntheticServer]]:
    """Parley in embedded mode (`serve --backend`) over a model that answers every
    request with its `pieces` (set by each test; a title request gets them too)."""
    model = SyntheticServer(pieces=["unset"], delay_s=0.02).start()
    folder = Path(tempfile.mkdtemp(prefix="parley-markdown-ui-"))
    try:
        with embedded_serving(folder / "var", "--backend", model.url, timeout_s=60) as (base, _):
            yield base, model
    finally:
        model.stop()
        shutil.rmtree(folder, ignore_errors=True)


# What an answer's body holds, rendered (`scope`: the streaming answer or the stored one).
RENDERED_PARTS = """(scope) => {
    const body = document.querySelector(scope + ' .body');
    if (!body) return null;
    const link = body.querySelector('a[href^="https://example.org"]');
    const code = body.querySelector('.code-block pre code');
    return {
        heading: body.querySelector('h2')?.textContent ?? null,
        cells: [...body.querySelectorAll('table tr')].map(
            (tr) => [...tr.children].map((c) => [c.tagName, c.textContent, c.className])),
        bullets: [...body.querySelectorAll('ul > li')].map((li) => li.textContent),
        numbered: [...body.querySelectorAll('ol > li')].map((li) => li.textContent),
        strong: body.querySelector('ul strong')?.textContent ?? null,
        link: link && [link.textContent, link.href, link.rel, link.target],
        language: body.querySelector('.code-block .code-language')?.textContent ?? null,
        code: code?.textContent ?? null,
        highlighted: code ? [...code.querySelectorAll('span[class^="hljs-"]')].map(
            (s) => [s.className, s.textContent]) : [],
        quote: body.querySelector('blockquote code')?.textContent ?? null,
        last: body.lastElementChild?.textContent ?? null,
        html: body.innerHTML,
    };
}"""


def assert_rendered(parts: dict) -> None:
    assert parts["heading"] == "Rain by month"
    assert parts["cells"] == [
        [["TH", "Month", "align-left"], ["TH", "Rain (mm)", "align-right"]],
        [["TD", "Jan", "align-left"], ["TD", "78", "align-right"]],
        [["TD", "Feb", "align-left"], ["TD", "52", "align-right"]],
    ]
    assert parts["bullets"] == ["it rains in winter", "see the source"]
    assert parts["strong"] == "winter"
    assert parts["numbered"] == ["first", "second"]
    assert parts["link"] == [
        "the source",
        "https://example.org/rain",
        "noopener noreferrer nofollow",
        "_blank",
    ]
    assert parts["language"] == "python"
    assert parts["code"] == CODE
    assert ["hljs-keyword", "def"] in parts["highlighted"], parts["highlighted"]
    assert ["hljs-title function_", "greet"] in parts["highlighted"], parts["highlighted"]
    assert any(c == "hljs-string" for c, _ in parts["highlighted"]), parts["highlighted"]
    assert parts["quote"] == "inline code"
    assert parts["last"] == "End of the answer."
    assert 'style="' not in parts["html"]  # the CSP allows no inline style


def test_markdown_renders_while_streaming_across_a_reload_and_once_stored(parley, page):  # noqa: F811
    base, model = parley
    model.pieces = pieces(RENDERED)
    model.delay_s = 0.03
    seen = watch_console(page)
    run_done = hold_run_done(page)
    log_in(page, base)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    send(page, "How much did it rain?")

    # Rendered while it streams: the table is there before the answer ends.
    live = "#messages li[data-run-id]"
    try:
        wait_until(
            page,
            "(scope) => document.querySelector(scope + ' .body table td') !== null",
            arg=live,
            timeout=60,
        )
    except AssertionError as error:
        shown = page.evaluate(
            "() => [document.getElementById('messages').innerHTML,"
            " document.getElementById('status').textContent]"
        )
        raise AssertionError(f"no table while streaming; shown: {shown}") from error
    assert page.locator(f"{live}.streaming").count() == 1
    assert not page.evaluate(
        "(scope) => document.querySelector(scope + ' .body').textContent"
        ".includes('End of the answer.')",
        live,
    )

    # A reload mid-stream: the page attaches again and renders from the events again.
    page.reload()
    page.wait_for_selector(live, state="attached", timeout=30_000)
    streamed = wait_until(
        page,
        f"""(scope) => {{
            const parts = ({RENDERED_PARTS})(scope);
            return parts && parts.last === 'End of the answer.' ? parts : null;
        }}""",
        arg=live,
        timeout=60,
    )
    assert page.locator(f"{live}.streaming").count() == 1  # run.done is still held
    assert_rendered(streamed)

    run_done["release"]()
    wait_for_answer(page)
    stored = "#messages li.assistant[data-id]"
    once_stored = page.evaluate(RENDERED_PARTS, stored)
    assert_rendered(once_stored)
    # Nothing lost or doubled: what streamed renders as what was stored.
    assert once_stored["html"] == streamed["html"]

    # Copy puts the code (not the label, not the button) on the clipboard.
    copy = page.locator(f"{stored} .code-block button.copy")
    copy.click()
    wait_until(
        page,
        "(scope) => document.querySelector(scope).textContent === 'Copied'",
        arg=f"{stored} .code-block button.copy",
    )
    assert page.evaluate("() => navigator.clipboard.readText()") == CODE

    page.reload()
    page.wait_for_selector(f"{stored} .body table")
    assert page.evaluate(RENDERED_PARTS, stored)["html"] == streamed["html"]

    page.wait_for_timeout(300)  # (late errors)
    assert page.evaluate("window.__violations || []") == []
    assert seen["errors"] == []


def test_hostile_output_renders_inert_and_loads_nothing_remote(parley, page):  # noqa: F811
    base, model = parley
    model.pieces = pieces(HOSTILE)
    model.delay_s = 0.01
    seen = watch_console(page)
    log_in(page, base)
    send(page, "Say something nasty.")
    wait_for_answer(page)
    stored = "#messages li.assistant[data-id]"
    page.wait_for_selector(f"{stored} a.remote-image")

    body = page.evaluate(
        """(scope) => {
            const body = document.querySelector(scope + ' .body');
            return {
                text: body.textContent,
                elements: [...body.querySelectorAll('*')].map((e) => e.tagName),
                handlers: [...body.querySelectorAll('*')].flatMap(
                    (e) => [...e.attributes].map((a) => a.name).filter((n) => n.startsWith('on'))),
                hrefs: [...body.querySelectorAll('a')].map((a) => a.getAttribute('href')),
                images: [...document.querySelectorAll('img')].map((i) => i.getAttribute('src')),
                remote: [...body.querySelectorAll('a.remote-image')].map(
                    (a) => [a.textContent, a.href, a.rel, a.target]),
            };
        }""",
        stored,
    )
    # Raw HTML is shown as text, never made into elements.
    assert "<script>window.__pwned=1</script>" in body["text"]
    assert '<img src=x onerror="window.__pwned=1">' in body["text"]
    assert '<svg onload="window.__pwned=1">' in body["text"]
    assert not {"SCRIPT", "IMG", "SVG", "svg", "IFRAME", "OBJECT"} & set(body["elements"])
    assert body["handlers"] == []
    # `javascript:` and `data:` links are left as text; the remote image is a link.
    assert "[x](javascript:window.__pwned=1)" in body["text"]
    assert body["hrefs"] == [f"http://{REMOTE}/a.png"]
    assert body["remote"] == [
        ["remote", f"http://{REMOTE}/a.png", "noopener noreferrer nofollow", "_blank"]
    ]
    assert not any(REMOTE in (src or "") for src in body["images"])
    assert body["text"].rstrip().endswith("Still here.")

    # Clicking what looks like the `javascript:` link runs nothing.
    page.get_by_text("[x](javascript:window.__pwned=1)", exact=False).click()
    page.wait_for_timeout(300)
    assert page.evaluate("() => typeof window.__pwned") == "undefined"
    assert not [url for url in seen["requests"] if REMOTE in url]
    # Nothing even tried: no script or remote load refused by the CSP.
    assert page.evaluate("window.__violations || []") == []
    assert seen["errors"] == []


MATH = r"""Euler: $e^{i\pi}+1=0$, and it costs $5 and $6.

$$
\int_0^1 x^2\,dx = \frac{1}{3}
$$

Untrusted: $\href{javascript:window.__pwned=1}{click}$

Done."""


def test_math_is_typeset_once_an_answer_holds_some(parley, page):  # noqa: F811
    base, model = parley
    model.pieces = pieces(MATH)
    model.delay_s = 0.01
    seen = watch_console(page)
    log_in(page, base)
    # KaTeX is loaded only for an answer with math.
    assert not [url for url in seen["requests"] if "/parley/math-" in url]
    send(page, "Some math, please.")
    wait_for_answer(page)
    stored = "#messages li.assistant[data-id]"
    math = wait_until(
        page,
        """(scope) => {
            const body = document.querySelector(scope + ' .body');
            const nodes = [...body.querySelectorAll('.math')];
            if (!nodes.length || nodes.some((n) => !n.classList.contains('typeset'))) return null;
            return {
                kinds: nodes.map(
                    (n) => [n.className, n.querySelector('math')?.getAttribute('display')]),
                text: body.innerText,
                identifiers: [...body.querySelectorAll('.math-block math mi, .math-block math mo')]
                    .map((n) => n.textContent),
                annotations: body.querySelectorAll('annotation').length,
                links: [...body.querySelectorAll('[href]')].map((n) => n.getAttribute('href')),
                styled: body.querySelectorAll('[style]').length,
            };
        }""",
        arg=stored,
        timeout=30,
    )
    assert math["kinds"] == [
        ["math math-inline typeset", None],
        ["math math-block typeset", "block"],
        ["math math-inline typeset", None],
    ], math
    assert "∫" in math["identifiers"] and "x" in math["identifiers"], math
    assert "$5 and $6" in math["text"]  # money, not math
    assert math["annotations"] == 0 and math["links"] == [] and math["styled"] == 0, math
    assert [url for url in seen["requests"] if "/parley/math-" in url]
    assert page.evaluate("() => typeof window.__pwned") == "undefined"
    page.wait_for_timeout(300)  # (late errors)
    assert page.evaluate("window.__violations || []") == []
    assert seen["errors"] == []
