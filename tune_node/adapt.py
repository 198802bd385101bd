"""``python -m tune_node.adapt``; the code lives in :mod:`tune_node.experiments.adapt` (this name stays importable)."""

import sys

from .experiments import adapt as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
