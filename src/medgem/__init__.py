"""medgem: run, serve, fine-tune, embed with and evaluate MedGemma-family models.

Not a medical device: outputs need review by a qualified healthcare professional.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medgem.notice import NOTICE

if TYPE_CHECKING:
    from medgem.pipeline import Pipeline
    from medgem.siglip import SiglipEncoder

__version__ = "0.1.0"


def load(src=None, **kwargs) -> Pipeline:
    """Load a model (see `medgem.pipeline.load`); imported lazily so `medgem --help` stays fast."""
    from medgem.pipeline import load as _load

    return _load(src, **kwargs)


def load_siglip(src, **kwargs) -> SiglipEncoder:
    """Load a SigLIP / MedSigLIP dual encoder (see `medgem.siglip.load_siglip`), imported lazily."""
    from medgem.siglip import load_siglip as _load_siglip

    return _load_siglip(src, **kwargs)


__all__ = ["NOTICE", "__version__", "load", "load_siglip"]
