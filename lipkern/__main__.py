"""``python -m lipkern``: the same command line as the ``lipkern`` console script."""

import sys

from lipkern.cli import main

sys.exit(main())
