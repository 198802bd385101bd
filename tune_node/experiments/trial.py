"""One trial of a study: one seed at one setting, from the search space to the results table.

A :class:`Trial` is what a grid or an adaptation experiment plans, what ``grid.json``
and ``adapt.json`` record, what a Ray trial config carries (as :meth:`Trial.to_dict`),
what the trainable trains and what ``final.json`` names. Its dict form is flat and
JSON-friendly, and for the paper's studies it is exactly the form earlier versions
wrote, so recorded experiments resume and give the same trial names and tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..ode.solvers import SolverSetting
from ..train.training import GPU_FLAGS, TrainConfig

__all__ = ["Adaptation", "Trial", "TRAINING_KEYS", "GPU_KEYS"]

#: The training fields a trial carries (those of :class:`~tune_node.training.TrainConfig`
#: besides dataset, solver, device, the user's code and the GPU flags), all resolved.
TRAINING_KEYS = ("seed", "iterations", "lr", "batch_size", "optimizer", "report_every", "test_every", "eval_batch_size",
                 "data_root", "download")
#: TrainConfig's GPU flags (:data:`~tune_node.training.GPU_FLAGS`): a trial carries one only where
#: it is not at its default, so the records, trial names and tables of other trials stay as they were.
GPU_KEYS = tuple(name for name, _ in GPU_FLAGS)
_GPU_DEFAULTS = dict(GPU_FLAGS)
_ADAPTATION_KEYS = ("threshold", "k", "initial_tol", "gradient", "mode", "method", "test_method")
# Step mode's open choices and their defaults (Adaptation's), carried only where they differ.
_STEP_CHOICES = {"check_size": None, "initial_rtol": 1e-3, "initial_atol": 1e-3}


@dataclass(frozen=True)
class Adaptation:
    """How an adaptation trial adapts its train solver (Algorithms 2 and 3).

    Arguments:
        mode: ``"step"`` (the step size of a fixed-step method) or ``"tolerance"``.
        method, test_method: the train solver and the more accurate one it is checked against.
        k: iterations between checks.
        threshold: largest batch-accuracy difference counted as agreement.
        initial_tol: the starting tolerance (tolerance mode; step mode starts from the
            Hairer-Norsett-Wanner step on the first batch).
        gradient: the train solver's gradient mode.
        check_size, initial_rtol, initial_atol: step mode's choices the paper leaves open
            (:meth:`~tune_node.adaptation.StepAdaptation.for_training`): checks on a fixed subset of
            ``check_size`` training points (None: the iteration's batch, the paper's reading) and the
            starting step's norm weights. A trial's dict carries them only where they differ from
            these defaults, so the records and names of other trials stay as they were.
    """

    mode: str
    method: str
    test_method: str
    k: int
    threshold: float
    initial_tol: float
    gradient: str = "backprop"
    check_size: int | None = None
    initial_rtol: float = 1e-3
    initial_atol: float = 1e-3

    def controller(self, config: TrainConfig, data=None):
        """``(config, controller)``: ``config`` at the controller's starting setting, and the
        :class:`~tune_node.adaptation.StepAdaptation` or :class:`~tune_node.adaptation.ToleranceAdaptation`
        at its starting value (step mode: Hairer, Norsett & Wanner's step on the first batch of
        ``data``; tolerance mode: ``initial_tol``). Raises ValueError on invalid parameters."""
        from ..train.adaptation import StepAdaptation, ToleranceAdaptation

        kwargs = {"test_method": self.test_method, "k": self.k, "threshold": self.threshold}
        if self.mode == "step":
            return StepAdaptation.for_training(config, data=data, rtol=self.initial_rtol, atol=self.initial_atol,
                                               check_size=self.check_size, **kwargs)
        return ToleranceAdaptation.for_training(config, tol=self.initial_tol, **kwargs)

    def starting_setting(self) -> SolverSetting:
        """A placeholder train setting of the right kind; the controller replaces it with its starting one.
        It fixes the paper's training defaults (MNIST trains adaptive solvers with Adam)."""
        if self.mode == "step":
            return SolverSetting.fixed(self.method, 1, self.gradient)
        return SolverSetting.adaptive(self.method, self.initial_tol, self.gradient)


@dataclass(frozen=True)
class Trial:
    """One seed of one study setting.

    Arguments:
        experiment: the experiment's name.
        dataset: a built-in dataset's name or a user's ``"module:function"``.
        seed: fixes data, initial weights and batch order.
        training: the resolved training fields (:data:`TRAINING_KEYS` but ``seed``), and those of
            :data:`GPU_KEYS` not at their defaults (one at its default is dropped).
        solver: the train setting (a grid trial); None for an adaptation trial.
        adaptation: how the solver adapts (an adaptation trial); None for a grid trial.
        model, code_dir: a user's model builder and the folder of their modules (None: the paper's).

    Guarantees: exactly one of ``solver`` and ``adaptation`` is set; :meth:`from_dict`
    of :meth:`to_dict` gives an equal trial.
    """

    experiment: str
    dataset: str
    seed: int
    training: dict = field(hash=False)
    solver: SolverSetting | None = None
    adaptation: Adaptation | None = None
    model: str | None = None
    code_dir: str | None = None

    def __post_init__(self):
        if (self.solver is None) == (self.adaptation is None):
            raise ValueError("a trial has either a train solver (grid) or an adaptation, not both nor neither")
        training = _without_default_flags(self.training)
        if len(training) != len(self.training):
            # A GPU flag at its default is no flag: the trial equals (and records as) the trial without it.
            object.__setattr__(self, "training", training)

    def train_config(self, device: str = "cpu") -> TrainConfig:
        """The :class:`~tune_node.training.TrainConfig` this trial trains (an adaptation trial's at
        its placeholder starting setting, which the controller replaces)."""
        setting = self.solver if self.adaptation is None else self.adaptation.starting_setting()
        return TrainConfig(dataset=self.dataset, solver=setting, seed=self.seed, device=device, model=self.model,
                           code_dir=self.code_dir, **self.training)

    def user_code(self) -> dict:
        return {k: v for k, v in (("model", self.model), ("code_dir", self.code_dir)) if v is not None}

    def to_dict(self) -> dict:
        """The flat, JSON-friendly form (a Ray trial config's ``"trial"``, a record's entry)."""
        training = {k: self.training[k] for k in TRAINING_KEYS if k != "seed"}
        training.update({k: self.training[k] for k in GPU_KEYS if k in self.training})
        if self.adaptation is None:
            s = self.solver
            return {"experiment": self.experiment, "dataset": self.dataset, "method": s.method, "steps": s.steps,
                    "tol": s.tol, "gradient": s.gradient, **({"max_steps": s.max_steps} if s.max_steps is not None else {}),
                    "seed": self.seed, **training, **self.user_code()}
        a = self.adaptation
        chosen = {k: getattr(a, k) for k, default in _STEP_CHOICES.items() if getattr(a, k) != default}
        return {"experiment": self.experiment, "dataset": self.dataset, "steps": None, "tol": None,
                **{k: getattr(a, k) for k in _ADAPTATION_KEYS}, **chosen, "seed": self.seed, **training, **self.user_code()}

    @classmethod
    def from_dict(cls, d: dict) -> "Trial":
        """The trial of a :meth:`to_dict` dict (also of the configs earlier versions recorded)."""
        # Records from before the GPU flags, and trials at their defaults, carry none.
        training = {k: d[k] for k in TRAINING_KEYS if k != "seed"}
        training.update({k: d[k] for k in GPU_KEYS if k in d})
        common = {"experiment": d["experiment"], "dataset": d["dataset"], "seed": d["seed"], "training": training,
                  "model": d.get("model"), "code_dir": d.get("code_dir")}
        if "mode" in d:
            return cls(**common, adaptation=Adaptation(**{k: d[k] for k in _ADAPTATION_KEYS},
                                                       **{k: d[k] for k in _STEP_CHOICES if k in d}))
        solver = SolverSetting(d["method"], steps=d["steps"], tol=d["tol"], gradient=d["gradient"], max_steps=d.get("max_steps"))
        return cls(**common, solver=solver)

    @classmethod
    def of(cls, experiment: str, config: TrainConfig, adaptation: Adaptation | None = None) -> "Trial":
        """The trial of a resolved config: its solver (a grid trial) or ``adaptation``."""
        training = {k: getattr(config, k) for k in TRAINING_KEYS if k != "seed"}
        training.update({k: getattr(config, k) for k in GPU_KEYS})  # those at their defaults are dropped
        return cls(experiment, config.dataset, config.seed, training, solver=None if adaptation else config.solver,
                   adaptation=adaptation, model=config.model, code_dir=config.code_dir)


def _without_default_flags(training: dict) -> dict:
    """``training`` less the GPU flags at their defaults (identity: ``1`` is no ``True``, and TrainConfig refuses it)."""
    return {k: v for k, v in training.items() if not (k in _GPU_DEFAULTS and v is _GPU_DEFAULTS[k])}
