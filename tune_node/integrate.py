"""Moved to :mod:`tune_node.ode.integrate`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .ode import integrate as _moved

sys.modules[__name__] = _moved
