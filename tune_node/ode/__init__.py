"""The numerics: ODE methods as data (:mod:`.solvers`: tableaus, the method registry, solver
settings) and integration with exact NFE (:mod:`.integrate`; :mod:`.adaptive`: the project's own
adaptive embedded Runge-Kutta solve with torchdiffeq's step control, per seed, opt-in). Knows
nothing of models or Ray."""
