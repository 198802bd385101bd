"""Seeded Neural ODE training: ``train(config) -> TrainResult``.

Plain PyTorch; knows nothing of Ray. One seed fixes the data (generated sets and
splits), the initial weights and the batch order, so two runs with one seed and
one thread give bit-identical weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..data.datasets import BUILTIN_DATASETS, PAPER_TRAINING, TRAIN_SIZES, Dataset, check_dataset_name, load_dataset
from ..data.user_code import is_reference
from ..ode.integrate import SolverStepLimitError, StepSizeUnderflowError, steps_taken
from ..ode.solvers import SolverSetting
from .evaluation import accuracy, cross_solver_table, test_matrix, unevaluated_table
from .models import NeuralODEClassifier, build_for, build_model

__all__ = [
    "HYPERPARAMETERS",
    "TrainConfig",
    "SeedStack",
    "OneModel",
    "train_seeds",
    "Progress",
    "TrainResult",
    "Divergence",
    "SolverController",
    "train",
    "save_checkpoint",
    "load_checkpoint",
    "training_state",
    "gpu_features",
    "StaticStep",
]

#: The paper's training schedules per model family (Appendix D): the dataset registry's
#: :data:`~tune_node.datasets.PAPER_TRAINING`, under its former name.
HYPERPARAMETERS = PAPER_TRAINING
#: A user's dataset (``"module:function"``) has no paper values: it takes the small-data
#: (sphere) schedule unless its search space or config says otherwise.
USER_DATASET_DEFAULTS = HYPERPARAMETERS["sphere"]
OPTIMIZERS = ("adam", "sgd")
#: The GPU flags of :class:`TrainConfig` and their defaults (see :func:`gpu_features`).
GPU_FLAGS = (("cuda_graph", True), ("channels_last", True), ("tf32", False), ("amp", False))
#: Eager iterations (on a side stream) before a training iteration is captured as a CUDA graph.
GRAPH_WARMUP = 3


@dataclass
class TrainConfig:
    """What to train. ``None`` fields take the paper's value for the dataset (Appendix D).

    Arguments:
        dataset: one of :data:`~tune_node.datasets.DATASETS`, or a user's loader
            ``"module:function"`` (:func:`~tune_node.datasets.load_dataset`).
        solver: the train solver setting (for adaptation runs, the initial one).
        seed: fixes data, initial weights and batch order.
        iterations, batch_size, optimizer (``adam``/``sgd``), lr: training schedule.
        report_every: iterations between progress reports (and checkpoints).
        test_every: iterations between full test-set evaluations in reports; 0 = only at the end.
        eval_batch_size: batch size of evaluation passes.
        data_root, download: where torchvision's files are and whether to fetch them.
        device: torch device string: ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.
        model: None for the paper's model of a built-in dataset, or a user's builder
            ``"module:function"`` (:func:`~tune_node.models.build_for`).
        code_dir: the folder a user's modules are looked for first (a search space's folder).
        cuda_graph, channels_last, tf32, amp: GPU features, each a no-op on the CPU; what each
            does and when it applies: :func:`gpu_features`. Defaults: graphs and channels-last on
            (same arithmetic, rounding aside), TF32 and mixed precision off (both lower the
            precision of products).

    Guarantees: a constructed config is valid, checked before any data is loaded:
    integer fields are integers (numpy integers stored as ``int``; booleans refused),
    ``seed >= 0``, ``lr`` is a finite real > 0, ``batch_size`` is at most a built-in dataset's
    training set (:data:`~tune_node.datasets.TRAIN_SIZES`; a user's is checked when
    loaded), ``model`` is None or ``"module:function"``, the device parses (and CUDA
    exists if asked for), and the solver's test matrix can be built. Bad values raise
    ValueError naming the value and what is allowed.
    """

    dataset: str
    solver: SolverSetting
    seed: int = 0
    iterations: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    report_every: int = 100
    test_every: int = 0
    eval_batch_size: int = 1000
    data_root: str = "data"
    download: bool = False
    device: str = "cpu"
    model: str | None = None
    code_dir: str | None = None
    cuda_graph: bool = True
    channels_last: bool = True
    tf32: bool = False
    amp: bool = False

    def __post_init__(self):
        check_dataset_name(self.dataset)
        for name, _ in GPU_FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.model is not None and not is_reference(self.model):
            raise ValueError(f"model must be None (the paper's model of a built-in dataset) or 'module:function' "
                             f"naming your builder, got {self.model!r}")
        if isinstance(self.solver, dict):
            self.solver = SolverSetting.from_dict(self.solver)
        if not isinstance(self.solver, SolverSetting):
            raise TypeError(f"solver must be a SolverSetting, got {type(self.solver).__name__}")
        defaults = self.paper_defaults(self.dataset, self.solver)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        # bool is an Integral, but True where a count belongs is a mistake, not 1.
        minimum = {"seed": 0, "iterations": 1, "batch_size": 1, "report_every": 1, "eval_batch_size": 1, "test_every": 0}
        for name, least in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
            setattr(self, name, int(value))
        train_size = TRAIN_SIZES.get(self.dataset)
        if train_size is not None and self.batch_size > train_size:
            raise ValueError(f"batch_size {self.batch_size} is larger than the {self.dataset} training set; "
                             f"allowed: 1..{train_size}")
        if not (isinstance(self.lr, numbers.Real) and not isinstance(self.lr, bool) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}; allowed: a finite real number > 0")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"unknown device {self.device!r}; allowed: 'cpu', 'cuda', 'cuda:N'") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} requested but CUDA is not available; use device='cpu'")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"device {self.device!r} requested but there are {torch.cuda.device_count()} CUDA "
                                 f"device(s); allowed: 'cpu', 'cuda', 'cuda:0'..'cuda:{torch.cuda.device_count() - 1}'")
        try:
            # Evaluation after training builds these settings (steps x 2, tol x 0.1):
            # one that cannot exist would lose the trained model's results.
            test_matrix(self.solver)
        except ValueError as err:
            raise ValueError(f"train solver {self.solver.label()} cannot be evaluated after training: "
                             f"its test settings are invalid ({err})") from None

    @staticmethod
    def paper_defaults(dataset: str, solver: SolverSetting) -> dict:
        if dataset not in BUILTIN_DATASETS:
            return dict(USER_DATASET_DEFAULTS)
        return BUILTIN_DATASETS[dataset].paper_training(solver.is_adaptive)

    def to_dict(self) -> dict:
        """A plain dict :meth:`from_dict` reads back; ``model``, ``code_dir`` and the GPU flags
        only when not at their defaults, so configs of built-in studies (and their checkpoints)
        stay as they were."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["solver"] = self.solver.to_dict()
        for optional in ("model", "code_dir"):
            if d[optional] is None:
                del d[optional]
        for name, default in GPU_FLAGS:
            if d[name] is default:
                del d[name]
        return d

    def load_data(self) -> Dataset:
        """This config's dataset, loaded (seeded by ``seed``)."""
        return load_dataset(self.dataset, self.seed, self.data_root, self.download, code_dir=self.code_dir)

    def build_model(self, data: Dataset) -> NeuralODEClassifier:
        """The model this config's training starts from (initial weights fixed by ``seed``)."""
        return build_for(data, model=self.model, seed=self.seed, code_dir=self.code_dir)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**d)


@dataclass
class Progress:
    """What a report carries: the iteration just finished and its numbers.

    ``nfe_forward``/``nfe_backward`` are the train solver's evaluations of that
    iteration; ``check_nfe`` is the cumulative cost of solver checks (adaptation).
    """

    iteration: int
    loss: float
    train_accuracy: float
    nfe_forward: int
    nfe_backward: int
    setting: SolverSetting
    steps: int
    total_nfe: int
    check_nfe: int
    elapsed: float
    test_accuracy: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["setting"] = self.setting.to_dict()
        return d


class SolverController(Protocol):
    """Changes the train solver during training (the adaptation algorithms).

    ``update`` runs after the backward pass and before the optimizer step, on the
    iteration's batch, with the weights that produced ``logits``. It returns the
    setting for the next iteration and the function evaluations it spent.
    """

    def update(self, iteration: int, model: NeuralODEClassifier, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
               setting: SolverSetting) -> tuple[SolverSetting, int]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Divergence:
    """Why training stopped early: the first iteration whose loss was not finite.

    ``reason`` says what was seen (``"loss is nan"``, or the solver error that a model
    with non-finite weights ran into).
    """

    iteration: int
    reason: str

    def to_dict(self) -> dict:
        return {"iteration": self.iteration, "reason": self.reason}


def solver_failure_divergence(model: torch.nn.Module, iteration: int, err: Exception) -> Divergence | None:
    """A :class:`Divergence` when ``err`` (a solver's step-limit or underflow error) met a model
    whose weights are no longer finite: the adaptive solver failed because training diverged.
    None when the weights are finite: then the error is the solver's own, and stands."""
    if all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return None
    return Divergence(iteration, f"weights are not finite; the solver then failed: {err}")


@dataclass
class TrainResult:
    """The outcome of :func:`train`.

    A run that diverged (:attr:`diverged` set) stopped at that iteration; its
    accuracies are NaN and its model's weights are not finite.
    """

    config: TrainConfig
    model: NeuralODEClassifier
    setting: SolverSetting
    iterations: int
    test_accuracy: float
    train_accuracy: float
    total_nfe_forward: int
    total_nfe_backward: int
    check_nfe: int
    wall_time: float
    history: list[dict]
    diverged: Divergence | None = None

    @property
    def nfe_per_iteration(self) -> float:
        """All function evaluations of training (forward, backward and checks) per iteration."""
        return (self.total_nfe_forward + self.total_nfe_backward + self.check_nfe) / max(1, self.iterations)

    @property
    def forward_nfe_per_iteration(self) -> float:
        """Forward evaluations of training passes and checks per iteration."""
        return (self.total_nfe_forward + self.check_nfe) / max(1, self.iterations)

    def cross_solver_table(self, data: Dataset | None = None) -> list[dict]:
        """The paper's test matrix for this model at its final train setting (accuracy NaN
        and no evaluation when the run diverged)."""
        if self.diverged is not None:
            return unevaluated_table(self.setting)
        data = (data or self.config.load_data()).to(self.config.device)
        return cross_solver_table(self.model, data.x_test, data.y_test, self.setting, self.config.eval_batch_size)


class BatchSampler:
    """Seeded batches without replacement; a fresh permutation every epoch, last partial batch dropped.

    ``batch_size`` must be in ``1..n`` (ValueError naming both otherwise), so every
    batch has exactly ``batch_size`` examples.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        # A batch larger than the training set was once clamped silently: the run then
        # trained with another batch size than its config (and results) said.
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size {batch_size!r} does not fit a training set of {n} examples; allowed: 1..{n}")
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.empty(0, dtype=torch.int64)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.perm):
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.generator.set_state(s["generator"])
        self.perm, self.pos = s["perm"], s["pos"]


def make_optimizer(name: str, params, lr: float, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam or SGD; ``capturable`` Adam keeps its step count on the parameters' device, so its
    step can be captured in a CUDA graph (CUDA only)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, capturable=True) if capturable else torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def gpu_features(config: TrainConfig, device: torch.device | str | None = None,
                 controller: "SolverController | None" = None) -> dict[str, tuple[bool, str]]:
    """Which GPU features a training of ``config`` on ``device`` (default: ``config.device``) uses:
    ``{name: (on, why)}`` for ``cuda_graph``, ``channels_last``, ``tf32`` and ``amp``.

    - ``cuda_graph``: one training iteration (forward solve, loss, backward pass, optimizer
      step) captured as a CUDA graph after :data:`GRAPH_WARMUP` eager iterations and replayed,
      which removes the launch cost of every kernel (the small sphere fields launch hundreds
      of tiny ones per iteration). The same kernels in the same order; Adam runs as
      ``capturable`` (its step count a device tensor), which rounds its bias correction
      differently. For the paper's sphere models with a fixed-step backprop solve and no
      solver controller.
    - ``channels_last``: the paper's image models' weights and batches in NHWC layout, which cuDNN's
      fastest convolutions want. Same arithmetic, other summation orders: rounding only.
    - ``tf32``: matrix products and convolutions with TF32 inputs (10-bit mantissa, FP32
      accumulation) on tensor cores. Off: plain FP32, also for cuDNN (whose default is TF32).
    - ``amp``: the paper's image models' forward pass and loss under ``torch.autocast`` in
      bfloat16 (convolutions and products in bfloat16, the solver's sums and the loss in
      FP32): changes the solver's arithmetic. No loss scaling: bfloat16 has FP32's range.
    - ``tf32`` applies to every product of the training (a process-wide switch, restored after).

    On a CPU all are off (the CPU's results never depend on these flags).
    """
    device = torch.device(config.device if device is None else device)
    flags = {name: getattr(config, name) for name, _ in GPU_FLAGS}
    if device.type != "cuda":
        return {name: (False, f"device is {device.type}: {name} is CUDA only") for name in flags}
    builtin = BUILTIN_DATASETS.get(config.dataset) if config.model is None else None
    family = builtin.family if builtin is not None else None
    image = family in ("mnist", "cifar10")

    def image_only(name: str, on_text: str) -> tuple[bool, str]:
        if not flags[name]:
            return False, f"{name} is off"
        return (True, on_text) if image else (False, f"{name} is for the paper's image models only")

    out = {"channels_last": image_only("channels_last", "image model on CUDA: NHWC layout"),
           "tf32": (flags["tf32"], "tf32 is on" if flags["tf32"] else "tf32 is off: FP32 products and convolutions"),
           "amp": image_only("amp", "image model on CUDA: bfloat16 autocast")}
    if not flags["cuda_graph"]:
        graph = (False, "cuda_graph is off")
    elif family != "sphere":
        graph = (False, "graphs are for the paper's sphere models only")
    elif config.solver.is_adaptive or config.solver.gradient != "backprop":
        graph = (False, "graphs need a fixed-step backprop solve (the same kernels every iteration)")
    elif controller is not None:
        graph = (False, "a solver controller changes the solve between iterations")
    else:
        graph = (True, "fixed-step backprop sphere training on CUDA")
    return {"cuda_graph": graph, **out}


@contextlib.contextmanager
def _cuda_precision(features: dict, device: torch.device):
    """TF32 for CUDA products and convolutions as ``features`` say, restored afterwards (the
    switches are global to the process)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    on = features["tf32"][0]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _autocast(features: dict, device: torch.device):
    """A fresh autocast context for one forward pass where ``amp`` is on, else a no-op."""
    if device.type == "cuda" and features["amp"][0]:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class StaticStep:
    """One training iteration (forward solve, loss, backward pass, optimizer step) on static
    input buffers: what a CUDA graph replays.

    Each call copies the batch into the buffers and runs the iteration. With ``capture`` (CUDA
    only) the first ``warmup`` calls run eagerly on a side stream, the next one captures the
    iteration as a graph, and that call and all later ones replay it. Without ``capture``
    every call runs the iteration eagerly on the buffers, with the same results as
    :func:`train_seeds`' plain loop, bit for bit (the CPU's check of this path).

    Returns ``(logits detached, per-seed losses, solution)``; on replay these are the same
    tensors every call, refilled. The optimizer step is taken before the caller sees the
    losses (a graph cannot branch on them).
    """

    def __init__(self, seeds: "SeedStack", optimizer: torch.optim.Optimizer, setting: SolverSetting, capture: bool,
                 warmup: int = GRAPH_WARMUP, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.seeds, self.optimizer, self.setting = seeds, optimizer, setting
        self.capture, self.warmup, self.autocast = capture, warmup, autocast
        self.x = self.y = None
        self.graph = None
        self.outputs = None
        self.eager_runs = 0
        self.held = ()

    def _iteration(self):
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits, sol = self.seeds.forward(self.x, self.setting)
            losses, loss = self.seeds.losses(logits, self.y)
        loss.backward()
        self.optimizer.step()
        return logits.detach(), losses, sol

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        if self.x is None:
            self.x, self.y = x.clone(), y.clone()
        else:
            self.x.copy_(x)
            self.y.copy_(y)
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        if not self.capture:
            return self._iteration()
        current = torch.cuda.current_stream(x.device)
        if self.eager_runs < self.warmup:
            # torch's graph docs: warm up on a side stream, so lazy initialisations (cuBLAS
            # handles, the optimizer's state, the solve's buffers) are not captured.
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                out = self._iteration()
            current.wait_stream(side)
            self.eager_runs += 1
            return out
        from ..fast import dense_solve

        self.graph = torch.cuda.CUDAGraph()
        # Gradients set to None before capture are allocated in the graph's pool by backward().
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.outputs = self._iteration()
        # The graph writes into the fused solve's activation buffers: they must outlive it.
        self.held = dense_solve.held_buffers()
        self.graph.replay()
        return self.outputs


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write a training state (as passed to report callbacks) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash never leaves half a checkpoint
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a state written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    return torch.load(path, map_location="cpu", weights_only=False)


def restore_model(state: dict, device: str = "cpu") -> tuple[NeuralODEClassifier, SolverSetting, TrainConfig]:
    """The model, solver setting and config stored in a checkpoint state."""
    config = TrainConfig.from_dict(state["config"])
    if config.model is None and config.dataset in BUILTIN_DATASETS:
        model = build_model(BUILTIN_DATASETS[config.dataset].family, tuple(state["input_shape"]))
    else:  # a user's builder takes the dataset itself
        model = build_for(config.load_data(), model=config.model, code_dir=config.code_dir)
    model.load_state_dict(state["model"])
    return model.to(device), SolverSetting.from_dict(state["setting"]), config


def training_state(config: TrainConfig, input_shape, iteration: int, model_state: dict, optimizer_state: dict,
                   sampler_state: dict, setting: SolverSetting, totals: dict, history: list, elapsed: float,
                   controller_state: dict | None = None) -> dict:
    """The checkpoint format that :func:`train` resumes from, as a snapshot (deep copy):
    ``state_dict()``s alias live tensors that training keeps updating."""
    return copy.deepcopy({
        "config": config.to_dict(),
        "input_shape": list(input_shape),
        "iteration": iteration,
        "model": model_state,
        "optimizer": optimizer_state,
        "sampler": sampler_state,
        "setting": setting.to_dict(),
        "totals": dict(totals),
        "history": list(history),
        "elapsed": elapsed,
        "controller": controller_state,
    })


ReportFn = Callable[[Progress, Callable[[], dict]], None]
#: ``on_report(i, progress, state_fn)`` for seed ``i`` of a stack.
StackReportFn = Callable[[int, Progress, Callable[[], dict]], None]


class SeedStack(Protocol):
    """The models of S >= 1 seeds, trained by one loop (:func:`train_seeds`) as one.

    One seed is :class:`OneModel`; the paper's small sphere models stack into one batched
    model (:class:`tune_node.seed_groups.SphereStack`). Every seed keeps its own weights,
    data and batches: the stack's loss gradient is, for each seed, that seed's own.
    """

    size: int
    #: The module whose parameters train (its train/eval mode is the stack's).
    net: torch.nn.Module

    def parameters(self): ...

    def batch(self, idx: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch of every seed (``idx[i]``: seed ``i``'s example indices)."""

    def forward(self, x: torch.Tensor, setting: SolverSetting):
        """``(logits, solution)`` of a batch; the solution's NFE is each seed's."""

    def losses(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(per-seed losses (S,), detached; the scalar to differentiate)``."""

    def batch_accuracies(self, logits: torch.Tensor, y: torch.Tensor) -> list[float]: ...

    def model(self, i: int) -> NeuralODEClassifier:
        """Seed ``i``'s model as a :class:`~tune_node.models.NeuralODEClassifier` (for evaluation)."""

    def model_state(self, i: int) -> dict: ...

    def optimizer_state(self, stacked: dict, i: int) -> dict:
        """Seed ``i``'s part of the optimizer's state dict: what its own optimizer would hold."""

    def load(self, states: list[dict], optimizer: torch.optim.Optimizer) -> None:
        """Restore every seed's weights and optimizer state from its checkpoint state."""


class OneModel:
    """A stack of one seed: the model itself, trained as :func:`train` always trained it."""

    size = 1

    def __init__(self, config: TrainConfig, data: Dataset, device: torch.device):
        self.net = config.build_model(data).to(device)
        self.data = data

    def parameters(self):
        return self.net.parameters()

    def batch(self, idx):
        return self.data.x_train[idx[0]], self.data.y_train[idx[0]]

    def forward(self, x, setting):
        return self.net(x, setting)

    def losses(self, logits, y):
        loss = F.cross_entropy(logits, y)
        return loss.detach().view(1), loss

    def batch_accuracies(self, logits, y):
        return [float((logits.argmax(1) == y).float().mean())]

    def model(self, i):
        return self.net

    def model_state(self, i):
        return self.net.state_dict()

    def optimizer_state(self, stacked, i):
        return stacked

    def load(self, states, optimizer):
        self.net.load_state_dict(states[0]["model"])
        optimizer.load_state_dict(states[0]["optimizer"])


def train(
    config: TrainConfig,
    on_report: ReportFn | None = None,
    controller: SolverController | None = None,
    resume_from: dict | None = None,
    data: Dataset | None = None,
) -> TrainResult:
    """Train the model of ``config`` (the paper's for a built-in dataset, else ``config.model``).

    Arguments:
        config: what to train.
        on_report: called every ``config.report_every`` iterations and after the last
            with a :class:`Progress` and a function returning the full training state
            (for :func:`save_checkpoint`).
        controller: optional :class:`SolverController` that adapts the train solver.
        resume_from: a state from a checkpoint; training continues after its iteration
            exactly as if it had not stopped.
        data: the loaded dataset, to skip loading it again.

    Accuracy in reports is the current batch's; ``test_accuracy`` is exact over the
    whole test set. A loss that is not finite stops training at that iteration, before
    its optimizer step: the result's ``diverged`` says where and why, and nothing more
    is reported or evaluated. This is :func:`train_seeds` with one seed.
    """
    report = None if on_report is None else (lambda i, progress, state: on_report(progress, state))
    return train_seeds([config], on_report=report, controller=controller,
                       resume_from=None if resume_from is None else [resume_from],
                       data=None if data is None else [data])[0]


def train_seeds(
    configs: list[TrainConfig],
    *,
    stack: Callable[[list[TrainConfig], list[Dataset], torch.device], SeedStack] | None = None,
    on_report: StackReportFn | None = None,
    controller: SolverController | None = None,
    resume_from: list[dict] | None = None,
    data: list[Dataset] | None = None,
    static_step: bool | None = None,
) -> list[TrainResult]:
    """The training loop: S >= 1 seeds of one configuration, trained as one :class:`SeedStack`.

    Arguments:
        configs: one config per seed, equal but for ``seed`` (one config: any model).
        stack: keyword only: builds the stack from the configs, their datasets and the
            device; None: :class:`OneModel` (one seed only).
        on_report: ``on_report(i, progress, state_fn)`` for seed ``i`` at every report.
        controller: a :class:`SolverController` (one seed only), run after the backward
            pass and before the optimizer step.
        resume_from: one checkpoint state per seed, all at one iteration.
        data: the seeds' loaded datasets.
        static_step: run iterations through :class:`StaticStep` (True), the plain loop
            (False), or as :func:`gpu_features` decides (None: the graph path where
            ``cuda_graph`` is on). True on a CPU runs the graph path without capture.

    GPU features (:func:`gpu_features`) apply on CUDA only. On the graph path a stack whose
    every seed diverged has taken that iteration's optimizer step too (its weights are not
    finite either way).

    Returns one :class:`TrainResult` per seed, in order. Every seed keeps its own data,
    initial weights, batch order, optimizer state, reports and checkpoints (``train``'s
    format); a seed whose loss stops being finite is marked as diverged at that iteration
    while the others train on, and training stops once all have.
    """
    if not configs:
        raise ValueError("train_seeds needs at least one config")
    n, config = len(configs), configs[0]
    if stack is None and n != 1:
        raise ValueError(f"{n} seeds need a stack that trains them together (e.g. tune_node.seed_groups.SphereStack)")
    if controller is not None and n != 1:
        raise ValueError(f"a solver controller adapts one seed's solver; got {n} seeds (each may need other steps)")
    for name, given in (("resume_from", resume_from), ("data", data)):
        if given is not None and len(given) != n:
            raise ValueError(f"{name} has {len(given)} entries for {n} configs")
    device = torch.device(config.device)
    features = gpu_features(config, device, controller)
    with _cuda_precision(features, device):
        return _train_seeds(configs, stack, on_report, controller, resume_from, data, static_step, device, features)


def _train_seeds(configs, stack, on_report, controller, resume_from, data, static_step, device, features):
    n, config = len(configs), configs[0]
    start = time.perf_counter()
    datasets = [(d or c.load_data()).to(device) for c, d in zip(configs, data or [None] * n)]
    seeds = stack(configs, datasets, device) if stack is not None else OneModel(config, datasets[0], device)
    channels_last = features["channels_last"][0]
    if channels_last:
        seeds.net.to(memory_format=torch.channels_last)
    graph = features["cuda_graph"][0]
    static = graph if static_step is None else static_step
    if static and (controller is not None or config.solver.is_adaptive):
        raise ValueError("the static-buffer step needs a fixed-step solve without a solver controller")
    optimizer = make_optimizer(config.optimizer, seeds.parameters(), config.lr, capturable=static and graph)
    autocast = lambda: _autocast(features, device)  # noqa: E731
    step = StaticStep(seeds, optimizer, config.solver, capture=static and graph, autocast=autocast) if static else None
    samplers = [BatchSampler(len(d.y_train), config.batch_size, seed=c.seed) for c, d in zip(configs, datasets)]
    setting = config.solver
    first = 1
    totals = [{"fwd": 0, "bwd": 0, "check": 0} for _ in configs]
    histories: list[list[dict]] = [[] for _ in configs]
    if resume_from is not None:
        # Loaded optimizer tensors would otherwise be updated in place, spoiling a reused state.
        resume_from = copy.deepcopy(resume_from)
        _check_resume_states(resume_from, configs, controller)
        seeds.load(resume_from, optimizer)
        for sampler, s, t, h in zip(samplers, resume_from, totals, histories):
            sampler.load_state_dict(s["sampler"])
            t.update(s["totals"])
            h.extend(s["history"])
        setting = SolverSetting.from_dict(resume_from[0]["setting"])
        first = resume_from[0]["iteration"] + 1
        start -= resume_from[0].get("elapsed", 0.0)
        if controller is not None and resume_from[0].get("controller") is not None:
            controller.load_state_dict(resume_from[0]["controller"])

    def state(i: int, iteration: int) -> dict:
        return training_state(configs[i], datasets[i].input_shape, iteration, seeds.model_state(i),
                              seeds.optimizer_state(optimizer.state_dict(), i), samplers[i].state_dict(), setting,
                              totals[i], histories[i], time.perf_counter() - start,
                              controller.state_dict() if controller is not None else None)

    seeds.net.train()
    diverged: list[Divergence | None] = [None] * n

    def _report(iteration: int) -> None:
        # Reads the iteration's logits, losses, solution and setting from the loop's variables.
        if iteration % config.report_every == 0 or iteration == config.iterations:
            test_now = config.test_every and (iteration % config.test_every == 0 or iteration == config.iterations)
            batch_accuracies = seeds.batch_accuracies(logits.detach(), y)
            counts = sol.seed_counts(n)
            for i, d in enumerate(datasets):
                # A diverged seed (its weights no longer finite) has no accuracy, and an adaptive solve of it would fail.
                evaluate = test_now and diverged[i] is None
                test_acc = accuracy(seeds.model(i), d.x_test, d.y_test, setting, config.eval_batch_size)[0] if evaluate else None
                t = totals[i]
                progress = Progress(
                    iteration=iteration, loss=float(losses[i]), train_accuracy=batch_accuracies[i],
                    nfe_forward=counts[i][0], nfe_backward=counts[i][1], setting=used, steps=steps_taken(used, counts[i][0]),
                    total_nfe=t["fwd"] + t["bwd"] + t["check"], check_nfe=t["check"],
                    elapsed=time.perf_counter() - start, test_accuracy=test_acc,
                )
                histories[i].append(progress.to_dict())
                if on_report is not None:
                    on_report(i, progress, lambda i=i, it=iteration: state(i, it))

    def every_seed_diverged(losses: torch.Tensor, iteration: int) -> bool:
        """Marks the seeds whose loss at ``iteration`` is not finite; True once no seed trains on."""
        if bool(torch.isfinite(losses).all()):
            return False
        for i, value in enumerate(losses.tolist()):
            if diverged[i] is None and not math.isfinite(value):
                diverged[i] = Divergence(iteration, f"loss is {value}")
        return all(diverged)

    def name_failed_seed(err: Exception, iteration: int) -> None:
        position = getattr(err, "seed", None)
        if n > 1 and position is not None:  # a stack's solve names the position: say which seed
            err.args = (f"seed {configs[position].seed} of the group, iteration {iteration}: {err}",)

    def count_nfe(sol) -> None:
        for t, d, (forward, backward) in zip(totals, diverged, sol.seed_counts(n)):
            if d is None:  # a diverged seed's cost ends where its training did
                t["fwd"] += forward
                t["bwd"] += backward

    for iteration in range(first, config.iterations + 1):
        x, y = seeds.batch([s.next().to(device) for s in samplers])
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        used = setting
        if step is not None:
            logits, losses, sol = step(x, y)
            if every_seed_diverged(losses, iteration):
                break
            count_nfe(sol)
            _report(iteration)
            continue
        try:
            with autocast():
                logits, sol = seeds.forward(x, used)
                losses, loss = seeds.losses(logits, y)
        except (SolverStepLimitError, StepSizeUnderflowError) as err:
            diverged[0] = solver_failure_divergence(seeds.model(0), iteration, err) if n == 1 else None
            if diverged[0] is None:
                name_failed_seed(err, iteration)
                raise
            break
        if every_seed_diverged(losses, iteration):
            break
        optimizer.zero_grad(set_to_none=True)
        # Seeds share no weights: the loss's gradient is each seed's own loss gradient.
        while True:
            try:
                loss.backward()
                break
            except (SolverStepLimitError, StepSizeUnderflowError) as err:  # the adjoint's backward solve
                position = getattr(err, "seed", None)
                if n == 1 or position is None or diverged[position] is not None:
                    name_failed_seed(err, iteration)
                    raise
                # One seed's backward solve failed: its training ends here (its own run would stop with this
                # error) and the others redo the iteration without it: its weights become NaN, so solves leave it out.
                diverged[position] = Divergence(iteration, f"the adjoint's backward solve failed: {err}")
                with torch.no_grad():
                    for p in seeds.parameters():
                        p[position] = math.nan
                optimizer.zero_grad(set_to_none=True)
                with autocast():
                    logits, sol = seeds.forward(x, used)
                    losses, loss = seeds.losses(logits, y)
        if all(diverged):
            break
        count_nfe(sol)
        if controller is not None:
            setting, spent = controller.update(iteration, seeds.model(0), x, y, logits.detach(), used)
            totals[0]["check"] += spent
        optimizer.step()
        _report(iteration)

    results = []
    for i, (c, d) in enumerate(zip(configs, datasets)):
        model = seeds.model(i)
        if diverged[i] is None:
            test_acc, _ = accuracy(model, d.x_test, d.y_test, setting, c.eval_batch_size)
            train_acc, _ = accuracy(model, d.x_train, d.y_train, setting, c.eval_batch_size)
        else:
            test_acc = train_acc = float("nan")
        results.append(TrainResult(
            config=c, model=model, setting=setting,
            # A diverged run completed the iterations before the one whose loss was not finite.
            iterations=c.iterations if diverged[i] is None else diverged[i].iteration - 1,
            test_accuracy=test_acc, train_accuracy=train_acc, total_nfe_forward=totals[i]["fwd"],
            total_nfe_backward=totals[i]["bwd"], check_nfe=totals[i]["check"], wall_time=time.perf_counter() - start,
            history=histories[i], diverged=diverged[i],
        ))
    return results


def _check_resume_states(states: list[dict], configs: list[TrainConfig], controller) -> None:
    iterations = {s["iteration"] for s in states}
    if len(iterations) != 1:
        raise ValueError(f"resume states of a group must be at one iteration, got {sorted(iterations)}")
    for i, (s, c) in enumerate(zip(states, configs)):
        if s["config"]["seed"] != c.seed or s["config"]["dataset"] != c.dataset:
            raise ValueError(f"resume state {i} is of {s['config']['dataset']} seed {s['config']['seed']}, not of "
                             f"{c.dataset} seed {c.seed}")
        if len(states) > 1 and s.get("controller") is not None:
            raise ValueError("a seed group cannot resume a run that had a solver controller")
