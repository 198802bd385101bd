"""Moved to :mod:`tune_node.fast.native`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .fast import native as _moved

sys.modules[__name__] = _moved
