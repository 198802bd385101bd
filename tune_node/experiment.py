"""Moved to :mod:`tune_node.experiments.experiment`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .experiments import experiment as _moved

sys.modules[__name__] = _moved
