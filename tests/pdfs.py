"""PDF files written by hand for the documents tests: exact objects, a correct xref
table, nothing a library would add."""

from __future__ import annotations

import re


def raw_pdf(objects: list[bytes]) -> bytes:
    """A PDF written by hand: objects 1..n (1 is the catalog), a correct xref table."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def _pdf_string(line: str) -> bytes:
    return b"(" + re.sub(rb"([\\()])", rb"\\\1", line.encode("latin-1")) + b")"


def pdf_with_text(pages: list[list[str]]) -> bytes:
    """A PDF written by hand: each page's lines in Helvetica, one under the other; a
    page without lines has an empty content stream."""
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"",  # the page tree, once the pages are numbered
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    kids = []
    for lines in pages:
        content = b"BT /F1 12 Tf 16 TL 72 720 Td\n"
        content += b"".join(_pdf_string(line) + b" Tj T*\n" for line in lines) + b"ET"
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents %d 0 R >>" % len(objects)
        )
        kids.append(b"%d 0 R" % len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(kids), len(kids))
    return raw_pdf(objects)
