"""Models and data by name: the plug-in surface used by the campaign layer and the CLI.

Model specs (``load_model``):
  ``vit_digits``, ``cnn_digits``   embedded models, trained weights shipped in ``qfi/zoo/checkpoints``
  ``package.module:callable``     any importable factory returning an ``nn.Module``
  ``torchvision:<name>``          a torchvision model (needs the ``vision`` extra); nothing is downloaded:
                                  pass ``weights=<path>``, or get a randomly initialised model
``weights`` is a path to a state dict, raw or under a ``"state_dict"`` key (the shipped checkpoint format).

Data specs (``load_data``):
  ``digits``                      scikit-learn's real 8x8 digits, no download
  ``imagefolder:<path>``          (or an existing directory) images laid out as ``<path>/<class>/<image>``
  ``package.module:callable``     any importable factory returning samples (the contract below)

**Arguments.** Factories (``module:callable``, and ``torchvision:<name>``) take keyword
arguments from ``args=`` (a mapping; YAML ``model_args:`` / ``data_args:``) or inline in the spec,
``module:callable?key=value&key2=value2``, each value read as a YAML scalar (``32``, ``0.1``,
``1e-3``, ``true``, ``null``, ``[1, 2]``, else a string; no ``&`` inside values).  Image folders
take their options the same way (``imagefolder:<path>?resize=256&class_map=<file>``).  A data
factory with a ``split`` parameter gets ``split="test"`` for evaluation and ``"train"`` for
calibration; ``split`` is therefore no argument of its own.  A bad argument is an error naming
the spec, the argument and what the factory raised.

**The data contract.** A data factory returns a torch ``Dataset`` (map-style or iterable), a
sequence or other finite iterable of samples, or a mapping of equally long tensors (columns, e.g.
a tokenizer's ``BatchEncoding``: sample i is ``{key: column[i]}``).  A sample is one of

* ``(inputs, target)``: ``inputs`` a tensor (the model is called as ``model(x)``), a tuple
  (positional arguments, ``model(*x)``) or a dict (keyword arguments, ``model(**x)``);
  ``target`` a label, token ids, or anything the metric compares against;
* a dict alone: keyword arguments (the HF convention: ``input_ids``, ``attention_mask``, ...); its
  ``labels`` entry, when present, is also the target;
* a tensor alone: the input, no target (metrics that compare with the clean run, such as cosine).

Samples are batched by torch's default ``DataLoader`` collate, so they hold tensors, numpy arrays
or numbers of one shape per key (pad token ids to one length; a list of ints is not a tensor).
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import QfiError
from .cnn import CNN_DIGITS_CONFIG, DigitsCNN
from .data import digits_dataset, image_folder_dataset
from .vit import VIT_DIGITS_CONFIG, VisionTransformer

__all__ = [
    "EMBEDDED_MODELS",
    "MissingDependencyError",
    "ZooError",
    "default_data_for",
    "load_data",
    "load_model",
    "has_splits",
    "split_spec",
]

EMBEDDED_MODELS = ("vit_digits", "cnn_digits")
_BUILDERS = {
    "vit_digits": (VisionTransformer, VIT_DIGITS_CONFIG),
    "cnn_digits": (DigitsCNN, CNN_DIGITS_CONFIG),
}
_MODEL_FORMS = f"embedded: {', '.join(EMBEDDED_MODELS)}; or 'module:callable', 'torchvision:<name>'"
_DATA_FORMS = "allowed: 'digits', 'imagefolder:<path>', an existing directory, or 'module:callable'"
_IMAGE_OPTIONS = ("image_size", "mean", "std", "resize", "channels", "class_map")
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


def _yaml_value(text: str) -> Any:
    import yaml

    v = yaml.safe_load(text)
    # YAML 1.1 (PyYAML) reads 1e-3 as a string: numbers written without a dot are numbers here too
    if isinstance(v, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", v.strip()):
        return float(v)
    return v


def split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"mypkg.models:make?depth=2&act=gelu"`` -> ``("mypkg.models:make", {"depth": 2, "act": "gelu"})``.

    Each value is read as a YAML scalar (``32``, ``0.5``, ``1e-3``, ``true``, ``null``, ``[1, 2]``,
    else a string).  A spec without ``?`` has no inline arguments.
    """
    if not isinstance(spec, str):
        raise ZooError(f"a spec is a string, got {type(spec).__name__} {spec!r}")
    base, sep, query = spec.partition("?")
    args: dict[str, Any] = {}
    if not sep:
        return spec, args
    for part in query.split("&"):
        if not part.strip():
            continue
        key, eq, text = part.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ZooError(
                f"bad argument {part!r} in spec {spec!r}: write 'key=value' pairs joined by '&', "
                "e.g. 'mypkg.data:make?n=100&seq_len=16'"
            )
        if key in args:
            raise ZooError(f"argument {key!r} is given twice in spec {spec!r}")
        try:
            args[key] = _yaml_value(text)
        except Exception as e:  # yaml.YAMLError: a value such as '[1, 2'
            raise ZooError(f"argument {key}={text!r} in spec {spec!r} is no YAML value: {e}") from e
    return base, args


def _merge_args(spec: str, inline: dict[str, Any], args: object) -> dict[str, Any]:
    if args is None:
        return inline
    if not isinstance(args, Mapping):
        raise ZooError(
            f"arguments for {spec!r} must be a mapping of name -> value, got {type(args).__name__}"
        )
    bad = next((k for k in args if not (isinstance(k, str) and k.isidentifier())), None)
    if bad is not None:
        raise ZooError(f"argument name {bad!r} for {spec!r} is not a Python identifier")
    both = sorted(set(inline) & set(args))
    if both:
        raise ZooError(f"argument {both[0]!r} for {spec!r} is given both inline (after '?') and in args")
    return {**inline, **args}


def _show(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _import_factory(spec: str, what: str):
    mod_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ZooError(f"cannot import {what} factory {spec!r}: {e}") from e
    if not callable(obj):
        raise ZooError(f"{what} factory {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def _parameters(factory) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # some builtins and C extensions have no signature
        return None


def _call_factory(spec: str, what: str, factory, kwargs: dict[str, Any]) -> Any:
    """``factory(**kwargs)``; errors name the spec, the arguments and what the factory raised."""
    params = _parameters(factory)
    if params is not None:
        takes = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        shown = ", ".join(takes) or "none"
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            unknown = [k for k in kwargs if k not in params or params[k].kind == params[k].POSITIONAL_ONLY]
            if unknown:
                raise ZooError(
                    f"{what} factory {spec!r} has no argument {unknown[0]!r} (its arguments: {shown})"
                )
        try:
            inspect.Signature(list(params.values())).bind(**kwargs)
        except TypeError as e:
            raise ZooError(f"{what} factory {spec!r} cannot be called with ({_show(kwargs)}): {e}") from e
    try:
        return factory(**kwargs)
    except Exception as e:  # the user's code: name the spec, the arguments and what it raised
        msg = str(e).strip()
        called = f" called with ({_show(kwargs)})" if kwargs else ""
        raise ZooError(
            f"{what} factory {spec!r}{called} raised {type(e).__name__}" + (f": {msg}" if msg else "")
        ) from e


def _from_callable(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    model = _call_factory(spec, "model", _import_factory(spec, "model"), kwargs)
    if not isinstance(model, nn.Module):
        raise ZooError(f"model factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import torchvision.models as tvm
    except ImportError as e:
        raise MissingDependencyError(
            f"model 'torchvision:{name}' needs torchvision: {_TORCHVISION_HINT}"
        ) from e
    try:
        builder = tvm.get_model_builder(name)
    except ValueError as e:
        known = ", ".join(tvm.list_models()[:12])
        raise ZooError(f"unknown torchvision model {name!r}; e.g. {known}, ...") from e
    return _call_factory(f"torchvision:{name}", "model", lambda **kw: builder(weights=None, **kw), kwargs)


def load_model(
    spec: str = "vit_digits",
    weights: str | Path | None = None,
    device="cpu",
    args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The model named by ``spec`` with ``weights`` loaded (strictly), on ``device``, in eval mode.

    Embedded models load their shipped checkpoint unless ``weights`` is given.  For the other forms
    ``weights=None`` keeps the factory's own initialisation (random for ``torchvision:<name>``).
    ``args`` (and inline ``?key=value`` arguments) are passed to the factory as keyword arguments.
    """
    base, inline = split_spec(spec)
    kwargs = _merge_args(spec, inline, args)
    if base in EMBEDDED_MODELS:
        if kwargs:
            raise ZooError(f"embedded model {base!r} takes no arguments, got ({_show(kwargs)})")
        model = _embedded(base, weights)
    elif base.startswith("torchvision:"):
        model = _torchvision(base.removeprefix("torchvision:"), kwargs)
    elif base.count(":") == 1 and all(base.split(":")):
        model = _from_callable(base, kwargs)
    else:
        raise ZooError(f"unknown model {spec!r}; {_MODEL_FORMS}")
    if weights is not None and base not in EMBEDDED_MODELS:
        _load_state(model, _read_checkpoint(Path(weights)), repr(spec))
    return model.to(device).eval()


class ColumnDataset(Dataset):
    """A mapping of equally long tensors (columns) as a dataset of ``{key: column[i]}`` samples."""

    def __init__(self, columns: Mapping[str, Any]) -> None:
        self.columns = dict(columns)
        lengths = {k: len(v) for k, v in self.columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"columns of different lengths: {lengths}")
        self.n = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.columns.items()}


def _is_array(x: object) -> bool:
    return isinstance(x, torch.Tensor) or type(x).__module__ == "numpy" and hasattr(x, "shape")


def _check_sample(spec: str, sample: object) -> None:
    """Raise ZooError naming ``spec`` when its first sample has none of the contract's shapes."""
    where = f"data factory {spec!r}: sample 0"
    if isinstance(sample, (tuple, list)) and len(sample) != 2:
        raise ZooError(
            f"{where} is a {type(sample).__name__} of {len(sample)} items; a sample is (inputs, target), "
            "a dict of model arguments or a tensor (wrap positional inputs in a tuple: ((x1, x2), target))"
        )
    inputs = sample[0] if isinstance(sample, (tuple, list)) else sample
    if isinstance(inputs, Mapping):
        for k, v in inputs.items():
            if isinstance(v, (list, tuple)):
                raise ZooError(
                    f"{where}: {k!r} is a {type(v).__name__}; samples hold tensors, arrays or numbers "
                    "(torch.tensor(...); a tokenizer returns them with return_tensors='pt')"
                )
    elif not (_is_array(inputs) or isinstance(inputs, (tuple, list))):
        raise ZooError(
            f"{where} is a {type(sample).__name__}; allowed: (inputs, target) with inputs a tensor, tuple or "
            "dict, a dict of model arguments, or a tensor"
        )


def has_splits(spec: str) -> bool:
    """Whether ``load_data(spec, split=...)`` tells a training split from the test split: the
    embedded digits, and a data factory with a ``split`` parameter (so calibration can use the
    training split)."""
    base, _ = split_spec(spec)
    if base == "digits":
        return True
    if base.startswith("imagefolder:") or not (base.count(":") == 1 and all(base.split(":"))):
        return False
    try:
        params = _parameters(_import_factory(base, "data"))
    except ZooError:
        return False
    return params is not None and "split" in params


def _from_data_callable(spec: str, split: str, kwargs: dict[str, Any]) -> Any:
    factory = _import_factory(spec, "data")
    if "split" in kwargs:
        raise ZooError(
            f"data factory {spec!r}: 'split' is no argument of its own: qfi passes split='test' for "
            "evaluation and split='train' for calibration to a factory with a 'split' parameter"
        )
    params = _parameters(factory)
    if params is not None and "split" in params:
        kwargs = {**kwargs, "split": split}
    data = _call_factory(spec, "data", factory, kwargs)
    if isinstance(data, torch.utils.data.DataLoader):
        raise ZooError(
            f"data factory {spec!r} returned a DataLoader; return its dataset (qfi batches the samples "
            "itself with --batch-size)"
        )
    if isinstance(data, torch.utils.data.IterableDataset):
        return data  # streamed: nothing to check without consuming it
    if isinstance(data, Mapping):
        try:
            data = ColumnDataset(data)
        except (TypeError, ValueError, StopIteration) as e:
            raise ZooError(
                f"data factory {spec!r} returned a mapping that is no set of equally long columns: {e}"
            ) from e
    elif isinstance(data, (str, bytes)) or not isinstance(data, (Dataset, Iterable)) and not _is_array(data):
        raise ZooError(
            f"data factory {spec!r} returned {type(data).__name__}; allowed: a torch Dataset, a sequence "
            "or iterable of samples, or a mapping of equally long tensors"
        )
    elif not isinstance(data, (Dataset, Sequence)) and not _is_array(data):
        data = list(data)  # a generator or another one-pass iterable
    try:
        n = len(data)
    except TypeError:
        return data  # a map-style Dataset without a length: the Evaluator will tell
    if n == 0:
        raise ZooError(f"data factory {spec!r} returned no samples")
    _check_sample(spec, data[0])
    return data


def load_data(
    spec: str = "digits",
    split: str = "test",
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    *,
    resize: int | None = None,
    channels: int | None = None,
    class_map: object = None,
    args: Mapping[str, Any] | None = None,
) -> Any:
    """The dataset named by ``spec`` (see the module docstring for the forms and the data contract).

    ``digits``: ``split`` is "train" or "test"; the images are 8x8 with fixed normalisation, so
    the image options must be None (``image_size`` may be 8).

    Image folders ignore ``split`` (point at the split's folder).  ``image_size``: the crop size
    (default 224); ``resize``: the shorter side is resized to it first (default ``image_size``;
    ImageNet evaluation: ``resize=256, image_size=224``); ``channels``: 3 (RGB, default) or 1
    (grayscale); ``mean``/``std``: default ImageNet's (averaged over channels for grayscale);
    ``class_map``: a JSON or text file, dict or list giving each folder's class index (ImageNet's
    1,000 indices without 1,000 folders; a folder not in it is an error naming it).  The same
    options may come in ``args`` or inline (``imagefolder:<dir>?resize=256&channels=1``).

    ``module:callable``: called with ``args`` (and the inline arguments) as keyword arguments and
    ``split`` when it has a ``split`` parameter; the image options must be None.
    """
    given = {
        k: v
        for k, v in dict(
            image_size=image_size, mean=mean, std=std, resize=resize, channels=channels, class_map=class_map
        ).items()
        if v is not None
    }
    if isinstance(spec, (str, Path)) and Path(spec).is_dir():  # a directory whose name may hold '?'
        base, inline = str(spec), {}
    else:
        base, inline = split_spec(spec)
    kwargs = _merge_args(spec, inline, args)
    if base == "digits":
        opts = {**kwargs, **given}
        if kwargs or opts.pop("image_size", 8) != 8 or opts:
            raise ZooError(
                f"digits are 8x8 with fixed normalisation and take no options; got "
                f"({_show({**kwargs, **given})}) (allowed: image_size None or 8)"
            )
        try:
            return digits_dataset(split)
        except ValueError as e:
            raise ZooError(str(e)) from e
    path = base.removeprefix("imagefolder:")
    if base.startswith("imagefolder:") or Path(base).is_dir():
        bad = next((k for k in kwargs if k not in _IMAGE_OPTIONS), None)
        if bad is not None:
            raise ZooError(
                f"image folder {spec!r}: unknown option {bad!r}; allowed: {', '.join(_IMAGE_OPTIONS)}"
            )
        both = next((k for k in kwargs if k in given), None)
        if both is not None:
            raise ZooError(f"image folder option {both!r} is given both in {spec!r} and as an argument")
        opts = {**kwargs, **given}
        for k in ("mean", "std"):
            if k in opts:
                opts[k] = tuple(opts[k]) if isinstance(opts[k], (list, tuple)) else (opts[k],)
        try:
            return image_folder_dataset(path, **{"image_size": 224, **opts})
        except (ValueError, TypeError) as e:
            raise ZooError(str(e)) from e
    if base.count(":") == 1 and all(base.split(":")):
        if given:
            raise ZooError(
                f"data factory {spec!r}: {', '.join(given)} apply to image folders only; pass the "
                "factory's own arguments in args or inline (module:callable?key=value)"
            )
        return _from_data_callable(base, split, kwargs)
    raise ZooError(f"unknown data {spec!r}; {_DATA_FORMS}")


def default_data_for(model_spec: str) -> str:
    """The data spec a model is evaluated on by default: ``digits`` for the embedded models."""
    if model_spec in EMBEDDED_MODELS:
        return "digits"
    raise ZooError(f"no default data for model {model_spec!r}; pass a data spec such as 'imagefolder:<path>'")
