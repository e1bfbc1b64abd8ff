"""``python -m kvmsnap_plugin.cli``."""

import sys

from kvmsnap_plugin.cli import main

sys.exit(main())
