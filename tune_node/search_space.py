"""Moved to :mod:`tune_node.experiments.search_space`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .experiments import search_space as _moved

sys.modules[__name__] = _moved
