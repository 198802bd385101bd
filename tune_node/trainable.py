"""Moved to :mod:`tune_node.experiments.trainable`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .experiments import trainable as _moved

sys.modules[__name__] = _moved
