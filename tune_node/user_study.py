"""Moved to :mod:`tune_node.train.user_study`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .train import user_study as _moved

sys.modules[__name__] = _moved
