import sys

from .cli_eval import main

sys.exit(main())
