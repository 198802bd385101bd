"""The adaptive solve's cost per NFE inside a training loop, against the fixed-step path and torchdiffeq.

Run: ``python benchmarks/bench_adaptive_training.py`` (about a minute on a 2-core machine;
``--iterations``, ``--tol``). One thread throughout.

``bench_adaptive.py`` times solves on fixed weights; here each variant trains its own Sphere2
model (seed 0, batch 128, Adam, learning rate 1e-4, cross-entropy; the model's forward, which
solves through :func:`tune_node.integrate.integrate`) as a trial does, and only the forward pass
and the backward pass are timed (the classifier's small part included), so the cost per NFE is
the one a training run pays: between two solves the optimizer step and the next batch run, as in
``tune_node.train``. Variants (one seed each):

- fixed: the fused fixed-step RK4 solve (``--fixed-steps`` steps), the reference cost per NFE;
- ours fused, fehlberg2 and dopri5: ``integrate``'s default for adaptive backprop solves of the
  dense field, :func:`tune_node.fast.adaptive_solve.dense_adaptive_solve`;
- torchdiffeq, fehlberg2 and dopri5: the same solve through torchdiffeq's stepping
  (``TUNE_NODE_ADAPTIVE_SOLVER=torchdiffeq``).

The variants take turns in chunks of ``--chunk`` iterations (each continuing its own training),
so a load on the machine hits all alike; the first chunk of each is a warm-up, untimed. NFE
changes as a model trains, so costs are totals over the timed iterations: us per NFE = time /
(forward + backward NFE). Prints the median over chunks of each ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

from tune_node.datasets import load_dataset
from tune_node.models import build_model
from tune_node.ode.integrate import use_adaptive_solver
from tune_node.solvers import SolverSetting

BATCH = 128


class _Trainee:
    """One variant's model, optimizer, batches and timed totals."""

    def __init__(self, setting: SolverSetting, torchdiffeq: bool, x: torch.Tensor, y: torch.Tensor):
        self.setting, self.torchdiffeq = setting, torchdiffeq
        self.model = build_model("sphere", (1, 2), seed=0)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.x, self.y = x, y
        self.step = 0
        self.chunks: list[tuple[float, int]] = []  # (seconds, NFE fwd+bwd) per timed chunk

    def train(self, iterations: int, timed: bool) -> None:
        seconds, nfe = 0.0, 0
        for _ in range(iterations):
            start = (self.step * BATCH) % (len(self.x) - BATCH)
            x, y = self.x[start:start + BATCH], self.y[start:start + BATCH]
            self.step += 1
            began = time.perf_counter()
            with use_adaptive_solver("torchdiffeq") if self.torchdiffeq else contextlib.nullcontext():
                logits, sol = self.model(x, self.setting)
            loss = nn.functional.cross_entropy(logits, y)
            loss.backward()
            seconds += time.perf_counter() - began
            nfe += 2 * sol.nfe_forward
            self.optimizer.step()
            self.optimizer.zero_grad()
        if timed:
            self.chunks.append((seconds, nfe))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300, help="timed training iterations per variant (default 300)")
    parser.add_argument("--chunk", type=int, default=25, help="iterations per turn (default 25)")
    parser.add_argument("--tol", type=float, default=1e-3, help="rtol = atol of the adaptive solves (default 1e-3)")
    parser.add_argument("--fixed-steps", type=int, default=8, help="steps of the fixed-step RK4 reference (default 8)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset("sphere2", 0)
    variants = {"fixed rk4-%d fused" % args.fixed_steps: _Trainee(SolverSetting.fixed("rk4", args.fixed_steps), False, data.x_train,
                                                                  data.y_train)}
    for method in ("fehlberg2", "dopri5"):
        setting = SolverSetting.adaptive(method, args.tol)
        variants[f"ours fused, {method}"] = _Trainee(setting, False, data.x_train, data.y_train)
        variants[f"torchdiffeq, {method}"] = _Trainee(setting, True, data.x_train, data.y_train)
    names = list(variants)
    for name in names:
        variants[name].train(args.chunk, timed=False)
    for turn in range(-(-args.iterations // args.chunk)):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            variants[name].train(args.chunk, timed=True)

    def per_nfe(name: str) -> list[float]:
        return [seconds / nfe * 1e6 for seconds, nfe in variants[name].chunks]

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(per_nfe(a), per_nfe(b)))

    fixed = names[0]
    print(f"Sphere2, one seed training (batch {BATCH}, Adam), tol {args.tol:g}; forward + backward pass timed, us per NFE (fwd+bwd); "
          f"{args.iterations} iterations per variant in turns of {args.chunk}")
    print("ratios, median over turns (targets: fused / torchdiffeq <= 0.25, fused / fixed fused <= 1.5)")
    print(f"  {'':32s} {'fehlberg2':>10s} {'dopri5':>10s}")
    print(f"  {'fused / torchdiffeq':32s} " + " ".join(f"{ratio(f'ours fused, {m}', f'torchdiffeq, {m}'):10.2f}"
                                                  for m in ("fehlberg2", "dopri5")))
    print(f"  {'fused / ' + fixed:32s} " + " ".join(f"{ratio(f'ours fused, {m}', fixed):10.2f}" for m in ("fehlberg2", "dopri5")))
    print("absolute, us per NFE (median over turns) [NFE fwd+bwd per iteration, mean]")
    for name in names:
        chunks = variants[name].chunks
        mean_nfe = sum(nfe for _, nfe in chunks) / (len(chunks) * args.chunk)
        print(f"  {name:32s} {statistics.median(per_nfe(name)):10.1f} [{mean_nfe:6.1f}]")


if __name__ == "__main__":
    main()
