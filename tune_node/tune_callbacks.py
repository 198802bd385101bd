"""Moved to :mod:`tune_node.experiments.tune_callbacks`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .experiments import tune_callbacks as _moved

sys.modules[__name__] = _moved
