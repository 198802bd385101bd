"""Helpers shared by the solver tests: torchdiffeq's solve as the reference, and the autograd graph's node names."""

import torch
import torchdiffeq


def torchdiffeq_solve(f, z0, method, tol, T=1.0, **options):
    """torchdiffeq's z(T), NFE and accepted step end times on an autonomous ``f``."""
    accepted, calls = [], [0]

    class Counted(torch.nn.Module):
        def forward(self, t, z):
            calls[0] += 1
            return f(z)

        def callback_accept_step(self, t0, y0, dt):
            accepted.append((t0 + dt).item())

    t = torch.tensor([0.0, T], dtype=torch.float64)
    z = torchdiffeq.odeint(Counted(), z0, t, method=method, rtol=tol, atol=tol, options=options or None)[-1]
    return z, calls[0], accepted


def graph_node_names(node, seen=None):
    """The type names of every autograd node reachable from ``node`` (which functions a result's graph holds)."""
    seen = set() if seen is None else seen
    if node is None or node in seen:
        return set()
    seen.add(node)
    names = {type(node).__name__}
    for child, _ in node.next_functions:
        names |= graph_node_names(child, seen)
    return names
