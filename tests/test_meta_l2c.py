"""meta-L2C (issue 17, item 3): the encoder and attention against hand-written loops, the
encoder gradient against finite differences, rounds against a hand-written loop over nodes,
checkpoints, the pretrained encoder's round trip and bad input."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import in_neighbours, own_tasks, read_datasets, run_local, small_config

from dmeta import rng
from dmeta.algorithms.base import CommTimer
from dmeta.algorithms.meta_l2c import attention_weights, embed, encoder_layout
from dmeta.config import ModelConfig, load_config
from dmeta.engine import Engine, execute
from dmeta.errors import DmetaError
from dmeta.exchange import LocalExchange
from dmeta.models import build_mlp
from dmeta.runfile import load_run
from dmeta.runner import plan_run

TINY = [
    "strategy=meta_l2c", "runtime.dtype=float64", "model.hidden=[8]", "learner.tasks_per_agent=2",
    "task.support_shots=4", "l2c.validation_tasks=2", "validation.stationarity_tasks=0",
]  # fmt: skip


def build(tmp_path: Path, *settings: str) -> Engine:
    config = small_config(*TINY, *settings)
    return Engine(plan_run(config, 1, 0, 0, 1), LocalExchange(config.agents), tmp_path / "r.h5")


@pytest.mark.parametrize("sharing", ["channel", "layer"])
def test_the_encoder_and_attention_equal_a_hand_written_loop(sharing) -> None:
    """An MLP 2 -> 3 -> 4 -> 1: layers of 3, 4 and 1 channels (a weight row and its bias) of
    3, 4 and 5 values; E_l = two affine maps to 10 then 5 per channel (eq. 7) or per layer,
    concatenated (eq. 8); w_i = softmax over the active slots of <E(q_i), E(k_is)> (eq. 4-5)."""
    model = build_mlp(ModelConfig(hidden=[3, 4]), 2, 1)
    layout = encoder_layout(model.slots, model.num_parameters, [10, 5], sharing)
    channels, widths = [3, 4, 1], [3, 4, 5]
    assert [layer.channels for layer in layout.layers] == channels
    whole = [c * w for c, w in zip(channels, widths, strict=True)]
    inputs = widths if sharing == "channel" else whole
    assert layout.widths == tuple(inputs)
    generator = torch.Generator().manual_seed(0)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    maps = [(normal(10, n), normal(10), normal(5, 10), normal(5)) for n in inputs]
    params = torch.cat([part.reshape(-1) for parts in maps for part in parts])
    assert params.numel() == layout.size

    def by_hand(change: torch.Tensor) -> torch.Tensor:
        tensors = model.unflatten(change)
        weights = [v for k, v in tensors.items() if k.endswith("weight")]
        biases = [v for k, v in tensors.items() if k.endswith("bias")]
        out = []
        for (a1, c1, a2, c2), weight, bias in zip(maps, weights, biases, strict=True):
            rows = [torch.cat([weight[c], bias[c : c + 1]]) for c in range(len(bias))]
            inputs_ = rows if sharing == "channel" else [torch.cat(rows)]
            for x in inputs_:
                out.append(a2 @ (a1 @ x + c1) + c2)
        return torch.cat(out)

    change = normal(model.num_parameters)
    torch.testing.assert_close(embed(layout, params, change), by_hand(change), rtol=1e-13, atol=0)
    queries, keys = normal(4, model.num_parameters), normal(4, 3, model.num_parameters)
    active = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.bool)
    weights = attention_weights(layout, params, queries, keys, active)
    for i in range(4):
        logits = torch.stack([by_hand(keys[i, s]) @ by_hand(queries[i]) for s in range(3)])
        expected = torch.exp(logits - logits[active[i]].max()) * active[i]
        torch.testing.assert_close(weights[i], expected / expected.sum(), rtol=1e-10, atol=0)


def test_a_meta_sgd_row_encodes_its_step_sizes_as_a_second_copy() -> None:
    model = build_mlp(ModelConfig(hidden=[3]), 1, 1)
    once = encoder_layout(model.slots, model.num_parameters, [10, 5], "channel")
    twice = encoder_layout(model.slots, 2 * model.num_parameters, [10, 5], "channel")
    assert twice.widths == 2 * once.widths and twice.size == 2 * once.size
    shifted = [(o + model.num_parameters, n) for layer in once.layers for o, n in layer.pieces]
    assert [p for layer in twice.layers[2:] for p in layer.pieces] == shifted


def test_a_channel_shared_encoder_fits_a_model_with_another_number_of_outputs() -> None:
    """Eq. (7): E_l sees one channel at a time, so its shapes do not depend on how many
    channels a layer has (the paper's CIFAR-100 -> CIFAR-10 transfer); a layer-wide E_l's do."""
    one, three = (build_mlp(ModelConfig(hidden=[8]), 1, outputs) for outputs in (1, 3))
    for sharing, same in (("channel", True), ("layer", False)):
        a, b = (encoder_layout(m.slots, m.num_parameters, [10, 5], sharing) for m in (one, three))
        assert (a.widths == b.widths) is same and (a.size == b.size) is same


def test_the_encoder_gradient_equals_finite_differences(tmp_path) -> None:
    """d/d encoder of sum_i L(theta_i - sum_j w_ij Delta_j; D_i^val), w from the attention of
    the changes through the exchange, against central differences of the same losses after a
    dense aggregation; every encoder parameter, float64."""
    engine = build(tmp_path, "graph.topology=erdos_renyi", "graph.edge_probability=0.5")
    algorithm = engine.algorithm
    generator = torch.Generator().manual_seed(3)
    start = algorithm.models().clone()
    updates = 0.3 * torch.randn(start.shape, generator=generator, dtype=torch.float64)
    changes = 0.5 * torch.randn(start.shape, generator=generator, dtype=torch.float64)
    encoder = algorithm.shared["encoder"][0].clone()
    aggregated, gradient = algorithm.aggregate(1, start, updates, changes, CommTimer(start.device))
    neighbours = in_neighbours(engine)
    layout = algorithm.layout

    def losses(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = [embed(layout, params, change) for change in changes]
        models = []
        for i, sources in enumerate(neighbours):
            weights = torch.softmax(torch.stack([codes[j] @ codes[i] for j in sources]), dim=0)
            mixed = sum(w * updates[j] for w, j in zip(weights, sources, strict=True))
            models.append(start[i] - mixed)
        models = torch.stack(models)
        return algorithm.validation_loss(1, models).sum(), models

    torch.testing.assert_close(aggregated, losses(encoder)[1], rtol=1e-12, atol=1e-12)
    numeric = torch.zeros_like(encoder)
    step = 1e-6
    for n in range(len(encoder)):
        shift = torch.zeros_like(encoder)
        shift[n] = step
        numeric[n] = (losses(encoder + shift)[0] - losses(encoder - shift)[0]) / (2 * step)
    assert gradient.abs().max() > 1e-3
    torch.testing.assert_close(gradient, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("decoupled", [False, True])
def test_rounds_equal_a_hand_written_loop_over_nodes(tmp_path, decoupled) -> None:
    """Two local SGD steps of MAML per node, the attention of the changes since theta^0
    (eq. 4-5), eq. (2) on the updates, torch.optim.Adam with weight decay on the shared
    encoder over the nodes' mean validation loss (eq. 6), and pruning of the weakest
    neighbour by the round's weights after round 2 of the ring: every node, one at a time;
    the logged terms of each encoder step (gradient and decay norms, the share |g| > |d|)."""
    engine = build(
        tmp_path, "optimizer.name=sgd", "optimizer.lr=0.05", "l2c.local_epochs=2",
        "l2c.prune_round=2", "l2c.prune_count=1", "l2c.alpha_lr=0.05",
        f"l2c.alpha_decoupled_decay={str(decoupled).lower()}",
    )  # fmt: skip
    algorithm, learner, lr = engine.algorithm, engine.learner, 0.05
    layout, neighbours = algorithm.layout, in_neighbours(engine)
    theta = algorithm.models().clone()
    theta0 = theta.clone()
    encoder = algorithm.shared["encoder"][0].clone().requires_grad_()
    adam = torch.optim.Adam([encoder], lr=0.05, weight_decay=0.01, decoupled_weight_decay=decoupled)
    active = [torch.ones(len(n), dtype=torch.bool) for n in neighbours]
    for t in range(1, 4):
        half = []
        for i in range(7):
            w = theta[i]
            for step in range(2):
                tasks = own_tasks(engine, i, 2 * (t - 1) + step + 1, 2, rng.STREAM_TASKS)
                w = w - lr * torch.func.grad(learner.agent_meta_loss)(w, tasks)
            half.append(w)
        delta, change = theta - torch.stack(half), torch.stack(half) - theta0
        codes = [embed(layout, encoder, change[j]) for j in range(7)]
        aggregated, losses, weights = [], [], []
        for i in range(7):
            logits = torch.stack([codes[j] @ codes[i] for j in neighbours[i]])
            w = torch.softmax(logits.masked_fill(~active[i], -torch.inf), dim=0)
            model = theta[i] - sum(w[p] * delta[j] for p, j in enumerate(neighbours[i]))
            tasks = own_tasks(engine, i, t, 2, rng.STREAM_L2C_VALIDATION)
            losses.append(learner.agent_meta_loss(model, tasks))
            aggregated.append(model.detach())
            weights.append(w.detach())
        adam.zero_grad()
        (sum(losses) / 7).backward()
        gradient, decay = encoder.grad.clone(), 0.01 * encoder.detach().clone()
        adam.step()
        theta = torch.stack(aggregated)
        algorithm.round(t)
        # The logged terms of the step: |g| of eq. (6), |d| of the decay, the share |g| > |d|.
        terms = algorithm.row_values()
        assert terms["l2c/gradient_norm"] == pytest.approx(float(gradient.norm()), rel=1e-10)
        assert terms["l2c/decay_norm"] == pytest.approx(float(decay.norm()), rel=1e-12)
        share = float((gradient.abs() > decay.abs()).double().mean())
        assert 0 < share < 1 and terms["l2c/gradient_share"] == share
        torch.testing.assert_close(algorithm.models(), theta, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            algorithm.shared["encoder"][0], encoder.detach(), rtol=1e-10, atol=1e-12
        )
        for i in range(7):
            torch.testing.assert_close(algorithm.weights()[i], weights[i], rtol=1e-10, atol=1e-12)
        if t == 2:
            for i in range(7):
                key = weights[i].masked_fill(torch.tensor(neighbours[i]) == i, torch.inf)
                active[i][int(torch.argmin(key))] = False
    assert (algorithm.weights() > 0).sum(dim=1).tolist() == [2] * 7
    assert not torch.equal(algorithm.weights()[:, 0], algorithm.weights()[:, 1])


def test_a_run_logs_the_encoder_and_a_checkpoint_resumes_to_the_same_file(tmp_path) -> None:
    """/l2c/encoder's columns are the flat encoder, split over the agents; /mixing/weights
    starts uniform. Stopped at iteration 6, after pruning at 4: the encoder, its Adam state
    and theta^0 come back from the checkpoint (shared and per-agent state)."""
    config = small_config(
        *TINY, "graph.topology=complete", "iterations=12", "l2c.prune_round=4",
        "l2c.prune_count=3", "checkpoint.poll_every=3", "checkpoint.every_minutes=1e-9",
        "optimizer.name=sgd", "optimizer.lr=0.05",
    )  # fmt: skip
    plan = plan_run(config, 1, 0, 0, 1)
    out = tmp_path / "run.h5"
    asked = iter([False, True])
    assert execute(plan, None, out, show_progress=False, stop_requested=lambda: next(asked)) == 6
    with h5py.File(f"{out}.ckpt") as f:
        assert not f["agents/l2c/active"][()].all(), "pruned before the checkpoint"
        assert f["shared/l2c/adam/step"][()].tolist() == [6]
    assert execute(plan, None, out, show_progress=False, resume=True) is None
    resumed, reference = read_datasets(out), run_local(config, tmp_path / "reference.h5")
    assert resumed.keys() == reference.keys()
    for name in resumed:
        if not name.startswith("time/"):
            np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
    encoder = reference["l2c/encoder"]
    with h5py.File(tmp_path / "reference.h5") as f:
        attributes = dict(f["topology"].attrs)
    assert attributes["kind"] == "attention" and attributes["encoder_sharing"] == "channel"
    assert encoder.shape == (4, attributes["encoder_parameters"])
    assert attributes["encoder_widths"].tolist() == [2, 9]  # [8, 1] + [8]; [1, 8] + [1]
    np.testing.assert_allclose(reference["mixing/weights"][0], 1 / 7)
    kept = np.bincount(
        reference["topology/edges"][:, 1], weights=reference["mixing/weights"][-1] > 0
    )
    assert kept.tolist() == [4] * 7


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished meta_l2c run file of 7 nodes on a ring."""
    path = tmp_path_factory.mktemp("trained") / "trained.h5"
    config = small_config(*TINY, "iterations=4", "optimizer.name=sgd", "optimizer.lr=0.05")
    run_local(config, path)
    return path


def test_a_pretrained_encoder_is_loaded_and_applied_to_new_nodes(tmp_path, trained) -> None:
    """Another seed, 5 new nodes on a complete graph: every row of /l2c/encoder is the last
    row of the trained run's (not trained further), unless l2c.train_pretrained, where only
    row 0 is; the step terms are NaN untrained, and trained the decay is 0.01 times the
    previous row's encoder norm."""
    last = read_datasets(trained)["l2c/encoder"][-1]
    new = [*TINY, "agents=5", "seed=9", "graph.topology=complete", "iterations=2",
           "log_every=1", f"l2c.pretrained={trained}"]  # fmt: skip
    applied = run_local(load_config(None, new), tmp_path / "applied.h5")
    assert applied["l2c/encoder"].shape == (3, len(last))
    np.testing.assert_array_equal(applied["l2c/encoder"], np.broadcast_to(last, (3, len(last))))
    assert not np.allclose(applied["mixing/weights"][1], applied["mixing/weights"][0])
    for name in ("l2c/gradient_norm", "l2c/decay_norm", "l2c/gradient_share"):
        assert np.isnan(applied[name]).all(), f"{name}: the encoder takes no step"
    with h5py.File(tmp_path / "applied.h5") as f:
        assert f["topology"].attrs["encoder_pretrained"] == str(trained)
        assert f["topology"].attrs["encoder_pretrained_iteration"] == 4
    trained_further = run_local(
        load_config(None, [*new, "l2c.train_pretrained=true"]), tmp_path / "further.h5"
    )
    np.testing.assert_array_equal(trained_further["l2c/encoder"][0], last)
    assert not np.allclose(trained_further["l2c/encoder"][-1], last)
    # Row t's decay term is alpha_weight_decay (0.01) times the encoder before round t's step.
    assert np.isnan(trained_further["l2c/decay_norm"][0])
    np.testing.assert_allclose(
        trained_further["l2c/decay_norm"][1:],
        0.01 * np.linalg.norm(trained_further["l2c/encoder"][:-1], axis=1),
        rtol=1e-12,
    )


def test_load_run_leaves_the_per_edge_and_encoder_series_to_h5py(trained) -> None:
    """/mixing/weights [T, E] and /l2c/encoder [T, N] are no per-agent columns of the frames
    (they used to break them: every per-agent column must have T x K values)."""
    run = load_run(trained)
    assert run.agents.shape[0] == 2 * 7  # rows at iterations 0 and 4, 7 agents
    assert "metrics/val_loss" in run.agents and "mixing/weights" not in run.agents
    assert "l2c/encoder" not in run.agents


def test_bad_pretrained_files_give_one_line(tmp_path, trained) -> None:
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an HDF5 file")
    empty = tmp_path / "empty.h5"
    h5py.File(empty, "w").close()
    cases = [
        (tmp_path / "missing.h5", [], "missing.h5': no such file"),
        (garbage, [], "garbage.h5' is not a readable run file"),
        (empty, [], "holds no meta-L2C encoder"),
        (trained, ["model.hidden=[16,16]"], "holds an encoder for layers of input widths [2, 9]"),
        (trained, ["l2c.encoder_dims=[10,4]"], "encoder_dims [10, 5]"),
    ]
    for path, settings, message in cases:
        config = small_config(*TINY, f"l2c.pretrained={path}", *settings)
        with pytest.raises(DmetaError) as error:
            execute(plan_run(config, 1, 0, 0, 1), None, tmp_path / "r.h5", show_progress=False)
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize(
    "settings, message",
    [
        (["l2c.encoder_dims=[]"], "l2c.encoder_dims = [] must hold one or more positive widths"),
        (["l2c.encoder_dims=[10,0]"], "must hold one or more positive widths"),
        (["l2c.encoder_sharing=filter"], "l2c.encoder_sharing"),
        (["strategy=l2c", "l2c.pretrained=x.h5"], "set strategy = 'meta_l2c'"),
        (["graph.schedule=link_failures"], "strategy = 'meta_l2c' learns weights over a static"),
    ],
)
def test_bad_meta_l2c_settings_give_one_line(settings, message) -> None:
    with pytest.raises(DmetaError) as error:
        plan_run(small_config("strategy=meta_l2c", *settings), 1, 0, 0, 1)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_example_job_runs(tmp_path) -> None:
    job = Path(__file__).parent.parent / "jobs" / "meta_l2c_sine.toml"
    quick = ["iterations=3", "log_every=1", "validation.tasks=4", "runtime.threads=1",
             "l2c.prune_round=2", "agents=6", "l2c.prune_count=3"]  # fmt: skip
    config = load_config(job, quick)
    assert config.strategy == "meta_l2c"
    data = run_local(config, tmp_path / "job.h5")
    assert data["l2c/encoder"].shape[0] == 4
