"""Moved to :mod:`tune_node.train.adaptation`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .train import adaptation as _moved

sys.modules[__name__] = _moved
