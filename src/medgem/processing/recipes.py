"""Input recipes: the content of one user turn laid out the way MedGemma 1.5 was trained to read it.

Every face names them the same way (`--recipe ct`, `"recipe": "ct"`, `pipe.ask("ct", ...)`). A recipe
turns its sources into chat content parts; the processor and engine below never know which recipe
made them. Layouts, from the google-health/medgemma notebooks (January 2026):

- ct / mri (high_dimensional_ct_hugging_face.ipynb): the instruction text first, then each slice
  image followed by the text `SLICE n` (n from 1), then the question, which starts "Based on the
  visual evidence in the slices provided above, ..." (google-health/medgemma issue #76: a question
  before the slices gets X-ray-style answers). Slices and colours: inputs/volume.py.
- longitudinal (cxr_longitudinal_comparison_with_hugging_face.ipynb): the prior image, the current
  image, then the text. With two DICOM files the order comes from their dates, whatever order they
  were given in.
- localize (cxr_anatomy_localization_with_hugging_face.ipynb): the image zero-padded to a square,
  then the notebook's box instructions with the object's name; boxes: processing/boxes.py.
- wsi (high_dimensional_pathology_hugging_face.ipynb): the instruction ending "\n{tissue}, {procedure}:",
  then up to 125 patches at ~10x with no per-patch label; patches: inputs/wsi.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from medgem.errors import InputError
from medgem.inputs import dicom
from medgem.inputs.images import ImageSource, load_image
from medgem.inputs.volume import MAX_SLICES, Volume, load_volume
from medgem.inputs.wsi import SlidePatches, load_patches
from medgem.processing.boxes import Padding, pad_to_square

logger = logging.getLogger(__name__)

# The CT notebook's instruction, with its body part left out, so that it fits any volume.
VOLUME_INSTRUCTION = ("You are an instructor teaching medical students. You are analyzing a contiguous block of "
                      "{modality} slices. Please review the slices provided below carefully.")
EVIDENCE = "Based on the visual evidence in the slices provided above, "
VOLUME_QUESTION = "describe the findings."
LONGITUDINAL_PROMPT = ("Provide a comparison of these two images and include details from the image which "
                       "students should take note of when reading longitudinal CXR")
# The pathology notebook's prompt (its example: tissue "colon", procedure "biopsy").
WSI_PROMPT = ("You are an instructor teaching medical students. For education purposes, provide a brief descriptive "
              "text for the set of pathology patches extracted from a pathology slide. Consider the tissue type and "
              "procedure (below) when deciding what to include in the descriptive text.")
# The localization notebook's prompt, word for word ({target} is its `object_name`).
LOCALIZE_PROMPT = """Instructions:
The following user query will require outputting bounding boxes. The format of bounding boxes coordinates is [y0, x0, y1, x1] where (y0, x0) must be top-left corner and (y1, x1) the bottom-right corner. This implies that x0 < x1 and y0 < y1. Always normalize the x and y coordinates the range [0, 1000], meaning that a bounding box starting at 15% of the image width would be associated with an x coordinate of 150. You MUST output a single parseable json list of objects enclosed into ```json...``` brackets, for instance ```json[{{"box_2d": [800, 3, 840, 471], "label": "car"}}, {{"box_2d": [400, 22, 600, 73], "label": "dog"}}]``` is a valid output. Now answer to the user query.

Remember "left" refers to the patient's left side where the heart is and sometimes underneath an L in the upper right corner of the image.

Query:
Where is the {target}? Don't give a final answer without reasoning. Output the final answer in the format "Final Answer: X" where X is a JSON list of objects. The object needs a "box_2d" and "label" key. Answer:"""  # noqa: E501


@dataclass(frozen=True)
class Recipe:
    """One row of the table: what a recipe takes and how many images it may send."""

    name: str
    takes: str  # "volume" (a series folder, multi-frame DICOM or NIfTI), "pair" (prior, current), "image"
    max_images: int
    summary: str


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("ct", "volume", MAX_SLICES, "CT volume: up to 85 axial slices in patient order, HU windows "
           "-1024..1024 / -135..215 / 0..80 as R/G/B, each followed by 'SLICE n', then the question"),
    Recipe("mri", "volume", MAX_SLICES, "MR volume: up to 85 slices, one min-max over the volume in grey, each "
           "followed by 'SLICE n', then the question"),
    Recipe("longitudinal", "pair", 2, "two chest X-rays: the prior image, the current image, then the text "
           "(DICOM dates decide which is prior)"),
    Recipe("localize", "image", 1, "an image padded to a square and the name of what to find; the answer's "
           "boxes are mapped back to the image's pixels"),
    Recipe("wsi", "slide", 125, "a whole-slide image (OpenSlide file or DICOM WSI folder): the instruction with tissue and procedure, then up to 125 "
           "tissue patches of 896 px at ~10x in spatial order"),
)}


@dataclass
class RecipePrompt:
    """Chat messages built by a recipe, with what the faces report about them."""

    recipe: str
    messages: list[dict[str, Any]]
    images: int
    volume: Volume | None = None  # ct, mri: which slices were sent
    slide: SlidePatches | None = None  # wsi: which patches were sent
    padding: Padding | None = None  # localize: where the image sits in the square the model saw
    notes: list[str] = field(default_factory=list)  # warnings for the user (no identifiers)


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name]


def _question(question: str | None) -> str:
    """The question after the slices, in the notebook's words unless it already starts that way."""
    text = (question or "").strip() or VOLUME_QUESTION
    if text.lower().startswith("based on"):
        return "\n\n" + text
    if len(text) > 1 and text[0].isupper() and text[1].islower():  # "Is there ..." -> "is there ...", "CT" kept
        text = text[0].lower() + text[1:]
    return "\n\n" + EVIDENCE + text


def volume_content(images: list[Image.Image], question: str | None, instruction: str | None,
                   modality: str) -> list[dict[str, Any]]:
    """Instruction, then (slice, 'SLICE n') pairs from n = 1, then the question: one user turn's parts."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": instruction or VOLUME_INSTRUCTION.format(modality=modality)}]
    for n, image in enumerate(images, 1):
        parts += [{"type": "image", "image": image}, {"type": "text", "text": f"SLICE {n}"}]
    parts.append({"type": "text", "text": _question(question)})
    return parts


def _dicom_moment(src: ImageSource) -> str | None:
    """'YYYYMMDDHHMMSS' of a DICOM file's acquisition (else its study), for ordering only: never shown."""
    if isinstance(src, Image.Image):
        return None
    try:
        if isinstance(src, bytes):
            if not dicom.is_dicom(src):
                return None
            ds = dicom.read_dicom(src, pixels=False)
        else:
            dicom.check_regular_file(src)  # a FIFO would block the read below
            with open(src, "rb") as f:
                if not dicom.is_dicom(f.read(132)):
                    return None
            ds = dicom.read_dicom(src, pixels=False)
    except (OSError, InputError):
        return None
    for date_key, time_key in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime"),
                               ("StudyDate", "StudyTime")):
        date = str(ds.get(date_key) or "").strip()
        if len(date) == 8 and date.isdigit():
            clock = "".join(c for c in str(ds.get(time_key) or "") if c.isdigit())[:6]
            return date + clock.ljust(6, "0")
    return None


def longitudinal_order(prior: ImageSource, current: ImageSource) -> tuple[ImageSource, ImageSource, bool]:
    """(prior, current, swapped): when both are dated DICOM files the earlier one is the prior."""
    a, b = _dicom_moment(prior), _dicom_moment(current)
    if a is not None and b is not None and a > b:
        return current, prior, True
    return prior, current, False


def build(name: str, question: str | None = None, *, source: ImageSource | os.PathLike[str] | None = None,
          prior: ImageSource | None = None, current: ImageSource | None = None, instruction: str | None = None,
          max_slices: int = MAX_SLICES, series: str | None = None, tissue: str | None = None,
          procedure: str | None = None, patch_seed: int = 0, budget: Callable[[int], None] | None = None,
          progress: bool = False) -> RecipePrompt:
    """Messages for recipe `name`.

    ct/mri: `source` is a series folder, multi-frame DICOM or NIfTI file; `question` follows the
    slices, `instruction` (default VOLUME_INSTRUCTION) precedes them. longitudinal: `prior` and
    `current` images (or `source` unused). localize: `source` is the image and `question` what to find.
    `budget(n_images)` runs before any pixel is decoded and may refuse (Pipeline.check_budget).
    """
    spec = recipe(name)
    if spec.takes == "volume":
        if source is None or isinstance(source, bytes | Image.Image):
            raise InputError(f"the {name} recipe needs a series folder, a multi-frame DICOM or a NIfTI file")
        volume = load_volume(source, name, max_slices, series, budget=budget, progress=progress)
        content = volume_content(volume.images, question, instruction, "CT" if name == "ct" else "MRI")
        return RecipePrompt(name, [{"role": "user", "content": content}], len(volume.images), volume=volume,
                            notes=list(volume.warnings))
    if spec.takes == "slide":
        if source is None or isinstance(source, bytes | Image.Image) or not tissue or not procedure:
            raise InputError("the wsi recipe needs a slide file (or a DICOM WSI folder), its tissue and its procedure "
                             "(e.g. colon, biopsy)")
        slide = load_patches(source, min(spec.max_images, max_slices), patch_seed, budget=budget)
        text = f"{(question or '').strip() or WSI_PROMPT}\n{tissue.strip()}, {procedure.strip()}:"
        content = [{"type": "text", "text": text}, *({"type": "image", "image": p} for p in slide.images)]
        return RecipePrompt(name, [{"role": "user", "content": content}], len(slide.images), slide=slide)
    if tissue or procedure:
        raise InputError("tissue and procedure go with the wsi recipe")
    if instruction is not None:
        raise InputError(f"the {name} recipe takes no instruction; put everything in the question")
    if spec.takes == "pair":
        if prior is None or current is None:
            raise InputError("the longitudinal recipe needs a prior and a current image")
        if budget:
            budget(2)
        first, second, swapped = longitudinal_order(prior, current)
        notes = ["the prior image is dated after the current one, so they were swapped: the earlier one goes "
                 "first"] if swapped else []
        content = [{"type": "image", "image": load_image(first)}, {"type": "image", "image": load_image(second)},
                   {"type": "text", "text": (question or "").strip() or LONGITUDINAL_PROMPT}]
        return RecipePrompt(name, [{"role": "user", "content": content}], 2, notes=notes)
    if source is None or not (question or "").strip():
        raise InputError("the localize recipe needs an image and the name of what to find (e.g. 'right clavicle')")
    if budget:
        budget(1)
    square, padding = pad_to_square(load_image(source if not isinstance(source, Path) else str(source)))
    content = [{"type": "image", "image": square},
               {"type": "text", "text": LOCALIZE_PROMPT.format(target=(question or "").strip())}]
    return RecipePrompt(name, [{"role": "user", "content": content}], 1, padding=padding)
