"""`python -m mote_plugin ...`: the `mote` command line (mote_plugin.cli)."""

import sys

from .cli import main

sys.exit(main())
