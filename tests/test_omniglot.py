"""Omniglot from the real small subsets (read in place) and N-way K-shot episodes over them."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dmeta import fewshot, omniglot, rng
from dmeta.errors import DmetaError


def _data_folder() -> Path:
    """DMETA_OMNIGLOT, else the first shared/datasets/omniglot beside a folder above the tests."""
    if "DMETA_OMNIGLOT" in os.environ:
        return Path(os.environ["DMETA_OMNIGLOT"])
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "shared" / "datasets" / "omniglot"
        if candidate.is_dir():
            return candidate
    return here.parents[2] / "shared" / "datasets" / "omniglot"


DATA = _data_folder()
SOURCES = [DATA / "images_background_small1.zip", DATA / "images_background_small2.zip"]


@pytest.fixture(scope="module")
def characters() -> omniglot.CharacterSet:
    if not all(source.exists() for source in SOURCES):
        pytest.skip(f"the Omniglot subsets are not at {DATA} (set DMETA_OMNIGLOT)")
    return omniglot.load_characters(SOURCES)


def test_the_small_subsets_hold_242_characters_of_8_alphabets(characters) -> None:
    assert characters.images.shape == (242, 20, 28, 28)
    assert len(set(characters.alphabets)) == 8
    assert len(set(characters.names)) == 242  # Greek and Latin, in both zips, counted once
    # Ink is 1 on a 0 background: a few percent of the pixels.
    assert 0.02 < characters.images.mean() < 0.3 and characters.images.max() == 1.0


def test_splits_are_whole_disjoint_alphabets(characters) -> None:
    splits = omniglot.split_by_alphabet(characters, ["Greek"], ["Korean", "Latin"])
    every = np.concatenate(list(splits.values()))
    assert sorted(every) == list(range(242))
    alphabets = np.array(characters.alphabets)
    assert set(alphabets[splits["validation"]]) == {"Greek"}
    assert set(alphabets[splits["test"]]) == {"Korean", "Latin"}
    assert not {"Greek", "Korean", "Latin"} & set(alphabets[splits["train"]])
    with pytest.raises(DmetaError, match="'Klingon' is not among"):
        omniglot.split_by_alphabet(characters, ["Klingon"], [])


@pytest.mark.parametrize(("ways", "samples"), [(5, 16), (5, 10), (20, 2)])
def test_episodes_have_n_distinct_classes_of_distinct_drawings_from_one_split(
    characters, ways, samples
) -> None:
    splits = omniglot.split_by_alphabet(characters, ["Greek"], ["Korean"])
    # Rotations are further classes of the same split: class c + 242 r for each rotation r.
    train = torch.as_tensor(np.concatenate([splits["train"] + 242 * r for r in range(4)]))
    chosen, picks = fewshot.episode_indices(
        train, 20, 0, torch.arange(3), rng.STREAM_TASKS, 7, 50, ways, samples
    )
    assert chosen.shape == (3, 50, ways) and picks.shape == (3, 50, ways, samples)
    assert set(chosen.flatten().tolist()) <= set(train.tolist())
    assert (torch.sort(chosen, dim=-1).values.diff(dim=-1) > 0).all()  # distinct classes
    assert (torch.sort(picks, dim=-1).values.diff(dim=-1) > 0).all()  # distinct drawings
    assert picks.min() >= 0 and picks.max() < 20


def test_episode_images_and_labels_follow_the_indices(characters) -> None:
    images = torch.as_tensor(omniglot.with_rotations(characters.images))[:, :, None]
    classes = torch.arange(len(images))
    agents = torch.arange(2)
    sx, sy, qx, qy = fewshot.sample_episodes(images, classes, 0, agents, 2, 5, 3, 5, 1, 15)
    assert sx.shape == (2, 3, 5, 1, 28, 28) and qx.shape == (2, 3, 75, 1, 28, 28)
    assert sy[0, 0].tolist() == [0, 1, 2, 3, 4] and qy[0, 0].tolist() == sorted(
        [0, 1, 2, 3, 4] * 15
    )
    chosen, picks = fewshot.episode_indices(classes, 20, 0, agents, 2, 5, 3, 5, 16)
    for n in range(5):
        assert torch.equal(sx[1, 2, n], images[chosen[1, 2, n], picks[1, 2, n, 0]])
        assert torch.equal(qx[1, 2, 15 * n + 3], images[chosen[1, 2, n], picks[1, 2, n, 4]])
    # A rotated class is the same character turned by 90 degrees.
    assert torch.equal(images[242 + 7, 3], torch.rot90(images[7, 3], 1, dims=(-2, -1)))


def test_per_agent_class_lists_give_each_agent_its_own_classes(characters) -> None:
    lists = torch.arange(60).reshape(3, 20)  # agent a draws from classes 20 a .. 20 a + 19
    chosen, _ = fewshot.episode_indices(lists, 20, 0, torch.arange(3), 2, 1, 40, 5, 2)
    for agent in range(3):
        assert set(chosen[agent].flatten().tolist()) <= set(lists[agent].tolist())
        assert (torch.sort(chosen[agent], dim=-1).values.diff(dim=-1) > 0).all()
        # Every class of the agent's list turns up over 40 tasks of 5.
        assert len(set(chosen[agent].flatten().tolist())) == 20


def test_episodes_are_keyed_per_agent(characters) -> None:
    images = torch.as_tensor(characters.images)[:, :, None]
    classes = torch.arange(100)
    together = fewshot.sample_episodes(images, classes, 1, torch.arange(4), 2, 3, 2, 5, 1, 1)
    alone = fewshot.sample_episodes(images, classes, 1, torch.tensor([2]), 2, 3, 2, 5, 1, 1)
    for a, b in zip(together, alone, strict=True):
        assert torch.equal(a[2], b[0])


def test_an_episode_larger_than_the_split_is_refused(characters) -> None:
    images = torch.as_tensor(characters.images)[:, :, None]
    with pytest.raises(DmetaError, match="needs 5 classes and 2 images"):
        fewshot.sample_episodes(images, torch.arange(3), 0, torch.arange(1), 2, 0, 1, 5, 1, 1)


def test_a_wrong_path_names_the_expected_layout(tmp_path) -> None:
    with pytest.raises(DmetaError, match="does not exist; expected an Omniglot folder"):
        omniglot.load_characters([tmp_path / "nowhere"])
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("readme.txt", "no images")
    with pytest.raises(DmetaError, match="holds no images; expected .*<Alphabet>/<character>"):
        omniglot.load_characters([empty])
    (tmp_path / "not_a_zip.zip").write_text("plain text")
    with pytest.raises(DmetaError, match="not a readable zip archive"):
        omniglot.load_characters([tmp_path / "not_a_zip.zip"])
