"""Real data that needs no download: scikit-learn's digits, and image folders on disk.

Digits: the 1,797 real 8x8 images bundled in scikit-learn, split 75/25 stratified with a fixed seed
(1,347 train / 450 test), returned as float32 ``(N, 1, 8, 8)`` tensors: ``(pixel / 16 - MEAN) / STD``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "digits_dataset",
    "image_folder_dataset",
    "load_digits_split",
    "read_class_map",
]

DIGITS_MEAN = 0.3053  # mean and std of all 1,797 digits after /16, fixed here so checkpoints stay valid
DIGITS_STD = 0.3760
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@lru_cache(maxsize=4)
def _digits_arrays(seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits  # slow import (~1.4 s): only when digits are asked for
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = ((d.images / 16.0 - DIGITS_MEAN) / DIGITS_STD).astype(np.float32)[:, None]
    arrays = train_test_split(
        x, d.target.astype(np.int64), test_size=0.25, stratify=d.target, random_state=seed
    )
    for a in arrays:
        a.setflags(write=False)
    return tuple(arrays)


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: fresh tensors, the same for the same seed."""
    x_tr, x_te, y_tr, y_te = _digits_arrays(seed)
    return tuple(torch.tensor(a) for a in (x_tr, y_tr, x_te, y_te))  # type: ignore[return-value]


def digits_dataset(split: str = "test", seed: int = 0) -> TensorDataset:
    """The digits ``split`` ("train" or "test") as a dataset of ``(image (1, 8, 8), label)``."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown digits split {split!r}; allowed: 'train', 'test'")
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    return TensorDataset(x_tr, y_tr) if split == "train" else TensorDataset(x_te, y_te)


def read_class_map(source: object) -> dict[str, int]:
    """Folder name -> class index, from a mapping, a sequence of names (index = position) or a file.

    Files: JSON, either ``{"n01440764": 0, ...}``, Keras' ``imagenet_class_index.json``
    (``{"0": ["n01440764", "tench"], ...}``) or a list of names; or text, one class per line, its
    first word the folder name and its line number (from 0) the index (ImageNet's
    ``LOC_synset_mapping.txt``, a plain list of WordNet ids).
    """
    label = repr(str(source)) if isinstance(source, (str, Path)) else "given"
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read class map {str(path)!r}: {e}") from e
        if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("{", "["):
            try:
                source = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"class map {str(path)!r} is not valid JSON: {e}") from e
        else:
            lines = text.splitlines()
            while lines and not lines[-1].strip():
                lines.pop()
            for i, line in enumerate(lines):
                if not line.strip():
                    raise ValueError(
                        f"class map {str(path)!r} line {i + 1} is blank; each line names one class "
                        "(line number - 1 = class index)"
                    )
            source = [line.split()[0] for line in lines]
    if isinstance(source, Mapping):
        out: dict[str, int] = {}
        for k, v in source.items():
            if isinstance(v, (list, tuple)) and v and isinstance(v[0], str):  # Keras: index -> [wnid, label]
                k, v = v[0], k
            try:
                idx = int(v)
            except (TypeError, ValueError):
                raise ValueError(f"class map {label}: index {v!r} of {k!r} is not an integer") from None
            if idx < 0 or str(idx) != str(v).strip():
                raise ValueError(f"class map {label}: index {v!r} of {k!r} is not an integer >= 0")
            if k in out and out[k] != idx:
                raise ValueError(f"class map {label} gives {k!r} two indices, {out[k]} and {idx}")
            out[str(k)] = idx
    elif isinstance(source, (list, tuple)) and all(isinstance(n, str) for n in source):
        out = {}
        for i, n in enumerate(source):
            if n in out:
                raise ValueError(f"class map {label} lists {n!r} twice (indices {out[n]} and {i})")
            out[n] = i
    else:
        raise ValueError(
            f"class map {label} is a {type(source).__name__}; allowed: a dict of folder name -> index, "
            "a list of folder names, or a JSON or text file of either"
        )
    if not out:
        raise ValueError(f"class map {label} is empty")
    return out


def _classes(root: Path, class_map: dict[str, int] | None) -> tuple[list[str], dict[str, int]]:
    """The class folders under ``root`` (sorted) and their indices: their rank without a class
    map, their entry in it with one (a folder not in the map is an error naming it)."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if class_map is None:
        return folders, {c: i for i, c in enumerate(folders)}
    unknown = [f for f in folders if f not in class_map]
    if unknown:
        example = ", ".join(repr(k) for k in list(class_map)[:3])
        more = f"; {len(unknown) - 1} more folders are not in it" if len(unknown) > 1 else ""
        raise ValueError(
            f"folder {unknown[0]!r} under {str(root)!r} is not in the class map ({len(class_map)} "
            f"classes, e.g. {example}){more}"
        )
    return folders, {c: class_map[c] for c in folders}


class _PILImageFolder(Dataset):
    """``root/<class>/<image>``; class index = rank of the folder name, or its class-map entry."""

    def __init__(
        self, root: Path, image_size: int, mean, std, resize: int, mode: str, class_map: dict | None
    ) -> None:
        self.classes, self.class_to_idx = _classes(root, class_map)
        self.samples = [
            (f, self.class_to_idx[c])
            for c in self.classes
            for f in sorted((root / c).rglob("*"))
            if f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(f"no images found under {str(root)!r} (expected <root>/<class>/<image>)")
        self.image_size, self.resize, self.mode = image_size, resize, mode
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        size, r = self.image_size, self.resize
        with Image.open(path) as im:
            im = im.convert(self.mode)
            w, h = im.size  # resize the shorter side to `resize`, then center-crop `image_size`
            s = r / min(w, h)
            im = im.resize((max(r, round(w * s)), max(r, round(h * s))), Image.BILINEAR)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            im = im.crop((left, top, left + size, top + size))
            a = np.asarray(im, dtype=np.float32) / 255.0
            x = torch.from_numpy(a[:, :, None] if a.ndim == 2 else a).permute(2, 0, 1)
        return (x - self.mean) / self.std, label


def image_folder_dataset(
    path: str | Path,
    image_size: int = 224,
    mean=None,
    std=None,
    resize: int | None = None,
    channels: int | None = None,
    class_map: object = None,
) -> Dataset:
    """Images under ``path/<class>/``: the shorter side resized to ``resize`` (default
    ``image_size``; ImageNet evaluation uses 256 -> 224), center-cropped to ``image_size``, scaled
    to [0, 1] and normalised with ``mean``/``std``.

    ``channels``: 3 (default, RGB) or 1 (grayscale, PIL mode "L": one channel); ``mean``/``std``
    default to ImageNet's, averaged over the channels for grayscale (0.449, 0.226, as timm does).
    ``class_map``: a file, dict or list naming the class index of each folder (``read_class_map``),
    so a few class folders keep their indices among ImageNet's 1,000; every folder must be in it.
    Without one, a folder's class index is its rank among the sorted folder names.

    Uses torchvision's ``ImageFolder`` and transforms when torchvision is installed, otherwise a
    small PIL reader with the same class order.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder {str(path)!r} is not a directory")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    channels = channels or 3
    resize = image_size if resize is None else resize
    for what, v in (("image_size", image_size), ("resize", resize)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    if resize < image_size:
        raise ValueError(f"resize {resize} is smaller than image_size {image_size}: nothing to crop")
    if mean is None:
        mean = IMAGENET_MEAN if channels == 3 else (round(sum(IMAGENET_MEAN) / 3, 3),)
    if std is None:
        std = IMAGENET_STD if channels == 3 else (round(sum(IMAGENET_STD) / 3, 3),)
    for what, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, channels):
            raise ValueError(f"{what} has {len(v)} values; {channels}-channel images need 1 or {channels}")
    cmap = None if class_map is None else read_class_map(class_map)
    try:
        from torchvision import datasets, transforms
    except ImportError:
        return _PILImageFolder(root, image_size, mean, std, resize, "L" if channels == 1 else "RGB", cmap)
    tf = transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(image_size),
            *([transforms.Grayscale(1)] if channels == 1 else []),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    if cmap is None:
        return datasets.ImageFolder(str(root), transform=tf)

    class MappedImageFolder(datasets.ImageFolder):
        def find_classes(self, directory):  # type: ignore[override]
            return _classes(Path(directory), cmap)

    return MappedImageFolder(str(root), transform=tf)
