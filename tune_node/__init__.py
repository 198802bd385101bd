"""tune-node: find the critical step size of Neural ODEs with Ray Tune (Ott et al., ICLR 2021).

Subpackages: :mod:`.ode` (methods, integration), :mod:`.fast` (the spheres' fast path),
:mod:`.data` (datasets, a user's code), :mod:`.train` (models, training, evaluation,
adaptation, checks), :mod:`.experiments` (Ray Tune studies), :mod:`.results` (tables, the
critical-step rule), :mod:`.cli`. The modules of earlier versions (``tune_node.solvers``,
``tune_node.training``, ...) stay importable under their names.
"""
