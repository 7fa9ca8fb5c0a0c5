"""``python -m permerge`` is the ``permerge`` command."""

import sys

from permerge.cli import main

sys.exit(main())
