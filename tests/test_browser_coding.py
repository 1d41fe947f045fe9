"""The Coder on the chat page, in headless Chromium against Parley in embedded mode
with a scripted model (tests.synthetic) as its only backend, its code run in the real
sandbox: the model runs Python that draws a matplotlib figure and writes a CSV file;
the page shows the figure inline (an image really loaded from the artifact API) and
the CSV as a download link with its name and size, while the run streams and again
after a reload (from the stored message's steps), with the answer's text.

(The page's CSP forbids eval, so waits poll `page.evaluate`: tests.test_browser.)"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from tests.conftest import embedded_serving
from tests.synthetic import Reply, SyntheticServer, ToolCall
from tests.test_browser import log_in, page, wait_for_answer, wait_until  # noqa: F401
from tests.test_browser_page import watch_console

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(
        shutil.which("bwrap") is None, reason="bubblewrap is not installed (make test installs it)"
    ),
]

CSV = "month,rain_mm\nJan,78\nFeb,52\nMar,61\n"
CODE = f"""import matplotlib.pyplot as plt
open("rain.csv", "w").write({CSV!r})
plt.bar(["Jan", "Feb", "Mar"], [78, 52, 61])
plt.title("Rain")
print("rows:", 3)
"""
ANSWER = "The chart is above; rain.csv holds the numbers."


@pytest.fixture(scope="module")
def parley() -> Iterator[tuple[str, SyntheticServer]]:
    """Parley in embedded mode (`serve --backend`): its model runs CODE with code_run,
    then answers with ANSWER a few words at a time. The sandbox's Python environment is
    the one this test run's settings name (the served process's data folder is fresh)."""
    words = ANSWER.split(" ")
    model = SyntheticServer(
        replies=[
            Reply(tool_calls=[ToolCall("code_run", {"code": CODE, "language": "python"})]),
            Reply(pieces=[w + " " for w in words[:-1]] + [words[-1]]),
        ],
        delay_s=0.05,
    ).start()
    # The sandbox (VAR_DIR/sandbox) runs code as a user of its own, who must be able to
    # pass through the folders above it: not pytest's, which only their owner may enter.
    folder = Path(tempfile.mkdtemp(prefix="parley-coding-ui-"))
    folder.chmod(0o711)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PARLEY_SANDBOX_PYTHON", str(settings.PARLEY_SANDBOX_PYTHON))
            serving = embedded_serving(folder / "var", "--backend", model.url, timeout_s=60)
            with serving as (base, _):
                yield base, model
    finally:
        model.stop()
        shutil.rmtree(folder, ignore_errors=True)


def hold_run_done(tab) -> dict[str, Any]:
    """Hold the socket's `run.done` frames on their way to the page (so the run is
    seen streaming for as long as the test looks); `release()` sends them on."""
    state: dict[str, Any] = {"holding": True, "held": [], "socket": None}

    def route(ws) -> None:
        server = ws.connect_to_server()
        state["socket"] = ws
        ws.on_message(lambda message: server.send(message))

        def to_page(message) -> None:
            if state["holding"] and '"run.done"' in str(message):
                state["held"].append(message)
            else:
                ws.send(message)

        server.on_message(to_page)

    def release() -> None:
        state["holding"] = False
        for message in state["held"]:
            state["socket"].send(message)
        state["held"].clear()

    tab.route_web_socket("**/ws/v1/", route)
    state["release"] = release
    return state


# What the page shows of the artifacts under `scope` (the streaming answer or the
# stored one).
SHOWN_FILES = """(scope) => {
    const item = document.querySelector(scope);
    const figures = item ? [...item.querySelectorAll('.artifacts figure.artifact')] : [];
    return figures.map((figure) => {
        const img = figure.querySelector('img');
        const link = figure.querySelector('figcaption a');
        return {
            id: figure.dataset.artifactId,
            img: img ? {src: new URL(img.src).pathname, alt: img.alt,
                        loaded: img.complete && img.naturalWidth > 0,
                        width: img.naturalWidth} : null,
            link: link.textContent,
            href: new URL(link.href).pathname,
            download: link.getAttribute('download'),
            size: figure.querySelector('.artifact-size').textContent,
        };
    });
}"""


def shown_files(tab, scope: str, answers: list[tuple[str, int]]) -> dict[str, dict[str, Any]]:
    """The files shown under `scope` by name, once every image among them has loaded
    (`answers`: what the server answered the page's requests for artifacts)."""
    # (a lazy image loads once in view, as a member sees it)
    tab.locator(f"{scope} .artifacts img").first.scroll_into_view_if_needed()
    deadline = time.monotonic() + 30
    while True:
        files = tab.evaluate(SHOWN_FILES, scope)
        if files and all(f["img"] is None or f["img"]["loaded"] for f in files):
            return {f["link"]: f for f in files}
        if time.monotonic() > deadline:
            result = tab.text_content(f"{scope} .tool-result")
            raise AssertionError(f"shown: {files}; answers: {answers}; the call: {result}")
        tab.wait_for_timeout(100)


def fetched(tab, path: str) -> dict[str, Any]:
    """GET `path` with the page's session: its status, type and text."""
    return tab.evaluate(
        """async (path) => {
            const response = await fetch(path);
            return {status: response.status, type: response.headers.get('content-type'),
                    disposition: response.headers.get('content-disposition'),
                    text: await response.text()};
        }""",
        path,
    )


def assert_files(files: dict[str, dict[str, Any]]) -> None:
    assert set(files) == {"figure-1.png", "rain.csv"}, files
    figure, table = files["figure-1.png"], files["rain.csv"]
    content = f"/api/v1/artifacts/{figure['id']}/content"
    assert figure["img"] == {
        "src": content,
        "alt": "figure-1.png",
        "loaded": True,
        "width": figure["img"]["width"],
    }
    assert figure["img"]["width"] >= 100, figure  # a matplotlib figure, not a broken icon
    assert (figure["href"], figure["download"]) == (content, "figure-1.png")
    # The CSV: a download link, no image.
    assert table["img"] is None, table
    assert table["href"] == f"/api/v1/artifacts/{table['id']}/content"
    assert table["download"] == "rain.csv"
    assert table["size"] == f" · {len(CSV.encode())} B"


def test_the_coders_figure_and_file_show_live_and_after_a_reload(parley, page):  # noqa: F811
    base, model = parley
    seen = watch_console(page)
    # Every answer the page got for an artifact: (path, status).
    answers: list[tuple[str, int]] = []
    page.on(
        "response",
        lambda response: (
            "/api/v1/artifacts/" in response.url
            and answers.append((urlsplit(response.url).path, response.status))
        ),
    )
    run_done = hold_run_done(page)
    log_in(page, base)
    page.select_option("#agent", "coding.coder")
    page.fill("#prompt", "Plot the rain and give me the numbers as CSV.")
    page.click("#send")

    # While the run streams (its run.done held back): the call, its files, the answer.
    live = "#messages li[data-run-id]"
    page.wait_for_selector(
        f"{live} details.tool.done, {live} details.tool.failed", state="attached", timeout=90_000
    )
    result = page.text_content(f"{live} details.tool .tool-result") or ""
    assert result.startswith("exit status 0") and "rows: 3" in result, result
    files = shown_files(page, live, answers)
    assert_files(files)
    wait_until(
        page,
        "([scope, text]) => document.querySelector(scope + ' .body')?.textContent === text",
        arg=[live, ANSWER],
    )
    assert page.locator(live).count() == 1  # still the streaming answer
    assert page.inner_text(f"{live} details.tool summary") == "code_run · done"
    assert len(model.bodies) == 2
    assert model.bodies[0]["tool_choice"] == "required"  # the Coder's first step
    tool_message = model.bodies[1]["messages"][-1]
    assert tool_message["role"] == "tool" and "rows: 3" in tool_message["content"]

    # The links serve what the code made: the figure as a PNG, the CSV as an attachment.
    image = fetched(page, files["figure-1.png"]["href"])
    assert (image["status"], image["type"]) == (200, "image/png")
    table = fetched(page, files["rain.csv"]["href"])
    assert (table["status"], table["text"]) == (200, CSV)
    disposition = table["disposition"] or ""
    assert disposition.startswith("attachment") and "rain.csv" in disposition, disposition

    run_done["release"]()
    wait_for_answer(page)
    stored = "#messages li.assistant[data-id]"
    assert page.inner_text(f"{stored} .body") == ANSWER

    # After a reload, from the stored message's steps: the same files, the same answer.
    page.reload()
    page.wait_for_selector(f"{stored} .artifacts figure.artifact")
    assert shown_files(page, stored, answers) == files
    assert page.inner_text(f"{stored} .body") == ANSWER
    assert page.inner_text(f"{stored} details.tool summary") == "code_run · done"
    assert page.text_content(f"{stored} details.tool .tool-result") == result

    page.wait_for_timeout(300)  # (late errors)
    assert page.evaluate("window.__violations || []") == []
    assert seen["errors"] == []
    # Every request for an artifact (the images', the test's fetches) was answered.
    assert all(status == 200 for _, status in answers), answers
