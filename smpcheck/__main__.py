"""``python -m smpcheck``: the same as the ``smpcheck`` console script."""

import sys

from smpcheck.cli import main

sys.exit(main())
