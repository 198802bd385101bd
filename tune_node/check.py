"""Moved to :mod:`tune_node.train.check`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .train import check as _moved

sys.modules[__name__] = _moved
