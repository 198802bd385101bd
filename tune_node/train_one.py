"""``python -m tune_node.train_one``; the code lives in :mod:`tune_node.cli.train_one` (this name stays importable)."""

import sys

from .cli import train_one as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
