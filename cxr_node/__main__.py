"""``python -m cxr_node`` is the ``cxr-node`` command line."""

import sys

from cxr_node.cli import main

if __name__ == "__main__":  # spawned worker processes import this module as __mp_main__
    sys.exit(main())
