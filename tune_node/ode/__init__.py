"""The numerics: ODE methods as data (:mod:`.solvers`: tableaus, the method registry, solver
settings) and integration with exact NFE (:mod:`.integrate`). Knows nothing of models or Ray."""
