"""``python -m mnet``: the command line."""

import sys

from mnet.cli import main

sys.exit(main())
