"""Nodes holding their own non-IID classification data (Li et al., "Learning to Collaborate in
Decentralized Learning of Personalized Models", CVPR 2022, Sec. 4, Fig. 2 and Fig. 4).

A labelled image data set (`load_data`: Fashion-MNIST from its IDX files, or Omniglot, a
character a class) of M classes (the first `classes`, 0: all) is dealt to K nodes (the agents):

- Fig. 2 (`noniid.split = "shards"`): (a) every class's training examples, in a random order
  keyed by (seed, class), are cut into P = `shards_per_class` shards of one size s (the smallest
  class's count, or `images_per_class`, over P; the rest unused); (b) shard p of class c joins
  group g(c, p), a random one-to-one map per class, so every group holds one shard of every
  class; (c) each group's M shards are shuffled (keyed by (seed, group)) and dealt,
  N = `classes_per_node` at a time from left to right, to M / N nodes: node g M / N + j takes
  positions j N .. j N + N - 1 of group g. K = M P / N nodes, each with N distinct random
  classes and one shard of each.
- Fig. 4 (`"tasks"`): the same shards and groups, but one shuffle of the classes (keyed by
  (seed, 0)) for every group: the classes are cut once into M / N tasks of N classes, and task j
  goes to the P nodes j P .. j P + P - 1, each with one shard (1/P of the used data) of each of
  its classes ("node 1-3 shares task-1, node 4-6 shares task-2").

Each node's N s examples, in a random order keyed by (seed, node), are split into a training
set (the first n - round(f n)) and a validation set (the last round(f n), f =
`validation_fraction`, the paper's 20%: "we randomly select 80% of its local data as the
training set and leave the rest as the validation set"). A node is tested on "all the available
test data belonging to the classes in its local task": the first `test_images_per_class` (0:
all) test images of each of its classes (Omniglot: the last t drawings of each character), one
test task per class. Labels stay the data set's
(0..M-1): every node's model has M outputs, so models and their updates can be mixed.

Training is local SGD in epochs: epoch e of node k is its training set in a random order keyed
by (seed, k, STREAM_TASKS, e), cut into floor(n_train / `batch_size`) minibatches; draw i >= 1
of `sample` is batch (i - 1) mod that count of epoch (i - 1) div it, so that one local step of
the diffusion family, L2C or FedAvg (`TaskFamily.steps_per_epoch`) is one epoch. All of the
split is computed on every rank from the seed alone: the same nodes on any rank layout.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

from dmeta import rng
from dmeta.config import ModelConfig, NonIIDConfig, ValidationConfig
from dmeta.errors import DmetaError
from dmeta.fewshot import accuracy, expand_paths
from dmeta.models import FlatModel, build_image_classifier
from dmeta.omniglot import LAYOUT, alphabets_of, load_characters
from dmeta.tasks import TaskBatch, TaskFamily

# The IDX files of a data set folder (Fashion-MNIST's names, as Debian installs them), each
# gzipped (name.gz) or not.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
UNSIGNED_BYTE = 0x08  # the IDX type code of uint8 data


@dataclass
class LabelledImages:
    """Grey images [n, side, side] uint8 with labels [n] int64, a training and a test set."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def classes(self) -> int:
        return int(self.train_labels.max()) + 1


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (LeCun's MNIST format: magic 0 0 8 d, d big-endian sizes,
    the data), gzipped when its name ends in .gz."""
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:
        raise DmetaError(f"cannot read the IDX file {path}: {error}") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != UNSIGNED_BYTE or data[3] == 0:
        raise DmetaError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else ()
    if len(dims) != ndim or len(data) - header != int(np.prod(dims)):
        raise DmetaError(f"{path}: the IDX sizes {list(dims)} do not match its {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def load_idx_folder(folder: Path) -> LabelledImages:
    """The four IDX files of `folder` (IDX_FILES, gzipped or not), checked."""
    arrays = {}
    for key, name in IDX_FILES.items():
        found = [folder / f"{name}.gz", folder / name]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            expected = ", ".join(f"{n}[.gz]" for n in IDX_FILES.values())
            raise DmetaError(
                f"noniid.paths: {folder} has no {name}[.gz]; expected {expected} "
                "(`make fashion-mnist` fetches them)"
            )
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1] != images.shape[2] or labels.ndim != 1:
            raise DmetaError(
                f"noniid.paths: the {split} IDX files hold {list(images.shape)} images and "
                f"{list(labels.shape)} labels, not [n, side, side] and [n]"
            )
        if len(images) != len(labels):
            raise DmetaError(f"noniid.paths: {len(images)} {split} images but {len(labels)} labels")
    return LabelledImages(
        arrays["train_images"],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"],
        arrays["test_labels"].astype(np.int64),
    )


def load_omniglot(source: Path, test_per_class: int) -> LabelledImages:
    """Omniglot characters as classes (dmeta.omniglot.load_characters: 28 x 28, ink bright,
    scaled to uint8; labels the characters' sorted <Alphabet>/<character> order): of each
    character's drawings in file-name order, the last `test_per_class` are its test images and
    the rest its training images."""
    characters = load_characters([source])
    images = np.round(characters.images * 255).astype(np.uint8)  # [classes, drawings, side, side]
    classes, drawings = images.shape[:2]
    if not 0 < test_per_class < drawings:
        raise DmetaError(
            f"noniid.test_images_per_class = {test_per_class}: Omniglot's characters have "
            f"{drawings} drawings each; set 1..{drawings - 1} of them aside as test images"
        )
    parts = images[:, : drawings - test_per_class], images[:, drawings - test_per_class :]
    train, test = (
        (part.reshape(-1, *part.shape[2:]), np.repeat(np.arange(classes), part.shape[1]))
        for part in parts
    )
    return LabelledImages(*train, *test)


def load_data(source: Path, test_per_class: int) -> LabelledImages:
    """The labelled images of `source`, its format read from the path: a folder with IDX files
    (`load_idx_folder`), else an Omniglot folder or zip (`load_omniglot`); DmetaError if it is
    neither."""
    names = [f"{name}{suffix}" for name in IDX_FILES.values() for suffix in ("", ".gz")]
    if source.is_dir() and any((source / name).is_file() for name in names):
        return load_idx_folder(source)
    if (source.is_dir() or zipfile.is_zipfile(source)) and alphabets_of(source):
        return load_omniglot(source, test_per_class)
    expected = ", ".join(f"{n}[.gz]" for n in IDX_FILES.values())
    raise DmetaError(
        f"noniid.paths: {source} is neither a folder of IDX files ({expected}; `make "
        f"fashion-mnist` fetches them) nor {LAYOUT}"
    )


def _keys(seed: int, key: int, stream: int, count: int) -> np.ndarray:
    """`count` uniform keys of (seed, key, stream, iteration 0), float64."""
    unit = rng.uniform(seed, torch.tensor([key]), stream, 0, (count,), dtype=torch.float64)
    return unit[0].numpy()


def class_shards(
    labels: np.ndarray, classes: int, shards: int, per_class: int, seed: int
) -> np.ndarray:
    """Fig. 2 (a)-(b): [classes, groups = shards, s] training rows; entry [c, g] is the shard of
    class c in group g. Class c's examples in their random order (seed, c), the first
    `per_class` (0: all) kept, are cut into `shards` shards of s = min over classes of the kept
    counts // shards; shard p joins group order[p], order a random permutation per class."""
    counts = np.bincount(labels, minlength=classes)[:classes]
    kept = counts if not per_class else np.minimum(counts, per_class)
    size = int(kept.min()) // shards
    if size < 1:
        smallest = int(np.argmin(kept))
        raise DmetaError(
            f"noniid.shards_per_class = {shards} cuts the {int(kept[smallest])} images used of "
            f"class {smallest} into empty shards: lower it or raise noniid.images_per_class"
        )
    out = np.empty((classes, shards, size), dtype=np.int64)
    for c in range(classes):
        rows = np.flatnonzero(labels == c)
        keys = _keys(seed, c, rng.STREAM_CLASS_SHARDS, len(rows) + shards)
        ordered = rows[np.argsort(keys[: len(rows)], kind="stable")][: shards * size]
        groups = np.argsort(keys[len(rows) :], kind="stable")
        out[c, groups] = ordered.reshape(shards, size)
    return out


def deal_shards(
    shards: np.ndarray, per_node: int, split: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fig. 2 (c) or Fig. 4: (examples [K, per_node s], classes [K, per_node] ascending) of the
    K = M P / per_node nodes, from `class_shards`' [M, P, s] (module docstring)."""
    classes, groups, size = shards.shape
    if per_node > classes or classes % per_node:
        raise DmetaError(
            f"noniid.classes_per_node = {per_node} must divide the {classes} classes of the data "
            f"set (each group of {classes} shards is dealt to nodes {per_node} at a time)"
        )
    keys = [0 if split == "tasks" else g for g in range(groups)]
    orders = np.stack(
        [np.argsort(_keys(seed, k, rng.STREAM_GROUP_CLASSES, classes), kind="stable") for k in keys]
    )
    nodes_per_group = classes // per_node
    dealt = np.sort(orders.reshape(groups, nodes_per_group, per_node), axis=2)
    if split == "tasks":  # node j P + g: the P nodes of task j are consecutive
        dealt = dealt.transpose(1, 0, 2)
        group_of = np.repeat(np.arange(groups)[None], nodes_per_group, axis=0)
    else:  # node g M / N + j: group by group, left to right
        group_of = np.repeat(np.arange(groups)[:, None], nodes_per_group, axis=1)
    node_classes = dealt.reshape(-1, per_node)
    node_groups = group_of.reshape(-1)
    examples = shards[node_classes, node_groups[:, None]].reshape(len(node_classes), -1)
    return examples, node_classes


def split_nodes(examples: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training [K, n - v], validation [K, v]) rows of each node, v = round(fraction n) within
    [1, n - 1]: node k's examples in their random order (seed, k), the last v validation."""
    count = examples.shape[1]
    if count < 2:
        raise DmetaError(
            f"a node holds {count} example: too few for a training and a validation set; raise "
            "noniid.images_per_class or lower noniid.shards_per_class"
        )
    held = min(max(1, round(fraction * count)), count - 1)
    nodes = torch.arange(len(examples))
    keys = rng.uniform(seed, nodes, rng.STREAM_NODE_SPLIT, 0, (count,), dtype=torch.float64)
    order = torch.argsort(keys, dim=1, stable=True).numpy()
    shuffled = np.take_along_axis(examples, order, axis=1)
    return shuffled[:, : count - held], shuffled[:, count - held :]


def class_test_rows(labels: np.ndarray, classes: int, per_class: int) -> np.ndarray:
    """[classes, t]: the first t test rows of each class in file order, t = `per_class` or,
    with 0, the smallest class's count (all of them where the classes are equal)."""
    counts = np.bincount(labels, minlength=classes)[:classes]
    size = int(counts.min()) if not per_class else per_class
    if size < 1 or size > counts.min():
        smallest = int(np.argmin(counts))
        raise DmetaError(
            f"noniid.test_images_per_class = {per_class}: class {smallest} has "
            f"{int(counts[smallest])} test images"
        )
    return np.stack([np.flatnonzero(labels == c)[:size] for c in range(classes)])


def epoch_batches(
    seed: int, agents: torch.Tensor, stream: int, epoch: int, count: int, batch: int, index: int
) -> torch.Tensor:
    """[A, batch] positions 0..count-1: batch `index` of each agent's epoch `epoch`, its
    positions in a random order keyed by (seed, agent, stream, epoch)."""
    keys = rng.uniform(seed, agents, stream, epoch, (count,), dtype=torch.float64)
    order = torch.argsort(keys, dim=1, stable=True)
    return order[:, index * batch : (index + 1) * batch]


class NonIIDTask(TaskFamily):
    """Nodes with their own non-IID data (problem = "noniid"; module docstring).

    A training draw is one minibatch of the node's training set (support set = query set = the
    batch: local SGD with `learner.name = "arm"`, the paper's local update); L2C's mixing step
    scores the node's whole validation set (`validation_data`); with `validation.own_tasks` the
    engine scores each node on its validation set and, always, on its test images of its
    classes (`own_test_set`): /metrics/val_accuracy and /metrics/test_accuracy [T, K]. For a
    learner with inner steps, the support set of these is the node's training set.
    """

    scores = {"accuracy": accuracy}
    series = {
        "metrics/val_accuracy": (
            True,
            "1",
            "accuracy on the validation batches drawn from all nodes' validation sets",
        ),
        "centroid/val_accuracy": (
            False,
            "1",
            "accuracy of the centroid on the validation batches of all nodes",
        ),
    }

    def __init__(
        self,
        config: NonIIDConfig,
        num_agents: int,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(config, num_agents, seed, dtype, device)
        (folder,) = expand_paths(config.paths, "noniid.paths")
        data = load_data(folder, config.test_images_per_class)
        self.classes = config.classes or data.classes
        if self.classes > data.classes:
            raise DmetaError(
                f"noniid.classes = {config.classes} exceeds the {data.classes} classes of {folder}"
            )
        shards = class_shards(
            data.train_labels,
            self.classes,
            config.shards_per_class,
            config.images_per_class,
            seed,
        )
        examples, node_classes = deal_shards(shards, config.classes_per_node, config.split, seed)
        if len(examples) != num_agents:
            raise DmetaError(
                f"noniid: {self.classes} classes x {config.shards_per_class} shards / "
                f"{config.classes_per_node} classes per node make {len(examples)} nodes, the "
                f"agents: set agents = {len(examples)}"
            )
        train, validation = split_nodes(examples, config.validation_fraction, seed)
        self.batches = train.shape[1] // config.batch_size
        if self.batches < 1:
            raise DmetaError(
                f"noniid.batch_size = {config.batch_size} exceeds the {train.shape[1]} training "
                "examples of a node"
            )
        test = class_test_rows(data.test_labels, self.classes, config.test_images_per_class)

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(array, device=device)

        self.train_images, self.train_labels = tensor(data.train_images), tensor(data.train_labels)
        self.test_images, self.test_labels = tensor(data.test_images), tensor(data.test_labels)
        self.node_classes = tensor(node_classes)
        self.train_rows, self.validation_rows = tensor(train), tensor(validation)
        self.test_rows = tensor(test)[self.node_classes]  # [K, N, t]

    def _batch(self, images: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor):
        """(inputs [..., 1, side, side] in [0, 1], labels [...]) of example rows (any shape)."""
        return (images[rows].to(self.dtype) / 255.0).unsqueeze(-3), labels[rows]

    def _train(self, rows: torch.Tensor):
        return self._batch(self.train_images, self.train_labels, rows)

    def steps_per_epoch(self) -> int:
        """floor(n_train / batch_size) minibatches make an epoch."""
        return self.batches

    def sample(
        self, agents: torch.Tensor, iteration: int, tasks: int, stream: int = rng.STREAM_TASKS
    ) -> TaskBatch:
        """Training draws [agents, 1, batch_size, 1, side, side]: on STREAM_TASKS draw
        `iteration` >= 1 is the minibatch of the epochs (module docstring), whatever `tasks`;
        another stream gives `tasks` minibatches drawn at random from the training set."""
        count, batch = self.train_rows.shape[1], self.config.batch_size
        own = self.train_rows[agents]
        if stream == rng.STREAM_TASKS:
            epoch, index = divmod(iteration - 1, self.batches)
            positions = epoch_batches(self.seed, agents, stream, epoch, count, batch, index)
            x, y = self._train(torch.gather(own, 1, positions))
            x, y = x[:, None], y[:, None]
        else:
            keys = rng.uniform(
                self.seed, agents, stream, iteration, (tasks, count), dtype=torch.float64
            )
            positions = torch.argsort(keys, dim=2, stable=True)[..., :batch]
            x, y = self._train(torch.gather(own[:, None].expand(-1, tasks, -1), 2, positions))
        return TaskBatch(x, y, x, y)

    def example_counts(self, agents: torch.Tensor, tasks: TaskBatch) -> torch.Tensor:
        """n_k: the node's training examples (FedAvg's weights)."""
        count = float(self.train_rows.shape[1])
        return torch.full((len(agents),), count, dtype=torch.float64, device=agents.device)

    def _own(self, agents: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor):
        """Tasks of the query sets `query_x` [A, tasks, n, ...], `query_y` [A, tasks, n] whose
        support set is the node's training set (a view, not a copy per task)."""
        sx, sy = self._train(self.train_rows[agents])
        tasks = query_y.shape[1]
        return TaskBatch(
            sx[:, None].expand(-1, tasks, *sx.shape[1:]),
            sy[:, None].expand(-1, tasks, -1),
            query_x,
            query_y,
        )

    def validation_data(self, agents: torch.Tensor, iteration: int, tasks: int) -> TaskBatch:
        """D_k^val (eq. 3): the node's whole validation set, one task [agents, 1, n_val, ...],
        whatever `tasks`; its support set the training set."""
        return self._own(agents, *self._train(self.validation_rows[agents][:, None]))

    def own_validation_set(self, agents: torch.Tensor, config: ValidationConfig) -> TaskBatch:
        """The node's validation set (the same as `validation_data`): validation.tasks and the
        shots do not apply."""
        return self.validation_data(agents, 0, 1)

    def own_test_set(self, agents: torch.Tensor) -> TaskBatch:
        """The node's test images of its classes, one task per class [agents, N, t, ...] (the
        classes weigh equally; with the same count per class, as Fashion-MNIST's 1000, the
        mean is the accuracy over the node's test images); its support set the training
        set."""
        images = self._batch(self.test_images, self.test_labels, self.test_rows[agents])
        return self._own(agents, *images)

    def validation_set(self, config: ValidationConfig) -> TaskBatch:
        """`validation.tasks` shared tasks [tasks, ...]: query sets of `validation.query_shots`
        and support sets of `validation.support_shots` examples drawn (rng.STREAM_VALIDATION,
        key 0) from all nodes' validation and training sets."""
        key = torch.zeros(1, dtype=torch.int64, device=self.device)
        validation, train = self.validation_rows.flatten(), self.train_rows.flatten()
        if config.query_shots > len(validation) or config.support_shots > len(train):
            raise DmetaError(
                f"validation.query_shots = {config.query_shots} and support_shots = "
                f"{config.support_shots} exceed the {len(validation)} validation and "
                f"{len(train)} training examples of the nodes"
            )
        keys = rng.uniform(
            self.seed,
            key,
            rng.STREAM_VALIDATION,
            0,
            (config.tasks, len(validation) + len(train)),
            dtype=torch.float64,
        )[0]
        query = torch.argsort(keys[:, : len(validation)], dim=1)[:, : config.query_shots]
        support = torch.argsort(keys[:, len(validation) :], dim=1)[:, : config.support_shots]
        return TaskBatch(*self._train(train[support]), *self._train(validation[query]))

    def build_model(self, config: ModelConfig) -> FlatModel:
        """The image classifier (model.convnet; the paper's group norm with model.norm =
        "group") with one output per class of the data set."""
        side = self.train_images.shape[-1]
        return build_image_classifier(config, 1, side, self.classes, config.norm)

    def learner_functions(self, model: FlatModel):
        return model.forward, F.cross_entropy

    def arrays(self) -> dict[str, torch.Tensor]:
        """Each node's classes [K, N] and its training and validation examples (rows of the
        training set) [K, n]; its test images are the first of each class's."""
        return {
            "tasks/node_classes": self.node_classes,
            "tasks/train_examples": self.train_rows,
            "tasks/validation_examples": self.validation_rows,
        }
