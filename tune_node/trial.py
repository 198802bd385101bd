"""Moved to :mod:`tune_node.experiments.trial`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .experiments import trial as _moved

sys.modules[__name__] = _moved
