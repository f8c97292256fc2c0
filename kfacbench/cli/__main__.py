"""``python -m kfacbench.cli`` is the ``kfacbench`` command."""

import sys

from kfacbench.cli import main

sys.exit(main())
