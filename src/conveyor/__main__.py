"""``python -m conveyor`` (and ``torchrun -m conveyor``) run the command line."""

import sys

from .cli import main

sys.exit(main())
