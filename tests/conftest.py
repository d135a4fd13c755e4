"""Shared helpers: a small, fast config and an in-process run."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dmeta.config import Config, load_config
from dmeta.engine import Engine, execute
from dmeta.exchange import LocalExchange
from dmeta.runner import plan_run
from dmeta.tasks import TaskBatch

SMALL = [
    "agents=7",
    "iterations=12",
    "log_every=4",
    "graph.topology=ring",
    "validation.tasks=6",
    "learner.tasks_per_agent=3",
    "model.hidden=[16,16]",
    "runtime.threads=1",
]


# A small linear representation problem (seed 001), on top of SMALL.
LINEAR = [
    "problem=linear_representation",
    "linear.dim=6",
    "linear.rank=2",
    "optimizer.name=sgd",
    "optimizer.lr=0.05",
    "runtime.dtype=float64",
]


# L2C and meta-L2C tests: a node's in-edges and its own tasks.
def in_neighbours(engine: Engine) -> list[list[int]]:
    """Each node's in-edges' sources, itself included, by id (its slots)."""
    plan = engine.algorithm.plan_
    return [plan.sources[plan.destinations == i].tolist() for i in range(engine.config.agents)]


def own_tasks(engine: Engine, node: int, draw: int, count: int, stream: int) -> TaskBatch:
    tasks = engine.task.sample(torch.tensor([node]), draw, count, stream=stream)
    return TaskBatch(*(part[0] for part in tasks))


def small_config(*overrides: str) -> Config:
    """A 7-agent sine run of a dozen iterations."""
    return load_config(None, [*SMALL, *overrides])


def run_local(config: Config, path: Path) -> dict[str, np.ndarray]:
    """Run in-process (local backend) and return every dataset of the run file."""
    execute(plan_run(config, 1, 0, 0, 1), None, path, show_progress=False)
    return read_datasets(path)


def dense_matrix(data: dict[str, np.ndarray], num_agents: int) -> np.ndarray:
    """The K x K matrix a[l, k] of a small run file's /topology/edges and /topology/weights."""
    matrix = np.zeros((num_agents, num_agents))
    edges = data["topology/edges"]
    matrix[edges[:, 0], edges[:, 1]] = data["topology/weights"]
    return matrix


def mix(matrix: np.ndarray, rows: torch.Tensor) -> torch.Tensor:
    """w_k = sum_l a[l, k] rows_l (eq. 6b) through the in-process exchange."""
    exchange = LocalExchange(matrix.shape[0])
    sources, destinations = np.nonzero(matrix)
    route = exchange.route(sources, destinations)
    return exchange.mix(rows, route, route.weights(matrix[sources, destinations], rows))


def read_datasets(path: Path) -> dict[str, np.ndarray]:
    """All datasets of an HDF5 file by path."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


@pytest.fixture
def small() -> Config:
    return small_config()


def write_miniimagenet(
    root: Path, form: str, classes: int = 5, images: int = 6, size: int = 12
) -> Path:
    """A tiny MiniImagenet in the CSV ("csv") or pickle ("pickle") form: `classes` classes per
    split of `images` random RGB images, each class with its own mean colour."""
    import pickle

    from PIL import Image

    state = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        labels = [f"n{split}{c:03d}" for c in range(classes)]
        pixels = [
            np.clip(
                state.integers(0, 256, 3)[None, None, :]
                + state.normal(0, 40, (images, size, size, 3))[..., :],
                0,
                255,
            ).astype(np.uint8)
            for _ in labels
        ]
        if form == "pickle":
            data = {
                "image_data": np.concatenate(pixels),
                "class_dict": {
                    label: list(range(c * images, (c + 1) * images))
                    for c, label in enumerate(labels)
                },
            }
            with (root / f"mini-imagenet-cache-{split}.pkl").open("wb") as handle:
                pickle.dump(data, handle)
            continue
        (root / "images").mkdir(exist_ok=True)
        lines = ["filename,label"]
        for label, block in zip(labels, pixels, strict=True):
            for i, image in enumerate(block):
                # PNG, lossless, so both forms hold the same pixels (the real files are JPEG).
                name = f"{label}{i:08d}.png"
                Image.fromarray(image).save(root / "images" / name)
                lines.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


# A few-shot run on a tiny synthetic MiniImagenet (fewshot.paths is added by the caller).
FEWSHOT = [
    "problem=fewshot",
    "fewshot.dataset=miniimagenet",
    "fewshot.image_size=8",
    "fewshot.ways=3",
    "fewshot.shots=1",
    "fewshot.queries=2",
    "fewshot.test_tasks=7",
    "model.filters=4",
    "model.blocks=2",
    "learner.inner_lr=0.1",
    "learner.tasks_per_agent=2",
    "validation.tasks=4",
    "validation.stationarity_tasks=2",
    "optimizer.name=sgd",
    "optimizer.lr=0.1",
]


def write_leaf(path: Path, sizes: list[int], features: int = 16, classes: int = 3) -> Path:
    """A LEAF JSON file of len(sizes) users, user i holding sizes[i] examples of `features`
    numbers (a 4 x 4 image for 16) whose label shifts their mean."""
    state = np.random.default_rng(len(sizes))
    users = [f"user{i:02d}" for i in range(len(sizes))]
    data = {}
    for user, size in zip(users, sizes, strict=True):
        labels = state.integers(0, classes, size)
        x = state.normal(0, 1, (size, features)) + labels[:, None]
        data[user] = {"x": x.round(4).tolist(), "y": labels.tolist()}
    table = {"users": users, "num_samples": sizes, "user_data": data}
    path.write_text(json.dumps(table))
    return path


# Clients of unequal sizes: with federated.min_samples = 8, 12 are kept (the 6s dropped), with
# federated.test_fraction = 0.2: 2 test, 1 validation and 9 training clients.
LEAF_SIZES = [14, 12, 10, 6, 8, 9, 6, 13, 12, 15, 11, 9, 10, 6, 8]


def federated_config(leaf: Path, *overrides: str) -> Config:
    """A federated run on the LEAF file `leaf` (written with LEAF_SIZES): 9 training clients."""
    return small_config(
        "problem=federated", "strategy=fedmeta", "agents=9", f"federated.paths=[{leaf}]",
        "federated.test_fraction=0.2",
        "federated.min_samples=8", "federated.clients_per_round=4", "model.norm=group",
        "model.filters=4", "model.blocks=1", "runtime.dtype=float64", "learner.inner_lr=0.1",
        "validation.stationarity_tasks=2", *overrides,
    )  # fmt: skip


# Non-IID data (problem = "noniid"): tiny labelled images as IDX files and a run on them.
CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, SIDE = 4, 12, 5, 8


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes, gzipped when the name ends in .gz."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def write_images(folder: Path, gz: bool = True) -> Path:
    """Tiny labelled images: class c's pixels brighter where c says (learnable), classes
    interleaved so that rows are not sorted by class."""
    state = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("t10k", TEST_PER_CLASS)):
        labels = np.tile(np.arange(CLASSES), per_class)
        images = state.integers(0, 60, (len(labels), SIDE, SIDE))
        images[np.arange(len(labels)), labels, :] += 150
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return folder


def write_omniglot(root: Path, alphabets: int = 2, characters: int = 3, drawings: int = 4) -> Path:
    """A tiny Omniglot-layout folder <root>/<Alphabet>/<character>/<id>.png of 10 x 10 PNGs
    (white background, black ink): character c of alphabet a inks row c and column a, so each
    character's drawings are alike and the characters differ."""
    from PIL import Image

    state = np.random.default_rng(0)
    for a in range(alphabets):
        for c in range(characters):
            folder = root / f"Alphabet{a}" / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for d in range(drawings):
                pixels = np.full((10, 10), 255, dtype=np.uint8)
                pixels[c, :] = pixels[:, a] = 0
                pixels[state.integers(0, 10, 2)] = 0
                Image.fromarray(pixels).save(folder / f"{a}{c}_{d + 1:02d}.png")
    return root


def noniid_config(folder: Path, *overrides: str):
    """4 nodes of two-class tasks (Fig. 4) on the tiny images, L2C, two rounds."""
    return load_config(
        None,
        [
            "problem=noniid",
            f"noniid.paths=[{folder}]",
            "noniid.split=tasks",
            "noniid.shards_per_class=2",
            "noniid.classes_per_node=2",
            "noniid.batch_size=4",
            "agents=4",
            "strategy=l2c",
            "graph.topology=complete",
            "iterations=2",
            "log_every=1",
            "learner.name=arm",
            "learner.inner_steps=0",
            "optimizer.name=sgd",
            "optimizer.lr=0.05",
            "model.filters=8",
            "model.blocks=2",
            "model.norm=group",
            "model.same_init=true",
            "validation.own_tasks=true",
            "validation.stationarity_tasks=0",
            "runtime.threads=1",
            "runtime.dtype=float64",
            *overrides,
        ],
    )
