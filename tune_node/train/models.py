"""The paper's Neural ODE classifiers (Appendix D): one ODE block, one linear classifier.

The solver setting is an argument of every forward pass, so a model trained with
one solver can be evaluated with any other.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ode.integrate import Solution, fast_form, integrate
from ..ode.solvers import SolverSetting

__all__ = ["ConvODEField", "NeuralODEClassifier", "build_model", "build_for", "check_model_output", "MODEL_SHAPES"]

# dataset family -> (conv dimensionality, channels of the input, hidden channels, classes)
MODEL_SHAPES = {
    "sphere": (1, 1, 32, 2),
    "mnist": (2, 1, 96, 10),
    "cifar10": (2, 3, 128, 10),
}


class ConvODEField(nn.Module):
    """The autonomous vector field f(z): conv k1 + ReLU, conv k3 (pad 1) + ReLU, conv k1.

    Arguments:
        conv_dim: 1 for the spheres' ``(batch, 1, dim)`` signals, 2 for images.
        channels: channels of the state z.
        hidden: hidden channels.

    Attribute ``dense`` chooses the 1-d field's fast path (:mod:`tune_node.fast`, which
    registers it with :func:`~tune_node.ode.integrate.register_fast_form`): None (default)
    uses it for signals of length <= :data:`~tune_node.fast.dense.DENSE_MAX_DIM`, True
    always, False never. It changes speed only, not the parameters or the function (up
    to floating-point rounding).
    """

    #: Autonomous: called as ``field(z)`` (:func:`~tune_node.integrate.takes_time`).
    time_dependent = False

    def __init__(self, conv_dim: int, channels: int, hidden: int):
        super().__init__()
        conv = nn.Conv1d if conv_dim == 1 else nn.Conv2d
        self.conv1 = conv(channels, hidden, 1)
        self.conv2 = conv(hidden, hidden, 3, padding=1)
        self.conv3 = conv(hidden, channels, 1)
        self.dense: bool | None = None

    def prepare(self, z0: torch.Tensor):
        """The field in its registered fast form for states shaped like ``z0`` (a
        :class:`~tune_node.ode.integrate.PreparedField`), or None where the conv form is used."""
        registered = fast_form(type(self))
        return None if registered is None else registered(self, z0)

    def forward(self, z):
        z = torch.relu(self.conv1(z))
        z = torch.relu(self.conv2(z))
        return self.conv3(z)


class NeuralODEClassifier(nn.Module):
    """z(T) = ODESolve(f, x), logits = Linear(flatten(z(T))).

    Arguments:
        field: the ODE block's vector field: ``forward(z)`` (autonomous, the paper's) or
            ``forward(t, z)`` (time-dependent, torchdiffeq's convention).
        features: size of the flattened state.
        classes: number of classes.
    """

    def __init__(self, field: nn.Module, features: int, classes: int):
        super().__init__()
        self.field = field
        self.classifier = nn.Linear(features, classes)

    def solve(self, x: torch.Tensor, setting: SolverSetting, record_path: bool = False) -> Solution:
        """Integrate the ODE block from ``x``; the returned solution keeps the NFE."""
        return integrate(self.field, x, setting, record_path=record_path)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z.flatten(1))

    def forward(self, x: torch.Tensor, setting: SolverSetting) -> tuple[torch.Tensor, Solution]:
        """Logits and the ODE solution (for its NFE) of a batch under ``setting``."""
        sol = self.solve(x, setting)
        return self.classify(sol.z), sol


def _init_paper(module: nn.Module) -> None:
    # The reference implementation: Kaiming-normal (fan_in) weights, zero biases.
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in")
            nn.init.zeros_(m.bias)


def build_model(family: str, input_shape: tuple[int, ...], seed: int | None = None) -> NeuralODEClassifier:
    """The paper's model for a dataset family (``sphere``, ``mnist``, ``cifar10``).

    ``input_shape`` is one example's shape, e.g. ``(1, 2)`` for Sphere2 or
    ``(1, 28, 28)`` for MNIST. With ``seed`` the initial weights depend on the
    seed alone (a private generator; global RNG state is left untouched).
    """
    if family not in MODEL_SHAPES:
        raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(MODEL_SHAPES)}")
    conv_dim, channels, hidden, classes = MODEL_SHAPES[family]
    if len(input_shape) != conv_dim + 1 or input_shape[0] != channels:
        raise ValueError(f"{family} model needs examples of shape ({channels}, {'...' if conv_dim == 2 else 'dim'}), "
                         f"got {tuple(input_shape)}")
    features = 1
    for s in input_shape:
        features *= s
    if seed is None:
        model = NeuralODEClassifier(ConvODEField(conv_dim, channels, hidden), features, classes)
        _init_paper(model)
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NeuralODEClassifier(ConvODEField(conv_dim, channels, hidden), features, classes)
        _init_paper(model)
    return model


def build_for(data, *, model: str | None = None, seed: int | None = None, code_dir: str | None = None) -> NeuralODEClassifier:
    """The model a training run on ``data`` (a :class:`~tune_node.datasets.Dataset`) starts from.

    Arguments:
        data: the loaded dataset.
        model: None for the paper's model of a built-in dataset (:func:`build_model`), or a
            user's ``"module:function"``, called as ``function(data)``, which must return a
            :class:`NeuralODEClassifier`.
        seed: with it the initial weights depend on the seed alone: torch's global generator
            is seeded around a user's function (and restored afterwards).
        code_dir: the folder a user's module is looked for first.

    Raises :class:`~tune_node.user_code.UserCodeError` for a function that does not import
    or returns something else, ValueError for a user's dataset without a model.
    """
    if model is None:
        if data.family is None:
            raise ValueError(f"dataset {data.name!r} is not a built-in one, so it has no default model: name a model "
                             f"function ('module:function', model = ... in the search space) that builds a "
                             f"tune_node.models.NeuralODEClassifier for it")
        return build_model(data.family, data.input_shape, seed=seed)
    from ..data.user_code import UserCodeError, resolve_function

    build = resolve_function(model, code_dir=code_dir, what="model builder")
    if seed is None:
        built = build(data)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built = build(data)
    if not isinstance(built, NeuralODEClassifier):
        raise UserCodeError(f"model builder {model!r} returned a {type(built).__name__}, expected a "
                            f"tune_node.models.NeuralODEClassifier(field, features, classes)")
    return built


@torch.no_grad()
def check_model_output(model: NeuralODEClassifier, data, setting: SolverSetting, source: str = "the model") -> None:
    """Run ``model`` on two training examples under ``setting`` and check its logits' shape.

    Raises ValueError naming ``source``, the shape it gave and the ``(batch, classes)``
    expected (and lets the field's own errors, such as a wrong signature, surface here,
    before any training).
    """
    x = data.x_train[:2]
    try:
        logits, _ = model(x, setting)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{source} fails on two training examples of shape {tuple(x.shape)} under "
                         f"{setting.label()}: {type(err).__name__}: {err}") from err
    if tuple(logits.shape) != (len(x), data.classes):
        raise ValueError(f"{source} gives logits of shape {tuple(logits.shape)} for {len(x)} examples; expected "
                         f"({len(x)}, {data.classes}): one logit per class of dataset {data.name!r}")
