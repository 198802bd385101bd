"""``python -m tune_node.search``; the code lives in :mod:`tune_node.experiments.search` (this name stays importable)."""

import sys

from .experiments import search as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
