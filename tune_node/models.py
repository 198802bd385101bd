"""Moved to :mod:`tune_node.train.models`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .train import models as _moved

sys.modules[__name__] = _moved
