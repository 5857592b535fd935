"""Report documents as they enter medgem: a PDF's pages as images (for a multimodal model) or its text
layer (for a text-only one), a page image, or plain text.

PDFs go through PDFium (`pypdfium2`, the renderer Chrome uses; one wheel, no system libraries). The
kind is read from the bytes, not the file name: `%PDF-` at the start is a PDF, something Pillow opens
is a page image, anything else must be UTF-8 text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from PIL import Image

from medgem.errors import InputError
from medgem.inputs.dicom import check_regular_file, source_name

MAX_PAGES = 20  # lab reports run a few pages; a 500-page PDF is not one
RENDER_SCALE = 2.0  # 144 dpi: an A4 page is 1191 x 1684 pixels, more than the 896 the vision tower reads


@dataclass
class Document:
    """A report: its kind ("pdf", "image" or "text"), its page images (rendered only when asked) and text."""

    kind: str
    name: str
    text: str = ""  # a text file's content, or a PDF's text layer (pages joined by form feeds)
    pages: list[Image.Image] = field(default_factory=list)
    page_count: int = 0


def read_document(path: str | os.PathLike[str], *, images: bool = True, max_pages: int = MAX_PAGES) -> Document:
    """Read a report. images: render a PDF's pages (else only its text layer is read)."""
    name = source_name(path)
    check_regular_file(path)  # a missing file, a FIFO or a device: one line naming it
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise InputError(f"{name}: the file is empty")
    if data.startswith(b"%PDF-"):
        return _read_pdf(data, name, images, max_pages)
    from medgem.inputs.images import load_image, looks_like_raster

    if looks_like_raster(data):
        image = load_image(data)
        return Document("image", name, pages=[image], page_count=1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{name}: not a PDF, a PNG/JPEG page or UTF-8 text") from None
    if not text.strip():
        raise InputError(f"{name}: the file holds no text")
    return Document("text", name, text=text, page_count=1)


def _read_pdf(data: bytes, name: str, images: bool, max_pages: int) -> Document:
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        raise InputError(f"{name}: not a readable PDF ({str(exc).splitlines()[0][:80]})") from None
    try:
        count = len(pdf)
        if count == 0:
            raise InputError(f"{name}: the PDF has no pages")
        if count > max_pages:
            raise InputError(f"{name}: the PDF has {count} pages; at most {max_pages} are read (a lab report "
                             "runs a few)")
        texts, pages = [], []
        for i in range(count):
            page = pdf[i]
            textpage = page.get_textpage()
            texts.append(textpage.get_text_bounded().replace("\r\n", "\n"))
            textpage.close()
            if images:
                pages.append(page.render(scale=RENDER_SCALE).to_pil().convert("RGB"))
            page.close()
    except pdfium.PdfiumError as exc:
        raise InputError(f"{name}: a page cannot be read ({str(exc).splitlines()[0][:80]})") from None
    finally:
        pdf.close()
    return Document("pdf", name, text="\f".join(texts), pages=pages, page_count=count)
