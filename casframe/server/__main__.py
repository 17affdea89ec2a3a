"""``python -m casframe.server STORE [options]``: the same as ``casframe serve``."""

import sys

from casframe.server.command import main

sys.exit(main())
