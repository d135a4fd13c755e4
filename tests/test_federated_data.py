"""Federated data (issue 15, step 2): client splits, support/query sets, example-count weights,
per-client test accuracy, the LEAF reader, the Shakespeare parser, Omniglot's writers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from conftest import LEAF_SIZES, federated_config, run_local, write_leaf
from torch.func import vmap

from dmeta import federated_data as fd
from dmeta import rng, shakespeare
from dmeta.algorithms.federated import sample_clients
from dmeta.config import FederatedConfig
from dmeta.engine import Engine
from dmeta.errors import DmetaError
from dmeta.exchange import LocalExchange
from dmeta.models import build_char_lstm, build_word_lstm
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


def test_fedavg_meta_fine_tunes_with_finetune_lr_else_the_learners_step(leaf, tmp_path) -> None:
    import h5py

    runs = {}
    for name, inner, finetune in (("own", 0.1, 0.02), ("learner", 0.02, 0)):
        config = federated_config(
            leaf, "strategy=fedavg", "iterations=2", "federated.finetune_at_test=true",
            f"learner.inner_lr={inner}", f"federated.finetune_lr={finetune}",
        )  # fmt: skip
        runs[name] = run_local(config, tmp_path / f"{name}.h5")
        with h5py.File(tmp_path / f"{name}.h5") as f:
            assert json.loads(f.attrs["config"])["federated"]["finetune_lr"] == finetune
    # 0.02 as finetune_lr fine-tunes exactly as 0.02 as the learner's step (FedAvg's training
    # never takes the learner's step), on the validation clients and on the test clients.
    for name in ("params/final", "metrics/val_loss", "final/test_loss"):
        np.testing.assert_array_equal(runs["own"][name], runs["learner"][name])


FEDAVG = ["strategy=fedavg", "federated.server_optimizer=sgd", "federated.server_lr=1"]


def client_rows(task: fd.FederatedDataTask, agent: int) -> torch.Tensor:
    """A training client's example rows, support then query, without padding."""
    support, query = task.tables["train"]
    return torch.cat([support[agent][support[agent] >= 0], query[agent][query[agent] >= 0]])


def hand_written_fedavg(engine, theta, t, batch_size):
    """McMahan et al.'s Algorithm 1 for round t by torch.autograd, one sampled client at a time:
    each local epoch steps on the client's batch_size mini-batches (0: all its data) in the order
    drawn for (seed, client, stream 24, the epoch's draw), torch's mean cross entropy on each.
    Returns the example-weighted average model and mean client loss (mean batch loss of an epoch,
    summed over the epochs)."""
    config, task = engine.config, engine.task
    settings = config.federated
    sampled = sample_clients(config.seed, t, config.agents, settings.clients_per_round)
    width = task.training_rows.shape[1]
    models, losses, sizes = [], [], []
    for agent in sampled.tolist():
        rows = client_rows(task, agent)
        w = theta.clone()
        loss = 0.0
        for epoch in range(settings.local_epochs):
            draw = (t - 1) * settings.local_epochs + epoch + 1
            if batch_size:
                keys = rng.uniform(
                    config.seed, torch.tensor([agent]), rng.STREAM_CLIENT_BATCHES, draw, (width,),
                    dtype=torch.float64,
                )[0, : len(rows)]  # fmt: skip
                batches = rows[torch.argsort(keys, stable=True)].split(batch_size)
            else:
                batches = (rows,)
            batch_losses = []
            for batch in batches:
                w = w.detach().requires_grad_()
                value = F.cross_entropy(
                    engine.learner.forward(w, task._inputs(batch)), task.y[batch]
                )
                (gradient,) = torch.autograd.grad(value, w)
                w = w - settings.client_lr * gradient
                batch_losses.append(float(value.detach()))
            loss += sum(batch_losses) / len(batch_losses)
        models.append(w.detach())
        losses.append(loss)
        sizes.append(float(len(rows)))
    weights = torch.tensor(sizes, dtype=torch.float64)
    average = (weights[:, None] * torch.stack(models)).sum(0) / weights.sum()
    return average, float(weights @ torch.tensor(losses, dtype=torch.float64) / weights.sum())


@pytest.mark.parametrize("batch_size", [0, 3])
def test_a_fedavg_round_equals_a_hand_written_loop_over_the_sampled_clients(
    leaf, tmp_path, batch_size
) -> None:
    """Full batch (0) and mini-batches of 3: the clients' 8 to 15 examples take 3 to 5 steps an
    epoch, each client its own number, in its own drawn order; two local epochs."""
    config = federated_config(
        leaf, *FEDAVG, "federated.client_lr=0.3", "federated.local_epochs=2",
        f"federated.batch_size={batch_size}",
    )  # fmt: skip
    engine = Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(9), tmp_path / "r.h5")
    for t in (1, 2):
        theta = engine.algorithm.server[0].clone()
        report = engine.algorithm.round(t)
        expected, loss = hand_written_fedavg(engine, theta, t, batch_size)
        torch.testing.assert_close(engine.algorithm.server[0], expected, rtol=1e-12, atol=1e-14)
        assert report.steps == 2
        np.testing.assert_allclose(float(report.loss_sum[0]), loss, rtol=1e-12)
    sampled = sample_clients(config.seed, 2, 9, 4)
    steps = [-(-len(client_rows(engine.task, u)) // 3) for u in sampled.tolist()]
    assert len(set(steps)) > 1, "the test needs clients with different numbers of batches"


def test_fedavg_batches_of_a_clients_size_or_more_are_its_full_batch(leaf, tmp_path) -> None:
    servers = {}
    for batch_size in (0, 15, 40):  # the largest client holds 15 examples
        config = federated_config(leaf, *FEDAVG, f"federated.batch_size={batch_size}")
        engine = Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(9), tmp_path / "r.h5")
        engine.algorithm.round(1)
        servers[batch_size] = engine.algorithm.server[0]
    # The same examples in another order: the sums of the mean differ in the last bits only.
    for batch_size in (15, 40):
        torch.testing.assert_close(servers[batch_size], servers[0], rtol=1e-12, atol=1e-14)
    assert not torch.equal(servers[0], engine.algorithm.server[0].new_zeros(1))


def test_the_default_batch_size_is_todays_full_batch_bit_for_bit(leaf, tmp_path) -> None:
    """batch_size = 0 (the default) steps on all of a client's data with torch's mean cross
    entropy: the masked loss equals it to the bit, and is 0 with gradient 0 on padding alone."""
    runs = {}
    for name, extra in (("default", []), ("zero", ["federated.batch_size=0"])):
        config = federated_config(leaf, *FEDAVG, "iterations=2", *extra)
        runs[name] = run_local(config, tmp_path / f"{name}.h5")
    np.testing.assert_array_equal(runs["zero"]["params/final"], runs["default"]["params/final"])
    logits = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([2, fd.IGNORE, 0, 1, fd.IGNORE, 0])
    for dtype in (torch.float64, torch.float32):
        x = logits.detach().to(dtype).requires_grad_()
        mine = fd.masked_cross_entropy(x, labels)
        torchs = F.cross_entropy(x, labels)
        assert torch.equal(mine, torchs)
        assert torch.equal(torch.autograd.grad(mine, x)[0], torch.autograd.grad(torchs, x)[0])
    padding = torch.full((6,), fd.IGNORE)
    value = fd.masked_cross_entropy(logits, padding)
    assert float(value.detach()) == 0.0
    assert torch.equal(torch.autograd.grad(value, logits)[0], torch.zeros_like(logits))


def test_fedavg_batches_are_the_same_for_any_group_of_clients(leaf, tmp_path) -> None:
    """A client's mini-batches depend on (seed, client, round, epoch) alone: drawn with any other
    clients (another rank layout), the same rows, then padding alone."""
    config = federated_config(leaf, "strategy=fedavg", "federated.batch_size=4")
    engine = Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(9), tmp_path / "r.h5")
    task = engine.task
    together = list(task.minibatches(torch.arange(9), 5, 4))
    for group in (torch.tensor([3]), torch.tensor([0, 7]), torch.tensor([8, 2, 5])):
        apart = list(task.minibatches(group, 5, 4))
        for row, agent in enumerate(group.tolist()):
            count = len(client_rows(task, agent))
            for step, batch in enumerate(together):
                labels = batch.query_y[agent, 0]
                if step < len(apart):
                    assert torch.equal(apart[step].query_x[row, 0], batch.query_x[agent, 0])
                    assert torch.equal(apart[step].query_y[row, 0], labels)
                real = min(4, max(0, count - 4 * step))
                assert (labels[:real] != fd.IGNORE).all() and (labels[real:] == fd.IGNORE).all()
    # Another epoch draws another order.
    again = next(task.minibatches(torch.arange(9), 6, 4))
    assert not torch.equal(again.query_x, together[0].query_x)
    # A device round's epoch (the round as a tensor: no sizes read back) takes the batches of
    # the largest training client whoever is sampled; the extra ones are padding alone.
    small = torch.tensor([3, 8])  # 8 examples each: 2 batches of 4, where the largest needs 4
    eager, fixed = (
        list(task.minibatches(small, 5, 4)),
        list(task.minibatches(small, torch.tensor(5), 4)),
    )
    assert len(eager) == 2 and len(fixed) == len(together) == 4
    for a, b in zip(eager, fixed, strict=False):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all((batch.query_y == fd.IGNORE).all() for batch in fixed[2:])


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
        (
            '{"users": ["a"], "num_samples": [0], "user_data": {"a": {"x": [], "y": []}}}',
            "hold no samples: num_samples is 0 for each of their 1 users",
        ),
        (
            '{"users": ["a"], "num_samples": [2], '
            '"user_data": {"a": {"x": [["1", "d", "q", "a", "hi"]], "y": [1]}}}',
            "user 'a' has 1 x and 1 y but num_samples says 2",
        ),
        (
            '{"users": ["a"], "num_samples": [2], "user_data": {"a": {"x": '
            '[["1", "d", "q", "a", "hi"], ["2", "d", "q", "a", "ho"]], "y": [1, 4]}}}',
            "LEAF Sent140 user 'a': label 4 is not 0 or 1",
        ),
        (
            '{"users": ["a"], "num_samples": [2], "user_data": {"a": {"x": '
            '[["1", "d", "q", "a", "hi"], "ho"], "y": [1, 0]}}}',
            "LEAF Sent140 user 'a': sample 1 is not a record [id, date, query, user, text]",
        ),
        (
            '{"users": ["a"], "num_samples": [1], '
            '"user_data": {"a": {"x": ["img_001.jpg"], "y": [1]}}}',
            "image file names as inputs (CelebA)",
        ),
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


CAPITALS = """THE SONNETS

ACT I.

SCENE I. Athens.

[Enter THESEUS and HIPPOLYTA.]

THESEUS
Now, fair Hippolyta, our nuptial hour
                    Draws on apace;

FIRST FAIRY
Over hill, over dale,

[Exit.]

THESEUS.
Go, Philostrate.

XII
Not a speaker: a roman numeral.

HIPPOLYTA
Four days will quickly steep themselves in nights;
"""


def test_the_shakespeare_parser_reads_speakers_in_capitals_without_a_period() -> None:
    assert shakespeare.parse_play(CAPITALS, folio=False) == {
        "THESEUS": [
            "Now, fair Hippolyta, our nuptial hour",
            "Draws on apace;",
            "Go, Philostrate.",
            "XII",  # a roman numeral (the Sonnets' headings) names no speaker
            "Not a speaker: a roman numeral.",
        ],
        "FIRST FAIRY": ["Over hill, over dale,"],
        "HIPPOLYTA": ["Four days will quickly steep themselves in nights;"],
    }
    # Where speakers with a period are the more (the MODERN play), capitals alone name none.
    roles = shakespeare.parse_play(MODERN + "\nEDGAR\nSpoken on.\n", folio=False)
    assert roles["FIRST CITIZEN"] == ["Speak, speak.", "EDGAR", "Spoken on."]


MODERN_IRREGULAR = """KING HENRY THE EIGHTH

BUCKINGHAM
NORFOLK, a duke.

ACT I.

MRS. PAGE.
What, have I scaped love-letters?

POSTHUMUS.
My queen!

ALL.
Ay.

1 Clown.
Is she to be buried in Christian burial?
[Enter two Men bearing a coffin; then
LUCIUS and QUINTUS.]
It must be se offendendo; an
act hath three branches.
[A noise within, 'Down with the tawny-coats!'
What tumult's this?
[Aside.] Argal, she drowned herself.

NORFOLK.
I thank your Grace.

BUCKINGHAM.
Good morrow.

NORFOLK. [Aside.] Healthful; and ever since a fresh admirer
Of what I saw there.

BUCKINGHAM
An untimely ague

POSTHUMUS.

[Waking.]

Sleep, thou hast been a grandsire.

Hor. and Mar.
Ay, by heaven, my lord.

ALL. Amen.

ALL.

So be it.

Exit.
"""


def test_the_shakespeare_parser_reads_the_irregular_speaker_lines_of_modern_plays() -> None:
    # Abbreviated and numbered roles; a known speaker without the period, with the speech on
    # the same line (a stage direction there dropped) or after a blank line; two speaking
    # together are a role; the list of persons before the first heading is no speech; a stage
    # direction over two lines is no speech, one never closed is one line, one closed on its
    # line leaves the rest to the speech; a line opening with "act" is no heading.
    assert shakespeare.parse_play(MODERN_IRREGULAR, folio=False) == {
        "MRS. PAGE": ["What, have I scaped love-letters?"],
        "1 Clown": [
            "Is she to be buried in Christian burial?",
            "It must be se offendendo; an",
            "act hath three branches.",
            "What tumult's this?",
            "Argal, she drowned herself.",
        ],
        "NORFOLK": [
            "I thank your Grace.",
            "Healthful; and ever since a fresh admirer",
            "Of what I saw there.",
        ],
        "BUCKINGHAM": ["Good morrow.", "An untimely ague"],
        "POSTHUMUS": ["My queen!", "Sleep, thou hast been a grandsire."],
        "ALL": ["Ay.", "Amen.", "So be it."],
        "Hor. and Mar": ["Ay, by heaven, my lord."],
    }


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


def test_the_lstm_layer_and_its_gradient_equal_torchs_lstm() -> None:
    from dmeta.models import LSTMLayer

    torch.manual_seed(0)
    layer = LSTMLayer(3, 5).double()
    reference = torch.nn.LSTM(3, 5, batch_first=True).double()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_()
        reference.weight_ih_l0.copy_(layer.weight_ih)
        reference.weight_hh_l0.copy_(layer.weight_hh)
        reference.bias_ih_l0.copy_(layer.bias)
        reference.bias_hh_l0.zero_()
    sequence = torch.randn(4, 7, 3, dtype=torch.float64, requires_grad=True)
    mine, theirs = layer(sequence), reference(sequence)[0]
    torch.testing.assert_close(mine, theirs)
    weights = torch.randn_like(mine)  # a loss on every step's state
    got = torch.autograd.grad((weights * mine).sum(), [sequence, layer.weight_ih])
    expected = torch.autograd.grad((weights * theirs).sum(), [sequence, reference.weight_ih_l0])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


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
        ("federated.words=0", "federated.words = 0 must be at least 1"),
        ("federated.vocabulary_size=0", "federated.vocabulary_size = 0 must be at least 1"),
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


# LEAF Sent140: records [id, date, query, user, text], labels 0/1 (some as floats, as in LEAF's
# files). Users a, b, c, d, e; with min_samples = 2, test_fraction = validation_fraction = 0.2
# and seed 0 (SENT140 below) one test, one validation and three training clients.
TWEETS = {
    "a": [("I love it!! love, LOVE", 1), ("Bad day... so bad", 0), ("love the sun", 1.0)],
    "b": [("so tired; bad bad", 0), ("it's fine", 1), ("sun sun sun", 1)],
    "c": [("Rain again? ugh", 0.0), ("zebra zebra", 1), ("love", 1), ("bad", 0)],
    "d": [("unique words here", 1), ("more unique words", 0)],
    "e": [("nothing", 0), ("", 1), ("THE END", 0)],
}


def write_sent140(root, tweets=TWEETS):
    """LEAF's layout: train/ and test/ files, each user's first tweet in test/, the rest in
    train/ (the reader joins them)."""
    for split, part in (("train", slice(1, None)), ("test", slice(0, 1))):
        users = list(tweets)
        data = {}
        for user in users:
            held = tweets[user][part]
            records = [
                [f"{user}{i}", "Mon Apr 06", "NO_QUERY", user, t] for i, (t, _) in enumerate(held)
            ]
            data[user] = {"x": records, "y": [label for _, label in held]}
        table = {"users": users, "num_samples": [len(data[u]["y"]) for u in users]}
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / "all_data.json").write_text(json.dumps({**table, "user_data": data}))
    return root


SENT140 = [
    "agents=3", "federated.min_samples=2", "federated.validation_fraction=0.2",
    "federated.test_fraction=0.2", "federated.words=4", "model.embedding=3",
    "model.lstm_hidden=4", "model.lstm_layers=2", "federated.clients_per_round=2",
]  # fmt: skip


def test_the_leaf_reader_reads_sent140_tweets_as_words(tmp_path) -> None:
    data = fd.read_leaf([write_sent140(tmp_path)], words=4)
    assert data.kind == "words" and data.classes == 2 and data.x.shape == (15, 4)
    assert data.names == list("abcde") and data.counts().tolist() == [3, 3, 4, 2, 3]
    # test/ before train/: each user's first tweet comes first.
    assert data.y.tolist() == [1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0]

    def words(row):
        return [data.vocabulary[i - 2] for i in row if i != fd.PADDING]

    # LEAF's split, lower-cased, the first 4 words, padded at the front.
    assert words(data.x[0]) == ["i", "love", "it", "!"]
    assert data.x[2].tolist()[:1] == [fd.PADDING] and words(data.x[2]) == ["love", "the", "sun"]
    assert words(data.x[4]) == ["it's", "fine"]
    assert (data.x[13] == fd.PADDING).all()  # "" has no words
    assert fd.tokenize("Bad day... so bad") == ["bad", "day", ".", ".", ".", "so", "bad"]


def test_the_sent140_vocabulary_holds_the_training_clients_words_only(tmp_path) -> None:
    data = fd.read_leaf([write_sent140(tmp_path)], words=4)
    config = FederatedConfig(min_samples=2, validation_fraction=0.2, test_fraction=0.2)
    splits = fd.build_splits(data, config, seed=0)
    train = [data.names[c] for c in splits["train"].clients]
    held_out = [data.names[c] for s in ("validation", "test") for c in splits[s].clients]
    assert train == ["a", "b", "c"] and held_out == ["d", "e"]
    tokens = {
        user: [w for text, _ in TWEETS[user] for w in fd.tokenize(text)[:4]] for user in TWEETS
    }
    counts: dict[str, int] = {}
    for word in (w for user in train for w in tokens[user]):
        counts[word] = counts.get(word, 0) + 1
    before, words = data.x.copy(), data.vocabulary
    fd.restrict_vocabulary(data, splits["train"], 5)
    # By count, then alphabetically: sun 4, bad 3, love 3, "." 2, zebra 2 (the 1s cut).
    assert data.vocabulary == sorted(counts, key=lambda w: (-counts[w], w))[:5]
    assert data.vocabulary == ["sun", "bad", "love", ".", "zebra"]
    assert not {w for u in held_out for w in tokens[u]} & set(data.vocabulary)

    def restricted(index: int) -> int:
        if index == fd.PADDING:
            return fd.PADDING
        word = words[index - 2]
        return data.vocabulary.index(word) + 2 if word in data.vocabulary else fd.UNKNOWN

    # Every other word is unknown, in every client; padding stays padding.
    assert data.x.ravel().tolist() == [restricted(i) for i in before.ravel()]


def test_a_fedmeta_run_on_sent140_writes_finite_rows(tmp_path) -> None:
    root = write_sent140(tmp_path / "sent140")
    config = federated_config(root, *SENT140, "iterations=3", "log_every=1")
    data = run_local(config, tmp_path / "sent140.h5")
    assert data["tasks/clients_train"].tolist() == [0, 1, 2]
    assert data["metrics/train_loss"].shape == (4, 3)  # row 0: before any round
    assert np.isfinite(data["metrics/train_loss"][1:]).all()
    for name in ("metrics/val_accuracy", "final/test_accuracy", "final/test_loss"):
        assert np.isfinite(data[name]).all(), name
    # Embedding (the training clients' 19 distinct words, padding and unknown) x 3, two LSTMs
    # of 4 units, a 2-class head.
    lstm = 4 * 4 * (3 + 4 + 1) + 4 * 4 * (4 + 4 + 1)
    assert data["params/final"].shape[-1] == 21 * 3 + lstm + 4 * 2 + 2


def test_the_word_lstm_ignores_front_padding_and_vmaps_over_clients() -> None:
    model = build_word_lstm(12, 2, 3, 5, 2)
    theta = model.initial_parameters(0, torch.arange(2), False, torch.float64)
    words = torch.randint(2, 12, (2, 4, 6))
    words[:, :, :2] = fd.PADDING
    batched = vmap(model.forward)(theta, words)
    assert batched.shape == (2, 4, 2)
    for client in range(2):
        torch.testing.assert_close(batched[client], model.forward(theta[client], words[client]))
        unpadded = model.forward(theta[client], words[client, :, 2:])
        torch.testing.assert_close(batched[client], unpadded)


F64 = torch.float64


def test_glove_vectors_initialize_the_embedding_rows_of_their_words(tmp_path) -> None:
    root = write_sent140(tmp_path / "sent140")
    glove = tmp_path / "glove.txt"
    glove.write_text("sun 1 2 3\nabsent 4 5 6\nlove -1 -2 -3.5\n")
    config = federated_config(root, *SENT140, f"federated.embeddings={glove}")
    engine = Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(3), tmp_path / "r.h5")
    task = engine.task
    model = task.build_model(config.model)
    sun, love = (task.vocabulary.index(w) + 2 for w in ("sun", "love"))
    other = [i for i in range(len(task.vocabulary) + 2) if i not in (sun, love)]
    # The server starts from agent 0's launch model; each agent's has the same GloVe rows.
    server = model.unflatten(engine.algorithm.server[0])["embedding.weight"]
    agents = vmap(model.unflatten)(task.initial_parameters(model, torch.arange(3), False, F64))
    random = vmap(model.unflatten)(model.initial_parameters(0, torch.arange(3), False, F64))
    for table in (server[None], agents["embedding.weight"]):
        for row, vector in ((sun, [1.0, 2, 3]), (love, [-1.0, -2, -3.5])):
            expected = torch.tensor(vector, dtype=F64).expand_as(table[:, row])
            torch.testing.assert_close(table[:, row], expected)
    # Words the file lacks keep their random rows, per agent.
    torch.testing.assert_close(
        agents["embedding.weight"][:, other], random["embedding.weight"][:, other]
    )
    torch.testing.assert_close(server[other], random["embedding.weight"][0, other])


@pytest.mark.parametrize(
    "strategy",
    [
        ("strategy=fedmeta", "learner.name=maml"),
        ("strategy=fedmeta", "learner.name=metasgd"),
        ("strategy=fedavg", "federated.finetune_at_test=true", "learner.name=maml"),
    ],
)
@pytest.mark.parametrize("frozen", [False, True])
def test_frozen_glove_embeddings_take_no_step(tmp_path, strategy, frozen) -> None:
    """federated.freeze_embeddings (the paper's fixed GloVe): after two rounds the server's
    embedding is its initial one, bit for bit, while the rest of the model moved; unfrozen it
    moves too."""
    root = write_sent140(tmp_path / "sent140")
    glove = tmp_path / "glove.txt"
    glove.write_text("sun 1 2 3\nlove -1 -2 -3.5\n")
    config = federated_config(
        root,
        *SENT140,
        *strategy,
        "iterations=2",
        "log_every=1",
        "runtime.dtype=float64",
        f"federated.embeddings={glove}",
        f"federated.freeze_embeddings={str(frozen).lower()}",
    )
    data = run_local(config, tmp_path / "r.h5")
    engine = Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(3), tmp_path / "m.h5")
    model = engine.task.build_model(config.model)
    (slot,) = (slot for slot in model.slots if slot.name == "embedding.weight")
    table = slice(slot.offset, slot.offset + slot.size)
    before, after = data["params/initial"][0], data["params/final"][0]
    assert np.array_equal(after[table], before[table]) == frozen
    rest = np.ones(len(before), dtype=bool)
    rest[table] = False
    assert not np.array_equal(after[rest], before[rest])
    # A frozen embedding (and Meta-SGD's step sizes of it) is not sent: the clients hold it.
    copies = 2 if "learner.name=metasgd" in strategy else 1
    sent = copies * (model.num_parameters - (slot.size if frozen else 0)) * 8  # float64
    per_round = config.federated.clients_per_round * sent
    assert data["comm/bytes_up"][1:].tolist() == [per_round] * 2
    assert data["comm/bytes_down"][1:].tolist() == [per_round] * 2


def test_freezing_embeddings_without_glove_gives_one_line(tmp_path) -> None:
    root = write_sent140(tmp_path / "sent140")
    config = federated_config(root, *SENT140, "federated.freeze_embeddings=true")
    with pytest.raises(DmetaError, match="set federated.embeddings") as error:
        Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(3), tmp_path / "r.h5")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "content, data, message",
    [
        (None, "sent140", "is not a file"),
        ("", "sent140", "holds no vectors"),
        ("sun 1 2 3\nlove 1 2\n", "sent140", "line 2 of"),
        ("sun 1 2 x\n", "sent140", "line 1 of"),
        (
            "sun 1 2\n",
            "sent140",
            "holds 2-d vectors but model.embedding = 3: set model.embedding = 2",
        ),
        ("sun 1 2 3\n", "numeric", "applies to LEAF Sent140 data only"),
    ],
)
def test_bad_embeddings_give_one_line(tmp_path, leaf, content, data, message) -> None:
    glove = tmp_path / "glove.txt"
    if content is not None:
        glove.write_text(content)
    if data == "sent140":
        config = federated_config(
            write_sent140(tmp_path / "s"), *SENT140, f"federated.embeddings={glove}"
        )
    else:
        config = federated_config(leaf, f"federated.embeddings={glove}")
    with pytest.raises(DmetaError) as error:
        Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(config.agents), tmp_path / "r.h5")
    assert message in str(error.value) and "\n" not in str(error.value)
