"""The first ten minutes of a new user, in headless Chromium against the embedded default
(`make run`'s Parley, with the real bundled model): the demo's calculator agent calls
its tool and the answer shows the step and the right number; the demo's operator lands
on the operator's page.

How often the bundled model calls the right tool with valid arguments is measured by
tests/bench/local_tools.py (docs/benchmarks.md: SmolLM2-135M gets 37% of its 30
questions right when a tool call is required, as the calculator agent requires it);
here one plain multiplication, of the kind it gets right, must go through the whole
product: the agent picker, the pool, the tool, the step on the page, the answer."""

from __future__ import annotations

import pytest

from tests.test_browser import ANSWER_TIMEOUT_MS, log_in, page, wait_until  # noqa: F401

pytestmark = [pytest.mark.embedded, pytest.mark.llm]


def test_the_calculator_agent_shows_its_tool_step_and_the_right_number(embedded_server, page):  # noqa: F811
    base, _ = embedded_server
    log_in(page, base)
    picker = page.locator("#agent")
    assert picker.is_visible(), "the demo tenant's agents are enabled: the picker shows"
    picker.select_option("calculator.calculator")
    page.fill("#prompt", "What is 23 * 47?")
    page.keyboard.press("Enter")
    # The tool step appears while the run goes on, and ends done with the result.
    page.wait_for_selector("details.tool", timeout=ANSWER_TIMEOUT_MS)
    step = page.locator("details.tool").first
    assert step.locator(".tool-name").text_content() == "calculate"
    wait_until(
        page,
        "() => !!document.querySelector('details.tool.done .tool-result')",
        timeout=ANSWER_TIMEOUT_MS / 1000,
    )
    assert "1081" in step.locator(".tool-result").text_content()  # (a closed <details>)
    answer = wait_until(
        page,
        """() => !document.querySelector('#messages li.streaming, #messages li.pending')
            && document.querySelector('#messages li.assistant[data-id] .body')?.textContent""",
        timeout=ANSWER_TIMEOUT_MS / 1000,
    )
    assert "1081" in answer.replace(",", "")


def test_the_demo_operator_lands_on_the_operator_page(embedded_server, page):  # noqa: F811
    base, _ = embedded_server
    page.goto(f"{base}/")
    page.fill("input[name=username]", "operator")
    page.fill("input[name=password]", "parley-operator")
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/operator/")
    assert page.locator("h1").inner_text() == "Platform operator"
    assert page.locator("table").inner_text().count("Demo Company") == 1
    assert page.locator("a[href='/api/v1/docs']").is_visible()
