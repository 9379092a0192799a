"""``python -m protoseg``: the command line."""

import sys

from protoseg.cli import main

sys.exit(main())
