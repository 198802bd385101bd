"""Moved to :mod:`tune_node.train.seed_groups`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .train import seed_groups as _moved

sys.modules[__name__] = _moved
