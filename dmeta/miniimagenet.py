"""MiniImagenet in the two on-disk forms users already have, read in place.

- The Ravi-Larochelle split: `<root>/train.csv`, `val.csv`, `test.csv` (header
  `filename,label`, one image per line) and the images in `<root>/images/`.
- The pickle form: `<root>/mini-imagenet-cache-{train,val,test}.pkl`, each a dict with
  `image_data` [N, H, W, 3] uint8 and `class_dict` {label: [row indices]}.

Both give the 64/16/20 classes of the three splits as uint8 images [classes, images per class,
3, size, size]; nothing is downloaded.
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np

from dmeta.errors import DmetaError

SPLITS = {"train": "train", "validation": "val", "test": "test"}
LAYOUT = (
    "a MiniImagenet folder holding either train.csv, val.csv, test.csv (lines 'filename,label') "
    "and images/<filename>, or mini-imagenet-cache-train.pkl, -val.pkl and -test.pkl"
)


def _pickle_path(root: Path, split: str) -> Path:
    return root / f"mini-imagenet-cache-{SPLITS[split]}.pkl"


def check_root(root: Path) -> str:
    """Which form the folder holds ("csv" or "pickle"); DmetaError naming the layout if neither."""
    if not root.is_dir():
        raise DmetaError(f"MiniImagenet folder {root} does not exist; expected {LAYOUT}")
    if all((root / f"{name}.csv").is_file() for name in SPLITS.values()):
        if not (root / "images").is_dir():
            raise DmetaError(f"{root} has the CSV files but no images/ folder; expected {LAYOUT}")
        return "csv"
    if all(_pickle_path(root, split).is_file() for split in SPLITS):
        return "pickle"
    raise DmetaError(f"{root} holds neither MiniImagenet form; expected {LAYOUT}")


def _equal_counts(rows: dict[str, list], where: str) -> None:
    counts = {len(items) for items in rows.values()}
    if len(counts) != 1:
        raise DmetaError(
            f"{where}: classes have different numbers of images ({sorted(counts)}); every class "
            "of a split must have as many images as the others"
        )


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 3] uint8 to [3, size, size] uint8."""
    from PIL import Image

    if image.shape[:2] != (size, size):
        resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
        image = np.asarray(resized)
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def _read_csv_split(root: Path, split: str, size: int) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    table = root / f"{SPLITS[split]}.csv"
    files: dict[str, list[str]] = {}
    with table.open(newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):
            if not row.get("filename") or not row.get("label"):
                raise DmetaError(
                    f"{table}, line {number}: expected the header 'filename,label' and two "
                    "fields on every line"
                )
            files.setdefault(row["label"], []).append(row["filename"])
    if not files:
        raise DmetaError(f"{table} lists no images; expected {LAYOUT}")
    _equal_counts(files, str(table))
    labels = sorted(files)
    images = []
    for label in labels:
        per_class = []
        for name in files[label]:
            path = root / "images" / name
            if not path.is_file():
                raise DmetaError(f"{table} lists {name}, which is not in {root / 'images'}")
            try:
                with Image.open(path) as image:
                    per_class.append(_resize(np.asarray(image.convert("RGB")), size))
            except OSError as error:  # PIL's UnidentifiedImageError is an OSError
                raise DmetaError(f"{path} is not a readable image ({error})") from None
        images.append(np.stack(per_class))
    return np.stack(images), labels


def _read_pickle_split(root: Path, split: str, size: int) -> tuple[np.ndarray, list[str]]:
    path = _pickle_path(root, split)
    try:
        data = _unpickle(path)
        image_data, class_dict = data["image_data"], data["class_dict"]
        _equal_counts(class_dict, str(path))
        labels = sorted(class_dict)
        images = np.stack(
            [
                np.stack([_resize(np.asarray(image_data[i]), size) for i in class_dict[label]])
                for label in labels
            ]
        )
    except DmetaError:
        raise
    except Exception as error:  # any malformed pickle: one line naming the file
        raise DmetaError(
            f"{path} is not a MiniImagenet cache (a dict with image_data [N, H, W, 3] uint8 "
            f"and class_dict {{label: [row indices]}}): {type(error).__name__}: {error}"
        ) from None
    return images, [str(label) for label in labels]


def _unpickle(path: Path) -> object:
    """The pickled object; caches written by Python 2 need latin-1 for their byte strings."""
    with path.open("rb") as handle:
        try:
            return pickle.load(handle)  # noqa: S301 - the user's own data file
        except UnicodeDecodeError:
            handle.seek(0)
            return pickle.load(handle, encoding="latin1")  # noqa: S301


def load_splits(root: str | Path, size: int = 84) -> dict[str, tuple[np.ndarray, list[str]]]:
    """{split: (uint8 images [classes, images, 3, size, size], class labels)} for the three
    splits; DmetaError if a class appears in two splits."""
    root = Path(root)
    read = _read_csv_split if check_root(root) == "csv" else _read_pickle_split
    splits = {split: read(root, split, size) for split in SPLITS}
    seen: dict[str, str] = {}
    for split, (_, labels) in splits.items():
        for label in labels:
            if label in seen:
                raise DmetaError(f"MiniImagenet class {label} is in both {seen[label]} and {split}")
            seen[label] = split
    return splits
