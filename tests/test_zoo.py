"""The model zoo: torchvision-compatible ViT naming, shipped checkpoints, data loaders, spec errors."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch

from qfi.zoo import (
    EMBEDDED_MODELS,
    MissingDependencyError,
    ZooError,
    default_data_for,
    load_data,
    load_model,
)
from qfi.zoo.cnn import CNN_DIGITS_CONFIG, DigitsCNN
from qfi.zoo.data import IMAGENET_MEAN, IMAGENET_STD, load_digits_split
from qfi.zoo.vit import VIT_DIGITS_CONFIG, VisionTransformer, vit_b_16_shaped

_LAYER_SUFFIXES = [
    "ln_1.weight", "ln_1.bias",
    "self_attention.in_proj_weight", "self_attention.in_proj_bias",
    "self_attention.out_proj.weight", "self_attention.out_proj.bias",
    "ln_2.weight", "ln_2.bias",
    "mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias",
]  # fmt: skip
VIT_B_16_NAMES = (
    ["class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding"]
    + [f"encoder.layers.encoder_layer_{i}.{s}" for i in range(12) for s in _LAYER_SUFFIXES]
    + ["encoder.ln.weight", "encoder.ln.bias", "heads.head.weight", "heads.head.bias"]
)
THRESHOLDS = {"vit_digits": 0.95, "cnn_digits": 0.97}
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def _accuracy(model: torch.nn.Module) -> float:
    x, y = load_data("digits", "test").tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_vit_b_16_shaped_matches_torchvision_names_shapes_and_count():
    """vit_b_16_shaped has torchvision vit_b_16's 152 parameter names in order and 86,567,656 values."""
    with torch.device("meta"):
        model = vit_b_16_shaped()
    params = dict(model.named_parameters())
    assert list(params) == VIT_B_16_NAMES and len(params) == 152
    assert sum(p.numel() for p in params.values()) == 86_567_656
    assert params["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"].shape == (2304, 768)
    assert params["class_token"].shape == (1, 1, 768)
    assert params["encoder.pos_embedding"].shape == (1, 197, 768)
    assert params["heads.head.weight"].shape == (1000, 768)
    assert [n for n, _ in model.encoder.layers.named_children()] == [f"encoder_layer_{i}" for i in range(12)]


def test_vit_forward_shape_and_no_dropout():
    """A small 3-channel ViT maps (N, 3, H, W) to (N, classes) and has no dropout modules."""
    torch.manual_seed(0)
    model = VisionTransformer(16, 4, 2, 2, 16, 32, num_classes=7).eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    with pytest.raises(ValueError, match="image_size 15"):
        VisionTransformer(15, 4, 1, 1, 8, 8)


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_shipped_checkpoint_reaches_its_accuracy(name):
    """The shipped weights reach the threshold on the digits test split; the same untrained model does not."""
    model = load_model(name)
    assert not model.training
    acc = _accuracy(model)
    assert acc >= THRESHOLDS[name]
    cls, config = {
        "vit_digits": (VisionTransformer, VIT_DIGITS_CONFIG),
        "cnn_digits": (DigitsCNN, CNN_DIGITS_CONFIG),
    }[name]
    torch.manual_seed(0)
    assert _accuracy(cls(**config).eval()) < 0.5


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_checkpoint_metadata(name, tmp_path):
    """Checkpoints carry config, accuracy, seed and torch version, with contiguous float32 tensors."""
    from importlib import resources

    with resources.files("qfi.zoo").joinpath("checkpoints").joinpath(f"{name}.pt").open("rb") as f:
        ckpt = torch.load(f, weights_only=True)
    assert set(ckpt) == {"state_dict", "config", "test_accuracy", "seed", "torch_version"}
    assert ckpt["test_accuracy"] >= THRESHOLDS[name]
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in ckpt["state_dict"].values())


def test_weights_override_raw_and_wrapped_state_dicts(tmp_path):
    """`weights` loads a raw state dict or a {'state_dict': ...} dict, for embedded and callable specs."""
    torch.manual_seed(1)
    sd = DigitsCNN(**CNN_DIGITS_CONFIG).state_dict()
    torch.save(sd, tmp_path / "raw.pt")
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pt")
    for spec in ("cnn_digits", "qfi.zoo.cnn:cnn_digits"):
        for f in ("raw.pt", "wrapped.pt"):
            got = load_model(spec, weights=tmp_path / f).state_dict()
            assert all(torch.equal(got[k], sd[k]) for k in sd)
    with pytest.raises(ZooError, match="do not fit"):
        load_model("vit_digits", weights=tmp_path / "raw.pt")


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("vit_digit", r"unknown model 'vit_digit'; embedded: vit_digits, cnn_digits"),
        ("no_such_module_xyz:make", r"no_such_module_xyz:make"),
        ("qfi.zoo.vit:no_such_factory", r"qfi.zoo.vit:no_such_factory"),
        ("qfi.zoo.data:load_digits_split", r"not an nn.Module"),
    ],
)
def test_load_model_errors_name_the_bad_value(spec, pattern):
    with pytest.raises(ZooError, match=pattern):
        load_model(spec)


def test_load_data_errors_name_the_bad_value():
    with pytest.raises(ZooError, match=r"unknown data 'mnist'.*'digits'"):
        load_data("mnist")
    with pytest.raises(ZooError, match=r"split 'val'"):
        load_data("digits", split="val")
    with pytest.raises(ZooError, match=r"image_size=32"):
        load_data("digits", image_size=32)
    with pytest.raises(ZooError, match=r"/no/such/dir"):
        load_data("imagefolder:/no/such/dir")
    with pytest.raises(ZooError, match=r"no default data for model 'torchvision:vit_b_16'"):
        default_data_for("torchvision:vit_b_16")
    assert default_data_for("vit_digits") == "digits"


def test_digits_split_is_deterministic_and_stratified():
    """450 test / 1,347 train, identical on every call, each class ~25 % in test, float32 (N, 1, 8, 8)."""
    x_tr, y_tr, x_te, y_te = load_digits_split()
    assert x_te.shape == (450, 1, 8, 8) and x_tr.shape == (1347, 1, 8, 8)
    assert x_te.dtype == torch.float32 and y_te.dtype == torch.int64
    again = load_digits_split()
    assert all(torch.equal(a, b) for a, b in zip((x_tr, y_tr, x_te, y_te), again, strict=True))
    total = torch.bincount(torch.cat([y_tr, y_te]), minlength=10)
    assert (torch.bincount(y_te, minlength=10) - 0.25 * total).abs().max() <= 1
    assert abs(x_tr.mean().item()) < 0.1 and abs(x_tr.std().item() - 1) < 0.1
    assert not torch.equal(load_digits_split(seed=1)[3], y_te)
    assert len(load_data("digits", "train")) == 1347


@pytest.mark.parametrize("prefix", ["imagefolder:", ""])
def test_image_folder(tmp_path, prefix):
    """Class index = sorted folder name; images resized/cropped to image_size and normalised."""
    from PIL import Image

    colours = {"cat": (255, 0, 0), "ant": (0, 128, 255)}
    for cls, rgb in colours.items():
        (tmp_path / cls).mkdir()
        Image.new("RGB", (12, 10), rgb).save(tmp_path / cls / "a.png")
        Image.new("L", (9, 16), 200).save(tmp_path / cls / "b.png")
    ds = load_data(f"{prefix}{tmp_path}", image_size=8)
    assert len(ds) == 4
    x, label = ds[0]
    assert label == 0 and x.shape == (3, 8, 8)  # 'ant' sorts first
    expected = (torch.tensor(colours["ant"]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    np.testing.assert_allclose(x.mean((1, 2)).numpy(), expected.numpy(), atol=1e-5)
    assert [ds[i][1] for i in range(4)] == [0, 0, 1, 1]
    assert ds[1][0].shape == (3, 8, 8)


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed")
def test_torchvision_spec_without_torchvision_says_how_to_install():
    with pytest.raises(MissingDependencyError, match=r"torchvision==0\.29\.1"):
        load_model("torchvision:vit_b_16")


def test_torchvision_vit_b_16_state_dict_loads_strictly():
    """torchvision's vit_b_16 and vit_b_16_shaped exchange state dicts with strict=True."""
    pytest.importorskip("torchvision")
    tv = load_model("torchvision:vit_b_16")
    torch.nn.init.normal_(tv.heads.head.weight)  # torchvision zero-initialises the head
    ours = vit_b_16_shaped()
    assert list(dict(tv.named_parameters())) == VIT_B_16_NAMES
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), tv(x))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", r"the file is empty \(0 bytes\)"),
        (b"hello, not weights", r"not a torch\.save file \(it starts with b'hell'\)"),
        ("model", r"UnpicklingError: Unsupported global: GLOBAL torch\.nn\.modules\.linear\.Linear was not "
                  r"an allowed global by default; .*save model\.state_dict\(\), not the model"),
        ("truncated", r"RuntimeError: PytorchStreamReader failed reading zip archive"),
    ],
)
@pytest.mark.parametrize("spec", ["cnn_digits", "qfi.zoo.cnn:cnn_digits"])
def test_unreadable_checkpoint_always_says_why(tmp_path, content, reason, spec):
    """An empty file used to give `cannot read weights '…': ` with nothing after the colon."""
    path = tmp_path / "w.pt"
    if content == "model":
        torch.save(torch.nn.Linear(2, 2), path)  # a pickled module, not a state dict
    elif content == "truncated":
        torch.save(DigitsCNN(**CNN_DIGITS_CONFIG).state_dict(), path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(ZooError, match=rf"cannot read weights '{re.escape(str(path))}': {reason}"):
        load_model(spec, weights=path)


def test_factory_that_raises_names_spec_and_exception(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(
        "def needs_gpu():\n    raise RuntimeError('no CUDA device here')\n"
        "def bare():\n    raise KeyError()\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ZooError, match=r"factory 'my_factories:needs_gpu' raised RuntimeError: no CUDA"):
        load_model("my_factories:needs_gpu")
    with pytest.raises(ZooError, match=r"model factory 'my_factories:bare' raised KeyError$"):
        load_model("my_factories:bare")
    with pytest.raises(ZooError, match=r"model factory 'my_factories:NOT_CALLABLE' is a int, not a callable"):
        load_model("my_factories:NOT_CALLABLE")
