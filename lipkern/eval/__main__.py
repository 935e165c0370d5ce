"""``python -m lipkern.eval``: the same as ``lipkern eval``."""

import sys

from .cli_eval import main

sys.exit(main())
