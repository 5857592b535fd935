"""medgem: run, serve, fine-tune, embed with and evaluate MedGemma-family models.

Not a medical device: outputs need review by a qualified healthcare professional.
"""

from medgem.notice import NOTICE

__version__ = "0.1.0"

__all__ = ["NOTICE", "__version__"]
