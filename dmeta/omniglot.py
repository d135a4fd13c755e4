"""Omniglot characters from the standard on-disk layout, and their meta-train/val/test splits.

Reads `<root>/<Alphabet>/<character>/<image>.png` (the `images_background` and
`images_evaluation` folders of the Omniglot release) from folders or from zip archives that
hold such a folder, in place: nothing is downloaded or copied. Images are inverted (ink = 1),
resized to `size` x `size` and stored as float32 in [0, 1]. A character present in several
sources (the small background subsets share Greek and Latin) is read once.

Episodes over these classes are drawn by dmeta.fewshot.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmeta.errors import DmetaError

LAYOUT = (
    "an Omniglot folder or zip in the standard layout: <root>/<Alphabet>/<character>/<id>.png "
    "(e.g. images_background/Greek/character01/0394_01.png)"
)


@dataclass
class CharacterSet:
    """Characters as classes: images [classes, drawings, size, size] and their names."""

    images: np.ndarray
    alphabets: list[str]
    names: list[str]  # "<Alphabet>/<character>"


def _png_to_array(data: bytes, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        ink = Image.eval(image.convert("L"), lambda v: 255 - v)  # white background -> 0
        return np.asarray(ink.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255


def _entries(source: Path) -> list[tuple[str, str, str, bytes]]:
    """(alphabet, character, image name, PNG bytes) of every image under `source`."""
    entries = []
    if source.is_dir():
        for png in sorted(source.rglob("*.png")):
            parts = png.relative_to(source).parts
            if len(parts) >= 3:
                entries.append((parts[-3], parts[-2], parts[-1], png.read_bytes()))
        return entries
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as error:
        raise DmetaError(
            f"{source} is not a readable zip archive ({error}); expected {LAYOUT}"
        ) from None
    with archive:
        for name in sorted(archive.namelist()):
            parts = name.split("/")
            if name.endswith(".png") and len(parts) >= 4:
                entries.append((parts[-3], parts[-2], parts[-1], archive.read(name)))
    return entries


def alphabets_of(source: Path) -> set[str]:
    """The alphabets with at least one image under `source`, from file names only (cheap: no
    image is read); DmetaError if it is neither a folder nor a readable zip."""
    if source.is_dir():
        found = set()
        for png in source.rglob("*.png"):
            parts = png.relative_to(source).parts
            if len(parts) >= 3:
                found.add(parts[-3])
        return found
    try:
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise DmetaError(
            f"{source} is not a readable zip archive ({error}); expected {LAYOUT}"
        ) from None
    return {name.split("/")[-3] for name in names if name.endswith(".png") and name.count("/") >= 3}


def check_sources(sources: list[Path], validation: list[str] | None, test: list[str]) -> None:
    """Before a run starts: every source exists and holds images, and the alphabets of an
    alphabet split (`validation`, `test`; None for a character split) are among them."""
    known: set[str] = set()
    for source in sources:
        if not source.exists():
            raise DmetaError(f"Omniglot source {source} does not exist; expected {LAYOUT}")
        found = alphabets_of(source)
        if not found:
            raise DmetaError(f"Omniglot source {source} holds no images; expected {LAYOUT}")
        known |= found
    if validation is not None:
        for alphabet in [*validation, *test]:
            if alphabet not in known:
                raise DmetaError(
                    f"fewshot alphabet {alphabet!r} is not among the sources' alphabets "
                    f"{sorted(known)}; change fewshot.validation_alphabets or test_alphabets"
                )


def load_characters(sources: list[str | Path], size: int = 28) -> CharacterSet:
    """Every character of the given folders or zips; DmetaError naming the layout if none."""
    drawings: dict[str, list[tuple[str, np.ndarray]]] = {}
    for source in map(Path, sources):
        if not source.exists():
            raise DmetaError(f"Omniglot source {source} does not exist; expected {LAYOUT}")
        seen_here: dict[str, list[tuple[str, np.ndarray]]] = {}
        for alphabet, character, image, data in _entries(source):
            seen_here.setdefault(f"{alphabet}/{character}", []).append(
                (image, _png_to_array(data, size))
            )
        if not seen_here:
            raise DmetaError(f"Omniglot source {source} holds no images; expected {LAYOUT}")
        for name, images in seen_here.items():
            drawings.setdefault(name, images)  # a character shared by two sources counts once
    names = sorted(drawings)
    counts = {len(drawings[name]) for name in names}
    if len(counts) != 1:
        raise DmetaError(f"Omniglot characters have different numbers of drawings: {counts}")
    images = np.stack([np.stack([a for _, a in sorted(drawings[name])]) for name in names])
    return CharacterSet(images, [name.split("/")[0] for name in names], names)


def split_by_alphabet(
    characters: CharacterSet, validation: list[str], test: list[str]
) -> dict[str, np.ndarray]:
    """Class indices of the meta-train, meta-validation and meta-test splits: whole alphabets,
    never shared between splits."""
    known = set(characters.alphabets)
    for alphabet in [*validation, *test]:
        if alphabet not in known:
            raise DmetaError(f"alphabet {alphabet!r} is not among {sorted(known)}")
    if set(validation) & set(test):
        raise DmetaError(f"alphabets {sorted(set(validation) & set(test))} are in two splits")
    alphabets = np.array(characters.alphabets)
    in_validation = np.isin(alphabets, validation)
    in_test = np.isin(alphabets, test)
    return {
        "train": np.flatnonzero(~in_validation & ~in_test),
        "validation": np.flatnonzero(in_validation),
        "test": np.flatnonzero(in_test),
    }


def split_by_character(
    order: np.ndarray, validation_fraction: float, test_fraction: float
) -> dict[str, np.ndarray]:
    """Class indices of the three splits: the first test_fraction of the classes in `order` (a
    permutation) are meta-test, the next validation_fraction meta-validation, the rest
    meta-train. Each split gets at least one class."""
    count = len(order)
    test = max(1, round(test_fraction * count))
    validation = max(1, round(validation_fraction * count))
    if test + validation >= count:
        raise DmetaError(f"{count} characters are too few to split into three non-empty sets")
    return {
        "train": np.sort(order[test + validation :]),
        "validation": np.sort(order[test : test + validation]),
        "test": np.sort(order[:test]),
    }


def with_rotations(images: np.ndarray) -> np.ndarray:
    """Each class and its rotations by 90, 180 and 270 degrees as four classes: [4 C, ...]."""
    return np.concatenate([np.rot90(images, turns, axes=(-2, -1)) for turns in range(4)])
