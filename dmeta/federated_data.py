"""Federated data: clients holding their own finite data sets (Chen et al., Sec. 4 and App. A).

A data set is a list of clients, each with its examples (x, y). As in the paper's evaluation
scheme (Sec. 4.1, App. A.2):
- clients with fewer than `federated.min_samples` examples are dropped (Sec. 4.2: "we filter
  inactive clients with fewer than k records");
- the rest are split, by the seed, into training, validation and test clients (0.8/0.1/0.1 by
  default): the training clients are the run's agents, in order; validation clients are scored
  every logged row and test clients at the end ("the ability to generalize to new clients");
- each client's examples are split once, by the seed, into a support set (the fraction
  `support_fraction`, the paper's p, at least one example) and a query set: "the division of
  clients and the division of support/query sets remain the same for all methods" (App. A.2).
  A client's task (Algorithm 1, line 13) is therefore the same in every round: its fixed split.
Accuracy is "with respect to all data points" (App. A.2): a client's query accuracy weighs by
its query examples, and the server weighs a client's update by its example count n_u.

Clients have different sizes; a batch of clients is padded to the largest of their split, the
padded examples carrying the label IGNORE, which the loss (`masked_cross_entropy`) and the
accuracy skip. Every model here treats examples independently (group norm, an LSTM per
sequence), so padding changes no number.

FedAvg with `federated.batch_size` B > 0 (`minibatches`): local epoch e of round t of client u
is its n_u examples (support and query) in a random order keyed by (seed, u,
STREAM_CLIENT_BATCHES, the epoch's draw number), cut into ceil(n_u / B) mini-batches, the last
one short (LEAF's FedAvg: a client with more data takes more steps).

Sources: LEAF's JSON files (FEMNIST, Shakespeare, Sent140, LEAF's synthetic set), Omniglot's
writers (each (alphabet, drawer) a client, FEMNIST-like) and the plays of dmeta.shakespeare.
Sent140's words are indexed over a vocabulary of the training clients' words only, built once
the clients are split, so validation and test clients do not shape it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

from dmeta import omniglot, rng, shakespeare
from dmeta.config import FederatedConfig, ModelConfig, ValidationConfig
from dmeta.errors import DmetaError
from dmeta.fewshot import expand_paths, shuffled
from dmeta.models import (
    FlatModel,
    build_char_lstm,
    build_image_classifier,
    build_mlp,
    build_word_lstm,
)
from dmeta.noniid import epoch_batches
from dmeta.tasks import TaskBatch, TaskFamily

IGNORE = -100  # torch's cross-entropy ignore_index: the label of a padded example
SPLITS = ("train", "validation", "test")
PADDING, UNKNOWN = 0, 1  # word indices of Sent140's front padding and of an unknown word
WORD = re.compile(r"[\w']+|[.,!?;]")  # LEAF's split_line: words and punctuation marks


@dataclass
class ClientData:
    """Every client's examples, concatenated: client c holds rows offsets[c]:offsets[c + 1].

    kind "image": x [N, 1, side, side] float32; "vector": x [N, features] float32;
    "characters": x [N] int64, the start of each example's window in `text` (codes into
    shakespeare.VOCABULARY), its input text[x : x + window]; "words": x [N, words] int64, the
    first words of each example, word i of `vocabulary` as i + 2, padded at the front with
    PADDING (0), UNKNOWN (1) a word outside `vocabulary`. y [N] int64, labels 0..classes-1.
    """

    x: np.ndarray
    y: np.ndarray
    offsets: np.ndarray
    names: list[str]
    kind: str
    classes: int
    text: np.ndarray | None = None
    window: int = 0
    vocabulary: list[str] | None = None

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)


def _from_clients(parts: list[tuple[np.ndarray, np.ndarray]], names: list[str], **fields):
    """ClientData from per-client (x, y) arrays."""
    offsets = np.cumsum([0, *(len(y) for _, y in parts)])
    x = np.concatenate([x for x, _ in parts])
    y = np.concatenate([y for _, y in parts]).astype(np.int64)
    return ClientData(x, y, offsets, names, **fields)


def split_clients(
    count: int, seed: int, validation_fraction: float, test_fraction: float
) -> dict[str, np.ndarray]:
    """Positions 0..count-1 of the kept clients in each split (Sec. 4.1): after a shuffle keyed
    by the seed, the first test_fraction are test clients, the next validation_fraction
    validation clients, the rest training clients; each split non-empty, each sorted."""
    order = shuffled(count, seed, rng.STREAM_CLIENT_SPLIT)
    test = max(1, round(test_fraction * count))
    validation = max(1, round(validation_fraction * count))
    if test + validation >= count:
        raise DmetaError(
            f"{count} clients are too few for training, validation and test clients; lower "
            "federated.min_samples or use more data"
        )
    return {
        "train": np.sort(order[test + validation :]),
        "validation": np.sort(order[test : test + validation]),
        "test": np.sort(order[:test]),
    }


def support_size(examples: int, fraction: float) -> int:
    """|D_S| of a client with `examples` kept examples: round(p n), within [1, n - 1]."""
    return min(max(1, round(fraction * examples)), examples - 1)


def client_order(seed: int, client: int, examples: int, cap: int) -> np.ndarray:
    """A client's examples (0..examples-1) in the random order keyed by (seed, client source
    index) that fixes its support and query sets; only the first `cap` when cap > 0."""
    key = torch.tensor([client])
    unit = rng.uniform(seed, key, rng.STREAM_CLIENT_EXAMPLES, 0, (examples,), dtype=torch.float64)
    order = torch.argsort(unit[0], stable=True).numpy()
    return order[:cap] if cap else order


def padded(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of different lengths as one int64 table, padded with -1."""
    table = np.full((len(rows), max(len(row) for row in rows)), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        table[i, : len(row)] = row
    return table


def masked_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of the real (not padded) examples whose largest logit is their label."""
    real = labels != IGNORE
    correct = (logits.argmax(dim=-1) == labels) & real
    return correct.sum().to(logits.dtype) / real.sum().clamp(min=1).to(logits.dtype)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean cross entropy over the real (not padded) examples: torch's summed cross entropy
    (padding, label IGNORE, adds 0) over their count, at least 1, so that a batch of padding
    alone has loss 0 and gradient 0, where torch's mean would give 0 / 0."""
    real = (labels != IGNORE).sum().clamp(min=1).to(logits.dtype)
    return F.cross_entropy(logits, labels, reduction="sum") / real


def weighted_ci95(values: np.ndarray, weights: np.ndarray) -> float:
    """Half-width of the normal 95% interval of the weighted mean sum_i w_i v_i / sum_i w_i,
    the clients as the sampled units (the ratio estimator's standard error)."""
    w = weights / weights.sum()
    n = len(values)
    if n < 2:
        return math.nan
    mean = w @ values
    return float(1.96 * math.sqrt(n / (n - 1) * np.sum(w**2 * (values - mean) ** 2)))


def load_clients(config: FederatedConfig) -> ClientData:
    """The clients of `federated.dataset` from `federated.paths`."""
    paths = expand_paths(config.paths, "federated.paths")
    if config.dataset == "leaf":
        return read_leaf(paths, config.words)
    if config.dataset == "omniglot_writers":
        return omniglot_writers(paths, config.image_size)
    return shakespeare_clients(paths, config.sequence_length)


def _leaf_files(paths: list[Path]) -> list[Path]:
    """The JSON files of `paths`: a folder gives every *.json below it, a file itself."""
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.rglob("*.json"))
        elif path.is_file():
            files.append(path)
        else:
            raise DmetaError(f"LEAF source {path} does not exist")
    if not files:
        raise DmetaError(f"no LEAF .json files under {[str(p) for p in paths]}")
    return files


def _leaf_users(file: Path) -> dict[str, tuple[list, list]]:
    """user -> (x, y) of one LEAF file, checked against its `users` and `num_samples`."""
    try:
        table = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DmetaError(f"LEAF file {file} is not readable JSON: {error}") from None
    if not isinstance(table, dict) or not {"users", "num_samples", "user_data"} <= table.keys():
        raise DmetaError(f"LEAF file {file} must hold users, num_samples and user_data")
    users, counts, data = table["users"], table["num_samples"], table["user_data"]
    if len(users) != len(counts):
        raise DmetaError(f"LEAF file {file}: {len(users)} users but {len(counts)} num_samples")
    found = {}
    for user, count in zip(users, counts, strict=True):
        record = data.get(user)
        if not isinstance(record, dict) or "x" not in record or "y" not in record:
            raise DmetaError(f"LEAF file {file}: user {user!r} has no x and y in user_data")
        if not len(record["x"]) == len(record["y"]) == count:
            raise DmetaError(
                f"LEAF file {file}: user {user!r} has {len(record['x'])} x and "
                f"{len(record['y'])} y but num_samples says {count}"
            )
        found[user] = (record["x"], record["y"])
    return found


def read_leaf(paths: list[Path], words: int = 25) -> ClientData:
    """LEAF's JSON files (`users`, `num_samples`, `user_data` {user: {x, y}}), a user's samples
    over all files (e.g. LEAF's train/ and test/) joined. Inputs: numeric lists of square length
    are square grey images (FEMNIST: 784 = 28 x 28), other numeric lists vectors; strings with
    one-character labels are Shakespeare windows; records whose fifth field is text are
    Sent140 tweets (their first `words` words)."""
    users: dict[str, tuple[list, list]] = {}
    for file in _leaf_files(paths):
        for user, (x, y) in _leaf_users(file).items():
            before = users.setdefault(user, ([], []))
            before[0].extend(x)
            before[1].extend(y)
    names = sorted(users)
    first = next(((x[0], y[0]) for x, y in users.values() if x), None)
    if first is None:
        raise DmetaError(
            f"the LEAF files {[str(p) for p in paths]} hold no samples: num_samples is 0 for "
            f"each of their {len(users)} users"
        )
    sample_x, sample_y = first
    if isinstance(sample_x, str) and isinstance(sample_y, str) and len(sample_y) == 1:
        return _leaf_characters(users, names)
    if isinstance(sample_x, list) and len(sample_x) > 4 and isinstance(sample_x[4], str):
        return _leaf_words(users, names, words)
    if isinstance(sample_x, str) or not isinstance(sample_y, int):
        raise DmetaError(
            "LEAF data with image file names as inputs (CelebA) or non-integer labels is not "
            "supported: dmeta reads numeric inputs with integer labels (FEMNIST, synthetic), "
            "Shakespeare and Sent140"
        )
    try:
        parts = [(np.asarray(users[u][0], np.float32), np.asarray(users[u][1])) for u in names]
    except ValueError as error:
        raise DmetaError(f"LEAF inputs must be numeric lists of one length: {error}") from None
    data = _from_clients(parts, names, kind="vector", classes=0)
    side = math.isqrt(data.x.shape[1])
    if side * side == data.x.shape[1]:
        data.x, data.kind = data.x.reshape(-1, 1, side, side), "image"
    data.classes = int(data.y.max()) + 1
    return data


def _leaf_characters(users: dict[str, tuple[list, list]], names: list[str]) -> ClientData:
    """LEAF Shakespeare: each x a window of text, each y the next character."""
    windows = {len(x) for u in names for x in users[u][0]}
    if len(windows) != 1:
        raise DmetaError(f"LEAF Shakespeare windows must have one length, not {sorted(windows)}")
    (window,) = windows
    text = shakespeare.encode("".join(x for u in names for x in users[u][0]))
    y = [shakespeare.encode("".join(users[u][1])) for u in names]
    starts = np.arange(0, len(text), window) if window else np.zeros(len(text), np.int64)
    offsets = np.cumsum([0, *(len(labels) for labels in y)])
    classes = len(shakespeare.VOCABULARY)
    return ClientData(
        starts, np.concatenate(y), offsets, names, "characters", classes, text, window
    )


def tokenize(text: str) -> list[str]:
    """A text's words and punctuation marks, lower-cased (LEAF's `split_line`)."""
    return WORD.findall(text.lower())


def _leaf_words(users: dict[str, tuple[list, list]], names: list[str], words: int) -> ClientData:
    """LEAF Sent140: each x a record [id, date, query, user, text], each y 0 or 1. An input is
    the first `words` words of the text, indexed over every word of the source (in order of
    first appearance; `restrict_vocabulary` keeps the training clients' words)."""
    table: dict[str, int] = {}
    parts = []
    for user in names:
        records, labels = users[user]
        rows = np.full((len(records), words), PADDING, dtype=np.int64)
        for row, (record, label) in enumerate(zip(records, labels, strict=True)):
            if not (isinstance(record, list) and len(record) > 4 and isinstance(record[4], str)):
                raise DmetaError(
                    f"LEAF Sent140 user {user!r}: sample {row} is not a record [id, date, "
                    f"query, user, text] but {str(record)[:60]}"
                )
            if label not in (0, 1):
                raise DmetaError(f"LEAF Sent140 user {user!r}: label {label!r} is not 0 or 1")
            tokens = tokenize(record[4])[:words]
            if tokens:
                indices = [table.setdefault(token, len(table)) + 2 for token in tokens]
                rows[row, words - len(tokens) :] = indices
        parts.append((rows, np.asarray(labels, dtype=np.float64)))
    return _from_clients(parts, names, kind="words", classes=2, vocabulary=list(table))


def omniglot_writers(paths: list[Path], size: int) -> ClientData:
    """Omniglot as a writer split (FEMNIST-like): each (alphabet, drawer) a client holding the
    drawer's images of that alphabet's characters. File names are `<id>_<drawer>.png`; a
    label is the character's index among all characters of the sources (sorted names)."""
    entries = {}
    for source in paths:
        if not source.exists():
            raise DmetaError(f"Omniglot source {source} does not exist; expected {omniglot.LAYOUT}")
        for alphabet, character, image, data in omniglot._entries(source):
            stem = image.removesuffix(".png")
            if "_" not in stem:
                raise DmetaError(f"Omniglot image {image} is not named <id>_<drawer>.png")
            drawer = stem.rsplit("_", 1)[1]
            entries.setdefault((alphabet, drawer, character), data)
    if not entries:
        raise DmetaError(f"the Omniglot sources hold no images; expected {omniglot.LAYOUT}")
    characters = sorted({(a, c) for a, _, c in entries})
    label = {name: i for i, name in enumerate(characters)}
    clients: dict[tuple[str, str], list[tuple[np.ndarray, int]]] = {}
    for (alphabet, drawer, character), data in sorted(entries.items()):
        example = (omniglot._png_to_array(data, size), label[(alphabet, character)])
        clients.setdefault((alphabet, drawer), []).append(example)
    names = [f"{alphabet}/drawer{drawer}" for alphabet, drawer in clients]
    parts = [
        (np.stack([image for image, _ in held])[:, None], np.array([y for _, y in held]))
        for held in clients.values()
    ]
    return _from_clients(parts, names, kind="image", classes=len(characters))


def shakespeare_clients(paths: list[Path], window: int) -> ClientData:
    """Each (play, role) of dmeta.shakespeare a client; its examples every `window` characters
    of its text and the character after them."""
    roles = shakespeare.role_texts(paths)
    names = sorted(name for name, text in roles.items() if len(text) > window)
    if not names:
        raise DmetaError(f"no role of the plays speaks more than {window} characters")
    codes = [shakespeare.encode(roles[name]) for name in names]
    bounds = np.cumsum([0, *(len(c) for c in codes)])
    starts = [bounds[i] + np.arange(len(c) - window) for i, c in enumerate(codes)]
    text = np.concatenate(codes)
    x = np.concatenate(starts)
    offsets = np.cumsum([0, *(len(s) for s in starts)])
    classes = len(shakespeare.VOCABULARY)
    return ClientData(x, text[x + window], offsets, names, "characters", classes, text, window)


@dataclass
class ClientSplit:
    """One split's clients: source indices, example counts n_u, and the (global) example rows
    of their support and query sets, padded with -1."""

    clients: np.ndarray
    examples: np.ndarray
    support: np.ndarray
    query: np.ndarray


def build_splits(data: ClientData, config: FederatedConfig, seed: int) -> dict[str, ClientSplit]:
    """Drop small clients, split the rest into train/validation/test clients and each client's
    examples into its fixed support and query sets (module docstring)."""
    counts = data.counts()
    kept = np.flatnonzero(counts >= config.min_samples)
    positions = split_clients(len(kept), seed, config.validation_fraction, config.test_fraction)
    splits = {}
    for name in SPLITS:
        clients = kept[positions[name]]
        supports, queries = [], []
        for client in clients:
            order = client_order(seed, int(client), int(counts[client]), config.max_samples)
            rows = data.offsets[client] + order
            size = support_size(len(rows), config.support_fraction)
            supports.append(rows[:size])
            queries.append(rows[size:])
        examples = np.array([len(s) + len(q) for s, q in zip(supports, queries, strict=True)])
        splits[name] = ClientSplit(clients, examples, padded(supports), padded(queries))
    return splits


def restrict_vocabulary(data: ClientData, training: ClientSplit, size: int) -> None:
    """Keep the `size` most frequent words of the training clients' examples (ties in
    alphabetical order) as `data.vocabulary`, in that order; every other word of any client
    becomes UNKNOWN."""
    rows = np.concatenate([training.support.ravel(), training.query.ravel()])
    counts = np.bincount(data.x[rows[rows >= 0]].ravel(), minlength=len(data.vocabulary) + 2)
    seen = np.flatnonzero(counts[2:])
    kept = sorted(seen.tolist(), key=lambda i: (-counts[i + 2], data.vocabulary[i]))[:size]
    mapping = np.full(len(data.vocabulary) + 2, UNKNOWN, dtype=np.int64)
    mapping[PADDING] = PADDING
    mapping[np.asarray(kept, dtype=np.int64) + 2] = np.arange(len(kept)) + 2
    data.x = mapping[data.x]
    data.vocabulary = [data.vocabulary[i] for i in kept]


def read_embeddings(path: Path, vocabulary: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The vectors of a GloVe text file (a line "word v1 ... vd") for the words of `vocabulary`
    it holds: their word indices (position + 2) and [found, d] vectors. Line 1 sets d."""
    if not path.is_file():
        raise DmetaError(f"federated.embeddings: {path} is not a file")
    index = {word: i + 2 for i, word in enumerate(vocabulary)}
    rows, vectors, dimension = [], [], 0
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                dimension = dimension or len(line.split()) - 1
                parts = line.rstrip().rsplit(" ", dimension)
                try:
                    if dimension < 1 or len(parts) != dimension + 1:
                        raise ValueError
                    if parts[0] in index:
                        vectors.append([float(value) for value in parts[1:]])
                        rows.append(index.pop(parts[0]))
                except ValueError:
                    numbers = f"{dimension} numbers, as line 1 is" if dimension > 0 else "numbers"
                    raise DmetaError(
                        f"federated.embeddings: line {number} of {path} is not a word and {numbers}"
                    ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise DmetaError(f"federated.embeddings: {path} is not readable text: {error}") from None
    if not dimension:
        raise DmetaError(f"federated.embeddings: {path} holds no vectors")
    return np.array(rows, dtype=np.int64), np.array(vectors).reshape(len(rows), dimension)


class FederatedDataTask(TaskFamily):
    """Clients with their own data (problem = "federated"): agent k is training client k.

    A client's task is its fixed support/query split ([agents, 1, examples, ...]: one task per
    client, whatever is asked); validation and test clients are tasks of the fixed validation
    and test sets, weighted by their query examples. The final evaluation scores each test
    client (`final_per_task`).
    """

    scores = {"accuracy": masked_accuracy}
    # A client's split is fixed: `sample` and `training_data` index device tables and read
    # no iteration, so a round can be captured (FedAvg's `minibatches` then take the largest
    # client's count of batches, with no read-back).
    draws_by_counter = True
    final_evaluation = True
    final_per_task = True
    series = {
        "metrics/val_accuracy": (
            True,
            "1",
            "query accuracy of the validation clients after adaptation on their support sets",
        ),
        "centroid/val_accuracy": (
            False,
            "1",
            "query accuracy of the validation clients for the centroid after adaptation",
        ),
    }

    def __init__(
        self,
        config: FederatedConfig,
        num_agents: int,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(config, num_agents, seed, dtype, device)
        data = load_clients(config)
        self.splits = build_splits(data, config, seed)
        kept = sum(len(split.clients) for split in self.splits.values())
        trained = len(self.splits["train"].clients)
        if trained != num_agents:
            raise DmetaError(
                f"federated data: {kept} of {len(data.names)} clients hold at least "
                f"federated.min_samples = {config.min_samples} examples and {trained} of them "
                f"are training clients, the agents: set agents = {trained}"
            )
        self.pretrained: tuple[np.ndarray, np.ndarray] | None = None
        if data.kind == "words":
            restrict_vocabulary(data, self.splits["train"], config.vocabulary_size)
            if config.embeddings:
                (path,) = expand_paths([config.embeddings], "federated.embeddings")
                self.pretrained = read_embeddings(path, data.vocabulary)
        elif config.embeddings:
            raise DmetaError(
                "federated.embeddings initializes a word embedding: it applies to LEAF Sent140 "
                "data only"
            )
        if config.freeze_embeddings and self.pretrained is None:
            raise DmetaError(
                "federated.freeze_embeddings keeps the GloVe vectors of federated.embeddings "
                "fixed: set federated.embeddings (LEAF Sent140 data) or leave it false"
            )
        self.freeze_embeddings = config.freeze_embeddings
        self.kind, self.classes, self.window = data.kind, data.classes, data.window
        self.names, self.vocabulary = data.names, data.vocabulary
        self.x = torch.as_tensor(data.x, device=device)
        self.y = torch.as_tensor(data.y, device=device)
        self.text = None if data.text is None else torch.as_tensor(data.text, device=device)
        self.training_examples = torch.as_tensor(
            self.splits["train"].examples, dtype=torch.float64, device=device
        )
        self.tables = {
            name: (
                torch.as_tensor(part.support, device=device),
                torch.as_tensor(part.query, device=device),
            )
            for name, part in self.splits.items()
        }
        # [training clients, most examples]: each training client's examples, support then
        # query, padded with -1 at the end (FedAvg's mini-batches; built here, not on first
        # use, which may be inside a compiled round's trace).
        train = self.splits["train"]
        own = zip(train.support, train.query, strict=True)
        rows = padded([np.concatenate([s[s >= 0], q[q >= 0]]) for s, q in own])
        self.training_rows = torch.as_tensor(rows, device=device)

    def _inputs(self, rows: torch.Tensor) -> torch.Tensor:
        """The inputs of example rows (any shape; -1 padding reads row 0)."""
        x = self.x[rows.clamp(min=0)]
        if self.kind == "characters":
            return self.text[x[..., None] + torch.arange(self.window, device=x.device)]
        if self.kind == "words":
            return x
        return x.to(self.dtype)

    def _labels(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.where(rows >= 0, self.y[rows.clamp(min=0)], IGNORE)

    def _batch(self, support: torch.Tensor, query: torch.Tensor) -> TaskBatch:
        return TaskBatch(
            self._inputs(support), self._labels(support), self._inputs(query), self._labels(query)
        )

    def sample(
        self, agents: torch.Tensor, iteration: int, tasks: int, stream: int = rng.STREAM_TASKS
    ) -> TaskBatch:
        """Each training client's fixed support/query split (Algorithm 1, line 13; App. A.2):
        [agents, 1, examples, ...], the same in every round."""
        support, query = self.tables["train"]
        batch = self._batch(support[agents], query[agents])
        return TaskBatch(*(part[:, None] for part in batch))

    def training_data(self, agents: torch.Tensor, iteration: int, tasks: int) -> TaskBatch:
        """All of a training client's data as its query set (FedAvg trains on it, Sec. 4.1)."""
        support, query = self.tables["train"]
        rows = torch.cat([support[agents], query[agents]], dim=1)
        batch = self._batch(rows, rows)
        return TaskBatch(*(part[:, None] for part in batch))

    def minibatches(
        self, agents: torch.Tensor, iteration: int | torch.Tensor, batch_size: int
    ) -> Iterator[TaskBatch]:
        """One local epoch of FedAvg's mini-batch SGD (McMahan et al., Algorithm 1) for the
        training clients `agents`: client u's n_u examples (support then query) in the random
        order of `noniid.epoch_batches` keyed by (seed, u, STREAM_CLIENT_BATCHES, `iteration`),
        cut into ceil(n_u / batch_size) batches, the last one short. Batch b of every client at
        once, [agents, 1, batch_size, ...] with support set = query set = the batch, for b = 0
        up to the most any client of `agents` needs; a client's batches after its last are
        padding alone (label IGNORE). The order of position j depends on (seed, u, iteration,
        n_u) only: the same on any rank layout.

        `iteration` as a 0-d tensor (a round replayed from a CUDA graph or compiled, whose
        shapes are fixed and which cannot read the sampled clients' sizes back): as many
        batches as the largest training client needs; the extra ones are padding for every
        client, steps that move no model."""
        rows = self.training_rows[agents]
        counts = (rows >= 0).sum(dim=1, keepdim=True)
        width = rows.shape[1]
        order = epoch_batches(
            self.seed, agents, rng.STREAM_CLIENT_BATCHES, iteration, width, width, 0
        )
        # The client's positions 0..n_u-1 first, in their drawn order, then its padding.
        last = torch.argsort((order >= counts).to(torch.uint8), dim=1, stable=True)
        shuffled = torch.gather(rows, 1, torch.gather(order, 1, last))
        most = width if isinstance(iteration, torch.Tensor) else int(counts.max())
        steps = -(-most // batch_size)
        shuffled = F.pad(shuffled, (0, max(0, steps * batch_size - width)), value=-1)
        for step in range(steps):
            batch = shuffled[:, None, step * batch_size : (step + 1) * batch_size]
            x, y = self._inputs(batch), self._labels(batch)
            yield TaskBatch(x, y, x, y)

    def example_counts(self, agents: torch.Tensor, tasks: TaskBatch) -> torch.Tensor:
        """n_u: the training clients' kept examples (App. A.2: weights proportional to them)."""
        return self.training_examples[agents]

    def _query_weights(self, split: str) -> torch.Tensor:
        query = self.splits[split].examples - (self.splits[split].support >= 0).sum(axis=1)
        return torch.as_tensor(query / query.sum(), dtype=torch.float64, device=self.device)

    def validation_set(self, config: ValidationConfig) -> TaskBatch:
        """The validation clients' splits: [validation clients, examples, ...]."""
        return self._batch(*self.tables["validation"])

    def validation_weights(self) -> torch.Tensor:
        """Validation clients weighted by their query examples (accuracy over data points)."""
        return self._query_weights("validation")

    def test_batches(self, tasks_at_once: int) -> Iterator[TaskBatch]:
        """The test clients' splits, `tasks_at_once` clients at a time (0: all)."""
        support, query = self.tables["test"]
        step = tasks_at_once or len(support)
        for start in range(0, len(support), step):
            yield self._batch(support[start : start + step], query[start : start + step])

    def test_weights(self) -> torch.Tensor:
        """Test clients weighted by their query examples."""
        return self._query_weights("test")

    def build_model(self, config: ModelConfig) -> FlatModel:
        """The conv net (images; FEMNIST's setting), LEAF's stacked character LSTM (text), the
        same LSTM over words (Sent140) or the fully connected network (vectors), with one
        output per class."""
        if self.kind == "characters":
            return build_char_lstm(
                self.classes, config.embedding, config.lstm_hidden, config.lstm_layers
            )
        if self.kind == "words":
            if self.pretrained is not None and self.pretrained[1].shape[1] != config.embedding:
                width = self.pretrained[1].shape[1]
                raise DmetaError(
                    f"federated.embeddings holds {width}-d vectors but model.embedding = "
                    f"{config.embedding}: set model.embedding = {width}"
                )
            return build_word_lstm(
                len(self.vocabulary) + 2,
                self.classes,
                config.embedding,
                config.lstm_hidden,
                config.lstm_layers,
                self.freeze_embeddings,
            )
        if self.kind == "vector":
            return build_mlp(config, self.x.shape[1], self.classes)
        if config.norm == "batch" and config.convnet == "maml":
            raise DmetaError(
                "problem = 'federated' pads each client's examples to one size, which batch "
                "statistics would mix in: set model.norm = 'group'"
            )
        _, channels, size, _ = self.x.shape
        return build_image_classifier(config, channels, size, self.classes, "group")

    def initial_parameters(
        self, model: FlatModel, agents: torch.Tensor, same_init: bool, dtype: torch.dtype
    ) -> torch.Tensor:
        """torch.nn's initialization (TaskFamily's); with federated.embeddings the embedding
        rows of the words the file holds are its vectors, in every agent's launch model."""
        theta = model.initial_parameters(self.seed, agents, same_init, dtype)
        if self.pretrained is not None:
            rows, vectors = self.pretrained
            (slot,) = (slot for slot in model.slots if slot.name == "embedding.weight")
            table = theta[:, slot.offset : slot.offset + slot.size].view(-1, *slot.shape)
            table[:, torch.as_tensor(rows, device=theta.device)] = torch.as_tensor(
                vectors, dtype=dtype, device=theta.device
            )
        return theta

    def learner_functions(self, model: FlatModel):
        return model.forward, masked_cross_entropy

    def arrays(self) -> dict[str, torch.Tensor]:
        """Each split's clients (indices into the source's sorted client names), their example
        counts n_u and support sizes."""
        arrays = {}
        for name, split in self.splits.items():
            arrays[f"tasks/clients_{name}"] = torch.as_tensor(split.clients)
            arrays[f"tasks/examples_{name}"] = torch.as_tensor(split.examples)
            arrays[f"tasks/support_{name}"] = torch.as_tensor((split.support >= 0).sum(axis=1))
        return arrays
