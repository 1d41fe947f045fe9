"""How a benchmark ends: its JSON result written and shown, the same way for all of them.

A full run writes bench-results/<name>.json unless `--out` says where; a quick run
writes only to `--out`. `--json` prints the JSON itself, otherwise the benchmark's
table and where the file went.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def result_write(
    name: str,
    result: dict[str, Any],
    *,
    out: str | Path | None,
    quick: bool,
    as_json: bool,
    table: Callable[[dict[str, Any]], str],
) -> int:
    """Write and show `result`; the exit code of the benchmark."""
    text = json.dumps(result, indent=2)
    path = out or (None if quick else str(ROOT / "bench-results" / f"{name}.json"))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    if as_json:
        print(text)
    else:
        print(table(result))
        if path:
            print(f"wrote {path}")
    return 0
