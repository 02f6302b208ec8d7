"""`python -m cald_scale ...`: the `cald-scale` command."""

import sys

from .cli import main

sys.exit(main())
