"""Plug-ins: factories with arguments, data factories of every sample shape, image-folder options,
and tied weights (one stored tensor under two names) selected, faulted and restored once."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import qfi
from qfi.select import call_model
from qfi.zoo import ColumnDataset, ZooError, load_data, load_model, split_spec
from qfi.zoo.data import IMAGENET_MEAN, IMAGENET_STD, read_class_map

PLUGIN = '''
import torch
from torch import nn

def mlp(width=4, depth=1, act="relu"):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU() if act == "relu" else nn.GELU()]
    return nn.Sequential(*layers)

def picky(width):
    raise ValueError(f"width {width} is odd")

def pairs(n=6, split="test"):
    g = torch.Generator().manual_seed(0 if split == "test" else 1)
    return [(torch.randn(4, generator=g), i % 3) for i in range(n)]

def tuples(n=4):
    return [((torch.ones(2) * i, torch.full((3,), float(i))), i) for i in range(n)]

def dicts(n=5, labels=True):
    out = [{"input_ids": torch.arange(3) + i, "attention_mask": torch.ones(3, dtype=torch.long)}
           for i in range(n)]
    if labels:
        for i, d in enumerate(out):
            d["labels"] = torch.tensor(i % 2)
    return out

def dict_pairs(n=4):
    return [({"a": torch.ones(2) * i}, i) for i in range(n)]

def bare(n=3):
    return [torch.full((2,), float(i)) for i in range(n)]

def columns(n=4):
    return {"input_ids": torch.arange(n * 3).view(n, 3), "labels": torch.arange(n)}

def generator(n=3):
    return ((torch.ones(2) * i, i) for i in range(n))

def tensor_rows():
    return torch.arange(12.0).view(4, 3)

class Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        return torch.tensor([float(i)]), i * i

def dataset():
    return Squares()

def loader():
    return torch.utils.data.DataLoader(Squares(), batch_size=2)

def triples():
    return [(torch.ones(2), 0, 1)]

def strings():
    return ["a sentence", "another"]

def token_lists():
    return [{"input_ids": [1, 2, 3]}]

def empty():
    return []

def number():
    return 3

def ragged():
    return {"input_ids": torch.zeros(3, 2), "labels": torch.zeros(2)}
'''


@pytest.fixture
def plug(tmp_path, monkeypatch):
    """A throw-away module ``qfi_test_plug`` with model and data factories."""
    (tmp_path / "qfi_test_plug.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "qfi_test_plug"


# -- spec arguments -----------------------------------------------------------------------------------


def test_split_spec_reads_yaml_scalars():
    """Inline values are YAML scalars; numbers without a dot (1e-3) are numbers too."""
    base, args = split_spec("m.x:make?a=32&b=0.5&c=1e-3&d=true&e=null&f=[1, 2]&g=gelu&h=&i=-2E+2")
    assert base == "m.x:make"
    assert args == {"a": 32, "b": 0.5, "c": 1e-3, "d": True, "e": None, "f": [1, 2], "g": "gelu", "h": None,
                    "i": -200.0}
    assert split_spec("m:make") == ("m:make", {})
    assert split_spec("m:make?") == ("m:make", {})


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("m:f?width", r"bad argument 'width' in spec 'm:f\?width': write 'key=value'"),
        ("m:f?2x=1", r"bad argument '2x=1'"),
        ("m:f?a=1&a=2", r"argument 'a' is given twice in spec 'm:f\?a=1&a=2'"),
        ("m:f?a=[1, 2", r"argument a='\[1, 2' in spec 'm:f\?a=\[1, 2' is no YAML value"),
    ],
)
def test_split_spec_errors_name_the_argument(spec, pattern):
    with pytest.raises(ZooError, match=pattern):
        split_spec(spec)


def test_model_factory_takes_arguments_from_args_and_inline(plug):
    """`module:callable` gets keyword arguments from args= and from '?key=value'; both merge."""
    m = load_model(f"{plug}:mlp", args={"width": 3, "depth": 2})
    assert [n for n, _ in m.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert m[0].weight.shape == (3, 3) and not m.training
    m = load_model(f"{plug}:mlp?width=5&act=gelu")
    assert m[0].weight.shape == (5, 5) and isinstance(m[1], nn.GELU)
    m = load_model(f"{plug}:mlp?width=2", args={"depth": 3})
    assert len(m) == 6 and m[0].weight.shape == (2, 2)


def test_model_factory_argument_errors_name_spec_argument_and_exception(plug):
    with pytest.raises(ZooError, match=rf"model factory '{plug}:mlp' has no argument 'wdith' "
                                       r"\(its arguments: width, depth, act\)"):
        load_model(f"{plug}:mlp", args={"wdith": 3})
    with pytest.raises(ZooError, match=rf"model factory '{plug}:picky' called with \(width=3\) raised "
                                       r"ValueError: width 3 is odd"):
        load_model(f"{plug}:picky?width=3")
    with pytest.raises(ZooError, match=rf"model factory '{plug}:picky' cannot be called with \(\): "
                                       r"missing a required argument: 'width'"):
        load_model(f"{plug}:picky")
    with pytest.raises(ZooError, match=r"argument 'width' for .* is given both inline"):
        load_model(f"{plug}:mlp?width=2", args={"width": 3})
    with pytest.raises(ZooError, match=r"must be a mapping of name -> value, got list"):
        load_model(f"{plug}:mlp", args=[("width", 3)])
    with pytest.raises(ZooError, match=r"embedded model 'vit_digits' takes no arguments, got \(depth=2\)"):
        load_model("vit_digits", args={"depth": 2})
    with pytest.raises(ZooError, match=r"cannot import model factory 'qfi_no_such_mod:make'"):
        load_model("qfi_no_such_mod:make?width=2")


# -- data factories -----------------------------------------------------------------------------------


def _batches(ds, n=2):
    return list(DataLoader(ds, batch_size=n, shuffle=False))


def test_data_factory_pairs_get_the_split_when_they_take_one(plug):
    """A factory with a `split` parameter gets the split; its args come in too."""
    test, train = load_data(f"{plug}:pairs?n=4"), load_data(f"{plug}:pairs", split="train", args={"n": 4})
    assert len(test) == len(train) == 4
    assert not torch.equal(test[0][0], train[0][0])
    assert torch.equal(test[0][0], load_data(f"{plug}:pairs", args={"n": 4})[0][0])
    x, y = _batches(test)[0]
    assert x.shape == (2, 4) and y.tolist() == [0, 1]


def test_data_factory_without_split_parameter_is_called_without_it(plug):
    assert len(load_data(f"{plug}:bare", split="train")) == 3  # no TypeError: split is not passed


@pytest.mark.parametrize(
    ("factory", "check"),
    [
        # (inputs tuple, target): positional model arguments
        ("tuples", lambda b: isinstance(b[0], list) and b[0][0].shape == (2, 2) and b[0][1].shape == (2, 3)),
        # a dict alone: keyword arguments, `labels` inside
        ("dicts", lambda b: set(b) == {"input_ids", "attention_mask", "labels"} and len(b["labels"]) == 2),
        # (dict, target)
        ("dict_pairs", lambda b: b[0]["a"].shape == (2, 2) and b[1].tolist() == [0, 1]),
        # a bare tensor: inputs, no target
        ("bare", lambda b: isinstance(b, torch.Tensor) and b.shape == (2, 2)),
        # columns: sample i = {key: column[i]}
        ("columns", lambda b: b["input_ids"].tolist() == [[0, 1, 2], [3, 4, 5]] and b["labels"].sum() == 1),
        # a one-pass generator is kept as a list
        ("generator", lambda b: b[0].shape == (2, 2) and b[1].tolist() == [0, 1]),
        # a tensor: its rows are bare samples
        ("tensor_rows", lambda b: b.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]),
        # a torch Dataset is returned as it is
        ("dataset", lambda b: b[0].shape == (2, 1) and b[1].tolist() == [0, 1]),
    ],
)
def test_data_factory_sample_shapes_collate_as_documented(plug, factory, check):
    """Every sample shape of the contract collates (torch's default collate) into a batch of the
    same shape: what the Evaluator consumes."""
    ds = load_data(f"{plug}:{factory}")
    assert check(_batches(ds)[0])
    if factory == "generator":
        assert len(ds) == 3 and len(_batches(ds)) == 2  # a list: every evaluation sees all samples
    if factory == "columns":
        assert isinstance(ds, ColumnDataset) and len(ds) == 4


def test_dict_and_tuple_batches_call_the_model_with_arguments(plug):
    """A tuple batch is positional arguments, a dict batch keyword arguments."""

    class Two(nn.Module):
        def forward(self, a=None, b=None, input_ids=None, attention_mask=None, labels=None):
            return a if input_ids is None else input_ids * attention_mask

    (x, _), = _batches(load_data(f"{plug}:tuples"), 4)[:1]
    assert torch.equal(call_model(Two(), tuple(x)), x[0])
    batch = _batches(load_data(f"{plug}:dicts?labels=false"), 5)[0]
    assert call_model(Two(), batch).shape == (5, 3)


@pytest.mark.parametrize(
    ("factory", "pattern"),
    [
        ("loader", r"returned a DataLoader; return its dataset"),
        ("triples", r"sample 0 is a tuple of 3 items; a sample is \(inputs, target\)"),
        ("strings", r"sample 0 is a str; allowed: \(inputs, target\)"),
        ("token_lists", r"sample 0: 'input_ids' is a list; samples hold tensors"),
        ("empty", r"returned no samples"),
        ("number", r"returned int; allowed: a torch Dataset"),
        ("ragged", r"returned a mapping that is no set of equally long columns"),
    ],
)
def test_data_factory_bad_returns_name_the_spec(plug, factory, pattern):
    with pytest.raises(ZooError, match=rf"data factory '{plug}:{factory}'.*{pattern}"):
        load_data(f"{plug}:{factory}")


def test_data_factory_option_errors(plug):
    with pytest.raises(ZooError, match=r"'split' is no argument of its own"):
        load_data(f"{plug}:pairs?split=train")
    with pytest.raises(ZooError, match=r"image_size, resize apply to image folders only"):
        load_data(f"{plug}:pairs", image_size=8, resize=9)
    with pytest.raises(ZooError, match=rf"data factory '{plug}:pairs' has no argument 'm'"):
        load_data(f"{plug}:pairs", args={"m": 1})
    with pytest.raises(ZooError, match=r"cannot import data factory 'qfi_no_such_mod:make'"):
        load_data("qfi_no_such_mod:make")
    with pytest.raises(ZooError, match=r"digits are 8x8 .* take no options; got \(seed=1\)"):
        load_data("digits", args={"seed": 1})
    with pytest.raises(ZooError, match=r"unknown data 'mnist'.*'module:callable'"):
        load_data("mnist")


def test_column_dataset_is_a_dataset():
    ds = ColumnDataset({"x": torch.zeros(3, 2), "y": np.arange(3)})
    assert isinstance(ds, Dataset) and len(ds) == 3 and ds[2]["y"] == 2


# -- image folders -------------------------------------------------------------------------------------


def _framed(path, inner, outer, size=16, frame=4):
    """A size x size RGB image: an `outer` frame `frame` pixels wide around an `inner` square."""
    from PIL import Image

    a = np.empty((size, size, 3), np.uint8)
    a[:] = outer
    a[frame:-frame, frame:-frame] = inner
    Image.fromarray(a).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for cls in ("n02", "n01"):
        (root / cls).mkdir(parents=True)
        _framed(root / cls / "a.png", (200, 200, 200), (0, 0, 0))
    return root


def _norm(v, c=0):
    return (v / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]


def test_image_folder_resize_apart_from_crop(folder):
    """resize=16, image_size=8 keeps the inner square only (ImageNet's 256 -> 224); the default
    (resize = image_size) squeezes the whole image, frame included, into 8x8."""
    x, _ = load_data(f"imagefolder:{folder}", image_size=8, resize=16)[0]
    assert x.shape == (3, 8, 8)
    np.testing.assert_allclose(x[0].numpy(), _norm(200.0), atol=1e-5)
    whole, _ = load_data(f"imagefolder:{folder}", image_size=8)[0]
    assert whole[0, 0, 0] < _norm(100.0) and abs(float(whole[0, 4, 4]) - _norm(200.0)) < 1e-5
    inline, _ = load_data(f"imagefolder:{folder}?image_size=8&resize=16")[0]
    assert torch.equal(inline, x)


def test_image_folder_grayscale(folder):
    """channels=1: one channel (PIL mode "L"), normalised by ImageNet's channel-averaged mean/std."""
    x, _ = load_data(str(folder), image_size=8, resize=16, channels=1)[0]
    assert x.shape == (1, 8, 8)
    np.testing.assert_allclose(x.numpy(), (200 / 255 - 0.449) / 0.226, atol=1e-5)
    x, _ = load_data(str(folder), image_size=8, resize=16, channels=1, mean=(0.5,), std=(0.25,))[0]
    np.testing.assert_allclose(x.numpy(), (200 / 255 - 0.5) / 0.25, atol=1e-5)
    x3, _ = load_data(str(folder), image_size=8, channels=3)[0]
    assert x3.shape == (3, 8, 8)


@pytest.mark.parametrize(
    "write",
    [
        lambda p: p.with_suffix(".json").write_text(json.dumps({"n01": 7, "n02": 3, "n09": 0})),
        lambda p: p.with_suffix(".json").write_text(
            json.dumps({"0": ["n09", "x"], "3": ["n02", "goldfish"], "7": ["n01", "tench"]})
        ),  # Keras' imagenet_class_index.json
        lambda p: p.with_suffix(".json").write_text(json.dumps(["n09", *"ab", "n02", *"cde", "n01"])),
        lambda p: p.with_suffix(".txt").write_text(
            "n09 x\na\nb\nn02 goldfish, Carassius\nc\nd\ne\nn01 tench, Tinca tinca\n\n"
        ),  # ImageNet's LOC_synset_mapping.txt: line number = class index
    ],
)
def test_image_folder_class_map_gives_the_indices(folder, tmp_path, write):
    """With a class map, folder n01 is class 7 and n02 class 3, whatever their sorted ranks."""
    write(tmp_path / "map")
    path = next(tmp_path.glob("map.*"))
    ds = load_data(f"imagefolder:{folder}", image_size=8, class_map=str(path))
    assert [ds[i][1] for i in range(len(ds))] == [7, 3]
    assert load_data(f"imagefolder:{folder}?class_map={path}", image_size=8)[1][1] == 3
    assert [load_data(str(folder), image_size=8)[i][1] for i in range(2)] == [0, 1]  # default: ranks


def test_image_folder_class_map_errors(folder, tmp_path):
    with pytest.raises(ZooError, match=r"folder 'n02' under '.*imgs' is not in the class map \(2 classes, "
                                       r"e\.g\. 'n01', 'n09'\)"):
        load_data(str(folder), class_map={"n01": 0, "n09": 1})
    with pytest.raises(ZooError, match=r"class map given: index -1 of 'n01' is not an integer >= 0"):
        load_data(str(folder), class_map={"n01": -1, "n02": 1})
    (tmp_path / "gap.txt").write_text("n01\n\nn02\n")
    with pytest.raises(ZooError, match=r"class map '.*gap\.txt' line 2 is blank"):
        load_data(str(folder), class_map=tmp_path / "gap.txt")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ZooError, match=r"class map '.*bad\.json' is not valid JSON"):
        load_data(str(folder), class_map=str(tmp_path / "bad.json"))
    with pytest.raises(ZooError, match=r"cannot read class map '.*nothing\.json'"):
        load_data(str(folder), class_map=str(tmp_path / "nothing.json"))
    with pytest.raises(ValueError, match=r"lists 'a' twice \(indices 0 and 1\)"):
        read_class_map(["a", "a"])


def test_image_folder_option_errors(folder):
    with pytest.raises(ZooError, match=r"resize 8 is smaller than image_size 16"):
        load_data(str(folder), image_size=16, resize=8)
    with pytest.raises(ZooError, match=r"channels must be 1 \(grayscale\) or 3 \(RGB\), got 2"):
        load_data(str(folder), channels=2)
    with pytest.raises(ZooError, match=r"mean has 3 values; 1-channel images need 1 or 1"):
        load_data(str(folder), channels=1, mean=(0.1, 0.2, 0.3))
    with pytest.raises(ZooError, match=r"unknown option 'size'; allowed: image_size, mean"):
        load_data(f"imagefolder:{folder}?size=3")
    with pytest.raises(ZooError, match=r"option 'resize' is given both"):
        load_data(f"imagefolder:{folder}?resize=300", resize=256)


# -- tied weights --------------------------------------------------------------------------------------


class Tied(nn.Module):
    """A tiny language model whose output projection is its input embedding."""

    def __init__(self, distinct: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 4)
        self.mid = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 11, bias=False)
        # the same Parameter under two names, or (distinct) another Parameter viewing its memory
        self.lm_head.weight = nn.Parameter(self.embed.weight) if distinct else self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.mid(self.embed(ids)))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict(keep_vars=True).items()}


def _bits_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    same = (torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)
    return a.keys() == b.keys() and all(same)


@pytest.mark.parametrize("distinct", [False, True])
def test_tied_weight_is_one_candidate_under_either_name(distinct):
    """Either name selects the one stored tensor, listed under its first name with its alias."""
    m = Tied(distinct)
    assert qfi.select_weights(m) == ["embed.weight", "mid.weight", "mid.bias"]
    assert qfi.select_weights(m, "lm_head") == ["embed.weight"]
    assert qfi.select_weights(m, "*lm_head.weight") == ["embed.weight"]
    assert qfi.select_weights(m, exclude="lm_head") == ["mid.weight", "mid.bias"]  # it is lm_head's too
    infos = qfi.list_names(m)
    assert infos[0].name == "embed.weight" and infos[0].aliases == ("lm_head.weight",)
    assert infos[0].label == "embed.weight (= lm_head.weight)" and infos[1].label == "mid.weight"
    assert qfi.select.weight_aliases(m) == {"embed.weight": ("lm_head.weight",)}
    with pytest.raises(qfi.QfiError, match=r"'lm_haed' matches no weights; did you mean .*'lm_head'"):
        qfi.select_weights(m, "lm_haed")


def test_shared_module_registered_twice_gives_aliases():
    """A module reachable under two names gives its weights both names."""
    lin = nn.Linear(2, 2)
    m = nn.ModuleDict({"a": lin, "b": lin})
    assert qfi.select_weights(m, "b.") == ["a.weight", "a.bias"]
    assert qfi.select.weight_aliases(m) == {"a.weight": ("b.weight",), "a.bias": ("b.bias",)}


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("distinct", [False, True])
def test_tied_weight_flips_once_reaches_both_names_and_restores(fmt, distinct):
    """The index space holds the tied tensor once (11x4 + 4x4 + 4 codes), a site named through the
    alias lands on the stored word and shows through both names, a BER campaign's logs never
    repeat a (tensor, element, bit) site, and the session restores every bit with the tie intact."""
    m = Tied(distinct)
    before = _state(m)
    ids = torch.arange(11)[None]
    with qfi.weights(m, fmt) as s:
        assert s.numel == 11 * 4 + 4 * 4 + 4
        clean = m(ids)
        assert m.lm_head.weight.data_ptr() == m.embed.weight.data_ptr()
        with s.inject(qfi.FlipSites(sites=(("lm_head.weight", 5, s.format.bits - 2),))) as log:
            assert log.names[int(log.columns["name_id"][0])] == "embed.weight"
            assert int(log.columns["index"][0]) == 5
            assert torch.equal(m.lm_head.weight.view(-1)[5], m.embed.weight.view(-1)[5])
            assert m.embed.weight.view(-1)[5] != before["embed.weight"].view(-1)[5]
        for seed in range(20):
            with s.inject(qfi.BitFlip(ber=0.05), seed=seed) as log:
                cols = log.columns
                sites = (cols["name_id"] * 10_000 + cols["index"]) * 64 + cols["bit"]
                assert log.flips > 0 and sites.unique().numel() == sites.numel() == log.flips
                tied = cols["name_id"] == 0  # log.names[0] is "embed.weight": 44 elements, not 88
                assert log.names[0] == "embed.weight" and int(cols["index"][tied].max()) < 11 * 4
                m(ids)
        assert torch.equal(m(ids), clean)
    assert _bits_equal(_state(m), before)
    assert (m.lm_head.weight is m.embed.weight) is not distinct
    assert m.lm_head.weight.data_ptr() == m.embed.weight.data_ptr()  # the tie survives the session
