"""`python -m vvu` is the `vvu` command."""

import sys

from vvu.cli import main

sys.exit(main())
