"""Models and data by name: the plug-in surface used by the campaign layer and the CLI.

Model specs (``load_model``):
  ``vit_digits``, ``cnn_digits``   embedded models, trained weights shipped in ``qfi/zoo/checkpoints``
  ``package.module:callable``     any importable factory, called with no arguments
  ``torchvision:<name>``          a torchvision model (needs the ``vision`` extra); nothing is downloaded:
                                  pass ``weights=<path>``, or get a randomly initialised model
``weights`` is a path to a state dict, raw or under a ``"state_dict"`` key (the shipped checkpoint format).

Data specs (``load_data``): ``digits`` (scikit-learn's real 8x8 digits, no download), or
``imagefolder:<path>`` / an existing directory laid out as ``<path>/<class>/<image>``.
"""

from __future__ import annotations

import importlib
import pickle
import re
import warnings
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import QfiError
from .cnn import CNN_DIGITS_CONFIG, DigitsCNN
from .data import IMAGENET_MEAN, IMAGENET_STD, digits_dataset, image_folder_dataset
from .vit import VIT_DIGITS_CONFIG, VisionTransformer

__all__ = [
    "EMBEDDED_MODELS",
    "MissingDependencyError",
    "ZooError",
    "default_data_for",
    "load_data",
    "load_model",
]

EMBEDDED_MODELS = ("vit_digits", "cnn_digits")
_BUILDERS = {
    "vit_digits": (VisionTransformer, VIT_DIGITS_CONFIG),
    "cnn_digits": (DigitsCNN, CNN_DIGITS_CONFIG),
}
_MODEL_FORMS = f"embedded: {', '.join(EMBEDDED_MODELS)}; or 'module:callable', 'torchvision:<name>'"
_TORCHVISION_HINT = (
    "pip install torch==2.14.1 torchvision==0.29.1 (or the 'vision' extra: pip install 'qfi[vision]')"
)


class ZooError(QfiError):
    """A model or data spec that cannot be resolved; the message names the bad value and what is allowed."""


class MissingDependencyError(ZooError, ImportError):
    """An optional dependency (torchvision) is needed for this spec."""


def _head(source) -> tuple[int | None, bytes]:
    """(size in bytes or None when unknown, first 4 bytes) of a path or a seekable binary file."""
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as f:
                return Path(source).stat().st_size, f.read(4)
        pos = source.tell()
        head = source.read(4)
        size = source.seek(0, 2) - pos
        source.seek(pos)
        return size, head
    except (OSError, AttributeError, ValueError):
        return None, b""


def _load_failure(source, e: BaseException) -> str:
    """Why ``torch.load`` failed, always in words: its message is sometimes empty (an empty file
    gives a bare ``EOFError``) or a bare key (``KeyError: '101'`` for a text file)."""
    if isinstance(e, OSError):
        return str(e) or type(e).__name__
    size, head = _head(source)
    if size == 0:
        return "the file is empty (0 bytes)"
    # torch.save writes a zip archive; files of torch < 1.6 start with a pickle protocol byte
    if head and not head.startswith((b"PK\x03\x04", b"\x80")):
        return f"not a torch.save file (it starts with {head!r})"
    text = str(e).strip()
    if isinstance(e, pickle.UnpicklingError):  # a pickled model or other objects, not tensors
        why = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. |\n|$)", text)
        return (
            f"{type(e).__name__}: {why[1] if why else 'not a plain dict of tensors'}; weights are read "
            "with torch.load(weights_only=True): save model.state_dict(), not the model"
        )
    msg = text.splitlines()[0].split(". ")[0][:200] if text else ""  # the first sentence: the advice
    return f"{type(e).__name__}: {msg}" if msg else f"{type(e).__name__} (truncated or corrupt file?)"


def _read_checkpoint(source) -> dict:
    label = str(source if isinstance(source, (str, Path)) else getattr(source, "name", source))
    try:
        with warnings.catch_warnings():  # a plain pickle warns before it fails: keep the failure
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # re-raised with the path named and a reason
        raise ZooError(f"cannot read weights {label!r}: {_load_failure(source, e)}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": obj}
    raise ZooError(f"weights {label!r} hold neither a state dict nor a dict with a 'state_dict' key")


def _load_state(model: nn.Module, ckpt: dict, what: str) -> None:
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as e:
        raise ZooError(f"weights do not fit {what}: {e}") from e


def _embedded(name: str, weights) -> nn.Module:
    if weights is None:
        ref = resources.files(__name__).joinpath("checkpoints").joinpath(f"{name}.pt")
        with ref.open("rb") as f:
            ckpt = _read_checkpoint(f)
    else:
        ckpt = _read_checkpoint(Path(weights))
    cls, default = _BUILDERS[name]
    model = cls(**ckpt.get("config", default))
    _load_state(model, ckpt, repr(name))
    return model


def _from_callable(spec: str) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ZooError(f"cannot import model factory {spec!r}: {e}") from e
    if not callable(factory):
        raise ZooError(f"model factory {spec!r} is a {type(factory).__name__}, not a callable")
    try:
        model = factory()
    except Exception as e:  # the user's code: name the spec and what it raised
        msg = str(e).strip()
        raise ZooError(
            f"model factory {spec!r} raised {type(e).__name__}" + (f": {msg}" if msg else "")
        ) from e
    if not isinstance(model, nn.Module):
        raise ZooError(f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _torchvision(name: str) -> nn.Module:
    try:
        import torchvision.models as tvm
    except ImportError as e:
        raise MissingDependencyError(
            f"model 'torchvision:{name}' needs torchvision: {_TORCHVISION_HINT}"
        ) from e
    try:
        return tvm.get_model(name, weights=None)
    except ValueError as e:
        known = ", ".join(tvm.list_models()[:12])
        raise ZooError(f"unknown torchvision model {name!r}; e.g. {known}, ...") from e


def load_model(spec: str = "vit_digits", weights: str | Path | None = None, device="cpu") -> nn.Module:
    """The model named by ``spec`` with ``weights`` loaded (strictly), on ``device``, in eval mode.

    Embedded models load their shipped checkpoint unless ``weights`` is given.  For the other forms
    ``weights=None`` keeps the factory's own initialisation (random for ``torchvision:<name>``).
    """
    if spec in EMBEDDED_MODELS:
        model = _embedded(spec, weights)
    elif spec.startswith("torchvision:"):
        model = _torchvision(spec.removeprefix("torchvision:"))
    elif spec.count(":") == 1 and all(spec.split(":")):
        model = _from_callable(spec)
    else:
        raise ZooError(f"unknown model {spec!r}; {_MODEL_FORMS}")
    if weights is not None and spec not in EMBEDDED_MODELS:
        _load_state(model, _read_checkpoint(Path(weights)), repr(spec))
    return model.to(device).eval()


def load_data(
    spec: str = "digits",
    split: str = "test",
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> Dataset:
    """The dataset named by ``spec``, yielding ``(image, label)`` pairs ready for the model.

    ``digits``: ``split`` is "train" or "test"; the images are 8x8 with fixed normalisation, so
    ``image_size`` may only be None or 8 and ``mean``/``std`` must be None.  Image folders ignore
    ``split`` (point at the split's folder); ``image_size`` defaults to 224, ``mean``/``std`` to
    ImageNet's.
    """
    if spec == "digits":
        if image_size not in (None, 8) or mean is not None or std is not None:
            raise ZooError(
                f"digits are 8x8 with fixed normalisation; got image_size={image_size!r}, "
                f"mean={mean!r}, std={std!r} (allowed: image_size None or 8, mean/std None)"
            )
        try:
            return digits_dataset(split)
        except ValueError as e:
            raise ZooError(str(e)) from e
    path = spec.removeprefix("imagefolder:")
    if spec.startswith("imagefolder:") or Path(spec).is_dir():
        try:
            return image_folder_dataset(path, image_size or 224, mean or IMAGENET_MEAN, std or IMAGENET_STD)
        except ValueError as e:
            raise ZooError(str(e)) from e
    raise ZooError(
        f"unknown data {spec!r}; allowed: 'digits', 'imagefolder:<path>', or an existing directory"
    )


def default_data_for(model_spec: str) -> str:
    """The data spec a model is evaluated on by default: ``digits`` for the embedded models."""
    if model_spec in EMBEDDED_MODELS:
        return "digits"
    raise ZooError(f"no default data for model {model_spec!r}; pass a data spec such as 'imagefolder:<path>'")
