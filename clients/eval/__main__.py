"""``python -m clients.eval``: the same as ``hogwild eval``."""

import sys

from clients.eval.cli import main

sys.exit(main())
