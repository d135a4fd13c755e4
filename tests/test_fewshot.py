"""Few-shot classification: MiniImagenet's two on-disk forms, class splits, the task and its runs.

The MiniImagenet files here are tiny synthetic copies of the real layouts (conftest), so these
tests run anywhere; the Omniglot run uses the real subsets when they are present.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import FEWSHOT, mix, read_datasets, run_local, small_config, write_miniimagenet
from test_omniglot import SOURCES

from dmeta import fewshot, miniimagenet, rng
from dmeta.checkpoint import checkpoint_path
from dmeta.config import load_config
from dmeta.engine import execute
from dmeta.errors import DmetaError
from dmeta.meta import MAML
from dmeta.models import build_convnet
from dmeta.runner import plan_run
from dmeta.tasks import TaskBatch

F64 = torch.float64


@pytest.mark.parametrize("form", ["csv", "pickle"])
def test_both_miniimagenet_forms_give_the_same_three_disjoint_splits(tmp_path, form) -> None:
    root = write_miniimagenet(tmp_path / form, form, classes=5, images=6, size=12)
    splits = miniimagenet.load_splits(root, size=10)
    assert list(splits) == ["train", "validation", "test"]
    for split, (images, labels) in splits.items():
        assert images.shape == (5, 6, 3, 10, 10) and images.dtype == np.uint8
        assert labels == sorted(labels) and len(set(labels)) == 5
        assert all(label.startswith(f"n{miniimagenet.SPLITS[split]}") for label in labels)


def test_the_csv_and_pickle_forms_hold_the_same_images(tmp_path) -> None:
    csv_form = miniimagenet.load_splits(write_miniimagenet(tmp_path / "c", "csv", size=8), 8)
    pickled = miniimagenet.load_splits(write_miniimagenet(tmp_path / "p", "pickle", size=8), 8)
    for split in ("train", "validation", "test"):
        assert np.array_equal(csv_form[split][0], pickled[split][0])
        assert csv_form[split][1] == pickled[split][1]


def test_wrong_miniimagenet_paths_name_the_expected_layout(tmp_path) -> None:
    with pytest.raises(DmetaError, match="does not exist; expected a MiniImagenet folder"):
        miniimagenet.load_splits(tmp_path / "nowhere")
    with pytest.raises(DmetaError, match="holds neither MiniImagenet form; expected .*train.csv"):
        miniimagenet.load_splits(tmp_path)
    root = write_miniimagenet(tmp_path / "csv", "csv")
    (root / "val.csv").write_text("filename,label\nmissing.jpg,nval000\n")
    with pytest.raises(DmetaError, match="lists missing.jpg, which is not in"):
        miniimagenet.load_splits(root)
    root = write_miniimagenet(tmp_path / "corrupt", "csv")
    next((root / "images").iterdir()).write_bytes(b"not an image")
    with pytest.raises(DmetaError, match="is not a readable image"):
        miniimagenet.load_splits(root)
    root = write_miniimagenet(tmp_path / "pickle", "pickle")
    (root / "mini-imagenet-cache-val.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DmetaError, match="is not a MiniImagenet cache"):
        miniimagenet.load_splits(root)
    broken = {"image_data": np.zeros((2, 4, 4, 3), np.uint8), "class_dict": {"n1": [0, 5]}}
    (root / "mini-imagenet-cache-val.pkl").write_bytes(pickle.dumps(broken))
    with pytest.raises(DmetaError, match="is not a MiniImagenet cache .*IndexError"):
        miniimagenet.load_splits(root)


def test_a_class_in_two_miniimagenet_splits_is_refused(tmp_path) -> None:
    root = write_miniimagenet(tmp_path, "csv", classes=5, images=3)
    train = (root / "train.csv").read_text()
    (root / "test.csv").write_text(train)
    with pytest.raises(DmetaError, match="is in both train and test"):
        miniimagenet.load_splits(root)


def test_a_missing_data_path_fails_when_the_run_is_planned(tmp_path) -> None:
    config = load_config(None, [*FEWSHOT, f"fewshot.paths=[{tmp_path / 'absent'}]"])
    with pytest.raises(DmetaError, match="absent does not exist; expected a MiniImagenet"):
        plan_run(config, 1, 0, 0, 1)
    config = load_config(None, ["problem=fewshot", f"fewshot.paths=[{tmp_path / 'absent.zip'}]"])
    with pytest.raises(DmetaError, match="absent.zip does not exist; expected an Omniglot"):
        plan_run(config, 1, 0, 0, 1)
    config = load_config(None, [*FEWSHOT, "fewshot.paths=[$DMETA_NOT_SET_ANYWHERE/mini]"])
    with pytest.raises(DmetaError, match=r"uses \$DMETA_NOT_SET_ANYWHERE, which is not set"):
        plan_run(config, 1, 0, 0, 1)
    with pytest.raises(DmetaError, match="needs fewshot.paths"):
        load_config(None, ["problem=fewshot"])


@pytest.fixture
def mini_root(tmp_path):
    return write_miniimagenet(tmp_path / "mini", "pickle", classes=6, images=5, size=8)


def _task(root, *overrides: str, agents: int = 4) -> fewshot.FewShotTask:
    config = load_config(None, [*FEWSHOT, f"fewshot.paths=[{root}]", *overrides])
    return fewshot.FewShotTask(config.fewshot, agents, 3, F64, torch.device("cpu"))


def test_training_validation_and_test_episodes_never_mix_splits(mini_root) -> None:
    task = _task(mini_root)
    splits = {name: set(ids.tolist()) for name, ids in task.classes.items()}
    assert not splits["train"] & splits["validation"] and not splits["train"] & splits["test"]
    assert not splits["validation"] & splits["test"]
    agents = torch.arange(4)
    for split, batch in [
        ("train", task.sample(agents, 5, 3)),
        ("validation", task.validation_set(load_config().validation)),
        ("test", next(task.test_batches(0))),
    ]:
        # Every image of every episode is an image of its split's classes.
        pool = task.images[task.classes[split]].to(F64) / 255
        flat_pool = pool.reshape(-1, *pool.shape[2:])
        for part in (batch.support_x, batch.query_x):
            images = part.reshape(-1, *part.shape[-3:])
            matches = (images[:, None] == flat_pool[None]).flatten(2).all(dim=2)
            assert (matches.sum(dim=1) >= 1).all(), split
    batch = task.sample(agents, 5, 3)
    # N classes, K support and Q query examples each: labels 0..N-1, K and Q times.
    assert batch.support_x.shape == (4, 3, 3 * 1, 3, 8, 8)
    assert batch.query_x.shape == (4, 3, 3 * 2, 3, 8, 8)
    assert torch.equal(torch.bincount(batch.support_y[2, 1]), torch.ones(3, dtype=torch.long))
    assert torch.equal(torch.bincount(batch.query_y[2, 1]), 2 * torch.ones(3, dtype=torch.long))


def test_disjoint_partition_gives_agents_their_own_meta_train_classes(mini_root) -> None:
    with pytest.raises(DmetaError, match="gives each of 4 agents 1 of the 6 meta-train classes"):
        _task(mini_root, "fewshot.partition=disjoint")
    task = _task(mini_root, "fewshot.partition=disjoint", "fewshot.ways=2", agents=3)
    lists = task.agent_classes
    assert lists.shape == (3, 2) and len(set(lists.flatten().tolist())) == 6
    assert set(lists.flatten().tolist()) == set(task.classes["train"].tolist())
    labels_of_images = {
        tuple(task.images[c, i].flatten().tolist()): c
        for c in range(len(task.images))
        for i in range(task.images.shape[1])
    }
    batch = task.sample(torch.arange(3), 2, 4)
    for agent in range(3):
        for image in batch.query_x[agent].reshape(-1, 3, 8, 8):
            key = tuple((image * 255).round().to(torch.uint8).flatten().tolist())
            assert labels_of_images[key] in lists[agent].tolist()


def test_omniglot_character_split_uses_every_character_once() -> None:
    order = np.random.default_rng(0).permutation(40)
    from dmeta.omniglot import split_by_character

    splits = split_by_character(order, 0.1, 0.25)
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [26, 4, 10]
    assert sorted(np.concatenate(list(splits.values()))) == list(range(40))


def test_chunked_evaluation_equals_all_tasks_at_once() -> None:
    model = build_convnet(3, 8, 3, filters=4, blocks=2, norm="batch")
    learner = MAML(model.forward, torch.nn.functional.cross_entropy, 0.3, 2, False)
    generator = torch.Generator().manual_seed(0)
    tasks = TaskBatch(
        torch.rand(7, 3, 3, 8, 8, generator=generator, dtype=F64),
        torch.arange(3).repeat(7, 1),
        torch.rand(7, 6, 3, 8, 8, generator=generator, dtype=F64),
        torch.arange(3).repeat_interleave(2).repeat(7, 1),
    )
    theta = model.initial_parameters(0, torch.arange(2), False, F64)
    whole = learner.evaluate(theta, tasks, 2, (fewshot.accuracy,))
    chunked = learner.evaluate(theta, tasks, 2, (fewshot.accuracy,), tasks_at_once=3)
    assert whole.shape == (2, 7, 2)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    assert ((whole[..., 1] * 6) == (whole[..., 1] * 6).round()).all()  # k of 6 queries right
    for agent in range(2):
        for index in range(7):
            adapted = learner.adapt(theta[agent], tasks.support_x[index], tasks.support_y[index], 2)
            logits = model.forward(adapted, tasks.query_x[index])
            expected = torch.nn.functional.cross_entropy(logits, tasks.query_y[index])
            torch.testing.assert_close(whole[agent, index, 0], expected, rtol=1e-10, atol=1e-12)


def test_the_combine_step_mixes_batch_norm_parameters_like_any_other(mini_root) -> None:
    """Batch norm keeps no running statistics (nothing else to combine); its scale and shift
    are slots of the flat launch model, so agent k's become sum_l a[l, k] of its neighbours'."""
    task = _task(mini_root)
    model = task.build_model(load_config(None, ["model.filters=4", "model.blocks=2"]).model)
    assert not list(model.module.buffers())
    rows = torch.randn(3, model.num_parameters, dtype=F64)
    matrix = np.array([[0.5, 0.2, 0.0], [0.5, 0.3, 0.6], [0.0, 0.5, 0.4]])
    combined = mix(matrix, rows)
    for name in ("1.weight", "1.bias", "5.weight"):
        expected = sum(matrix[j, 1] * model.unflatten(rows[j])[name] for j in range(3))
        torch.testing.assert_close(model.unflatten(combined[1])[name], expected)


def test_a_fewshot_run_writes_validation_and_meta_test_accuracy(mini_root, tmp_path) -> None:
    config = small_config(
        *FEWSHOT, f"fewshot.paths=[{mini_root}]", "agents=4", "iterations=6", "log_every=3"
    )
    data = run_local(config, tmp_path / "run.h5")
    accuracy = data["metrics/val_accuracy"]
    assert accuracy.shape == (3, 4) and ((accuracy >= 0) & (accuracy <= 1)).all()
    assert data["centroid/val_accuracy"].shape == (3,)
    assert data["final/test_accuracy"].shape == (4,)
    assert data["final/test_accuracy_ci95"].shape == (4,)
    assert (data["final/test_accuracy_ci95"] > 0).all()
    assert data["final/test_loss"].shape == (4,)
    import h5py

    with h5py.File(tmp_path / "run.h5") as f:
        attributes = f["final/test_accuracy"].attrs
        assert np.isclose(attributes["network_mean"], data["final/test_accuracy"].mean())
        assert 0 < attributes["network_ci95"] < 0.5


def test_episodes_of_a_run_do_not_depend_on_which_agents_a_rank_holds(mini_root) -> None:
    task = _task(mini_root)
    together = task.sample(torch.arange(4), 9, 2, stream=rng.STREAM_TASKS)
    alone = task.sample(torch.tensor([3]), 9, 2, stream=rng.STREAM_TASKS)
    for a, b in zip(together, alone, strict=True):
        assert torch.equal(a[3], b[0])


def test_omniglot_run_on_the_real_subsets(tmp_path) -> None:
    if not all(source.exists() for source in SOURCES):
        pytest.skip(f"the Omniglot subsets are not at {SOURCES[0].parent} (set DMETA_OMNIGLOT)")
    config = small_config(
        "problem=fewshot",
        f"fewshot.paths=[{','.join(map(str, SOURCES))}]",
        "fewshot.test_tasks=20",
        "model.filters=4",
        "agents=3",
        "iterations=2",
        "log_every=1",
        "validation.tasks=3",
        "validation.stationarity_tasks=2",
        "learner.tasks_per_agent=1",
    )
    data = run_local(config, tmp_path / "omniglot.h5")
    # Rotations make 4 classes of each of the 24 Greek characters.
    assert len(data["tasks/classes_validation"]) == 96
    assert data["final/test_accuracy"].shape == (3,)
    assert data["metrics/val_accuracy"].shape == (3, 3)


def test_the_meta_test_set_comes_in_groups_that_make_up_the_whole(mini_root) -> None:
    task = _task(mini_root)
    (whole,) = list(task.test_batches(0))
    groups = list(task.test_batches(3))
    assert [len(group.support_x) for group in groups] == [3, 3, 1]  # 7 test tasks
    for part, pieces in zip(whole, zip(*groups, strict=True), strict=True):
        assert torch.equal(part, torch.cat(pieces))


def test_a_stop_at_the_last_iteration_resumes_into_the_final_evaluation(
    mini_root, tmp_path
) -> None:
    overrides = [*FEWSHOT, f"fewshot.paths=[{mini_root}]", "agents=4", "iterations=6"]
    config = small_config(*overrides, "log_every=3", "checkpoint.poll_every=1")
    reference = run_local(config, tmp_path / "reference.h5")
    polls = iter(range(1, 100))
    plan = plan_run(config, 1, 0, 0, 1)
    out = tmp_path / "stopped.h5"
    stopped = execute(plan, None, out, show_progress=False, stop_requested=lambda: next(polls) == 6)
    # The training is saved before the final evaluation, which the resumed run then does.
    assert stopped == 6 and checkpoint_path(out).exists() and not out.exists()
    execute(plan, None, out, show_progress=False, resume=True)
    resumed = read_datasets(out)
    names = ("final/test_accuracy", "final/test_accuracy_ci95", "params/final")
    for name in (*names, "metrics/val_accuracy"):
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
    assert not checkpoint_path(out).exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["fewshot.image_size=8", "model.blocks=4"], "max-pools halve a 8x8 image to nothing"),
        (["model.norm=group", "model.filters=12"], "must be a multiple of 8"),
    ],
)
def test_conv_settings_that_cannot_work_are_refused(tmp_path, setting, message) -> None:
    with pytest.raises(DmetaError, match=message):
        load_config(None, [*FEWSHOT, f"fewshot.paths=[{tmp_path}]", *setting])
