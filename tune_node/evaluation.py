"""Moved to :mod:`tune_node.train.evaluation`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .train import evaluation as _moved

sys.modules[__name__] = _moved
