"""``python -m conveyor`` (and ``torchrun -m conveyor``) run the command line."""

import logging
import os
import sys

from .cli import main
from .runtime.launch import under_torchrun

code = main()
if under_torchrun():
    # A rank's work is done and its process group destroyed. Leave without the
    # interpreter's shutdown, as locally spawned ranks do: a gloo worker thread still
    # freeing a finished work's tensor while Python finalises aborts the process
    # ("terminate called without an active exception") and torchrun counts a failure.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
