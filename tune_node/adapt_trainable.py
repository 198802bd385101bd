"""Moved to :mod:`tune_node.experiments.adapt_trainable`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .experiments import adapt_trainable as _moved

sys.modules[__name__] = _moved
