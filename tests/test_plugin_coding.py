"""The Coder (plugins/coding): the conformance suite; its run tools over the real
sandbox, called as the agent runtime calls them (a ToolContext in the config): code,
figures, a workspace kept between calls, limits, a repository checked out, its tests
run, a diff applied; and an agent run end to end through the `sandbox` queue where a
scripted model runs code and the page gets the figure."""

from __future__ import annotations

import io
import shutil
import uuid
import zipfile

import pytest
from asgiref.sync import sync_to_async
from langchain_core.messages import AIMessage

from agents import tool_queue
from agents.context import ToolAnswer, ToolContext
from agents.runtime import agent_tools
from agents.testing import PluginConformance
from chat import agent_turn
from chat.models import Message
from documents.ingest import document_ingest
from documents.models import Document
from documents.services import document_upload
from plugins.coding.run_tools import code_run, diff_apply_tool, diff_review, repo_checkout
from sandbox.models import Artifact
from sandbox.services import workspace_load
from tenants.rls import tenant_scope
from tests.conftest import ws_connect
from tests.scripted_model import ScriptedChatModel

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap is not installed (make test installs it)"
)


class TestCodingConformance(PluginConformance):
    entry_point = "coding"
    settings_examples = [{}]
    invalid_settings_examples = [{"timeout": 3}]


def context(person, conversation_id: str | None = None, **kwargs) -> ToolContext:
    return ToolContext(
        tenant_id=str(person.tenant.id),
        user_id=str(person.user.id),
        run_id=str(uuid.uuid4()),
        conversation_id=conversation_id or str(uuid.uuid4()),
        **kwargs,
    )


def call(tool, ctx: ToolContext | None, **arguments):
    configurable = {"parley_context": ctx} if ctx is not None else {}
    return tool.invoke(arguments, config={"configurable": configurable})


def artifacts_of(person) -> list[Artifact]:
    with tenant_scope(tenant_id=person.tenant.id):
        return list(Artifact.objects.filter(tenant_id=person.tenant.id).order_by("name"))


# --- code_run ---------------------------------------------------------------------------


@needs_bwrap
@pytest.mark.django_db
def test_code_run_answers_with_status_usage_and_output(alice, sandbox_storage):
    answer = call(code_run, context(alice), code="import numpy as np\nprint(np.arange(5).sum())")
    assert isinstance(answer, ToolAnswer)
    assert answer.text.startswith("exit status 0 · ")
    assert " s CPU · " in answer.text and " memory · " in answer.text
    assert "stdout:\n10" in answer.text
    assert answer.artifacts == ()


@needs_bwrap
@pytest.mark.django_db
def test_a_matplotlib_figure_comes_back_as_an_image_artifact(alice, sandbox_storage):
    ctx = context(alice)
    answer = call(
        code_run,
        ctx,
        code="import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('rain')\nplt.show()",
    )
    assert isinstance(answer, ToolAnswer), answer
    [artifact] = answer.artifacts
    assert (artifact["name"], artifact["media_type"]) == ("figure-1.png", "image/png")
    [stored] = artifacts_of(alice)
    assert str(stored.id) == artifact["id"] and str(stored.conversation_id) == ctx.conversation_id
    assert "figure-1.png" in answer.text


@needs_bwrap
@pytest.mark.django_db
def test_the_workspace_persists_between_calls_of_one_conversation_only(alice, sandbox_storage):
    ctx = context(alice)
    first = call(code_run, ctx, code="open('notes.txt', 'w').write('kept')")
    assert [a["name"] for a in first.artifacts] == ["notes.txt"]
    again = call(code_run, ctx, code="cat notes.txt", language="bash")
    assert "stdout:\nkept" in again.text
    elsewhere = call(code_run, context(alice), code="ls -A; echo end", language="shell")
    assert "stdout:\nend" in elsewhere.text  # another conversation: an empty workspace


@needs_bwrap
@pytest.mark.django_db
def test_a_limit_says_what_stopped_the_code_and_keeps_the_old_workspace(
    alice, sandbox_storage, settings
):
    settings.PARLEY_SANDBOX_WALL_S = 1
    ctx = context(alice)
    call(code_run, ctx, code="echo one > a.txt", language="shell")
    answer = call(code_run, ctx, code="echo two > a.txt; sleep 30", language="shell")
    assert answer.text.startswith("stopped at the time limit")
    assert "keeps its files from before" in answer.text
    assert "stdout:\none" in call(code_run, ctx, code="cat a.txt", language="shell").text


@pytest.mark.django_db
def test_without_a_sandbox_the_code_is_refused_not_run(alice, sandbox_storage, settings, tmp_path):
    settings.PARLEY_SANDBOX_BWRAP = str(tmp_path / "missing-bwrap")
    marker = tmp_path / "ran"
    answer = call(code_run, context(alice), code=f"touch {marker}", language="shell")
    assert answer.startswith("Error: code cannot run here, so it was not run:")
    assert "bubblewrap is not installed" in answer
    assert not marker.exists()


def test_bad_input_and_no_run_give_errors():
    assert call(code_run, None, code="print(1)").startswith("Error: this tool runs")
    person = type(
        "P", (), {"tenant": type("T", (), {"id": uuid.uuid4()}), "user": type("U", (), {"id": 1})}
    )
    ctx = context(person)
    assert call(code_run, ctx, code="  ") == "Error: there is no code to run."
    assert "not 'ruby'" in call(code_run, ctx, code="puts 1", language="ruby")


# --- repositories, diffs, tests -----------------------------------------------------------

CALC = "def add(a, b):\n    return a - b\n"
TEST_CALC = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
FIX = """--- a/shop/calc.py
+++ b/shop/calc.py
@@ -1,2 +1,2 @@
 def add(a, b):
-    return a - b
+    return a + b
"""


@pytest.fixture
def repository(alice, documents_storage) -> Document:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("calc.py", CALC)
        archive.writestr("test_calc.py", TEST_CALC)
    with tenant_scope(tenant_id=alice.tenant.id, user_id=alice.user.id):
        document = document_upload(actor=alice.actor, data=buffer.getvalue(), filename="shop.zip")
    document_ingest(document_id=document.id, tenant_id=alice.tenant.id)
    return document


@needs_bwrap
@pytest.mark.django_db
def test_checkout_run_the_tests_fix_with_a_diff_and_run_them_again(
    alice, repository, sandbox_storage
):
    ctx = context(alice, document_ids=(str(repository.id),))
    checked = call(repo_checkout, ctx, repository="shop.zip")
    assert checked.startswith("Checked out 2 files of shop.zip into shop/"), checked
    failing = call(code_run, ctx, code="cd shop && python -m pytest -q", language="shell")
    assert failing.text.startswith("exit status 1"), failing.text
    assert "1 failed" in failing.text

    assert call(diff_apply_tool, ctx, diff=FIX) == "Applied: shop/calc.py (written)."
    passing = call(code_run, ctx, code="cd shop && python -m pytest -q", language="shell")
    assert passing.text.startswith("exit status 0"), passing.text
    assert "1 passed" in passing.text
    with tenant_scope(tenant_id=alice.tenant.id):
        workspace = workspace_load(tenant=alice.tenant.id, conversation_id=ctx.conversation_id)
    assert workspace is not None


@pytest.mark.django_db
def test_a_diff_that_does_not_apply_changes_nothing_and_says_where(
    alice, repository, sandbox_storage
):
    ctx = context(alice, document_ids=(str(repository.id),))
    call(repo_checkout, ctx, repository="shop.zip")
    wrong = FIX.replace("return a - b", "return a * b")
    answer = call(diff_apply_tool, ctx, diff=wrong)
    assert answer.startswith("Error:") and "shop/calc.py" in answer
    escaping = FIX.replace("shop/calc.py", "../../etc/passwd")
    assert call(diff_apply_tool, ctx, diff=escaping).startswith("Error:")


@pytest.mark.django_db
def test_another_tenants_repository_cannot_be_checked_out(
    alice, charlie, repository, sandbox_storage
):
    ctx = context(charlie, document_ids=(str(repository.id),))
    answer = call(repo_checkout, ctx, repository="shop.zip")
    assert answer.startswith("Error:")
    with tenant_scope(tenant_id=charlie.tenant.id):
        assert workspace_load(tenant=charlie.tenant.id, conversation_id=ctx.conversation_id) is None


def test_diff_review_ties_comments_to_lines_the_diff_shows():
    review = diff_review.invoke(
        {"diff": FIX, "comments": [{"path": "shop/calc.py", "line": 2, "body": "Good fix."}]}
    )
    assert review == "Review: 1 comment\n- shop/calc.py:2 (new): Good fix."
    refused = diff_review.invoke(
        {"diff": FIX, "comments": [{"path": "shop/calc.py", "line": 40, "body": "Here?"}]}
    )
    assert refused.startswith("Error:") and "line 40" in refused


def test_code_stays_available_to_a_run_that_reads_documents(all_plugins):
    from agents.registry import plugin_get

    plugin = plugin_get("coding")
    [spec] = plugin.manifest.agents
    granted = ("documents.read", "code.execute")
    trusted = {
        t.name for t in agent_tools(spec=spec, manifest=plugin.manifest, granted_scopes=granted)
    }
    untrusted = {
        t.name
        for t in agent_tools(
            spec=spec, manifest=plugin.manifest, granted_scopes=granted, untrusted=True
        )
    }
    assert "code_run" in untrusted and untrusted == trusted


# --- an agent run, end to end -------------------------------------------------------------


@needs_bwrap
@pytest.mark.django_db(transaction=True)
async def test_the_coder_runs_code_on_the_sandbox_queue_and_the_page_gets_the_figure(
    alice, sandbox_storage, worker, all_plugins, monkeypatch
):
    from agents.services import plugin_enable, plugin_scopes_grant

    def prepare() -> None:
        with tenant_scope(tenant_id=alice.tenant.id):
            plugin_scopes_grant(actor=alice.actor, name="coding", scopes=["code.execute"])
            plugin_enable(actor=alice.actor, name="coding")

    await sync_to_async(prepare)()
    code = "import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 5])\nprint(3 + 5)"
    model = ScriptedChatModel(
        script=iter(
            [
                AIMessage(
                    content="",
                    tool_calls=[{"name": "code_run", "args": {"code": code}, "id": "call_code"}],
                ),
                AIMessage(content="The total is 8; the chart is above."),
            ]
        )
    )
    monkeypatch.setattr(agent_turn, "agent_model_build", lambda *, run: model)
    queues: list[str] = []
    dispatch = tool_queue.tool_dispatch

    def recorded(*, queue, message, expires_s):
        queues.append(queue)
        dispatch(queue=queue, message=message, expires_s=expires_s)

    monkeypatch.setattr(tool_queue, "tool_dispatch", recorded)
    _, _, socket = await ws_connect(alice.user)
    await socket.send({"type": "chat.send", "agent": "coding.coder", "content": "Sum and plot."})
    started = await socket.receive(timeout=15)
    assert started["type"] == "run.started", started
    frames = await socket.receive_until(("run.done", "run.error"), timeout=90)
    await socket.close()
    frames = [f for f in frames if f.get("run_id") == started["run_id"]]

    assert frames[-1]["type"] == "run.done", frames[-1]
    assert queues == ["sandbox"]
    end = next(f for f in frames if f["type"] == "tool.end")
    assert end["error"] is None and "stdout:\n8" in end["result"], end
    [figure] = end["artifacts"]
    assert figure["name"] == "figure-1.png" and figure["media_type"] == "image/png"

    def stored() -> Message:
        with tenant_scope(tenant_id=alice.tenant.id):
            return Message.objects.get(produced_by__id=started["run_id"])

    message = await sync_to_async(stored)()
    [step] = message.steps
    assert step["artifacts"] == [figure]


@needs_bwrap
@pytest.mark.django_db
def test_an_error_shows_the_members_code_only(alice, sandbox_storage):
    answer = call(code_run, context(alice), code="x = 1\nprint(1 / 0)", language="py")
    assert answer.text.startswith("exit status 1")
    assert 'File "main.py", line 2' in answer.text and "ZeroDivisionError" in answer.text
    assert "run.py" not in answer.text and "exec(compile" not in answer.text
    syntax = call(code_run, context(alice), code="print(1 +", language="python")
    assert "SyntaxError" in syntax.text and "run.py" not in syntax.text
