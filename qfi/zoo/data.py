"""Real data that needs no download: scikit-learn's digits, and image folders on disk.

Digits: the 1,797 real 8x8 images bundled in scikit-learn, split 75/25 stratified with a fixed seed
(1,347 train / 450 test), returned as float32 ``(N, 1, 8, 8)`` tensors: ``(pixel / 16 - MEAN) / STD``.
"""

from __future__ import annotations

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


class _PILImageFolder(Dataset):
    """``root/<class>/<image>``; class index = position of the folder name in sorted order."""

    def __init__(self, root: Path, image_size: int, mean, std) -> None:
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.samples = [
            (f, i)
            for i, c in enumerate(self.classes)
            for f in sorted((root / c).rglob("*"))
            if f.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(f"no images found under {str(root)!r} (expected <root>/<class>/<image>)")
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size  # resize the shorter side to image_size, then center-crop a square
            s = self.image_size / min(w, h)
            im = im.resize(
                (max(self.image_size, round(w * s)), max(self.image_size, round(h * s))), Image.BILINEAR
            )
            left, top = (im.size[0] - self.image_size) // 2, (im.size[1] - self.image_size) // 2
            im = im.crop((left, top, left + self.image_size, top + self.image_size))
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std, label


def image_folder_dataset(
    path: str | Path, image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> Dataset:
    """Images under ``path/<class>/``: resized (shorter side) and center-cropped to ``image_size``,
    scaled to [0, 1] and normalised with ``mean``/``std``.  Uses torchvision's ``ImageFolder`` when it
    is installed, otherwise a small PIL reader with the same class order (sorted folder names)."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder {str(path)!r} is not a directory")
    try:
        from torchvision import datasets, transforms
    except ImportError:
        return _PILImageFolder(root, image_size, mean, std)
    tf = transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    return datasets.ImageFolder(str(root), transform=tf)
