"""Train one Neural ODE and print its cross-solver table: ``python -m tune_node.train_one``.

Example::

    python -m tune_node.train_one --dataset sphere2 --method euler --steps 8 --iterations 2000
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..data.datasets import check_data_available, load_dataset
from ..train.training import TrainConfig, save_checkpoint, train
from .common import UsageError, fail, format_table, solver_from_args
from .options import train_one_parser, training_overrides


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot train here (None if it can): not a torch device string, a kind
    of device this project does not train on, or one this machine lacks."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    allowed = "cpu, cuda or cuda:N (N a GPU index, with CUDA)" + (", mps" if mps else "")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device {device!r} is not a device; allowed: {allowed}"
    if parsed.type not in ("cpu", "cuda", "mps") or (parsed.type == "mps" and not mps):
        return f"--device {device!r} cannot train here; allowed: {allowed}"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {device!r} requested, but CUDA is not available on this machine; use --device cpu"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return (f"--device {device!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                    f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return None


def save_problem(save: str) -> str | None:
    """Why the checkpoint could not be written to ``save`` after training (None if it can): tried now,
    by creating a scratch file there (removed again, with any folder made for it)."""
    path = Path(save)
    if path.is_dir():
        return f"--save {save} is a folder; give the checkpoint's file path (e.g. {path / 'model.pt'})"
    made = [p for p in path.parents if not p.exists()]
    probe = path.with_suffix(path.suffix + ".tmp")  # the name save_checkpoint writes first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not probe.exists():  # else a stale scratch file: writing over it is save_checkpoint's business
            probe.open("xb").close()
            probe.unlink()
    except (FileExistsError, NotADirectoryError) as err:
        return f"--save {save} cannot be written: {err.filename} is a file, not a folder; give a path in a writable folder"
    except OSError as err:
        return f"--save {save} cannot be written ({err.strerror or err}: {err.filename}); give a path in a writable folder"
    finally:
        for folder in made:  # deepest first; save_checkpoint makes them again
            try:
                folder.rmdir()
            except OSError:
                break
    return None


def main(argv: list[str] | None = None) -> int:
    parser = train_one_parser()
    args = parser.parse_args(argv)
    setting = solver_from_args(parser, args)
    try:
        training = training_overrides(args, ("iterations", "lr", "batch_size", "report_every"))
    except UsageError as err:
        return fail(err)
    # Refused before training, whose model would otherwise be lost or never start.
    problem = ((f"--threads must be an integer >= 1, got {args.threads}" if args.threads < 1 else None)
               or device_problem(args.device) or (save_problem(args.save) if args.save else None))
    if problem:
        return fail(problem)
    try:
        config = TrainConfig(dataset=args.dataset, solver=setting, seed=args.seed, data_root=args.data_root,
                             download=args.download, device=args.device, **training)
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    try:
        check_data_available(config.dataset, config.data_root, config.download)
        data = load_dataset(config.dataset, config.seed, config.data_root, config.download)
    except (FileNotFoundError, ImportError) as err:
        return fail(err)
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
