"""`python -m grok1.inspect`: the command of grok1/inspect/command.py over `grok1.load`.

A program's entry point, like run.py: the one module of grok1.inspect that imports the library
layer above it (pyproject.toml's contract names this one exception)."""

import sys

from grok1.inference import load
from grok1.inspect.command import main

sys.exit(main(load))
