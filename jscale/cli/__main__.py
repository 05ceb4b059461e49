"""``python -m jscale.cli ...``: the ``jscale`` command."""

import sys

from jscale.cli import main

sys.exit(main())
