"""The fast path of the paper's small sphere fields: the Conv1d block as dense products
(:mod:`.dense`), a fused fixed-step solve with a hand-written backward (:mod:`.dense_solve`)
and its loops in C++ (:mod:`.native`, built on first use). Speed only: results equal the
generic path up to floating-point rounding.

Importing the package plugs the dense form of :class:`~tune_node.train.models.ConvODEField`
into :func:`~tune_node.ode.integrate.integrate` (:func:`~tune_node.ode.integrate.register_fast_form`);
:mod:`tune_node.train` imports it, so every model trained or evaluated through the library uses it.
"""

from ..ode.integrate import register_fast_form
from ..train.models import ConvODEField
from .dense import prepare_conv_field

register_fast_form(ConvODEField, prepare_conv_field)
