"""Several seeds of one configuration trained at once: ``train_seed_group(configs)``.

Plain PyTorch; knows nothing of Ray. The seeds' models are stacked into one
:class:`~tune_node.dense.StackedSphereClassifier` and trained with one optimizer on
the stacked weights, which amounts to separate training runs: each seed keeps its
own data, initial weights (those of ``build_model(..., seed)``), batch order and
optimizer state (Adam and SGD act elementwise, and the summed loss gives every
seed exactly its own gradient). Results, reports and checkpoints are per seed, and a
seed's checkpoint is the one :func:`~tune_node.training.train` would write, so it
resumes with either function.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from . import dense
from .datasets import BUILTIN_DATASETS, Dataset
from .evaluation import accuracy
from .models import build_model
from .solvers import SolverSetting
from .training import BatchSampler, Divergence, Progress, TrainConfig, TrainResult, make_optimizer, train, training_state

__all__ = ["groupable", "train_seed_group"]

GroupReportFn = Callable[[int, Progress, Callable[[], dict]], None]


def groupable(config: TrainConfig, input_shape: tuple[int, ...]) -> bool:
    """Whether seeds of ``config`` train as one stacked model: fixed-step backprop of the
    paper's model on a sphere short enough for the dense field (:data:`~tune_node.dense.DENSE_MAX_DIM`)."""
    s = config.solver
    info = BUILTIN_DATASETS.get(config.dataset)
    return (not s.is_adaptive and s.gradient == "backprop" and config.model is None
            and info is not None and info.family == "sphere"
            and len(input_shape) == 2 and input_shape[-1] <= dense.DENSE_MAX_DIM)


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
            diff = sorted(k for k in base if base[k] != other[k])
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

    Returns one :class:`~tune_node.training.TrainResult` per config, in order.
    Settings :func:`groupable` rejects (adaptive, adjoint, images, long spheres)
    train seed after seed with ``train``. Grouped, each seed's weights equal those
    of its own ``train`` run up to floating-point rounding; ``wall_time`` and
    ``elapsed`` are the group's. A seed whose loss stops being finite is marked as
    diverged at that iteration (as ``train`` does) while the others train on: seeds
    share no weights, so its non-finite values stay in its own slice; once every seed
    has diverged, training stops.
    """
    _check_group(configs)
    if resume_from is not None and len(resume_from) != len(configs):
        raise ValueError(f"resume_from has {len(resume_from)} states for {len(configs)} configs")
    if data is not None and len(data) != len(configs):
        raise ValueError(f"data has {len(data)} datasets for {len(configs)} configs")
    config = configs[0]
    device = torch.device(config.device)
    datasets = [(d or c.load_data()).to(device)
                for c, d in zip(configs, data or [None] * len(configs))]

    if len(configs) == 1 or not groupable(config, datasets[0].input_shape):
        results = []
        for i, (c, d) in enumerate(zip(configs, datasets)):
            report = None if on_report is None else (lambda p, s, i=i: on_report(i, p, s))
            results.append(train(c, on_report=report, resume_from=resume_from[i] if resume_from else None, data=d))
        return results
    return _train_stacked(configs, datasets, on_report, resume_from)


def _train_stacked(configs, datasets, on_report, resume_from) -> list[TrainResult]:
    start = time.perf_counter()
    config, n = configs[0], len(configs)
    device = torch.device(config.device)
    family, input_shape = datasets[0].family, datasets[0].input_shape
    model = dense.StackedSphereClassifier([build_model(family, input_shape, seed=c.seed) for c in configs]).to(device)
    params = model.stacked_parameters()
    optimizer = make_optimizer(config.optimizer, params, config.lr)
    samplers = [BatchSampler(len(d.y_train), config.batch_size, seed=c.seed) for c, d in zip(configs, datasets)]
    x_train = torch.stack([d.x_train for d in datasets])  # (seeds, N, 1, D)
    y_train = torch.stack([d.y_train for d in datasets])
    rows = torch.arange(n, device=device)[:, None]
    setting: SolverSetting = config.solver
    first = 1
    totals = [{"fwd": 0, "bwd": 0, "check": 0} for _ in configs]
    histories: list[list[dict]] = [[] for _ in configs]
    if resume_from is not None:
        first = _load_states(resume_from, model, optimizer, samplers, totals, histories, configs)
        start -= resume_from[0].get("elapsed", 0.0)

    def seed_model(i: int):
        m = build_model(family, input_shape).to(device)
        m.load_state_dict(model.model_state_dict(i))
        return m

    def state(i: int, iteration: int) -> dict:
        return training_state(configs[i], input_shape, iteration, model.model_state_dict(i),
                              _seed_optimizer_state(optimizer.state_dict(), i), samplers[i].state_dict(), setting,
                              totals[i], histories[i], time.perf_counter() - start)

    model.train()
    diverged: list[Divergence | None] = [None] * n
    for iteration in range(first, config.iterations + 1):
        idx = torch.stack([s.next() for s in samplers]).to(device)
        x, y = x_train[rows, idx], y_train[rows, idx]
        logits, sol = model(x, setting)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(n, -1).mean(1)
        if not bool(torch.isfinite(losses).all()):
            for i, loss in enumerate(losses.detach().tolist()):
                if diverged[i] is None and not math.isfinite(loss):
                    diverged[i] = Divergence(iteration, f"loss is {loss}")
            if all(diverged):
                break
        optimizer.zero_grad(set_to_none=True)
        # Seeds share no weights: the sum's gradient is each seed's own loss gradient.
        losses.sum().backward()
        optimizer.step()
        nfe_fwd, nfe_bwd = sol.nfe_forward, sol.nfe_backward
        for t, d in zip(totals, diverged):
            if d is None:  # a diverged seed's cost ends where its training did
                t["fwd"] += nfe_fwd
                t["bwd"] += nfe_bwd

        if iteration % config.report_every == 0 or iteration == config.iterations:
            test_now = config.test_every and (iteration % config.test_every == 0 or iteration == config.iterations)
            train_acc = (logits.detach().argmax(2) == y).float().mean(1)
            for i, d in enumerate(datasets):
                test_acc = accuracy(seed_model(i), d.x_test, d.y_test, setting, config.eval_batch_size)[0] if test_now else None
                progress = Progress(
                    iteration=iteration, loss=float(losses[i].detach()), train_accuracy=float(train_acc[i]),
                    nfe_forward=nfe_fwd, nfe_backward=nfe_bwd, setting=setting, steps=sol.steps,
                    total_nfe=totals[i]["fwd"] + totals[i]["bwd"], check_nfe=0,
                    elapsed=time.perf_counter() - start, test_accuracy=test_acc,
                )
                histories[i].append(progress.to_dict())
                if on_report is not None:
                    on_report(i, progress, lambda i=i, it=iteration: state(i, it))

    results = []
    for i, (c, d) in enumerate(zip(configs, datasets)):
        m = seed_model(i)
        if diverged[i] is None:
            test_acc, _ = accuracy(m, d.x_test, d.y_test, setting, c.eval_batch_size)
            train_acc, _ = accuracy(m, d.x_train, d.y_train, setting, c.eval_batch_size)
        else:
            test_acc = train_acc = float("nan")
        results.append(TrainResult(
            config=c, model=m, setting=setting, iterations=c.iterations if diverged[i] is None else diverged[i].iteration - 1,
            test_accuracy=test_acc, train_accuracy=train_acc, total_nfe_forward=totals[i]["fwd"],
            total_nfe_backward=totals[i]["bwd"], check_nfe=0, wall_time=time.perf_counter() - start,
            history=histories[i], diverged=diverged[i],
        ))
    return results


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


def _load_states(states, model, optimizer, samplers, totals, histories, configs) -> int:
    iterations = {s["iteration"] for s in states}
    if len(iterations) != 1:
        raise ValueError(f"resume states of a group must be at one iteration, got {sorted(iterations)}")
    for i, (s, c) in enumerate(zip(states, configs)):
        if s["config"]["seed"] != c.seed or s["config"]["dataset"] != c.dataset:
            raise ValueError(f"resume state {i} is of {s['config']['dataset']} seed {s['config']['seed']}, not of {c.dataset} seed {c.seed}")
        if s.get("controller") is not None:
            raise ValueError("a seed group cannot resume a run that had a solver controller")
    with torch.no_grad():
        for key, p in zip(model.keys, model.stacked_parameters()):
            p.copy_(torch.stack([s["model"][key] for s in states]))
    first = states[0]["optimizer"]
    stacked = {"state": {}, "param_groups": copy.deepcopy(first["param_groups"])}
    for key, s0 in first["state"].items():
        stacked["state"][key] = {name: torch.stack([s["optimizer"]["state"][key][name] for s in states]) if _is_per_seed(name, v) else _copy(v)
                                 for name, v in s0.items()}
    optimizer.load_state_dict(stacked)
    for sampler, s, t, h in zip(samplers, states, totals, histories):
        sampler.load_state_dict(s["sampler"])
        t.update(s["totals"])
        h.extend(s["history"])
    return states[0]["iteration"] + 1
