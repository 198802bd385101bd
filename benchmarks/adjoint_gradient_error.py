"""How far the adjoint's gradient is from the gradient of the loss it trains, per tolerance (Appendix B.2).

Run: ``python benchmarks/adjoint_gradient_error.py [--trained runs/sphere2_adaptive_backprop]`` (about a
minute). The paper explains the adjoint's low accuracy at large tolerances by its backward solve departing
from the forward one, so that "no valid gradient information is provided to the optimizer". This measures
it: for Sphere2 models (seeds 0..4, at initialisation or, with ``--trained``, the final weights a backprop
grid trained at that method and tolerance) and one training batch each (128 points, cross-entropy loss), the
loss's gradient in all weights by the adjoint at tolerance ``tol`` against the gradient of the same
discretised loss by backprop through the same forward solve (its exact gradient). Printed per method and
tolerance, the mean over seeds of: the relative error ``|g_adjoint - g_exact| / |g_exact|`` and the cosine
between them (1: same direction), and the forward and backward NFE. float32, as training.
"""

from __future__ import annotations

import argparse
import glob
import os

import torch
import torch.nn.functional as F

from tune_node.datasets import load_dataset
from tune_node.integrate import integrate
from tune_node.models import build_model
from tune_node.solvers import SolverSetting

BATCH = 128


def _gradient(model, x, y, setting):
    model.zero_grad()
    sol = integrate(model.field, x, setting)
    F.cross_entropy(model.classifier(sol.z.flatten(1)), y).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return grad, sol.nfe_forward, sol.nfe_backward


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", default=None, help="a backprop tolerance grid's run folder (its final weights per setting)")
    parser.add_argument("--tol", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4, 1e-5])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"weights: {args.trained or 'initial'}; mean over seeds 0..{args.seeds - 1}; float32, batch {BATCH}")
    print(f"{'method':10s} {'tol':>7s} {'rel. error':>10s} {'cosine':>7s} {'fwd NFE':>8s} {'bwd NFE':>8s}")
    for method in ("fehlberg2", "dopri5"):
        for tol in args.tol:
            errors, cosines, forward, backward = [], [], [], []
            for seed in range(args.seeds):
                model = build_model("sphere", (1, 2), seed=seed)
                if args.trained:
                    pattern = os.path.join(args.trained, f"{method}_tol{tol:.0e}_seeds*", "checkpoint_*", f"seed{seed}", "checkpoint.pt")
                    paths = sorted(glob.glob(pattern))
                    if not paths:
                        raise SystemExit(f"no checkpoint matches {pattern}")
                    model.load_state_dict(torch.load(paths[-1], weights_only=False)["model"])
                data = load_dataset("sphere2", seed)
                x, y = data.x_train[:BATCH], data.y_train[:BATCH]
                exact, _, _ = _gradient(model, x, y, SolverSetting.adaptive(method, tol, gradient="backprop"))
                adjoint, nfe_forward, nfe_backward = _gradient(model, x, y, SolverSetting.adaptive(method, tol, gradient="adjoint"))
                errors.append(((adjoint - exact).norm() / exact.norm()).item())
                cosines.append(F.cosine_similarity(adjoint, exact, dim=0).item())
                forward.append(nfe_forward)
                backward.append(nfe_backward)
            n = len(errors)
            means = [sum(errors) / n, sum(cosines) / n, sum(forward) / n, sum(backward) / n]
            print(f"{method:10s} {tol:7.0e} {means[0]:10.3f} {means[1]:7.3f} {means[2]:8.1f} {means[3]:8.1f}")


if __name__ == "__main__":
    main()
