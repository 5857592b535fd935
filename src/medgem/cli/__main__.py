"""`python -m medgem.cli` (used by torchrun and tests) runs the same entry point as `medgem`."""

import sys

from medgem.cli import main

sys.exit(main())
