"""Few-shot image classification: N-way K-shot episodes over the classes of an image data set.

The data (dmeta/omniglot.py, dmeta/miniimagenet.py) become one tensor of images
[classes, images per class, channels, size, size] and three disjoint lists of class ids:
meta-train, meta-validation and meta-test. Episodes are drawn with the counter-based generator
of dmeta.rng, keyed by (seed, agent, stream, iteration), so every layout of ranks sees the same
tasks, and vectorized over agents and tasks: no Python loop over either.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

from dmeta import miniimagenet, omniglot, rng
from dmeta.config import FewShotConfig, ModelConfig, ValidationConfig
from dmeta.errors import DmetaError
from dmeta.models import FlatModel, build_image_classifier
from dmeta.tasks import TaskBatch, TaskFamily


@dataclass
class ImageClasses:
    """Images [classes, images per class, channels, size, size] (float32 in [0, 1] or uint8)
    and the class ids of each split: "train", "validation", "test", never sharing a class."""

    images: np.ndarray
    splits: dict[str, np.ndarray]
    names: list[str]


def source_paths(config: FewShotConfig) -> list[Path]:
    """fewshot.paths with $VARIABLES and ~ expanded; DmetaError for an unset variable."""
    return expand_paths(config.paths, "fewshot.paths")


def expand_paths(entries: list[str], key: str) -> list[Path]:
    """The paths of the config key `key` with $VARIABLES and ~ expanded; DmetaError for an
    unset variable."""
    paths = []
    for path in entries:
        expanded = os.path.expandvars(path)
        unset = re.search(r"\$\{?(\w+)", expanded)
        if unset:
            raise DmetaError(
                f"{key} entry {path!r} uses ${unset.group(1)}, which is not set: "
                f"export {unset.group(1)}=/path/to/the/data or give the path itself"
            )
        paths.append(Path(os.path.expanduser(expanded)))
    return paths


def check_sources(config: FewShotConfig) -> list[Path]:
    """fewshot.paths (`source_paths`) after cheap checks, made before a run starts;
    DmetaError naming the expected layout."""
    paths = source_paths(config)
    if config.dataset == "miniimagenet":
        if len(paths) != 1:
            raise DmetaError(
                "fewshot.paths must name one folder for MiniImagenet; expected "
                + miniimagenet.LAYOUT
            )
        miniimagenet.check_root(paths[0])
        return paths
    alphabet_split = config.split == "alphabet"
    omniglot.check_sources(
        paths, config.validation_alphabets if alphabet_split else None, config.test_alphabets
    )
    return paths


def shuffled(count: int, seed: int, stream: int) -> np.ndarray:
    """A permutation of range(count) keyed by the run seed (one per `stream`)."""
    key = torch.zeros(1, dtype=torch.int64)
    unit = rng.uniform(seed, key, stream, 0, (count,), dtype=torch.float64)[0]
    return torch.argsort(unit).numpy()


def load_image_classes(config: FewShotConfig, seed: int) -> ImageClasses:
    """The data set of `config` with its three class splits."""
    size = config.image_side()
    paths = check_sources(config)
    if config.dataset == "miniimagenet":
        splits = miniimagenet.load_splits(paths[0], size)
        counts = {images.shape[1] for images, _ in splits.values()}
        if len(counts) != 1:
            raise DmetaError(
                f"MiniImagenet splits have different numbers of images per class: {counts}"
            )
        images = np.concatenate([images for images, _ in splits.values()])
        bounds = np.cumsum([0, *(len(labels) for _, labels in splits.values())])
        ids = {split: np.arange(bounds[i], bounds[i + 1]) for i, split in enumerate(splits)}
        names = [label for _, labels in splits.values() for label in labels]
        return ImageClasses(images, ids, names)
    characters = omniglot.load_characters(paths, size)
    if config.split == "alphabet":
        ids = omniglot.split_by_alphabet(
            characters, config.validation_alphabets, config.test_alphabets
        )
    else:
        order = shuffled(len(characters.names), seed, rng.STREAM_SPLIT)
        ids = omniglot.split_by_character(order, config.validation_fraction, config.test_fraction)
    images, names = characters.images, characters.names
    if config.rotations:
        # Class c turned by r quarter turns is class c + r C, in c's split.
        count = len(names)
        images = omniglot.with_rotations(images)
        ids = {split: np.concatenate([c + r * count for r in range(4)]) for split, c in ids.items()}
        names = [f"{name}@{90 * r}" for r in range(4) for name in names]
    return ImageClasses(np.ascontiguousarray(images[:, :, None]), ids, names)


def _first_of_random_order(uniform: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` smallest keys along the last axis: a uniform random subset."""
    return torch.argsort(uniform, dim=-1)[..., :count]


def episode_indices(
    classes: torch.Tensor,
    drawings: int,
    seed: int,
    agents: torch.Tensor,
    stream: int,
    iteration: int,
    tasks: int,
    ways: int,
    samples: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which classes and images make each episode: class ids [A, T, N] from `classes` ([C] for
    all agents, or [A, C] for one list per agent), all distinct, and image ids [A, T, N, samples],
    distinct within a class."""
    available = classes.shape[-1]
    if ways > available or samples > drawings:
        raise DmetaError(
            f"an episode of {ways} classes with {samples} images each needs {ways} classes "
            f"and {samples} images per class; the split has {available} and {drawings}"
        )
    keys = rng.uniform(
        seed, agents, stream, iteration, (tasks, available + ways * drawings), dtype=torch.float64
    )
    order = _first_of_random_order(keys[..., :available], ways)  # [A, T, N]
    if classes.dim() == 1:
        chosen = classes[order]
    else:
        chosen = torch.gather(classes[:, None, :].expand(-1, tasks, -1), 2, order)
    per_class = keys[..., available:].reshape(len(agents), tasks, ways, drawings)
    return chosen, _first_of_random_order(per_class, samples)


def gather_episodes(
    images: torch.Tensor, chosen: torch.Tensor, picks: torch.Tensor, shots: int
) -> TaskBatch:
    """The images and labels of the episodes that `episode_indices` chose.

    Returns support_x [A, T, N K, channels, H, W], support_y [A, T, N K] (labels 0..N-1, class
    by class), query_x [A, T, N Q, channels, H, W] and query_y [A, T, N Q], in the images' type.
    """
    agents, tasks, ways, _ = picks.shape
    selected = images[chosen[..., None], picks]  # [A, T, N, K + Q, channels, H, W]
    # A label is its class's position in the episode: [A, T, N, K + Q].
    labels = torch.arange(ways, device=images.device)[:, None].expand(*picks.shape)

    def flatten(part: torch.Tensor) -> torch.Tensor:
        return part.reshape(agents, tasks, -1, *part.shape[4:])

    return TaskBatch(
        flatten(selected[:, :, :, :shots]),
        flatten(labels[..., :shots].contiguous()),
        flatten(selected[:, :, :, shots:]),
        flatten(labels[..., shots:].contiguous()),
    )


def sample_episodes(
    images: torch.Tensor,
    classes: torch.Tensor,
    seed: int,
    agents: torch.Tensor,
    stream: int,
    iteration: int,
    tasks: int,
    ways: int,
    shots: int,
    queries: int,
) -> TaskBatch:
    """N-way K-shot episodes from `classes` (ids into images [C, D, channels, H, W]): the N
    classes of an episode are distinct and each gives K + Q distinct images
    (`episode_indices`, `gather_episodes`)."""
    chosen, picks = episode_indices(
        classes, images.shape[1], seed, agents, stream, iteration, tasks, ways, shots + queries
    )
    return gather_episodes(images, chosen, picks, shots)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of the examples whose largest logit is their label."""
    return (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()


class FewShotTask(TaskFamily):
    """N-way K-shot classification tasks for MAML's conv net (problem = "fewshot").

    Agent k's training tasks come from the meta-train classes (all of them, or its own share
    with `partition = "disjoint"`); validation and test tasks are fixed sets from the
    meta-validation and meta-test classes, the same for every agent. Images stay on the run's
    device in their stored type and become `dtype` one episode batch at a time.
    """

    draws_by_counter = True

    scores = {"accuracy": accuracy}
    final_evaluation = True
    series = {
        "metrics/val_accuracy": (
            True,
            "1",
            "query accuracy after adaptation on the fixed meta-validation tasks",
        ),
        "centroid/val_accuracy": (
            False,
            "1",
            "query accuracy of the centroid after adaptation on the meta-validation tasks",
        ),
    }

    def __init__(
        self,
        config: FewShotConfig,
        num_agents: int,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(config, num_agents, seed, dtype, device)
        data = load_image_classes(config, seed)
        self.images = torch.as_tensor(data.images, device=device)
        self.classes = {
            split: torch.as_tensor(ids, device=device) for split, ids in data.splits.items()
        }
        for split, ids in self.classes.items():
            if len(ids) < config.ways:
                raise DmetaError(
                    f"the meta-{split} split has {len(ids)} classes, fewer than fewshot.ways = "
                    f"{config.ways}; move classes into it or lower fewshot.ways"
                )
        if config.shots + config.queries > data.images.shape[1]:
            raise DmetaError(
                f"fewshot.shots + fewshot.queries = {config.shots + config.queries} exceeds the "
                f"{data.images.shape[1]} images of each class"
            )
        self.agent_classes: torch.Tensor | None = None
        if config.partition == "disjoint":
            train = data.splits["train"]
            share = len(train) // num_agents
            if share < config.ways:
                raise DmetaError(
                    f"partition = 'disjoint' gives each of {num_agents} agents {share} of the "
                    f"{len(train)} meta-train classes, fewer than fewshot.ways = {config.ways}"
                )
            order = train[shuffled(len(train), seed, rng.STREAM_PARTITION)]
            # The len(train) % num_agents classes left over are used by no agent.
            self.agent_classes = torch.as_tensor(
                np.sort(order[: share * num_agents].reshape(num_agents, share), axis=1),
                device=device,
            )

    def _as_float(self, batch: TaskBatch) -> TaskBatch:
        """Episode images in the run's dtype: uint8 images (MiniImagenet) scaled to [0, 1]."""
        scale = 255.0 if self.images.dtype == torch.uint8 else 1.0
        return batch._replace(
            support_x=batch.support_x.to(self.dtype) / scale,
            query_x=batch.query_x.to(self.dtype) / scale,
        )

    def _episodes(
        self, classes: torch.Tensor, agents: torch.Tensor, stream: int, iteration: int, tasks: int
    ) -> TaskBatch:
        c = self.config
        return self._as_float(
            sample_episodes(
                self.images,
                classes,
                self.seed,
                agents,
                stream,
                iteration,
                tasks,
                c.ways,
                c.shots,
                c.queries,
            )
        )

    def _fixed_indices(self, split: str, stream: int, tasks: int):
        """Classes and images of `tasks` episodes of a split, the same for every agent."""
        c = self.config
        key = torch.zeros(1, dtype=torch.int64, device=self.device)
        return episode_indices(
            self.classes[split],
            self.images.shape[1],
            self.seed,
            key,
            stream,
            0,
            tasks,
            c.ways,
            c.shots + c.queries,
        )

    def sample(
        self, agents: torch.Tensor, iteration: int, tasks: int, stream: int = rng.STREAM_TASKS
    ) -> TaskBatch:
        """Each agent's meta-train episodes at `iteration`: [agents, tasks, N (K or Q), ...]."""
        classes = self.classes["train"]
        if self.agent_classes is not None:
            classes = self.agent_classes[agents]
        return self._episodes(classes, agents, stream, iteration, tasks)

    def validation_set(self, config: ValidationConfig) -> TaskBatch:
        """validation.tasks fixed meta-validation episodes: [tasks, ...]."""
        chosen, picks = self._fixed_indices("validation", rng.STREAM_VALIDATION, config.tasks)
        batch = self._as_float(gather_episodes(self.images, chosen, picks, self.config.shots))
        return TaskBatch(*(part[0] for part in batch))

    def test_batches(self, tasks_at_once: int) -> Iterator[TaskBatch]:
        """The fewshot.test_tasks fixed meta-test episodes, `tasks_at_once` at a time (0: all):
        only one group of episodes is held as floats at a time."""
        tasks = self.config.test_tasks
        chosen, picks = self._fixed_indices("test", rng.STREAM_TEST, tasks)
        step = tasks_at_once or tasks
        for start in range(0, tasks, step):
            part = slice(start, start + step)
            batch = gather_episodes(self.images, chosen[:, part], picks[:, part], self.config.shots)
            yield TaskBatch(*(piece[0] for piece in self._as_float(batch)))

    def build_model(self, config: ModelConfig) -> FlatModel:
        """The image classifier (model.convnet) for this data set and `ways` outputs."""
        _, _, channels, size, _ = self.images.shape
        return build_image_classifier(config, channels, size, self.config.ways, config.norm)

    def learner_functions(self, model: FlatModel):
        return model.forward, F.cross_entropy

    def arrays(self) -> dict[str, torch.Tensor]:
        """The class ids of each split, and each agent's classes with a disjoint partition."""
        arrays = {f"tasks/classes_{split}": ids for split, ids in self.classes.items()}
        if self.agent_classes is not None:
            arrays["tasks/agent_classes"] = self.agent_classes
        return arrays


def confidence_interval_95(per_task: torch.Tensor) -> torch.Tensor:
    """Half-width of the normal 95% confidence interval of the mean over the last axis."""
    return 1.96 * per_task.std(dim=-1) / math.sqrt(per_task.shape[-1])
