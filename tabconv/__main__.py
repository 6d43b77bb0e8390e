"""Entry point of `python -m tabconv`."""

import sys

from tabconv.cli import main

sys.exit(main())
