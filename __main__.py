"""`python -m comfy_courier …`: the command-line helpers; everything lives in cli.py."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
