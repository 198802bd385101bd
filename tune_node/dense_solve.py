"""Moved to :mod:`tune_node.fast.dense_solve`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .fast import dense_solve as _moved

sys.modules[__name__] = _moved
