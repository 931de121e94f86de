"""Name filters select exactly the intended tensors and modules of a ViT-B/16-shaped model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qfi
from qfi.zoo.vit import vit_b_16_shaped, vit_digits


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    with torch.device("meta"):  # names and shapes only: no 86.6M-parameter allocation
        return vit_b_16_shaped()


@pytest.mark.parametrize(
    ("names", "exclude", "expected"),
    [
        ("in_proj_weight", None, 12),
        ("out_proj.weight", None, 12),
        ("class_token", None, 1),
        ("encoder.pos_embedding", None, 1),
        ("ln_1", None, 24),
        ("heads.head", None, 2),
        ("*.mlp.0.weight", None, 12),
        ("encoder.layers.encoder_layer_1[01].*", None, 24),
        (r"re:encoder_layer_(0|11)\.self_attention\.in_proj_weight$", None, 2),
        ("in_proj", "bias", 12),
        ("encoder.layers", "re:encoder_layer_([1-9]|1[01])\\.", 12),
        (None, None, 152),
    ],
)
def test_filter_counts(vit: nn.Module, names, exclude, expected: int) -> None:
    """Each filter selects exactly the expected number of tensors."""
    assert len(qfi.select_weights(vit, names, exclude)) == expected


def test_words_are_substrings_and_order_is_model_order(vit: nn.Module) -> None:
    """'mlp,ln' = names containing 'mlp' or 'ln', in named_parameters order."""
    all_names = [n for n, _ in vit.named_parameters()]
    got = qfi.select_weights(vit, "mlp,ln")
    assert got == [n for n in all_names if "mlp" in n or "ln" in n]
    assert len(got) == 48 + 48 + 2
    assert qfi.select_weights(vit) == all_names
    assert qfi.select_weights(vit, ["mlp", "ln"]) == got


def test_name_filter_parse() -> None:
    """A string, a list and a NameFilter spell the same filter."""
    f = qfi.NameFilter.parse("mlp, ln")
    assert f == qfi.NameFilter(("mlp", "ln")) == qfi.NameFilter.parse(["mlp", "ln"])
    assert qfi.NameFilter.parse(f) is f
    assert f.matches("a.mlp.0.weight") and not f.matches("a.in_proj_weight")
    assert not qfi.NameFilter(("mlp",), ("bias",)).matches("mlp.0.bias")


def test_no_match_suggests_close_names(vit: nn.Module) -> None:
    """A typo raises QfiError naming the entry, a close match, and how to list names."""
    with pytest.raises(qfi.QfiError, match=r"'in_proj_weigth'.*did you mean.*'in_proj_weight'.*list_names"):
        qfi.select_weights(vit, "in_proj_weigth")
    with pytest.raises(qfi.QfiError, match="selects no weights"):
        qfi.select_weights(vit, "mlp", exclude="mlp")
    with pytest.raises(qfi.QfiError, match="bad regular expression"):
        qfi.select_weights(vit, "re:(")


def test_integer_buffers_are_not_candidates() -> None:
    """num_batches_tracked (int64) is skipped; float buffers are selectable, BatchNorm's running
    statistics only with bn_stats=True (affine weight/bias always: they are parameters)."""
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    m.register_buffer("table", torch.ones(3))
    names = qfi.select_weights(m)
    assert names == ["table", "0.weight", "0.bias", "1.weight", "1.bias"]  # model order: root first
    names = qfi.select_weights(m, bn_stats=True)
    assert "1.running_mean" in names and "1.running_var" in names and "1.num_batches_tracked" not in names
    assert [i.name for i in qfi.list_names(m, bn_stats=True)] == names
    with pytest.raises(qfi.QfiError, match="num_batches_tracked"):
        qfi.select_weights(m, "num_batches_tracked")


def test_select_modules_treats_attention_as_one_module(vit: nn.Module) -> None:
    """MultiheadAttention is hooked as a whole (its out_proj never runs forward); others are leaves."""
    mods = qfi.select_modules(vit)
    assert "encoder.layers.encoder_layer_0.self_attention" in mods
    assert not any("out_proj" in m for m in mods)
    assert "encoder.layers.encoder_layer_0.mlp.0" in mods and "encoder.layers.encoder_layer_0.mlp" not in mods
    assert len(qfi.select_modules(vit, "self_attention")) == 12
    with pytest.raises(qfi.QfiError, match="list_names"):
        qfi.select_modules(vit, "attn")


def test_list_names(vit: nn.Module) -> None:
    """Weights: 152 tensors, 86,567,656 parameters; activations get shapes from an example."""
    infos = qfi.list_names(vit, "weights")
    assert len(infos) == 152 and sum(i.numel for i in infos) == 86_567_656
    assert infos[0].name == "class_token" and infos[0].shape == (1, 1, 768)
    small = vit_digits()
    acts = {i.name: i for i in qfi.list_names(small, "activations")}
    assert acts["encoder.layers.encoder_layer_0.self_attention"].shape is None
    acts = {i.name: i for i in qfi.list_names(small, "activations", example=torch.zeros(2, 1, 8, 8))}
    assert acts["encoder.layers.encoder_layer_0.self_attention"].shape == (2, 17, 48)
    assert acts["encoder.layers.encoder_layer_0.self_attention"].kind == "MultiheadAttention"
    with pytest.raises(qfi.QfiError, match="'bogus'"):
        qfi.list_names(small, "bogus")


class SameConv(nn.Conv2d):
    """'Same' padding through a child: a compute layer that has children."""

    def __init__(self) -> None:
        super().__init__(1, 2, 3)
        self.pad = nn.ZeroPad2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = SameConv()
        self.layer = nn.ModuleList([nn.ReLU() for _ in range(11)])
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 36, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for f in self.layer:
            x = f(x)
        return self.head(x)


def test_modules_with_children_that_compute_are_candidates() -> None:
    """A Conv2d subclass with a padding child is selectable by its name, alone (it used to select
    only its padding child, the conv's input); containers are not candidates; `names` lists the
    same set with shapes."""
    net = Net()
    assert qfi.select_modules(net, "stem") == ["stem"]
    assert qfi.select_modules(net, "stem.pad") == ["stem.pad"]
    assert qfi.select_modules(net, "stem*") == ["stem", "stem.pad"]  # a glob still matches both
    cands = qfi.select_modules(net)
    assert "stem" in cands and "layer" not in cands and "head" not in cands and "head.1" in cands
    infos = qfi.list_names(net, "activations", example=torch.zeros(1, 1, 6, 6))
    assert [i.name for i in infos] == cands
    assert {i.name: i.shape for i in infos}["stem"] == (1, 2, 6, 6)


def test_a_full_module_name_means_that_module_alone() -> None:
    """'layer.1' is not also 'layer.10'; excluding a full name excludes that module alone; a plain
    word that is part of names still matches as a substring."""
    net = Net()
    assert qfi.select_modules(net, "layer.1") == ["layer.1"]
    assert "stem.pad" in qfi.select_modules(net, exclude="stem")
    assert "stem" not in qfi.select_modules(net, exclude="stem")
    assert len(qfi.select_modules(net, "layer.")) == len(qfi.select_modules(net, "ayer")) == 11


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("layer", r"'layer' is a ModuleList, a container without a forward of its own.*'layer\.'"),
        ("head", r"'head' is a Sequential, a container whose output is the output of its last module 'head"),
    ],
)
def test_naming_a_container_is_an_error_not_a_silent_fallback(entry: str, match: str) -> None:
    """A full name of a module that carries no activation faults is refused with what to select."""
    with pytest.raises(qfi.QfiError, match=match):
        qfi.select_modules(Net(), entry)
    with pytest.raises(qfi.QfiError, match=match):
        qfi.select_modules(Net(), exclude=entry)


def test_out_proj_of_attention_is_explained(vit: nn.Module) -> None:
    """out_proj (never called by MultiheadAttention.forward) points to the attention module."""
    name = "encoder.layers.encoder_layer_0.self_attention"
    with pytest.raises(qfi.QfiError, match=f"inside MultiheadAttention '{name}', whose forward never"):
        qfi.select_modules(vit, f"{name}.out_proj")
    with pytest.raises(qfi.QfiError, match="'out_proj' matches no modules .*select"):
        qfi.select_modules(vit, "out_proj")
