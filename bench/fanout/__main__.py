"""`python -m fanout` from bench/, as `python bench/fanout.py`."""

import sys

from . import command

if __name__ == "__main__":
    sys.exit(command.main())
