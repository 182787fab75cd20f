"""`python -m loopserve.server --model M --method NAME --port P ...` runs the serve command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
