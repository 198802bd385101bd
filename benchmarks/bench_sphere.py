"""How fast the project trains the paper's models, against the practical limit and the paper's code path.

Run: ``python benchmarks/bench_sphere.py`` (about 3 minutes on a loaded 2-core
machine; ``--quick`` under 1 minute). One thread throughout.

(a) Sphere2 training steps (batch 128, Adam), in microseconds per function
    evaluation (NFE, forward and backward evaluations both counted) per seed:
    - project, one seed: ``tune_node.training.train``;
    - project, 5 seeds: ``tune_node.seed_groups.train_seed_group`` (stacked, bmm);
    - hand-written: a minimal dense Euler/RK4 training loop written here, one seed
      and 5 seeds stacked (the practical limit of this math in eager PyTorch);
    - plain: the paper's code path, an ``nn.Conv1d`` block through
      ``torchdiffeq.odeint(method, options={"step_size": h})``.
    The variants run interleaved, a chunk of 10 iterations each in turn, in a
    rotating order (``train`` and ``train_seed_group`` pause at their reports), and
    each reports its median chunk, so a neighbour's load hits all of them alike and
    the ratios stay meaningful.
(c) MNIST and CIFAR10 blocks (no fast path): where one training iteration's time
    goes (forward solve, backward, optimizer step), the same iteration through
    torchdiffeq for comparison, and a short torch.profiler summary.

``--crossover`` instead measures the dense sphere field against Conv1d over signal
lengths, the measurement behind ``tune_node.dense.DENSE_MAX_DIM``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F
import torchdiffeq
from torch import nn

from tune_node.datasets import load_dataset
from tune_node.dense import dense_conv_weights
from tune_node.models import build_model
from tune_node.seed_groups import train_seed_group
from tune_node.solvers import METHODS, SolverSetting
from tune_node.training import TrainConfig, train

SEEDS = 5
BATCH = 128
LR = 1e-4


# ---------------------------------------------------------------- (a) Sphere2 variants
# Each variant is a generator that sets itself up, then runs `chunks` chunks of `chunk`
# training iterations, yielding after each; the benchmark times every chunk and runs
# the variants' chunks in turn, so a neighbour's load falls on all of them alike.

def _in_chunks(run, chunk: int, chunks: int):
    for c in range(chunks):
        start = time.perf_counter()
        for it in range(c * chunk, (c + 1) * chunk):
            run(it)
        yield time.perf_counter() - start


def _pausing_at_reports(run_with_callback):
    """A generator over a training function that reports through a callback.

    ``run_with_callback(callback)`` runs in a worker thread that pauses at every
    report until the generator is advanced, so only one thread computes at a time.
    Yields the seconds the worker computed since it last resumed, timed inside the
    worker: waking threads on a loaded machine takes milliseconds that are no part
    of training.
    """
    resume, paused = threading.Semaphore(0), threading.Semaphore(0)
    threads = torch.get_num_threads()
    durations, resumed = [0.0], [0.0]

    def report(*_):
        durations.append(time.perf_counter() - resumed[0])
        paused.release()
        resume.acquire()
        resumed[0] = time.perf_counter()

    def worker():
        torch.set_num_threads(threads)  # OpenMP's thread count is per thread: a new one starts at all cores
        resume.acquire()
        resumed[0] = time.perf_counter()
        try:
            run_with_callback(report)
        finally:
            paused.release()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    while thread.is_alive():
        resume.release()
        paused.acquire()
        yield durations[-1]


def project_one_seed(method: str, steps: int, chunk: int, chunks: int):
    config = TrainConfig(dataset="sphere2", solver=SolverSetting.fixed(method, steps), seed=0,
                         iterations=chunk * chunks, report_every=chunk, lr=LR)
    return _pausing_at_reports(lambda report: train(config, on_report=report))


def project_seed_group(method: str, steps: int, chunk: int, chunks: int):
    configs = [TrainConfig(dataset="sphere2", solver=SolverSetting.fixed(method, steps), seed=s,
                           iterations=chunk * chunks, report_every=chunk, lr=LR) for s in range(SEEDS)]
    # Reports come per seed; pausing at the last seed's marks the end of a chunk.
    return _pausing_at_reports(lambda report: train_seed_group(
        configs, on_report=lambda i, p, s: report() if i == SEEDS - 1 else None))


def _sphere_batches(seeds: int, iterations: int):
    data = [load_dataset("sphere2", s) for s in range(seeds)]
    gen = torch.Generator().manual_seed(0)
    idx = [torch.randint(0, 2000, (iterations, BATCH), generator=gen) for _ in range(seeds)]
    x = torch.stack([d.x_train.flatten(1)[i] for d, i in zip(data, idx)], 1)  # (iterations, seeds, batch, 2)
    y = torch.stack([d.y_train[i] for d, i in zip(data, idx)], 1)
    return x, y


def hand_written(method: str, steps: int, chunk: int, chunks: int, seeds: int | None = None):
    """The same model and math with nothing around it: conv kernels as leaf tensors,
    dense matrices built once per iteration, the RK steps written out, Adam."""
    stacked = seeds is not None
    models = [build_model("sphere", (1, 2), seed=s) for s in range(seeds or 1)]
    params = [torch.stack([p.detach() for p in ps]).requires_grad_() if stacked else ps[0].detach().clone().requires_grad_()
              for ps in zip(*(m.parameters() for m in models))]
    opt = torch.optim.Adam(params, lr=LR)
    xs, ys = _sphere_batches(seeds or 1, chunk * chunks)
    if not stacked:
        xs, ys = xs[:, 0], ys[:, 0]
    h = 1.0 / steps
    mm = torch.baddbmm if stacked else torch.addmm

    def run(it):
        W1, c1, W2, c2, W3, c3 = dense_conv_weights(*params[:6], 2)
        if stacked:
            c1, c2, c3 = c1.unsqueeze(1), c2.unsqueeze(1), c3.unsqueeze(1)

        def f(z):
            return mm(c3, torch.relu_(mm(c2, torch.relu_(mm(c1, z, W1)), W2)), W3)

        z = xs[it]
        for _ in range(steps):
            if method == "euler":
                z = torch.add(z, f(z), alpha=h)
            else:  # Kutta's 3/8 rule, as torchdiffeq's rk4
                k1 = f(z)
                k2 = f(torch.add(z, k1, alpha=h / 3))
                k3 = f(torch.add(torch.add(z, k1, alpha=-h / 3), k2, alpha=h))
                k4 = f(torch.add(torch.add(torch.add(z, k1, alpha=h), k2, alpha=-h), k3, alpha=h))
                z = z + (k1 + 3 * (k2 + k3) + k4) * (h / 8)
        if stacked:
            logits = torch.baddbmm(params[7].unsqueeze(1), z, params[6].transpose(1, 2))
            loss = F.cross_entropy(logits.flatten(0, 1), ys[it].flatten(), reduction="none").view(seeds, -1).mean(1).sum()
        else:
            loss = F.cross_entropy(torch.addmm(params[7], z, params[6].t()), ys[it])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _in_chunks(run, chunk, chunks)


class _PlainField(nn.Module):
    """The paper's sphere block as the reference code runs it: Conv1d layers, f(t, z)."""

    def __init__(self, model):
        super().__init__()
        self.block = model.field

    def forward(self, t, z):
        b = self.block
        return b.conv3(torch.relu(b.conv2(torch.relu(b.conv1(z)))))


def plain_torchdiffeq(method: str, steps: int, chunk: int, chunks: int):
    model = build_model("sphere", (1, 2), seed=0)
    field = _PlainField(model)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    xs, ys = _sphere_batches(1, chunk * chunks)
    t = torch.tensor([0.0, 1.0])

    def run(it):
        z = torchdiffeq.odeint(field, xs[it, 0].unsqueeze(1), t, method=method, options={"step_size": 1.0 / steps})[-1]
        loss = F.cross_entropy(model.classifier(z.flatten(1)), ys[it, 0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _in_chunks(run, chunk, chunks)


def bench_sphere(steps: int, chunk: int, chunks: int, warmup: int = 2) -> dict:
    variants = {
        "project, one seed": (project_one_seed, 1),
        f"project, {SEEDS} seeds grouped": (project_seed_group, SEEDS),
        "hand-written, one seed": (hand_written, 1),
        f"hand-written, {SEEDS} seeds stacked": (lambda m, s, c, n: hand_written(m, s, c, n, SEEDS), SEEDS),
        "plain Conv1d + torchdiffeq": (plain_torchdiffeq, 1),
    }
    us = {}
    for method in ("euler", "rk4"):
        nfe = 2 * steps * METHODS[method].stages_per_step  # forward + backward per iteration
        runs = {name: fn(method, steps, chunk, warmup + chunks) for name, (fn, _) in variants.items()}
        for run in runs.values():  # set-up and warm-up chunks, untimed
            for _ in range(warmup):
                next(run)
        samples = {name: [] for name in variants}
        names = list(runs)
        for c in range(chunks):
            # Rotate the order: a chunk right after another variant's runs on cold
            # caches, and each variant should pay that equally often.
            for name in names[c % len(names):] + names[:c % len(names)]:
                samples[name].append(next(runs[name]) / (chunk * nfe * variants[name][1]) * 1e6)
        for run in runs.values():  # let the project's runs finish (final evaluation), untimed
            for _ in run:
                pass
        us[method] = {name: statistics.median(v) for name, v in samples.items()}
        print(f"  {method}: " + ", ".join(f"{n}: {us[method][n]:.0f}" for n in variants), flush=True)
    return us


def print_sphere(us: dict, steps: int) -> None:
    g, h1, hg, p1, plain = (f"project, {SEEDS} seeds grouped", "hand-written, one seed", f"hand-written, {SEEDS} seeds stacked",
                            "project, one seed", "plain Conv1d + torchdiffeq")
    print(f"\n(a) Sphere2 training, batch {BATCH}, Adam, {steps} steps; us per NFE (fwd+bwd) per seed")
    print("ratios (targets: project / hand-written <= 1.5, project / plain <= 0.2)")
    print(f"  {'':44s} {'euler':>8s} {'rk4':>8s}")
    rows = [
        (f"project {SEEDS} seeds / hand-written {SEEDS} seeds", g, hg),
        ("project one seed / hand-written one seed", p1, h1),
        (f"project {SEEDS} seeds / plain Conv1d+torchdiffeq", g, plain),
        ("project one seed / plain Conv1d+torchdiffeq", p1, plain),
        (f"project {SEEDS} seeds / hand-written one seed", g, h1),
    ]
    for label, a, b in rows:
        print(f"  {label:44s} " + " ".join(f"{us[m][a] / us[m][b]:8.2f}" for m in ("euler", "rk4")))
    print("absolute, us per NFE per seed")
    for name in us["euler"]:
        print(f"  {name:44s} " + " ".join(f"{us[m][name]:8.1f}" for m in ("euler", "rk4")))


# ---------------------------------------------------------------- (c) image blocks

@contextlib.contextmanager
def _stderr_silenced():
    # The profiler backend logs start/stop lines straight to file descriptor 2.
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def bench_image(family: str, shape: tuple, batch: int, iterations: int, profile: bool) -> None:
    model = build_model(family, shape, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1))
    setting = SolverSetting.fixed("euler", 1)
    parts = {"forward": [], "backward": [], "optimizer": [], "torchdiffeq iteration": []}
    field = _PlainField(model)
    t = torch.tensor([0.0, 1.0])

    def project_iteration(record: bool):
        t0 = time.perf_counter()
        logits, _ = model(x, setting)
        loss = F.cross_entropy(logits, y)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if record:
            parts["forward"].append(t1 - t0)
            parts["backward"].append(t2 - t1)
            parts["optimizer"].append(t3 - t2)

    def plain_iteration():
        t0 = time.perf_counter()
        z = torchdiffeq.odeint(field, x, t, method="euler", options={"step_size": 1.0})[-1]
        loss = F.cross_entropy(model.classifier(z.flatten(1)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        parts["torchdiffeq iteration"].append(time.perf_counter() - t0)

    project_iteration(False)
    for _ in range(iterations):
        project_iteration(True)
        plain_iteration()
    ms = {k: statistics.median(v) * 1e3 for k, v in parts.items()}
    total = ms["forward"] + ms["backward"] + ms["optimizer"]
    print(f"\n(c) {family} block, input {shape}, batch {batch}, Euler 1 step (1 NFE forward + 1 backward)")
    print(f"  project iteration / torchdiffeq iteration: {total / ms['torchdiffeq iteration']:.2f}")
    print("  share of the project iteration: " + ", ".join(f"{k} {ms[k] / total:.0%}" for k in ("forward", "backward", "optimizer")))
    print(f"  absolute: project iteration {total:.1f} ms (forward {ms['forward']:.1f}, backward {ms['backward']:.1f}, "
          f"optimizer {ms['optimizer']:.1f}); torchdiffeq iteration {ms['torchdiffeq iteration']:.1f} ms; "
          f"{total / 2 / batch * 1e3:.0f} us per NFE per example; at the paper's batch 256 about "
          f"{total * 256 / batch / 1e3:.1f} s per iteration and step")
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with _stderr_silenced(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            project_iteration(False)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
        whole = sum(e.self_cpu_time_total for e in prof.key_averages())
        print("  profiler, top ops by self CPU time: " + ", ".join(f"{e.key} {e.self_cpu_time_total / whole:.0%}" for e in events))


# ---------------------------------------------------------------- dense cutoff

def crossover(dims: tuple[int, ...], repeats: int) -> None:
    print("dense vs Conv1d sphere field: RK4 2 steps, batch 128, forward + backward, matrices built per solve")
    print(f"  {'D':>4s} {'conv us/NFE':>12s} {'dense us/NFE':>13s} {'conv/dense':>11s}")
    setting = SolverSetting.fixed("rk4", 2)
    for dim in dims:
        model = build_model("sphere", (1, dim), seed=0)
        x = torch.randn(128, 1, dim)
        times = {False: [], True: []}
        for _ in range(repeats):
            for use_dense in (False, True):
                model.field.dense = use_dense
                start = time.perf_counter()
                for _ in range(5):
                    model.zero_grad(set_to_none=True)
                    logits, _ = model(x, setting)
                    logits.sum().backward()
                times[use_dense].append((time.perf_counter() - start) / (5 * 16) * 1e6)
        conv, dense = min(times[False]), min(times[True])
        print(f"  {dim:4d} {conv:12.0f} {dense:13.0f} {conv / dense:11.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (fewer iterations and rounds)")
    parser.add_argument("--steps", type=int, default=4, help="fixed steps of the Sphere2 solves (default 4)")
    parser.add_argument("--skip-images", action="store_true", help="skip part (c), the MNIST and CIFAR10 blocks")
    parser.add_argument("--crossover", action="store_true", help="only measure the dense/Conv1d cutoff over signal lengths")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(1)
    if args.crossover:
        crossover((2, 3, 5, 8, 10, 12, 16, 32), repeats=2 if args.quick else 5)
        return
    chunk, chunks = (5, 8) if args.quick else (10, 40)
    print(f"torch {torch.__version__}, 1 thread; per variant {chunks} timed chunks of {chunk} iterations, "
          "run in turn with the other variants' chunks; median chunk", flush=True)
    us = bench_sphere(args.steps, chunk, chunks)
    print_sphere(us, args.steps)
    if not args.skip_images:
        image_iterations = 2 if args.quick else 5
        bench_image("mnist", (1, 28, 28), 32, image_iterations, profile=True)
        bench_image("cifar10", (3, 32, 32), 32, image_iterations, profile=True)


if __name__ == "__main__":
    main()
