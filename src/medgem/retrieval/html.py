"""A self-contained HTML contact sheet of search results: thumbnails inlined as PNG data URIs, so the
page opens anywhere without the image files beside it. DICOM thumbnails are rendered pixels only."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from medgem.errors import MedgemError
from medgem.inputs.images import load_image
from medgem.notice import NOTICE
from medgem.retrieval.index import Hit

THUMB = 192


def _thumbnail(path: str) -> str:
    """A data URI of the image shrunk to THUMB px, or '' when it can no longer be read."""
    try:
        image = load_image(path, size=THUMB)
    except MedgemError:
        return ""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def write_contact_sheet(query: str, hits: list[Hit], out: str | os.PathLike[str]) -> Path:
    cells = []
    for rank, hit in enumerate(hits, 1):
        uri = _thumbnail(hit.path)
        picture = f'<img src="{uri}" alt="result {rank}">' if uri else '<div class="gone">unreadable</div>'
        cells.append(
            f'<figure>{picture}<figcaption><b>#{rank}</b> {hit.score:.4f}<br>'
            f'<span title="{html.escape(hit.path)}">{html.escape(Path(hit.path).name)}</span></figcaption></figure>'
        )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medgem search</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: {THUMB}px; font-size: 12px; overflow-wrap: anywhere; }}
img, .gone {{ width: {THUMB}px; height: {THUMB}px; object-fit: contain; background: #111; }}
.gone {{ color: #bbb; display: flex; align-items: center; justify-content: center; }}
.notice {{ color: #a33; font-size: 13px; }}
</style></head><body>
<h1>Search results</h1>
<p>Query: {html.escape(query)} &middot; {len(hits)} result(s), cosine similarity</p>
<p class="notice">{html.escape(NOTICE)}</p>
<div class="grid">
{chr(10).join(cells)}
</div></body></html>
"""
    out = Path(out)
    out.write_text(page)
    return out
