"""medgem: run, serve, fine-tune, embed with and evaluate MedGemma-family models.

Not a medical device: outputs need review by a qualified healthcare professional.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from medgem.notice import NOTICE


def _openmp_spin_defaults() -> None:
    """Keep OpenMP workers spinning briefly between parallel regions, also off the main thread.

    Why: libgomp counts every thread that leads an OpenMP team, and once a process has more such threads
    than CPUs it throttles spinning to ~100 iterations, so each of decode's hundreds of parallel regions a
    token pays a futex wake-up. That is always the case when the engine runs in its own thread (server,
    `Engine`): measured on 2 cores, a 2048x640 int8 matmul took 54 us there against 18 us on the main
    thread, and decode 23.4 ms a token against 17.0 ms with these settings. OMP_WAIT_POLICY=ACTIVE with an
    explicit GOMP_SPINCOUNT (libgomp's usual 300,000) turns the throttle off without spinning forever.
    Only applies before torch loads libgomp, and never overrides a user's own settings.
    """
    if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
        os.environ["OMP_WAIT_POLICY"], os.environ["GOMP_SPINCOUNT"] = "ACTIVE", "300000"


def _huge_page_weights() -> None:
    """Back PyTorch's large CPU allocations (the packed LM head, big weights) with 2 MB pages.

    Why: decode streams every weight once a token, and with 4 kB pages the CPU's prefetchers stop at
    every page boundary. On the 2-core VM the 168 MB int8 LM head took 4.1 ms a token with
    THP_MEM_ALLOC_ENABLE=1 against 4.6 ms without (benchmarks/decode.py). The kernel only honours it
    where transparent huge pages are `madvise` or `always`. Like the OpenMP defaults: only before torch
    loads, never over a user's setting.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


_openmp_spin_defaults()
_huge_page_weights()

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
