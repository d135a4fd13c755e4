"""Federated data (issue 15, step 2): client splits, support/query sets, example-count weights,
per-client test accuracy, the LEAF reader, the Shakespeare parser, Omniglot's writers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import LEAF_SIZES, federated_config, run_local, write_leaf
from torch.func import vmap

from dmeta import federated_data as fd
from dmeta import shakespeare
from dmeta.algorithms.federated import sample_clients
from dmeta.config import FederatedConfig
from dmeta.engine import Engine
from dmeta.errors import DmetaError
from dmeta.exchange import LocalExchange
from dmeta.models import build_char_lstm
from dmeta.runner import plan_run


@pytest.fixture
def leaf(tmp_path):
    return write_leaf(tmp_path / "leaf.json", LEAF_SIZES)


def test_client_splits_are_disjoint_cover_and_depend_on_the_seed_only() -> None:
    splits = fd.split_clients(50, 3, 0.1, 0.1)
    together = np.concatenate(list(splits.values()))
    assert sorted(together.tolist()) == list(range(50))
    assert [len(splits[s]) for s in fd.SPLITS] == [40, 5, 5]
    again = fd.split_clients(50, 3, 0.1, 0.1)
    assert all((splits[s] == again[s]).all() for s in fd.SPLITS)
    other = fd.split_clients(50, 4, 0.1, 0.1)
    assert any((splits[s] != other[s]).any() for s in fd.SPLITS)
    with pytest.raises(DmetaError, match="2 clients are too few"):
        fd.split_clients(2, 3, 0.1, 0.1)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_support_and_query_sets_split_each_client_by_the_support_fraction(leaf, fraction):
    data = fd.read_leaf([leaf])
    config = FederatedConfig(min_samples=8, support_fraction=fraction, test_fraction=0.2)
    splits = fd.build_splits(data, config, seed=0)
    kept = [c for s in splits.values() for c in s.clients]
    assert sorted(kept) == [i for i, n in enumerate(LEAF_SIZES) if n >= 8]
    for split in splits.values():
        for row, client in enumerate(split.clients):
            support = split.support[row][split.support[row] >= 0]
            query = split.query[row][split.query[row] >= 0]
            n = LEAF_SIZES[client]
            assert len(support) == min(max(1, round(fraction * n)), n - 1)
            assert len(support) + len(query) == n == split.examples[row]
            rows = np.concatenate([support, query])
            start = data.offsets[client]
            assert sorted(rows.tolist()) == list(range(start, start + n))
    again = fd.build_splits(data, config, seed=0)
    np.testing.assert_array_equal(again["train"].support, splits["train"].support)
    capped = fd.build_splits(data, FederatedConfig(min_samples=8, max_samples=9), seed=0)
    assert capped["train"].examples.max() == 9


def test_the_agent_count_must_match_the_training_clients(leaf, tmp_path) -> None:
    config = federated_config(leaf, "agents=7")
    with pytest.raises(DmetaError) as error:
        Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(7), tmp_path / "r.h5")
    message = str(error.value)
    assert "12 of 15 clients hold at least federated.min_samples = 8" in message
    assert "set agents = 9" in message and "\n" not in message


def test_a_round_weighs_each_client_by_its_example_count(leaf, tmp_path) -> None:
    """Algorithm 1, line 9 with App. A.2's weights: SGD with step 1 on sum_u n_u g_u / sum n_u,
    each g_u the meta-gradient on the client's own fixed split, by hand."""
    config = federated_config(leaf, "federated.server_optimizer=sgd", "federated.server_lr=1")
    engine = Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(9), tmp_path / "r.h5")
    theta = engine.algorithm.server[0].clone()
    engine.algorithm.round(1)
    sampled = sample_clients(config.seed, 1, 9, 4)
    train = engine.task.splits["train"].clients
    sizes = torch.tensor([float(LEAF_SIZES[train[u]]) for u in sampled], dtype=torch.float64)
    assert len(set(sizes.tolist())) > 1, "the test needs unequal clients"
    gradients = torch.stack(
        [
            engine.learner.meta_gradients(theta[None], engine.task.sample(u[None], 1, 5))[0][0]
            for u in sampled
        ]
    )
    expected = theta - (sizes[:, None] * gradients).sum(0) / sizes.sum()
    torch.testing.assert_close(engine.algorithm.server[0], expected, rtol=1e-12, atol=1e-14)


def test_test_clients_are_scored_one_by_one_with_an_example_weighted_mean(leaf, tmp_path):
    data = run_local(federated_config(leaf, "iterations=4"), tmp_path / "fedmeta.h5")
    import h5py

    with h5py.File(tmp_path / "fedmeta.h5") as f:
        accuracy = f["final/test_accuracy"]
        values, mean = accuracy[()], accuracy.attrs["network_mean"]
        assert np.isfinite(accuracy.attrs["network_ci95"])
    clients = data["tasks/clients_test"]
    queries = data["tasks/examples_test"] - data["tasks/support_test"]
    assert values.shape == (2,) and ((0 <= values) & (values <= 1)).all()
    np.testing.assert_allclose(mean, queries @ values / queries.sum())
    assert [LEAF_SIZES[c] for c in clients] == data["tasks/examples_test"].tolist()
    assert np.isfinite(data["centroid/stationarity"]).all()
    np.testing.assert_array_equal(data["comm/bytes_up"][1:], data["comm/bytes_down"][1:])


def test_plain_fedavg_scores_the_server_model_unadapted(leaf, tmp_path) -> None:
    runs = {}
    for finetune in ("false", "true"):
        config = federated_config(
            leaf, "strategy=fedavg", "iterations=2", f"federated.finetune_at_test={finetune}"
        )
        runs[finetune] = run_local(config, tmp_path / f"fedavg_{finetune}.h5")
    np.testing.assert_array_equal(runs["false"]["params/final"], runs["true"]["params/final"])
    assert (runs["false"]["final/test_loss"] != runs["true"]["final/test_loss"]).all()


def test_the_leaf_reader_joins_a_users_files_and_infers_images(tmp_path) -> None:
    first = write_leaf(tmp_path / "train.json", [5, 7])
    second = write_leaf(tmp_path / "test.json", [3, 2])
    data = fd.read_leaf([tmp_path])
    assert data.kind == "image" and data.x.shape == (17, 1, 4, 4)
    assert data.names == ["user00", "user01"] and data.counts().tolist() == [8, 9]
    assert data.classes == int(data.y.max()) + 1
    # Files in name order: test.json's examples come first, then train.json's.
    for row, (file, index) in enumerate([(second, 0), (second, 1), (second, 2), (first, 0)]):
        expected = json.loads(file.read_text())["user_data"]["user00"]["x"][index]
        np.testing.assert_allclose(data.x[row].ravel(), expected, rtol=1e-6)
    (tmp_path / "v").mkdir()
    vector = fd.read_leaf([write_leaf(tmp_path / "v" / "v.json", [4], features=5)])
    assert vector.kind == "vector" and vector.x.shape == (4, 5)


def test_the_leaf_reader_reads_shakespeare_windows(tmp_path) -> None:
    table = {
        "users": ["a", "b"],
        "num_samples": [2, 1],
        "user_data": {"a": {"x": ["abc", "bcd"], "y": ["d", "e"]}, "b": {"x": ["xyz"], "y": ["!"]}},
    }
    (tmp_path / "s.json").write_text(json.dumps(table))
    data = fd.read_leaf([tmp_path / "s.json"])
    assert data.kind == "characters" and data.window == 3 and data.counts().tolist() == [2, 1]
    windows = data.text[data.x[:, None] + np.arange(3)]
    decoded = ["".join(shakespeare.VOCABULARY[i] for i in row) for row in windows]
    assert decoded == ["abc", "bcd", "xyz"]
    assert [shakespeare.VOCABULARY[i] for i in data.y] == ["d", "e", "!"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("{not json", "is not readable JSON"),
        ('{"users": []}', "must hold users, num_samples and user_data"),
        (
            '{"users": ["a"], "num_samples": [3], '
            '"user_data": {"a": {"x": [[1], [2]], "y": [0, 1]}}}',
            "user 'a' has 2 x and 2 y but num_samples says 3",
        ),
        ('{"users": ["a"], "num_samples": [1], "user_data": {}}', "user 'a' has no x and y"),
    ],
)
def test_bad_leaf_input_gives_one_line(tmp_path, content, message) -> None:
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DmetaError) as error:
        fd.read_leaf([path])
    assert message in str(error.value) and "\n" not in str(error.value)


MODERN = """THE TRAGEDY OF KING LEAR

Persons Represented.

Lear, King of Britain.
Fool.

ACT I.

SCENE I. A Room of State.

[Enter Kent, Gloster, and Edmund.]

Kent.
I thought the king had more affected
the Duke of Albany.

Glou.
It did always seem so to us.

[Exit Kent.]

So it did.

FIRST CITIZEN.
Speak, speak.
"""

FOLIO = """The Tragedie of King Lear

Actus Primus. Scoena Prima.

Enter Kent, Gloucester, and Edmond.

  Kent. I thought the King had more affected the
Duke of Albany, then Cornwall

   Glou. It did alwayes seeme so to vs: But
now in the diuision
  Lear. Meane time
Exeunt.
"""


def test_the_shakespeare_parser_reads_both_layouts() -> None:
    modern = shakespeare.parse_play(MODERN, folio=False)
    assert modern == {
        "Kent": ["I thought the king had more affected", "the Duke of Albany."],
        "Glou": ["It did always seem so to us.", "So it did."],
        "FIRST CITIZEN": ["Speak, speak."],
    }
    folio = shakespeare.parse_play(FOLIO, folio=True)
    assert folio == {
        "Kent": ["I thought the King had more affected the", "Duke of Albany, then Cornwall"],
        "Glou": ["It did alwayes seeme so to vs: But", "now in the diuision"],
        "Lear": ["Meane time"],
    }
    assert len(shakespeare.VOCABULARY) == 80
    assert shakespeare.encode("a\n|").tolist() == [shakespeare.VOCABULARY.index("a"), 0, 1]


def test_each_role_is_a_client_of_next_character_windows(tmp_path) -> None:
    (tmp_path / "lear_gut.txt").write_text(MODERN)
    (tmp_path / "lear_gut_f.txt").write_text(FOLIO)  # a folder gives the modern plays only
    data = fd.shakespeare_clients([tmp_path], 10)
    assert data.names == ["lear_gut/FIRST CITIZEN", "lear_gut/Glou", "lear_gut/Kent"]
    text = "I thought the king had more affected\nthe Duke of Albany."
    glou = "It did always seem so to us.\nSo it did."
    assert data.counts().tolist() == [3, len(glou) - 10, len(text) - 10]
    kent = data.offsets[2]
    window = data.text[data.x[kent] + np.arange(10)]
    assert "".join(shakespeare.VOCABULARY[i] for i in window) == text[:10]
    assert shakespeare.VOCABULARY[data.y[kent]] == text[10]


def test_the_character_lstm_vmaps_over_clients() -> None:
    model = build_char_lstm(80, 3, 5, 2)
    theta = model.initial_parameters(0, torch.arange(2), False, torch.float64)
    characters = torch.randint(0, 80, (2, 4, 6))
    batched = vmap(model.forward)(theta, characters)
    assert batched.shape == (2, 4, 80)
    for client in range(2):
        torch.testing.assert_close(
            batched[client], model.forward(theta[client], characters[client])
        )


@pytest.mark.parametrize(
    "setting, message",
    [
        ("federated.paths=[]", "problem = 'federated' needs federated.paths"),
        ("federated.support_fraction=1", "federated.support_fraction = 1.0 must lie in (0, 1)"),
        ("federated.support_fraction=0", "federated.support_fraction = 0.0 must lie in (0, 1)"),
        ("federated.min_samples=1", "federated.min_samples = 1 must be at least 2"),
        ("federated.max_samples=5", "federated.max_samples = 5 must be 0 (no cap) or at least"),
        ("federated.test_fraction=0.95", "must be positive and sum to less than 1"),
    ],
)
def test_bad_federated_data_settings_give_one_line(leaf, setting, message) -> None:
    with pytest.raises(DmetaError) as error:
        federated_config(leaf, setting)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_batch_norm_is_refused_on_padded_clients(leaf, tmp_path) -> None:
    config = federated_config(leaf, "model.norm=batch")
    with pytest.raises(DmetaError, match="set model.norm = 'group'"):
        Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(9), tmp_path / "r.h5")


def test_omniglot_writers_are_clients_of_their_alphabets_characters() -> None:
    from test_omniglot import SOURCES

    if not all(source.exists() for source in SOURCES):
        pytest.skip(f"the Omniglot subsets are not at {SOURCES[0].parent} (set DMETA_OMNIGLOT)")
    data = fd.omniglot_writers(SOURCES, 8)
    alphabets = sorted({name.split("/")[0] for name in data.names})
    assert len(alphabets) == 8 and len(data.names) == 8 * 20
    assert data.x.shape[1:] == (1, 8, 8) and data.classes == 242
    for client, name in enumerate(data.names[:40]):
        labels = data.y[data.offsets[client] : data.offsets[client + 1]]
        # One drawing of each of the alphabet's characters: distinct labels, the same count
        # for every drawer of the alphabet.
        assert len(set(labels.tolist())) == len(labels)
        first = data.names.index(f"{name.split('/')[0]}/drawer01")
        assert len(labels) == data.counts()[first]
