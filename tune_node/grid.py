"""``python -m tune_node.grid``; the code lives in :mod:`tune_node.experiments.grid` (this name stays importable)."""

import sys

from .experiments import grid as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
