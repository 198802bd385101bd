"""The paper's two hand-made examples, computed: the XOR flow (Eq. 4, Figure 3) and the
piecewise vector field of Appendix A (Eq. 6, Figures 6 and 7).

Both equations are unreadable in our copy of the paper's text, so the fields below are
reconstructions; every choice is written down where it is made.

Run ``python -m analysis.examples xor --out DIR`` or ``python -m analysis.examples
appendix-a --out DIR`` to write the figures and print the numbers behind them. This
module only computes; the figures are drawn by :mod:`analysis.plots`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.optimize import linprog

from .crossing import CrossingStats, crossing_stats

__all__ = [
    "euler_paths",
    "XORFlow",
    "XOR_FLOW",
    "xor_data",
    "separating_line",
    "linearly_separable",
    "xor_separability_sweep",
    "appendix_a_field",
    "appendix_a_ivps",
    "appendix_a_paths",
    "appendix_a_crossing",
    "APPENDIX_A_STEPS",
]


def euler_paths(field: Callable[[np.ndarray], np.ndarray], z0: np.ndarray, step: float, T: float) -> np.ndarray:
    """Euler's method on ``dz/dt = field(z)`` from the rows of ``z0`` over ``[0, T]``.

    Takes ``n = max(1, round(T / step))`` equal steps of ``T / n`` (the requested step
    when it divides ``T``). Returns every state, shape ``(n + 1, N, 2)``, float64; a
    path that overflows holds non-finite values from then on.
    """
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step!r}")
    n = max(1, round(T / step))
    h = T / n
    z = np.array(z0, dtype=np.float64)
    states = [z]
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(n):
            z = z + h * field(z)
            states.append(z)
    return np.stack(states)


# ---------------------------------------------------------------- XOR flow (Eq. 4)


@dataclass(frozen=True)
class XORFlow:
    """The XOR example's flow, our reading of the paper's Eq. 4:

        dz/dt = [[gamma, -alpha |z|^delta], [beta |z|^delta, gamma]] z

    ``gamma > 0`` makes orbits grow; the rotation speed grows with ``|z|^delta``; and
    ``alpha != beta`` turns circles into ellipses (axis ratio ``sqrt(alpha / beta)``):
    "increasing ellipsoids with ever increasing rotational speed". The defaults are
    our choice (the printed values are unreadable), picked for a wide margin at
    h = 10^-2.5: Euler's outputs of the four XOR points over ``[0, T]`` are linearly
    separable for log10 h in [-2.65, -2.25] (h = 10^-2.5 in the middle) and for no
    smaller step in a sweep from 10^-4 in steps of 0.05 (10^-3.5 included), which is
    Figure 3's finding; Euler diverges for log10 h in [-2.05, -1.75].
    """

    gamma: float = 2.0
    alpha: float = 3.0
    beta: float = 1.0
    delta: float = 2.0
    T: float = 0.5

    def __call__(self, z: np.ndarray) -> np.ndarray:
        speed = np.linalg.norm(z, axis=-1) ** self.delta
        x, y = z[..., 0], z[..., 1]
        return np.stack([self.gamma * x - self.alpha * speed * y, self.beta * speed * x + self.gamma * y], axis=-1)

    def paths(self, step: float, z0: np.ndarray | None = None) -> np.ndarray:
        """Euler paths of the XOR points (or ``z0``) with step ``step``; see :func:`euler_paths`."""
        return euler_paths(self, xor_data()[0] if z0 is None else z0, step, self.T)


XOR_FLOW = XORFlow()


def xor_data() -> tuple[np.ndarray, np.ndarray]:
    """The XOR points (0,0)->0, (1,1)->0, (0,1)->1, (1,0)->1 as numpy arrays."""
    return np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]), np.array([0, 0, 1, 1])


def separating_line(z: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float] | None:
    """The line ``w . z + b = 0`` separating the points ``z`` of two classes with the
    widest margin, or None when no line separates them strictly.

    A linear programme (scipy's HiGHS) on the points scaled to unit max-norm (so that
    growing flows stay well conditioned): maximise ``t`` subject to
    ``s_i (w . z_i + b) >= t`` with ``s_i = +-1`` by class and ``|w_k| <= 1``. The
    classes are strictly separable iff the optimum ``t* > 1e-9``. The returned
    ``(w, b)`` is in the original coordinates. None also when ``z`` is not finite
    (the solver diverged).
    """
    z = np.asarray(z, dtype=np.float64)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) != 2:
        raise ValueError(f"separability needs exactly two classes, got {classes.tolist()}")
    if not np.all(np.isfinite(z)):
        return None
    scale = float(np.abs(z).max()) or 1.0
    sign = np.where(labels == classes[1], 1.0, -1.0)
    dims = z.shape[1]
    # Variables (w, b, t); each row is t - s_i (w . z_i + b) <= 0.
    a_ub = np.hstack([-sign[:, None] * np.hstack([z / scale, np.ones((len(z), 1))]), np.ones((len(z), 1))])
    bounds = [(-1.0, 1.0)] * dims + [(None, None), (None, 1.0)]
    objective = np.zeros(dims + 2)
    objective[-1] = -1.0
    result = linprog(objective, A_ub=a_ub, b_ub=np.zeros(len(z)), bounds=bounds, method="highs")
    if result.status != 0 or result.x[-1] <= 1e-9:
        return None
    return result.x[:dims] / scale, float(result.x[dims])


def linearly_separable(z: np.ndarray, labels: np.ndarray) -> bool | None:
    """Whether a line strictly separates the two classes of ``z`` (see :func:`separating_line`);
    ``None`` when ``z`` is not finite (the solver diverged)."""
    if not np.all(np.isfinite(np.asarray(z, dtype=np.float64))):
        return None
    return separating_line(z, labels) is not None


def xor_separability_sweep(log10_steps, flow: XORFlow = XOR_FLOW) -> list[bool | None]:
    """Figure 3 (c): for each ``log10 h``, are Euler's outputs of the XOR points separable?
    ``None`` marks a step size at which Euler diverged."""
    x, y = xor_data()
    return [linearly_separable(flow.paths(10.0 ** float(e), x)[-1], y) for e in log10_steps]


# ------------------------------------------------------- Appendix A field (Eq. 6)

APPENDIX_A_STEPS = (1.0, 0.5, 2.0**-5)
APPENDIX_A_T = 4.0  # long enough for exact paths to leave the curved region and reach x = 3
# Pull of the y-component towards y = 1 in the curved region; > 4 so that Euler with
# h = 1/2 overshoots (|1 - h * 6 * 0.5| = 0.5 with a sign flip), < 64 so that h = 2^-5 does not.
APPENDIX_A_PULL = 6.0
APPENDIX_A_CENTRE = 1.0


def _appendix_a_profile(x: np.ndarray) -> np.ndarray:
    # The paper's piecewise-linear profile b(x): 0 up to x = 1, rising to 0.5 on (1, 1.25],
    # flat on (1.25, 1.75], falling back to 0 on (1.75, 2], 0 beyond. Continuous.
    return np.clip(np.minimum(2.0 * (x - 1.0), 0.5 - 2.0 * (x - 1.75)), 0.0, 0.5)


def appendix_a_field(z: np.ndarray) -> np.ndarray:
    """Our reconstruction of Appendix A's field (Eq. 6), for states ``z[..., (x, y)]``:

        f(x, y) = (1 - b(x), 6 b(x) (1 - y)),

    with the paper's profile ``b``: 0 for x <= 1 and x > 2, ``2 (x - 1)`` on (1, 1.25],
    0.5 on (1.25, 1.75], ``0.5 - 2 (x - 1.75)`` on (1.75, 2]. The x-component and ``b``
    are as printed (each piece's x-component is 1 minus its y-component). The printed
    y-component is garbled; read as ``b(x)`` alone, every IVP with ``x(0) = 0`` would
    follow the same path shifted in y, and shifted copies never cross at any step size,
    so the paper's h = 1/2 crossing needs y in the field. We multiply ``b`` by a pull
    ``6 (1 - y)`` towards y = 1. The field is straight (``(1, 0)``) outside
    ``x in (1, 2]``, curves only inside, and is Lipschitz, so exact paths never cross.
    """
    x, y = z[..., 0], z[..., 1]
    b = _appendix_a_profile(x)
    return np.stack([1.0 - b, APPENDIX_A_PULL * b * (APPENDIX_A_CENTRE - y)], axis=-1)


def appendix_a_ivps(extra_x0: float | None = None, count: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Initial values of Figure 7: ``count`` IVPs at x = 0 with y evenly in [0.2, 1.8]
    (group 0, blue), plus as many at ``x = extra_x0`` (group 1, orange) when given."""
    ys = np.linspace(0.2, 1.8, count)
    z0 = np.stack([np.zeros(count), ys], axis=1)
    groups = np.zeros(count, dtype=int)
    if extra_x0 is not None:
        z0 = np.vstack([z0, np.stack([np.full(count, float(extra_x0)), ys], axis=1)])
        groups = np.concatenate([groups, np.ones(count, dtype=int)])
    return z0, groups


def appendix_a_paths(step: float, extra_x0: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Euler paths of Figure 7's IVPs over ``[0, 4]`` and their groups."""
    z0, groups = appendix_a_ivps(extra_x0)
    return euler_paths(appendix_a_field, z0, step, APPENDIX_A_T), groups


def appendix_a_crossing(step: float, extra_x0: float | None = None) -> tuple[np.ndarray, np.ndarray, CrossingStats]:
    """:func:`appendix_a_paths`, and how many pairs of those paths cross (each of the at
    most 153 pairs is tested)."""
    paths, groups = appendix_a_paths(step, extra_x0)
    return paths, groups, crossing_stats(paths)


# ------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.examples", description=__doc__.split("\n\n")[0])
    parser.add_argument("example", choices=("xor", "appendix-a"), help="which example to compute and draw")
    parser.add_argument("--out", default="figures", help="folder for the figures (default: ./figures)")
    parser.add_argument("--no-svg", action="store_true", help="write PNG only")
    args = parser.parse_args(argv)
    # Imported here, not at the top: plots imports this module for its data, and the
    # computations stay importable without matplotlib.
    from . import plots

    out = Path(args.out)
    if args.example == "xor":
        x, y = xor_data()
        for e in (-2.5, -3.5):
            print(f"XOR flow, Euler h = 10^{e}: linearly separable = {linearly_separable(XOR_FLOW.paths(10.0 ** e)[-1], y)}")
        written = plots.save_figure(plots.xor_figure(), out, "xor", svg=not args.no_svg)
    else:
        for extra in (None, 1.4, 1.5):
            for h in APPENDIX_A_STEPS:
                stats = appendix_a_crossing(h, extra)[2]
                who = "x(0)=0" if extra is None else f"x(0)=0 and {extra}"
                print(f"Appendix A, IVPs {who}, Euler h = {h:g}: {stats.crossing}/{stats.tested} pairs cross")
        written = plots.save_figure(plots.appendix_a_figure(), out, "appendix_a", svg=not args.no_svg)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
