"""Checks every entry point applies to text and JSON from outside, before anything
else reads it: one definition of what Parley refuses as input.

- NUL (U+0000) is never valid text: PostgreSQL cannot store it in a text column, and
  no title, message, id or name needs it. It is refused as invalid input where text
  enters (REST bodies and queries, websocket frames, the OpenAI-compatible API).
- A lone surrogate (U+D800-U+DFFF outside a pair, which JSON can spell `\\ud800`) is
  not a character either: it cannot be encoded as UTF-8, so no database, log or
  client could take it. It is refused like a NUL.
- JSON nested deeper than `MAX_JSON_DEPTH` is refused before it is parsed, so no
  parser, validator or walker downstream can run out of stack on it.
- A date and time (`Timestamp` in API schemas) must be one PostgreSQL can compare and
  store: an offset from UTC under 16 hours, and a year from 1 to 9999 in UTC too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import AfterValidator

MAX_JSON_DEPTH = 64
NUL = "\x00"
# The kinds of refusal (InvalidInput.code), as the APIs name them to clients.
INVALID_JSON = "invalid_json"
INVALID_VALUE = "invalid_value"

# A JSON string literal (escapes included), so that brackets inside strings are skipped.
# (Runs of plain characters are matched whole: a character at a time, the scan of a
# long conversation took several times as long as parsing it.)
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# The escape of a surrogate (`\ud800`-`\udfff`): parsed strings can hold a lone one
# only when the JSON text has one of these.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class InvalidInput(ValueError):
    """Input refused before it was used; `message` says why, for the client; `code`
    is the kind: INVALID_JSON (not JSON, or nested too deep) or INVALID_VALUE."""

    def __init__(self, message: str, *, code: str = INVALID_VALUE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def json_depth_exceeds(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text nests arrays and objects deeper than `max_depth`.
    Cheap for ordinary bodies: without more openers than the limit it cannot be."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False
    depth = 0
    for match in _BRACKETS.finditer(_JSON_STRING.sub(b'""', raw)):
        if match.group() in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def _strings(value: Any) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def contains_nul(value: Any) -> bool:
    """Whether any string in a parsed JSON value (keys included) holds a NUL."""
    return any(NUL in text for text in _strings(value))


def contains_lone_surrogate(value: Any) -> bool:
    """Whether any string in a parsed JSON value (keys included) holds a surrogate
    outside a pair (the JSON parser joins the halves of a pair into one character)."""
    return any(_SURROGATE.search(text) for text in _strings(value))


def text_check(value: str, *, name: str = "text") -> str:
    """`value`, or InvalidInput when it holds a NUL or a lone surrogate."""
    if NUL in value:
        raise InvalidInput(f"{name} must not contain the NUL character (U+0000).")
    if _SURROGATE.search(value):
        raise InvalidInput(f"{name} must be valid Unicode text (it holds a lone surrogate).")
    return value


# PostgreSQL refuses a time zone displacement of 16 hours or more (Python allows 24).
MAX_UTC_OFFSET = timedelta(hours=16)


def datetime_check(value: datetime, *, name: str = "The date") -> datetime:
    """`value`, or InvalidInput when a database could not take it: an offset from UTC
    of 16 hours or more, or a moment outside the years 1 to 9999 once in UTC."""
    offset = value.utcoffset()
    if offset is not None:
        if abs(offset) >= MAX_UTC_OFFSET:
            raise InvalidInput(f"{name} has an offset from UTC of 16 hours or more.")
        try:
            value.astimezone(UTC)
        except OverflowError:
            raise InvalidInput(f"{name} is outside the years 1 to 9999 in UTC.") from None
    return value


# A date and time in an API schema, checked by datetime_check (a 422 otherwise).
Timestamp = Annotated[datetime, AfterValidator(datetime_check)]


def json_loads(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON from outside: InvalidInput when it is not JSON, nests deeper than
    `max_depth`, or holds a NUL or a lone surrogate in any string."""
    # A str that is not valid Unicode stays undecodable bytes: refused as not JSON.
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if json_depth_exceeds(data, max_depth):
        raise InvalidInput(f"The JSON nests deeper than {max_depth} levels.", code=INVALID_JSON)
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidInput("The body is not valid JSON.", code=INVALID_JSON) from None
    # A NUL reaches a parsed string only through the escape `\u0000` (a raw control
    # character is not valid JSON): look further only when that escape is there.
    if b"\\u0000" in data and contains_nul(value):
        raise InvalidInput("Text must not contain the NUL character (U+0000).")
    if _SURROGATE_ESCAPE.search(data) and contains_lone_surrogate(value):
        raise InvalidInput("Text must be valid Unicode (it holds a lone surrogate).")
    return value
