"""``python -m protoseg.cli``: the command line."""

import sys

from protoseg.cli import main

sys.exit(main())
