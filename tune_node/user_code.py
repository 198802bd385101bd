"""Moved to :mod:`tune_node.data.user_code`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .data import user_code as _moved

sys.modules[__name__] = _moved
