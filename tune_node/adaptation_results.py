"""Moved to :mod:`tune_node.results.adaptation`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .results import adaptation as _moved

sys.modules[__name__] = _moved
