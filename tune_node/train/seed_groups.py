"""Several seeds of one configuration trained at once: ``train_seed_group(configs)``.

Plain PyTorch; knows nothing of Ray. The seeds' models are stacked into one model
(:class:`SphereStack` for the paper's small spheres: a
:class:`~tune_node.fast.dense.StackedSphereClassifier`; :class:`FuncStack` for a user's
model: ``torch.func``) and trained by the one training loop
(:func:`~tune_node.training.train_seeds`) with one optimizer on the stacked weights,
which amounts to separate training runs: each seed keeps its own data, initial weights,
batch order and optimizer state (Adam and SGD act elementwise, and the summed loss gives
every seed exactly its own gradient). Results, reports and checkpoints are per seed, and a
seed's checkpoint is the one :func:`~tune_node.training.train` would write, so it
resumes with either function.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ..data.datasets import BUILTIN_DATASETS, Dataset
from ..fast import dense
from ..ode.integrate import Solution, adaptive_solver
from ..ode.solvers import SolverSetting
from .models import build_model
from .training import Progress, TrainConfig, TrainResult, train, train_seeds

__all__ = ["groupable", "stack_for", "stackable", "train_seed_group", "SphereStack", "FuncStack"]

GroupReportFn = Callable[[int, Progress, Callable[[], dict]], None]


def stack_for(config: TrainConfig, input_shape: tuple[int, ...]):
    """The :class:`~tune_node.training.SeedStack` class that trains seeds of ``config`` as one
    model, or None (they train seed after seed).

    Backprop, and the adjoint of adaptive methods: the paper's model on a sphere short enough for
    the dense field (:data:`~tune_node.fast.dense.DENSE_MAX_DIM`) stacks as :class:`SphereStack`,
    fixed-step or adaptive (each seed with its own step control, forward and in the adjoint's
    backward solve, :func:`~tune_node.ode.integrate.integrate_seeds`, unless
    ``TUNE_NODE_ADAPTIVE_SOLVER=torchdiffeq``); a user's model (``config.model``) as
    :class:`FuncStack`, fixed-step backprop only, where :func:`stackable` says it can.
    """
    s = config.solver
    if s.gradient != "backprop" and not (s.is_adaptive and s.gradient == "adjoint" and config.model is None):
        return None
    if s.is_adaptive and (config.model is not None or s.spec.embedded is None or adaptive_solver() != "tune_node"):
        return None
    if config.model is not None:
        return FuncStack if stackable(config) else None
    info = BUILTIN_DATASETS.get(config.dataset)
    if info is not None and info.family == "sphere" and len(input_shape) == 2 and input_shape[-1] <= dense.DENSE_MAX_DIM:
        return SphereStack
    return None


def stackable(config: TrainConfig) -> bool:
    """Whether two seeds of ``config``'s user model train as one :class:`FuncStack`: the model
    has no buffers (batch norm's running statistics would need per-seed updates) and one
    stacked training step on two examples runs (``vmap`` refuses, for instance, dropout's
    random numbers). Tried once per dataset, model, folder and solver setting."""
    return _stacks(config.dataset, config.model, config.code_dir, config.data_root, config.download,
                   config.solver.method, config.solver.steps)


@lru_cache(maxsize=None)
def _stacks(dataset, model, code_dir, data_root, download, method, steps) -> bool:
    configs = [TrainConfig(dataset=dataset, solver=SolverSetting.fixed(method, steps), seed=seed, model=model,
                           code_dir=code_dir, data_root=data_root, download=download, batch_size=2) for seed in (0, 1)]
    try:
        data = [c.load_data() for c in configs]
        stack = FuncStack(configs, data, torch.device("cpu"))
        x, y = stack.batch([torch.arange(2), torch.arange(2)])
        logits, _ = stack.forward(x, configs[0].solver)
        stack.losses(logits, y)[1].backward()
    except Exception:  # noqa: BLE001 - whatever fails here trains seed by seed instead
        return False
    return True


def groupable(config: TrainConfig, input_shape: tuple[int, ...]) -> bool:
    """Whether seeds of ``config`` train as one stacked model (:func:`stack_for`)."""
    return stack_for(config, input_shape) is not None


def _check_group(configs: list[TrainConfig]) -> None:
    if not configs:
        raise ValueError("train_seed_group needs at least one config")
    if not all(isinstance(c, TrainConfig) for c in configs):
        raise TypeError("train_seed_group takes a list of TrainConfig")
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds of a group must differ, got {seeds}")
    base = {k: v for k, v in configs[0].to_dict().items() if k != "seed"}
    for c in configs[1:]:
        other = {k: v for k, v in c.to_dict().items() if k != "seed"}
        if other != base:
            # to_dict leaves out fields at their defaults, so one side may lack a key.
            diff = sorted(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
            raise ValueError(f"configs of a seed group may differ only in seed; seed {c.seed} differs in {', '.join(diff)}")


def train_seed_group(
    configs: list[TrainConfig],
    on_report: GroupReportFn | None = None,
    resume_from: list[dict] | None = None,
    data: list[Dataset] | None = None,
) -> list[TrainResult]:
    """Train one configuration under several seeds, as one batched model where it pays.

    Arguments:
        configs: one :class:`~tune_node.training.TrainConfig` per seed, equal except
            for ``seed``.
        on_report: called as ``on_report(i, progress, state_fn)`` for seed ``configs[i]``
            at the iterations :func:`~tune_node.training.train` reports at;
            ``state_fn()`` returns that seed's full state in ``train``'s checkpoint format.
        resume_from: one checkpoint state per seed (all at one iteration), as
            ``state_fn`` returns them; training continues as if it had not stopped.
        data: the seeds' loaded datasets, to skip loading them again.

    Returns one :class:`~tune_node.training.TrainResult` per config, in order. Where
    :func:`stack_for` allows, the seeds train as one :class:`SphereStack` or :class:`FuncStack`
    through the one training loop, :func:`~tune_node.training.train_seeds`; other settings
    (fixed-step adjoint, adaptive ones of a user's model, of a method without an embedded pair or
    with ``TUNE_NODE_ADAPTIVE_SOLVER=torchdiffeq``, images, long spheres, a user's model that does not stack) train seed
    after seed with ``train``. Grouped, each seed's weights equal those of its own ``train``
    run up to floating-point rounding (bit for bit on CPU in the tests); ``wall_time`` and
    ``elapsed`` are the group's. A seed whose loss stops being finite is marked as diverged
    at that iteration (as ``train`` does) while the others train on: seeds share no weights,
    so its non-finite values stay in its own slice; once every seed has diverged, training stops.
    A seed whose adjoint backward solve fails (step cap, underflow) is marked diverged the same
    way, the error as its reason, and the others redo that iteration without it (alone, its run
    would stop with that error).
    """
    _check_group(configs)
    if resume_from is not None and len(resume_from) != len(configs):
        raise ValueError(f"resume_from has {len(resume_from)} states for {len(configs)} configs")
    if data is not None and len(data) != len(configs):
        raise ValueError(f"data has {len(data)} datasets for {len(configs)} configs")
    config = configs[0]
    device = torch.device(config.device)
    datasets = [(d or c.load_data()).to(device) for c, d in zip(configs, data or [None] * len(configs))]

    stack = stack_for(config, datasets[0].input_shape)
    if len(configs) == 1 or stack is None:
        results = []
        for i, (c, d) in enumerate(zip(configs, datasets)):
            report = None if on_report is None else (lambda p, s, i=i: on_report(i, p, s))
            results.append(train(c, on_report=report, resume_from=resume_from[i] if resume_from else None, data=d))
        return results
    return train_seeds(configs, stack=stack, on_report=on_report, resume_from=resume_from, data=datasets)


class _StackedData:
    """What every stack of S > 1 seeds shares: the seeds' training sets stacked, batches
    gathered per seed, per-seed losses (their sum is differentiated: seeds share no weights)
    and accuracies, and each seed's slice of the stacked optimizer's state."""

    def __init__(self, datasets: list[Dataset], device: torch.device):
        self.size = len(datasets)
        self.x_train = torch.stack([d.x_train for d in datasets])  # (seeds, N, *input_shape)
        self.y_train = torch.stack([d.y_train for d in datasets])
        self.rows = torch.arange(self.size, device=device)[:, None]

    def batch(self, idx):
        idx = torch.stack(idx)
        return self.x_train[self.rows, idx], self.y_train[self.rows, idx]

    def losses(self, logits, y):
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(self.size, -1).mean(1)
        return losses.detach(), losses.sum()

    def batch_accuracies(self, logits, y):
        return (logits.argmax(2) == y).float().mean(1).tolist()

    def optimizer_state(self, stacked, i):
        return _seed_optimizer_state(stacked, i)


class SphereStack(_StackedData):
    """The paper's sphere models of S seeds as one :class:`~tune_node.dense.StackedSphereClassifier`
    (a :class:`~tune_node.training.SeedStack`): batched matrix products, one optimizer over the
    stacked weights (Adam and SGD act elementwise, so it equals S separate optimizers)."""

    def __init__(self, configs: list[TrainConfig], datasets: list[Dataset], device: torch.device):
        super().__init__(datasets, device)
        self.family, self.input_shape, self.device = datasets[0].family, datasets[0].input_shape, device
        self.net = dense.StackedSphereClassifier([build_model(self.family, self.input_shape, seed=c.seed)
                                                  for c in configs]).to(device)

    def parameters(self):
        return self.net.stacked_parameters()

    def forward(self, x, setting):
        return self.net(x, setting)

    def model(self, i):
        m = build_model(self.family, self.input_shape).to(self.device)
        m.load_state_dict(self.net.model_state_dict(i))
        return m

    def model_state(self, i):
        return self.net.model_state_dict(i)

    def load(self, states, optimizer):
        with torch.no_grad():
            for key, p in zip(self.net.keys, self.net.stacked_parameters()):
                p.copy_(torch.stack([s["model"][key] for s in states]))
        _load_optimizer_states(states, optimizer)


class FuncStack(_StackedData):
    """S seeds of a user's model (one architecture, no buffers) as one, through ``torch.func``
    (a :class:`~tune_node.training.SeedStack`): the weights stacked with
    ``stack_module_state``, the forward pass ``vmap``-ed over ``functional_call``, one
    optimizer over the stacked weights. Fixed-step backprop solves only (an adaptive solve's
    step control depends on the data, which ``vmap`` cannot batch)."""

    def __init__(self, configs: list[TrainConfig], datasets: list[Dataset], device: torch.device):
        super().__init__(datasets, device)
        self.models = [c.build_model(d).to(device) for c, d in zip(configs, datasets)]
        if any(True for _ in self.models[0].buffers()):
            raise ValueError(f"model {configs[0].model!r} has buffers (batch norm, say): its seeds cannot be stacked; "
                             f"train one seed per trial (--no-seed-groups)")
        params, _ = stack_module_state(self.models)
        self.names = list(params)
        self.template = copy.deepcopy(self.models[0]).to("meta")
        self.net = nn.ParameterList([nn.Parameter(params[name]) for name in self.names])
        self.stacked = list(self.net)

    def parameters(self):
        return self.stacked

    def forward(self, x, setting):
        counters = []

        def one(weights, xi):
            logits, solution = functional_call(self.template, dict(zip(self.names, weights)), (xi, setting))
            counters.append(solution.counter)
            return logits

        logits = vmap(one)(tuple(self.stacked), x)
        # The one traced solve's counts are each seed's.
        return logits, Solution(logits, setting, counters[0])

    def model(self, i):
        m = copy.deepcopy(self.models[i])
        m.load_state_dict(self.model_state(i))
        return m

    def model_state(self, i):
        return {name: p[i].detach().clone() for name, p in zip(self.names, self.stacked)}

    def load(self, states, optimizer):
        with torch.no_grad():
            for name, p in zip(self.names, self.stacked):
                p.copy_(torch.stack([s["model"][name] for s in states]))
        _load_optimizer_states(states, optimizer)


def _load_optimizer_states(states: list[dict], optimizer: torch.optim.Optimizer) -> None:
    """Load the seeds' optimizer states (``train``'s format) into the stacked optimizer."""
    first = states[0]["optimizer"]
    stacked = {"state": {}, "param_groups": copy.deepcopy(first["param_groups"])}
    for key, s0 in first["state"].items():
        stacked["state"][key] = {name: torch.stack([s["optimizer"]["state"][key][name] for s in states])
                                 if _is_per_seed(name, v) else _copy(v) for name, v in s0.items()}
    optimizer.load_state_dict(stacked)


def _is_per_seed(name: str, value) -> bool:
    # Optimizer state: moments are shaped like their parameter (stacked: one slice per
    # seed); Adam's shared step count is a scalar.
    return torch.is_tensor(value) and value.dim() > 0 and name != "step"


def _copy(value):
    return value.clone() if torch.is_tensor(value) else copy.deepcopy(value)


def _seed_optimizer_state(stacked: dict, i: int) -> dict:
    """Seed ``i``'s slice of the stacked optimizer's state dict: what its own
    optimizer over ``model.parameters()`` would hold (same parameter order)."""
    state = {key: {name: v[i].clone() if _is_per_seed(name, v) else _copy(v) for name, v in s.items()}
             for key, s in stacked["state"].items()}
    return {"state": state, "param_groups": copy.deepcopy(stacked["param_groups"])}
