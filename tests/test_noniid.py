"""Non-IID data of L2C (issue 17, item 4; Li et al., CVPR 2022, Fig. 2 and Fig. 4): the shard
and task splits, each node's 80/20 split and epochs, its test accuracy, layout independence and
bad input, on tiny synthetic IDX files (the real data is not needed)."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    CLASSES,
    SIDE,
    TEST_PER_CLASS,
    TRAIN_PER_CLASS,
    noniid_config,
    run_local,
    write_images,
    write_omniglot,
)

from dmeta import noniid
from dmeta.algorithms.diffusion import LocalTraining
from dmeta.config import NonIIDConfig
from dmeta.engine import Engine
from dmeta.errors import DmetaError
from dmeta.exchange import LocalExchange
from dmeta.runner import build_model, plan_run


@pytest.fixture
def images(tmp_path) -> Path:
    return write_images(tmp_path / "data")


def build_task(config) -> noniid.NonIIDTask:
    return noniid.NonIIDTask(config.noniid, config.agents, config.seed, torch.float64, "cpu")


def labels(count: int = TRAIN_PER_CLASS) -> np.ndarray:
    return np.tile(np.arange(CLASSES), count)


def test_idx_files_read_gzipped_or_plain_and_bad_ones_give_one_line(tmp_path) -> None:
    for gz in (True, False):
        data = noniid.load_idx_folder(write_images(tmp_path / str(gz), gz))
        assert data.train_images.shape == (CLASSES * TRAIN_PER_CLASS, SIDE, SIDE)
        assert data.classes == CLASSES and len(data.test_labels) == CLASSES * TEST_PER_CLASS
    bad = tmp_path / "bad"
    write_images(bad)
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x09ab"))
    with pytest.raises(DmetaError, match="IDX sizes \\[9\\] do not match") as error:
        noniid.load_idx_folder(bad)
    assert "\n" not in str(error.value)
    with pytest.raises(DmetaError, match="has no train-images-idx3-ubyte"):
        noniid.load_idx_folder(tmp_path / "missing")


def test_omniglot_folder_or_zip_reads_each_character_as_a_class(tmp_path) -> None:
    """Six characters of 4 drawings at 28 x 28: the last test_images_per_class drawings of each
    are its test images, the rest its training images; a zip reads the same; a path that is
    neither IDX files nor Omniglot gives one line."""
    root = write_omniglot(tmp_path / "images_background")
    data = noniid.load_data(root, 1)
    assert data.classes == 6 and data.train_images.shape == (6 * 3, 28, 28)
    assert np.bincount(data.train_labels).tolist() == [3] * 6
    assert np.bincount(data.test_labels).tolist() == [1] * 6
    # Ink is bright; the drawings of a character share its row and column, not another's.
    assert data.train_images[data.train_labels == 0].mean() > 30
    zipped = shutil.make_archive(str(tmp_path / "omniglot"), "zip", tmp_path, root.name)
    again = noniid.load_data(Path(zipped), 1)
    np.testing.assert_array_equal(again.train_images, data.train_images)
    np.testing.assert_array_equal(again.test_labels, data.test_labels)
    with pytest.raises(DmetaError, match="test_images_per_class = 0: Omniglot's characters have"):
        noniid.load_data(root, 0)
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", Path(zipped).with_suffix(".txt")):
        with pytest.raises(DmetaError, match="is neither a folder of IDX files") as error:
            noniid.load_data(path, 1)
        assert "\n" not in str(error.value)


def test_omniglot_fig4_nodes_take_the_first_classes_and_split_the_drawings(tmp_path) -> None:
    """noniid.classes = 4 of the 6 characters, two-class tasks x 2 nodes: each node's training
    and validation rows are drawings of its characters' training drawings, its test images
    their last drawings; a subset of the nodes draws what they draw among all; the CNN takes
    the 28 x 28 images; more classes than characters fail."""
    root = write_omniglot(tmp_path / "omniglot", drawings=5)
    overrides = ["noniid.classes=4", "noniid.test_images_per_class=1", "noniid.batch_size=2"]
    config = noniid_config(root, *overrides)
    task = build_task(config)
    classes = task.node_classes
    assert task.classes == 4 and (classes[::2] == classes[1::2]).all()
    assert sorted(classes[::2].ravel().tolist()) == [0, 1, 2, 3]
    # 4 training drawings a class in 2 shards: a node holds 2 x 2, 3 for training, 1 validation.
    assert task.train_rows.shape == (4, 3) and task.validation_rows.shape == (4, 1)
    held = torch.cat([task.train_rows, task.validation_rows], dim=1)
    assert (task.train_labels[held][:, :, None] == classes[:, None]).any(-1).all()
    assert len(held[::2].unique()) == held[::2].numel()  # task mates never share a drawing
    test = task.own_test_set(torch.arange(4))
    assert test.query_x.shape == (4, 2, 1, 1, 28, 28) and (test.query_y[:, :, 0] == classes).all()
    everyone, some = task.sample(torch.arange(4), 2, 1), task.sample(torch.tensor([1, 2]), 2, 1)
    for part, few in zip(everyone, some, strict=True):
        torch.testing.assert_close(part[[1, 2]], few, rtol=0, atol=0)
    model = build_model(task, config)
    flat = model.initial_parameters(0, torch.arange(1), True, torch.float64)[0]
    assert model.forward(flat, test.query_x[0, :, 0]).shape == (2, 4)
    with pytest.raises(DmetaError, match="noniid.classes = 7 exceeds the 6 classes"):
        build_task(noniid_config(root, *overrides, "noniid.classes=7"))


def test_fig2_shards_give_each_node_distinct_random_classes_one_shard_each() -> None:
    y = labels()
    shards = noniid.class_shards(y, CLASSES, 3, 0, seed=5)
    assert shards.shape == (CLASSES, 3, TRAIN_PER_CLASS // 3)
    assert (y[shards] == np.arange(CLASSES)[:, None, None]).all()
    assert len(np.unique(shards)) == shards.size  # shards never share an example
    examples, classes = noniid.deal_shards(shards, 2, "shards", seed=5)
    assert examples.shape == (CLASSES * 3 // 2, 2 * 4) and classes.shape == (6, 2)
    for node, held in enumerate(classes):
        assert held[0] < held[1]  # two distinct classes, ascending
        assert (y[examples[node]] == np.repeat(held, 4)).all()  # one shard of each
    # Every shard of every class goes to exactly one node: group g holds nodes 2g, 2g + 1.
    assert sorted(examples.ravel().tolist()) == sorted(shards.ravel().tolist())
    for group in range(3):
        assert sorted(classes[2 * group : 2 * group + 2].ravel()) == list(range(CLASSES))
    # The groups deal the classes in their own orders (seed 5 gives two different pairings).
    pairings = {tuple(map(tuple, classes[2 * g : 2 * g + 2])) for g in range(3)}
    assert len(pairings) > 1
    again, _ = noniid.deal_shards(noniid.class_shards(y, CLASSES, 3, 0, 5), 2, "shards", 5)
    np.testing.assert_array_equal(again, examples)
    capped = noniid.class_shards(y, CLASSES, 3, 7, seed=5)
    assert capped.shape == (CLASSES, 3, 2)  # 7 images a class: shards of 7 // 3


def test_fig4_tasks_give_three_nodes_each_task_and_a_third_of_its_data() -> None:
    y = labels()
    shards = noniid.class_shards(y, CLASSES, 3, 0, seed=1)
    examples, classes = noniid.deal_shards(shards, 2, "tasks", seed=1)
    assert examples.shape == (6, 8)
    tasks = classes.reshape(2, 3, 2)  # nodes 3j .. 3j + 2 share task j
    assert (tasks == tasks[:, :1]).all()
    assert sorted(tasks[:, 0].ravel()) == list(range(CLASSES))  # the tasks cut the classes
    for node in range(6):
        assert (y[examples[node]] == np.repeat(classes[node], 4)).all()
    for task in range(2):  # a task's nodes hold disjoint thirds of its classes' images
        rows = examples[3 * task : 3 * task + 3].ravel()
        assert len(set(rows.tolist())) == 24 == 2 * TRAIN_PER_CLASS


def test_each_node_splits_its_data_80_20_by_the_seed() -> None:
    examples = np.arange(6 * 10).reshape(6, 10)
    train, validation = noniid.split_nodes(examples, 0.2, seed=3)
    assert train.shape == (6, 8) and validation.shape == (6, 2)
    for node in range(6):
        together = np.concatenate([train[node], validation[node]])
        assert sorted(together.tolist()) == examples[node].tolist()
    other, _ = noniid.split_nodes(examples, 0.2, seed=4)
    assert (other != train).any()
    # A node's split depends on its id and the seed, not on which nodes are split with it.
    alone, held = noniid.split_nodes(examples[:2], 0.2, seed=3)
    np.testing.assert_array_equal(alone, train[:2])
    np.testing.assert_array_equal(held, validation[:2])
    with pytest.raises(DmetaError, match="too few for a training and a validation set"):
        noniid.split_nodes(examples[:, :1], 0.2, seed=3)


def test_training_draws_are_epochs_and_the_same_on_any_layout(images) -> None:
    config = noniid_config(images)
    task = build_task(config)
    # Shards of 12 / 2 = 6 images, two classes a node: 10 training and 2 validation examples.
    assert task.train_rows.shape == (4, 10) and task.validation_rows.shape == (4, 2)
    assert task.steps_per_epoch() == 2  # floor(10 / 4): two examples wait for another epoch
    everyone = task.sample(torch.arange(4), 3, 5)
    some = task.sample(torch.tensor([1, 3]), 3, 5)
    for part, few in zip(everyone, some, strict=True):
        torch.testing.assert_close(part[[1, 3]], few, rtol=0, atol=0)
    # One epoch of batches of one: every training example once.
    wide = noniid_config(images, "noniid.batch_size=1")
    task = build_task(wide)
    assert task.steps_per_epoch() == 10
    agents = torch.arange(4)
    epoch = [task.sample(agents, draw, 1).query_y[:, 0] for draw in range(1, 11)]
    labels_seen = torch.cat(epoch, 1)
    expected = task.train_labels[task.train_rows]
    assert (labels_seen.sort(dim=1).values == expected.sort(dim=1).values).all()
    assert not (task.sample(agents, 11, 1).query_x == task.sample(agents, 1, 1).query_x).all()


def test_a_local_epoch_is_steps_per_epoch_outer_steps(images, tmp_path) -> None:
    config = noniid_config(images, "noniid.batch_size=2", "l2c.local_epochs=3")
    engine = Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(4), tmp_path / "r.h5")
    training: LocalTraining = engine.algorithm.training
    assert engine.task.steps_per_epoch() == 5
    assert training.steps(3) == 15 and training.steps() == 5


def test_test_accuracy_equals_a_hand_written_loop(images, tmp_path) -> None:
    """/metrics/test_accuracy [T, K]: node k's final model on the test images of its classes."""
    config = noniid_config(images)
    data = run_local(config, tmp_path / "run.h5")
    finals = data["params/final"]
    model = build_model(build_task(config), config)
    source = noniid.load_idx_folder(images)
    for node, held in enumerate(data["tasks/node_classes"]):
        correct = total = 0
        for cls in held:
            rows = np.flatnonzero(source.test_labels == cls)
            x = torch.as_tensor(source.test_images[rows], dtype=torch.float64)[:, None] / 255
            logits = model.forward(torch.as_tensor(finals[node]), x)
            correct += int((logits.argmax(dim=1) == cls).sum())
            total += len(rows)
        assert data["metrics/test_accuracy"][-1, node] == pytest.approx(correct / total)
    assert data["metrics/val_accuracy"].shape == (3, 4)
    assert data["metrics/test_loss"].shape == (3, 4)
    assert np.isfinite(data["mixing/weights"]).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["noniid.classes_per_node=5"],
            "noniid.classes_per_node = 5 must divide the 4 classes",
        ),
        (["agents=6"], "make 4 nodes, the agents: set agents = 4"),
        (["noniid.batch_size=11"], "noniid.batch_size = 11 exceeds the 10 training examples"),
        (["noniid.shards_per_class=13"], "cuts the 12 images used of class 0 into empty shards"),
        (["noniid.test_images_per_class=9"], "class 0 has 5 test images"),
    ],
)
def test_bad_splits_give_one_line(images, tmp_path, overrides, message) -> None:
    config = noniid_config(images, *overrides)
    with pytest.raises(DmetaError, match=message) as error:
        Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(config.agents), tmp_path / "r.h5")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["noniid.paths=[]"], "problem = 'noniid' needs noniid.paths"),
        (["noniid.validation_fraction=1"], "noniid.validation_fraction = 1.0 must lie in"),
        (["noniid.batch_size=0"], "noniid.batch_size = 0 must be at least 1"),
        (["noniid.images_per_class=-1"], "noniid.images_per_class = -1 must not be negative"),
    ],
)
def test_bad_noniid_keys_give_one_line(images, overrides, message) -> None:
    with pytest.raises(DmetaError, match=message):
        noniid_config(images, *overrides)


@pytest.mark.skipif(
    not os.path.isdir(os.path.expanduser("~/.cache/dmeta/fashion-mnist")),
    reason="Fashion-MNIST is not in ~/.cache/dmeta/fashion-mnist (make fashion-mnist)",
)
def test_fashion_mnist_fig4_split() -> None:
    data = noniid.load_idx_folder(Path(os.path.expanduser("~/.cache/dmeta/fashion-mnist")))
    assert data.classes == 10 and len(data.train_labels) == 60000
    shards = noniid.class_shards(data.train_labels, 10, 3, 600, seed=0)
    examples, classes = noniid.deal_shards(shards, 2, "tasks", seed=0)
    assert examples.shape == (15, 400) and (classes[::3] == classes[1::3]).all()


def test_the_config_section_defaults_are_the_papers() -> None:
    settings = NonIIDConfig()
    assert (settings.shards_per_class, settings.classes_per_node) == (20, 2)  # CIFAR-10's M P N
    assert settings.validation_fraction == 0.2 and settings.batch_size == 10


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=meta_l2c"],
        ["strategy=noncooperative", "learner.local_steps=2"],
        ["strategy=atc", "graph.rule=metropolis", "learner.local_steps=2"],
        [
            "strategy=fedavg",
            "federated.clients_per_round=2",
            "federated.server_optimizer=sgd",
            "federated.server_lr=1",
            "federated.local_epochs=2",
        ],
    ],
)
def test_the_baselines_train_local_epochs_and_log_test_accuracy(images, tmp_path, overrides):
    """Local training, D-PSGD, FedAvg and meta-L2C run on the nodes' data: a round is the
    local epochs' steps_per_epoch x epochs SGD steps, and every node gets a test accuracy."""
    data = run_local(noniid_config(images, *overrides), tmp_path / "run.h5")
    accuracy = data["metrics/test_accuracy"]
    assert accuracy.shape == (3, 4) and ((accuracy >= 0) & (accuracy <= 1)).all()
    assert np.isfinite(data["metrics/train_loss"][1:]).all()
