"""`python -m eet_pipe.compare`: see docs/COMPARE.md."""

import sys

from eet_pipe.compare.cli import main

if __name__ == "__main__":
    sys.exit(main())
