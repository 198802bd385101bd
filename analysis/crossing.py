"""Trajectory crossing as a number: how often numerical paths of different IVPs cross.

Solutions of an autonomous ODE with a Lipschitz field never cross in phase space
(Picard-Lindelof). A solver's discrete path can: the paper's sign that a Neural ODE
trained with too coarse a step is a ResNet rather than an ODE (Section 2.1, Figure 1).
Here a *path* is the polyline through one IVP's consecutive solver states, and two
paths cross when a segment of one properly intersects a segment of the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CrossingStats", "as_paths", "crossing_stats", "crossing_fraction", "solver_paths"]

# Pairs x segment-pairs evaluated at once: bounds memory to about 100 MB of float64.
_CHUNK_ELEMENTS = 1_000_000


@dataclass(frozen=True)
class CrossingStats:
    """The outcome of :func:`crossing_stats`.

    Attributes:
        crossing: pairs found crossing among those tested.
        tested: pairs tested (all eligible pairs, or a seeded sample of ``max_pairs``).
        eligible: pairs eligible (of different classes, or all when unlabelled).
    """

    crossing: int
    tested: int
    eligible: int

    @property
    def fraction(self) -> float:
        """Crossing pairs / tested pairs (0.0 when no pair is eligible)."""
        return self.crossing / self.tested if self.tested else 0.0

    @property
    def sampled(self) -> bool:
        return self.tested < self.eligible


def as_paths(paths) -> np.ndarray:
    """Paths as a float64 array of shape ``(states, N, 2)``.

    Accepts such an array (numpy or torch), or a list of per-state arrays of shape
    ``(N, ..., 2)`` as :attr:`tune_node.integrate.Solution.path` holds (Sphere2 states
    are ``(N, 1, 2)``). Raises ValueError for anything that is not 2-D per point.
    """
    if isinstance(paths, (list, tuple)):
        if not paths:
            raise ValueError("paths is empty: need at least two states per path")
        paths = [p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p) for p in paths]
        arr = np.stack(paths)
    elif isinstance(paths, torch.Tensor):
        arr = paths.detach().cpu().numpy()
    else:
        arr = np.asarray(paths)
    if arr.ndim < 3:
        raise ValueError(f"paths must have shape (states, N, 2), got {arr.shape}")
    arr = arr.reshape(arr.shape[0], arr.shape[1], -1).astype(np.float64)
    if arr.shape[2] != 2:
        raise ValueError(f"crossing is defined for 2-D states; paths have {arr.shape[2]} coordinates per point (shape {arr.shape})")
    if arr.shape[0] < 2:
        raise ValueError(f"a path needs at least two states, got {arr.shape[0]}")
    return arr


def _eligible_pairs(n: int, labels) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.triu_indices(n, k=1)
    if labels is None:
        return i, j
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for {n} paths")
    keep = labels[i] != labels[j]
    return i[keep], j[keep]


def _orientation(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sign-carrying 2-D cross product (a - o) x (b - o), broadcast over leading axes."""
    return (a[..., 0] - o[..., 0]) * (b[..., 1] - o[..., 1]) - (a[..., 1] - o[..., 1]) * (b[..., 0] - o[..., 0])


def _pairs_cross(paths: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """For each pair (i[k], j[k]): does any segment of path i properly cross any segment of path j?"""
    start, end = paths[:-1], paths[1:]  # (S, N, 2) each
    steps = start.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // (steps * steps))
    out = np.zeros(len(i), dtype=bool)
    for lo in range(0, len(i), chunk):
        ii, jj = i[lo : lo + chunk], j[lo : lo + chunk]
        # Segments of the first path along axis 1, of the second along axis 2: (P, S, S, 2).
        p1 = start[:, ii].transpose(1, 0, 2)[:, :, None]
        p2 = end[:, ii].transpose(1, 0, 2)[:, :, None]
        q1 = start[:, jj].transpose(1, 0, 2)[:, None]
        q2 = end[:, jj].transpose(1, 0, 2)[:, None]
        # Proper intersection: each segment's endpoints strictly on opposite sides of the
        # other's line. Touching or collinear overlap does not count: paths that merely
        # share a point (equal IVPs, a state landing on a line) are not crossing.
        d1, d2 = _orientation(q1, q2, p1), _orientation(q1, q2, p2)
        d3, d4 = _orientation(p1, p2, q1), _orientation(p1, p2, q2)
        hit = (d1 * d2 < 0) & (d3 * d4 < 0)
        out[lo : lo + chunk] = hit.any(axis=(1, 2))
    return out


def crossing_stats(paths, labels=None, max_pairs: int | None = 20_000, seed: int = 0) -> CrossingStats:
    """Count pairs of numerical paths that cross.

    Arguments:
        paths: states along each path, shape ``(steps + 1, N, 2)`` or a
            ``Solution.path`` list (see :func:`as_paths`).
        labels: class of each path, shape ``(N,)``; only pairs of different classes
            count. ``None`` counts all pairs.
        max_pairs: test at most this many pairs; when more are eligible, a uniform
            sample without replacement drawn with ``numpy.random.default_rng(seed)``
            is tested, so the fraction is an unbiased, reproducible estimate. ``None``
            tests every pair.
        seed: seed of that sample.

    Cost: ``tested x steps^2`` segment tests, vectorised in chunks.
    """
    arr = as_paths(paths)
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1 or None, got {max_pairs!r}")
    i, j = _eligible_pairs(arr.shape[1], labels)
    eligible = len(i)
    if max_pairs is not None and eligible > max_pairs:
        pick = np.sort(np.random.default_rng(seed).choice(eligible, size=max_pairs, replace=False))
        i, j = i[pick], j[pick]
    crossing = int(_pairs_cross(arr, i, j).sum()) if len(i) else 0
    return CrossingStats(crossing=crossing, tested=len(i), eligible=eligible)


def crossing_fraction(paths, labels=None, max_pairs: int | None = 20_000, seed: int = 0) -> float:
    """Fraction of (different-class) pairs of paths that cross; see :func:`crossing_stats`."""
    return crossing_stats(paths, labels, max_pairs, seed).fraction


@torch.no_grad()
def solver_paths(model, x: torch.Tensor, setting) -> np.ndarray:
    """The ODE block's numerical paths of ``x`` under a fixed-step ``setting``, shape ``(steps + 1, N, 2)``.

    ``model`` is a :class:`~tune_node.models.NeuralODEClassifier` on 2-D data.
    """
    if setting.is_adaptive:
        raise ValueError(f"paths need a fixed-step setting; got adaptive {setting.label()}")
    return as_paths(model.solve(x, setting, record_path=True).path)
