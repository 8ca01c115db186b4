"""`python -m forge_lm ...` is the `forge` command."""

import sys

from forge_lm.cli import main

sys.exit(main())
