"""Moved to :mod:`tune_node.data.datasets`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .data import datasets as _moved

sys.modules[__name__] = _moved
