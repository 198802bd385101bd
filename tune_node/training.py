"""Moved to :mod:`tune_node.train.training`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .train import training as _moved

sys.modules[__name__] = _moved
