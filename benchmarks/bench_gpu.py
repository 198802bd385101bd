"""GPU against CPU in one run: Sphere2 training in us per NFE per seed, MNIST and CIFAR10 iteration times.

Run: ``python benchmarks/bench_gpu.py [--out FILE]`` on a machine with CUDA (about 2 minutes);
``--cpu-only`` measures only the CPU side (no GPU needed; under a minute on 2 cores).
Without CUDA and without ``--cpu-only`` it says so and exits with status 2.

(a) Sphere2 (RK4 and Euler, 4 steps, the paper's batch, Adam), us per NFE (forward and backward
    evaluations both counted) per seed, through the project's entry point
    (``tune_node.seed_groups.train_seed_group``), one seed and a 5-seed group, on: the CPU (one
    thread, as a trial runs), the GPU eagerly (``cuda_graph=False``) and the GPU with the
    iteration captured as a CUDA graph (``cuda_graph=True``). Variants run interleaved in chunks,
    as in ``benchmarks/bench_sphere.py`` (whose pieces this imports), each reporting its median.
(b) MNIST (1x28x28) and CIFAR10 (3x32x32) training iterations at batch 256, Euler 1 step, on
    generated tensors of the real shapes (no download), through ``tune_node.training.train``:
    the CPU (one thread, few iterations) and the GPU in FP32, channels-last, channels-last + TF32
    and channels-last + bfloat16 autocast (``amp``).

Prints the ratios first (CPU time / GPU time: how many times faster the GPU is), then the
absolute numbers, and appends both to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sphere import LR, SEEDS, _pausing_at_reports  # noqa: E402

from tune_node.data.datasets import Dataset  # noqa: E402
from tune_node.fast import native  # noqa: E402
from tune_node.seed_groups import train_seed_group  # noqa: E402
from tune_node.solvers import METHODS, SolverSetting  # noqa: E402
from tune_node.training import TrainConfig, train  # noqa: E402

STEPS = 4
IMAGE_BATCH = 256
IMAGES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
#: Sphere variants: device and cuda_graph flag.
SPHERE_DEVICES = {"cpu": ("cpu", False), "gpu eager": ("cuda", False), "gpu graph": ("cuda", True)}
#: GPU image variants: the TrainConfig flags each sets.
IMAGE_FLAGS = {
    "gpu fp32": dict(channels_last=False, tf32=False, amp=False),
    "gpu channels-last": dict(channels_last=True, tf32=False, amp=False),
    "gpu channels-last+tf32": dict(channels_last=True, tf32=True, amp=False),
    "gpu channels-last+amp": dict(channels_last=True, tf32=False, amp=True),
}


def sphere_run(method: str, device: str, graph: bool, seeds: int, chunk: int, chunks: int):
    """A generator of chunk times (seconds) of a ``seeds``-seed Sphere2 training on ``device``."""
    configs = [TrainConfig(dataset="sphere2", solver=SolverSetting.fixed(method, STEPS), seed=s, iterations=chunk * chunks,
                           report_every=chunk, lr=LR, device=device, cuda_graph=graph) for s in range(seeds)]
    # Reports come per seed; the last seed's marks the end of a chunk.
    return _pausing_at_reports(lambda report: train_seed_group(
        configs, on_report=lambda i, p, s: report() if i == seeds - 1 else None))


def bench_sphere_devices(devices: list[str], chunk: int, chunks: int, warmup: int = 2) -> dict:
    """``{method: {(device variant, seeds): us per NFE per seed}}``, variants interleaved."""
    us = {}
    for method in ("rk4", "euler"):
        nfe = 2 * STEPS * METHODS[method].stages_per_step
        keys = [(d, s) for d in devices for s in (1, SEEDS)]
        runs = {k: sphere_run(method, *SPHERE_DEVICES[k[0]], k[1], chunk, warmup + chunks) for k in keys}
        for run in runs.values():  # set-up, warm-up and graph capture, untimed
            for _ in range(warmup):
                next(run)
        samples = {k: [] for k in keys}
        for c in range(chunks):
            for k in keys[c % len(keys):] + keys[:c % len(keys)]:
                samples[k].append(next(runs[k]) / (chunk * nfe * k[1]) * 1e6)
        for run in runs.values():  # the final evaluation, untimed
            for _ in run:
                pass
        us[method] = {k: statistics.median(v) for k, v in samples.items()}
        print(f"  sphere2 {method}: " + ", ".join(f"{d} x{s}: {v:.1f}" for (d, s), v in us[method].items()), flush=True)
    return us


def image_data(family: str, n: int = 2 * IMAGE_BATCH) -> Dataset:
    """Random tensors of the real shapes, named as the built-in dataset (so its model is built)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *IMAGES[family], generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset(family, x, y, x[:IMAGE_BATCH].clone(), y[:IMAGE_BATCH].clone(), 10)


def image_iteration_ms(family: str, device: str, iterations: int, warmup: int, **flags) -> float:
    """Median milliseconds of one training iteration (batch 256, Euler 1 step), between reports."""
    config = TrainConfig(dataset=family, solver=SolverSetting.fixed("euler", 1), device=device, batch_size=IMAGE_BATCH,
                         iterations=warmup + iterations, report_every=1, eval_batch_size=IMAGE_BATCH, **flags)
    times = []
    # A report reads the iteration's loss (a device sync), so the time between reports is the iteration's.
    train(config, data=image_data(family), on_report=lambda p, s: times.append(time.perf_counter()))
    steps = [b - a for a, b in zip(times[warmup - 1:], times[warmup:])]
    return statistics.median(steps) * 1e3


def bench_images(gpu: bool, cpu_iterations: int, gpu_iterations: int) -> dict:
    """``{family: {variant: ms per iteration}}``."""
    ms = {}
    for family in IMAGES:
        ms[family] = {"cpu": image_iteration_ms(family, "cpu", cpu_iterations, warmup=1)}
        if gpu:
            for name, flags in IMAGE_FLAGS.items():
                ms[family][name] = image_iteration_ms(family, "cuda", gpu_iterations, warmup=3, **flags)
        print(f"  {family}: " + ", ".join(f"{k}: {v:.2f} ms" for k, v in ms[family].items()), flush=True)
    return ms


def report(us: dict, ms: dict, gpu: bool) -> list[str]:
    """The lines to print and keep: ratios first, then absolute numbers."""
    lines = []
    if gpu:
        lines.append("ratios (CPU time / GPU time; targets: sphere >= 5 per NFE per seed, CIFAR10 >= 50 per iteration)")
        for method, row in us.items():
            for seeds in (1, SEEDS):
                cpu = row[("cpu", seeds)]
                lines.append(f"  sphere2 {method} {STEPS} steps, {seeds} seed(s): cpu/gpu eager {cpu / row[('gpu eager', seeds)]:.2f}, "
                             f"cpu/gpu graph {cpu / row[('gpu graph', seeds)]:.2f}, "
                             f"gpu eager/gpu graph {row[('gpu eager', seeds)] / row[('gpu graph', seeds)]:.2f}")
            best_cpu = min(row[("cpu", 1)], row[("cpu", SEEDS)])
            best_gpu = min(v for (d, _), v in row.items() if d != "cpu")
            lines.append(f"  sphere2 {method}: best CPU / best GPU per NFE per seed {best_cpu / best_gpu:.2f}")
        for family, row in ms.items():
            ratios = ", ".join(f"cpu/{k} {row['cpu'] / v:.1f}" for k, v in row.items() if k != "cpu")
            lines.append(f"  {family} batch {IMAGE_BATCH}: {ratios}")
    lines.append("absolute")
    for method, row in us.items():
        values = ", ".join(f"{d} x{s} {v:.2f}" for (d, s), v in row.items())
        lines.append(f"  sphere2 {method} {STEPS} steps, us per NFE per seed: {values}")
    for family, row in ms.items():
        lines.append(f"  {family} batch {IMAGE_BATCH} Euler 1 step, ms per iteration: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true", help="measure only the CPU side, briefly (no GPU needed)")
    parser.add_argument("--out", default=None, help="append the results to this file")
    args = parser.parse_args(argv)
    gpu = not args.cpu_only
    if gpu and not torch.cuda.is_available():
        print(f"bench_gpu: CUDA is not available (torch {torch.__version__}); run on a GPU machine or use --cpu-only",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # the CPU side as a trial runs it: one thread
    header = [f"bench_gpu: torch {torch.__version__}, CPU threads 1, C++ loops {'on' if native.dense_loops() else 'off'}"
              + (f", GPU {torch.cuda.get_device_name()}" if gpu else ", CPU only")]
    print(header[0], flush=True)
    devices = list(SPHERE_DEVICES) if gpu else ["cpu"]
    us = bench_sphere_devices(devices, chunk=20 if gpu else 10, chunks=5 if gpu else 2)
    ms = bench_images(gpu, cpu_iterations=2 if gpu else 1, gpu_iterations=10)
    lines = header + report(us, ms, gpu)
    print("\n" + "\n".join(lines[1:]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
