"""``python -m fxmin``: the command line (see :mod:`fxmin.cli`)."""
import sys

from .cli import main

sys.exit(main())
