"""Tool calls on the local model server: 30 questions that need a calculator tool.

    python tests/bench/local_tools.py --quick --json   # 10 questions, tool_choice auto
    python tests/bench/local_tools.py                  # 30 questions, auto and required;
                                                       # writes bench-results/local_tools.json

The real local model server (SmolLM2-135M-Instruct through llama.cpp, or
`--model-path`) is offered the calculator plugin's four tools (calculate,
convert_units, days_between, date_shift, their schemas as LangChain sends them) and
asked each question, temperature 0, as an agent's first step. A step counts as:

- `called`: the answer is a tool call;
- `right_tool`: of the expected tool;
- `valid_args`: its arguments parse and the tool accepts them (no "Error:");
- `right_result`: the tool's result is the expected value (the arguments were right);
- `right_answer`: the tool's result sent back (a `tool` message, tool_choice auto), the
  model's final text contains the expected value.

`success` = right tool, valid arguments and right final answer. Time per question is
wall time of both steps.
"""

from __future__ import annotations

import argparse
import json
import platform as stdlib_platform
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from results import result_write  # noqa: E402

# (question, expected tool, expected value as it appears in the tool's output)
QUESTIONS: list[tuple[str, str, str]] = [
    ("What is 23 * 47?", "calculate", "1081"),
    ("What is 1234 + 5678?", "calculate", "6912"),
    ("What is 999 - 123?", "calculate", "876"),
    ("What is 144 / 12?", "calculate", "12"),
    ("What is 2 to the power of 10?", "calculate", "1024"),
    ("What is the square root of 729?", "calculate", "27"),
    ("What is 17% of 300?", "calculate", "51"),
    ("What is 365 * 24?", "calculate", "8760"),
    ("What is (15 + 27) * 3?", "calculate", "126"),
    ("What is 7 factorial?", "calculate", "5040"),
    ("What is 88 * 12 - 56?", "calculate", "1000"),
    ("What is 4096 / 64?", "calculate", "64"),
    ("Convert 10 km to miles.", "convert_units", "6.21371"),
    ("How many kilograms is 150 lb?", "convert_units", "68.0389"),
    ("Convert 100 degC to degF.", "convert_units", "212"),
    ("How many minutes are in 3.5 h?", "convert_units", "210"),
    ("Convert 2 l to ml.", "convert_units", "2000"),
    ("How many meters is 5 mi?", "convert_units", "8046.72"),
    ("Convert 1 GiB to MiB.", "convert_units", "1024"),
    ("Convert 72 degF to degC.", "convert_units", "22.2222"),
    ("How many days are there from 2024-01-01 to 2024-12-25?", "days_between", "359"),
    ("How many days from 2023-03-15 to 2023-04-15?", "days_between", "31"),
    ("How many days between 2020-02-01 and 2020-03-01?", "days_between", "29"),
    ("How many days from 2025-06-01 to 2025-09-01?", "days_between", "92"),
    ("How many days from 2024-07-04 to 2025-07-04?", "days_between", "365"),
    ("What date is 100 days after 2024-01-01?", "date_shift", "2024-04-10"),
    ("What date is 30 days after 2025-02-15?", "date_shift", "2025-03-17"),
    ("What date is 7 days before 2024-03-03?", "date_shift", "2024-02-25"),
    ("What date is 45 days after 2023-11-20?", "date_shift", "2024-01-04"),
    ("What date is 10 days after 2024-12-25?", "date_shift", "2025-01-04"),
]

SYSTEM = None  # the calculator agent's instructions, read from the plugin


def calculator() -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    from langchain_core.utils.function_calling import convert_to_openai_tool

    import plugins.calculator as plugin

    manifest = plugin.parley_manifest()
    tools = {t.name: t for t in manifest.tools}
    return (
        [convert_to_openai_tool(t) for t in manifest.tools],
        tools,
        manifest.agents[0].instructions,
    )


def number_in(expected: str, text: str) -> bool:
    if expected in text.replace(",", ""):
        return True
    try:
        want = float(expected)
    except ValueError:
        return False
    for found in re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", "")):
        if abs(float(found) - want) <= 0.01 * max(1.0, abs(want)):
            return True
    return False


def ask(
    http: httpx.Client, question: str, tool: str, expected: str, choice: str, env: Any
) -> dict[str, Any]:
    schemas, tools, instructions = env
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": instructions},
        {"role": "user", "content": question},
    ]
    body = {"messages": messages, "tools": schemas, "tool_choice": choice}
    started = time.perf_counter()
    first = http.post(
        "/v1/chat/completions", json={**body, "temperature": 0, "max_tokens": 120}
    ).json()
    message = first["choices"][0]["message"]
    calls = message.get("tool_calls") or []
    row: dict[str, Any] = {
        "question": question,
        "called": bool(calls),
        "right_tool": False,
        "valid_args": False,
        "right_result": False,
        "right_answer": False,
    }
    if not calls:
        row["text"] = message.get("content")
        row["right_answer"] = number_in(expected, message.get("content") or "")
        row["seconds"] = round(time.perf_counter() - started, 3)
        return row
    call = calls[0]["function"]
    row["call"] = call
    row["right_tool"] = call["name"] == tool
    try:
        arguments = json.loads(call["arguments"])
        output = str(tools[call["name"]].invoke(arguments))
        row["valid_args"] = not output.startswith("Error")
    except Exception as exc:  # invalid for the tool (pydantic) or unknown
        output = f"Error: {exc}"
    row["result"] = output
    row["right_result"] = row["valid_args"] and number_in(expected, output)
    messages += [
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": output},
    ]
    final = http.post(
        "/v1/chat/completions",
        json={
            "messages": messages,
            "tools": schemas,
            "tool_choice": "auto",
            "temperature": 0,
            "max_tokens": 80,
        },
    ).json()["choices"][0]["message"]
    row["text"] = final.get("content")
    row["right_answer"] = number_in(expected, final.get("content") or "")
    row["seconds"] = round(time.perf_counter() - started, 3)
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)

    def share(key: str) -> float:
        return round(sum(bool(r[key]) for r in rows) / n, 3)

    success = [r["right_tool"] and r["valid_args"] and r["right_answer"] for r in rows]
    return {
        "questions": n,
        "called": share("called"),
        "right_tool": share("right_tool"),
        "valid_args": share("valid_args"),
        "right_result": share("right_result"),
        "right_answer": share("right_answer"),
        "success": round(sum(success) / n, 3),
        "mean_seconds": round(sum(r["seconds"] for r in rows) / n, 2),
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['model']}: {result['questions']} questions"]
    lines.append("choice    called  tool   args   result answer success  s/question")
    for choice, s in result["summary"].items():
        lines.append(
            f"{choice:9} {s['called']:6.0%} {s['right_tool']:6.0%} {s['valid_args']:6.0%} "
            f"{s['right_result']:6.0%} {s['right_answer']:6.0%} {s['success']:6.0%}  "
            f"{s['mean_seconds']:.2f}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 questions, auto only")
    parser.add_argument("--json", action="store_true", help="print the JSON result")
    parser.add_argument("--out", help="where to write the JSON result")
    parser.add_argument("--url", help="a running server instead of starting one")
    parser.add_argument("--model-path", default="", help="another GGUF model")
    parser.add_argument("--model-id", default="")
    parser.add_argument("--choices", default="", help="comma-separated, e.g. auto,required")
    args = parser.parse_args()

    from inference.local_process import LocalModelServer

    questions = QUESTIONS[::3] if args.quick else QUESTIONS
    choices = (
        args.choices.split(",")
        if args.choices
        else (["auto"] if args.quick else ["auto", "required"])
    )
    env = calculator()
    extra = ["--model-id", args.model_id] if args.model_id else []
    server = None
    if args.url:
        url = args.url
    else:
        server = LocalModelServer(model_path=args.model_path, extra_args=extra).start()
        url = server.url
    try:
        with httpx.Client(base_url=url, timeout=300) as http:
            model = http.get("/v1/models").json()["data"][0]["id"]
            results = {
                choice: [ask(http, q, t, e, choice, env) for q, t, e in questions]
                for choice in choices
            }
    finally:
        if server is not None:
            server.stop()
    result = {
        "bench": "local_tools",
        "model": model,
        "questions": len(questions),
        "machine": f"{stdlib_platform.machine()}, {stdlib_platform.python_version()}",
        "summary": {choice: summary(rows) for choice, rows in results.items()},
        "rows": results,
    }
    return result_write(
        "local_tools", result, out=args.out, quick=args.quick, as_json=args.json, table=table
    )


if __name__ == "__main__":
    sys.exit(main())
