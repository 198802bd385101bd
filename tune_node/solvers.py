"""Moved to :mod:`tune_node.ode.solvers`; this name stays importable (scripts and notebooks keep working)."""

import sys

from .ode import solvers as _moved

sys.modules[__name__] = _moved
