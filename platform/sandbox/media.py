"""An artifact's media type, from its content: whatever a run names its file, a
download is served as what the bytes are. Raster images may be shown inline in the
chat page; everything else, SVG included (it may carry scripts), is a download."""

from __future__ import annotations

import re

PNG = "image/png"
JPEG = "image/jpeg"
GIF = "image/gif"
WEBP = "image/webp"
SVG = "image/svg+xml"
PDF = "application/pdf"
TEXT = "text/plain"
CSV = "text/csv"
JSON = "application/json"
BINARY = "application/octet-stream"

# Shown inline (an <img> of the chat page); nothing else ever is.
INLINE = frozenset({PNG, JPEG, GIF, WEBP})

# Text files keep a more precise type by their name's ending (still downloads).
_TEXT_BY_SUFFIX = {".csv": CSV, ".json": JSON}
_SVG = re.compile(rb"<svg[\s>]", re.IGNORECASE)
_TEXT_SAMPLE = 8192


def media_type_detect(data: bytes, *, name: str = "") -> str:
    head = data[:16]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith((b"GIF87a", b"GIF89a")):
        return GIF
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    if head.startswith(b"%PDF-"):
        return PDF
    sample = data[:_TEXT_SAMPLE]
    if not _is_text(sample):
        return BINARY
    if _SVG.search(sample.lstrip()[:1024]):
        return SVG
    suffix = name[name.rfind(".") :].lower() if "." in name else ""
    return _TEXT_BY_SUFFIX.get(suffix, TEXT)


def _is_text(sample: bytes) -> bool:
    if b"\x00" in sample:
        return False
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A sample cut inside a character is still text.
        return exc.start >= len(sample) - 3 and len(sample) == _TEXT_SAMPLE
    return True
