"""Train one Neural ODE and print its cross-solver table: ``python -m tune_node.train_one``.

Example::

    python -m tune_node.train_one --dataset sphere2 --method euler --steps 8 --iterations 2000
"""

from __future__ import annotations

import argparse
import sys

import torch

from .cli import add_data_arguments, add_solver_arguments, format_table, solver_from_args
from .datasets import load_dataset
from .training import TrainConfig, save_checkpoint, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_node.train_one", description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    add_solver_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=None, help="default: the paper's for the dataset")
    parser.add_argument("--lr", type=float, default=None, help="default: the paper's for the dataset")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--report-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save", default=None, help="write the final checkpoint here")
    args = parser.parse_args(argv)
    setting = solver_from_args(parser, args)
    try:
        config = TrainConfig(
            dataset=args.dataset, solver=setting, seed=args.seed, iterations=args.iterations, lr=args.lr,
            batch_size=args.batch_size, report_every=args.report_every, data_root=args.data_root,
            download=args.download, device=args.device,
        )
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    try:
        data = load_dataset(config.dataset, config.seed, config.data_root, config.download)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"training {config.dataset} with {setting.label()}, seed {config.seed}, {config.iterations} iterations "
          f"({config.optimizer} lr={config.lr:g}, batch {config.batch_size})", flush=True)
    last_state = {}

    def report(p, state):
        last_state["fn"] = state
        print(f"  iter {p.iteration:>6}/{config.iterations}  loss {p.loss:.4f}  batch acc {p.train_accuracy:.3f}  "
              f"nfe fwd {p.nfe_forward} bwd {p.nfe_backward}  {p.elapsed:6.1f}s", flush=True)

    result = train(config, on_report=report, data=data)
    print(f"test accuracy {result.test_accuracy:.4f}, train accuracy {result.train_accuracy:.4f}, "
          f"NFE per iteration {result.nfe_per_iteration:.1f}, {result.wall_time:.1f}s")
    print("\ncross-solver table (test set):")
    print(format_table(result.cross_solver_table(data), ["test_method", "test_steps", "test_tol", "factor", "accuracy", "nfe"]))
    if args.save:
        print(f"checkpoint: {save_checkpoint(args.save, last_state['fn']())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
