"""Module outputs of any shape: walking them (qfi.outputs) and activation faults on them."""

from __future__ import annotations

import collections
import dataclasses
from collections import OrderedDict

import pytest
import torch
from torch import nn

import qfi
from qfi import outputs
from quant_schemes import get_format


@dataclasses.dataclass
class FakeModelOutput(OrderedDict):
    """A minimal stand-in for HF ``transformers.utils.ModelOutput``: a dataclass that is also an
    OrderedDict whose items are the fields that are set, attribute and item kept in step."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    attentions: tuple | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None:
                self[f.name] = v

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __setattr__(self, name, value) -> None:
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)


@dataclasses.dataclass
class Pair:
    ids: torch.Tensor
    hidden: torch.Tensor
    logits: torch.Tensor


Named = collections.namedtuple("Named", "ids hidden logits")


class Wrap(nn.Module):
    """A linear layer whose output is packed into a container; ``ids`` (int) comes first."""

    def __init__(self, pack) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.pack = pack

    def forward(self, x: torch.Tensor):
        h = self.lin(x)
        return self.pack(torch.arange(3), h, h * 2)


PACKS = {
    "dict": lambda i, h, lg: {"ids": i, "hidden": h, "logits": lg},
    "OrderedDict subclass (ModelOutput-like)": lambda i, h, lg: FakeModelOutput(h, lg, (i,)),
    "dataclass": lambda i, h, lg: Pair(i, h, lg),
    "namedtuple": lambda i, h, lg: Named(i, h, lg),
    "list": lambda i, h, lg: [i, h, lg],
    "nested": lambda i, h, lg: ({"ids": i, "out": [h]}, lg),
}
#: the first floating tensor of each pack in walk order, and a key naming the second one
FIRST = {"dict": "hidden", "OrderedDict subclass (ModelOutput-like)": "last_hidden_state",
         "dataclass": "hidden", "namedtuple": "1", "list": "1", "nested": "0.out.0"}
OTHER = {"dict": "logits", "OrderedDict subclass (ModelOutput-like)": "pooler_output",
         "dataclass": "logits", "namedtuple": "logits", "list": 2, "nested": 1}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.int32)


# -- walking ------------------------------------------------------------------------------------------
def test_float_tensors_lists_keys_in_walk_order() -> None:
    """Floating tensors only, depth first, with dotted keys; integer tensors and None are skipped."""
    h, lg = torch.ones(2), torch.zeros(2)
    assert outputs.float_tensors(h) == [("", h)]
    assert [k for k, _ in outputs.float_tensors(({"ids": torch.arange(2), "out": [h]}, lg, None))] == [
        "0.out.0",
        "1",
    ]
    assert [k for k, _ in outputs.float_tensors(FakeModelOutput(h, None, (lg, lg)))] == [
        "last_hidden_state",
        "attentions.0",
        "attentions.1",
    ]
    assert outputs.float_tensors({"ids": torch.arange(3)}) == [] and outputs.pick(None) is None
    assert len(outputs.tensors(({"ids": torch.arange(2)}, Pair(h, h, lg)))) == 4


@pytest.mark.parametrize("kind", list(PACKS))
def test_pick_by_default_key_and_index(kind: str) -> None:
    """Default: the first floating tensor; a key, an index or a dotted path picks another one."""
    i, h, lg = torch.arange(3), torch.ones(2), torch.zeros(2)
    out = PACKS[kind](i, h, lg)
    loc, t = outputs.pick(out)
    assert t is h and outputs.loc_str(loc) == FIRST[kind]
    assert outputs.pick(out, OTHER[kind])[1] is lg
    assert outputs.pick(out, FIRST[kind])[1] is h


def test_pick_follows_hf_positional_convention_and_reports_missing_keys() -> None:
    """``output=0`` on a mapping is its first entry (HF ``out[0]``); -1 the last; a key that is
    not there is a QfiError naming the output type and where its floating tensors are."""
    h, lg = torch.ones(2), torch.zeros(2)
    mo = FakeModelOutput(h, lg)
    assert outputs.pick(mo, 0)[1] is h and outputs.pick(mo, -1)[1] is lg
    assert outputs.pick((h, lg), "-1")[1] is lg
    assert outputs.pick({1: h, 0: lg}, 1)[1] is h  # a key wins over the position
    with pytest.raises(qfi.QfiError, match=r"'logits' names nothing.*FakeModelOutput \(a Mapping\).*"
                                           r"\['last_hidden_state', 'pooler_output'\]"):
        outputs.pick(mo, "logits")
    with pytest.raises(qfi.QfiError, match="Tensor output is itself the only floating tensor"):
        outputs.pick(h, "logits")
    with pytest.raises(qfi.QfiError, match=r"output=True"):
        outputs.check_key(True)


@pytest.mark.parametrize("kind", list(PACKS))
def test_replace_keeps_container_types_and_leaves_the_input_alone(kind: str) -> None:
    """The rebuilt output has the same type at every level, the new tensor at the key, every other
    entry the same object; the original output is not modified."""
    i, h, lg = torch.arange(3), torch.ones(2), torch.zeros(2)
    out = PACKS[kind](i, h, lg)
    loc, _ = outputs.pick(out)
    new = torch.full((2,), 7.0)
    got = outputs.replace(out, loc, new)
    assert type(got) is type(out) and got is not out
    assert outputs.pick(got)[1] is new and outputs.pick(out)[1] is h
    assert {id(t) for t in outputs.tensors(got) if t is not new} == {id(i), id(lg)}
    if isinstance(got, FakeModelOutput):
        assert got.last_hidden_state is new and got["last_hidden_state"] is new


def test_replace_in_special_containers() -> None:
    """torch.return_types, frozen dataclasses, dataclass fields with init=False, dict subclasses."""
    mx = torch.randn(3, 4).max(1)
    got = outputs.replace(mx, (0,), torch.zeros(3))
    assert type(got) is type(mx) and torch.equal(got.values, torch.zeros(3)) and got.indices is mx.indices

    @dataclasses.dataclass(frozen=True)
    class Frozen:
        a: torch.Tensor
        b: torch.Tensor = dataclasses.field(init=False, default_factory=lambda: torch.ones(1))

    f = Frozen(torch.ones(2))
    assert torch.equal(outputs.replace(f, ("a",), torch.zeros(2)).a, torch.zeros(2))
    g = outputs.replace(f, ("b",), torch.zeros(1))
    assert type(g) is Frozen and torch.equal(g.b, torch.zeros(1)) and torch.equal(f.b, torch.ones(1))
    d = collections.defaultdict(list, x=torch.ones(1))
    assert type(outputs.replace(d, ("x",), torch.zeros(1))) is collections.defaultdict


# -- activation faults on such outputs ----------------------------------------------------------------
def _run(kind: str, fmt: str = "fp32", output=None, fault=None, calibrate: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(Wrap(PACKS[kind]))
    x = torch.randn(5, 4)
    with torch.no_grad():
        clean = model(x)
        calib = [x] if calibrate else None
        with qfi.activations(model, fmt, names="0", output=output, calibrate=calib) as act:
            emulated = model(x)
            with act.inject(fault or qfi.FlipCount(8, bits=(20, 30)), seed=1) as log:
                out = model(x)
    return clean, emulated, out, log


@pytest.mark.parametrize("kind", list(PACKS))
def test_faults_reach_the_first_floating_tensor_of_any_output(kind: str) -> None:
    """fp32 faults on a dict / ModelOutput-like / dataclass / namedtuple / list / nested output:
    flips > 0, the first floating tensor changed exactly at the logged words (to the logged
    values), every other entry untouched, the output's type kept."""
    clean, _, out, log = _run(kind)
    assert type(out) is type(clean)
    assert log.flips == 8 and set(log.to_frame().name) == {"0"}
    key = FIRST[kind]
    got, ref = outputs.pick(out, key)[1], outputs.pick(clean, key)[1]
    changed = (bits(got) != bits(ref)).nonzero().flatten()
    assert changed.tolist() == sorted(set(log.index.tolist()))
    want = log.to_frame().drop_duplicates("index").set_index("index").new_value
    assert torch.equal(got.reshape(-1)[changed], torch.tensor(want.loc[changed.tolist()].to_numpy()))
    assert torch.equal(outputs.pick(out, OTHER[kind])[1], outputs.pick(clean, OTHER[kind])[1])
    ints = [t for t in outputs.tensors(out) if not t.is_floating_point()]
    assert len(ints) == 1 and torch.equal(ints[0], torch.arange(3))  # the integer entry passes through


@pytest.mark.parametrize("kind", list(PACKS))
def test_output_key_chooses_the_faulted_tensor(kind: str) -> None:
    """output=<key or index> moves the fault space to that tensor; the first one stays clean."""
    clean, _, out, log = _run(kind, output=OTHER[kind])
    assert log.flips == 8
    other, first = OTHER[kind], FIRST[kind]
    assert torch.equal(outputs.pick(out, first)[1], outputs.pick(clean, first)[1])
    changed = (bits(outputs.pick(out, other)[1]) != bits(outputs.pick(clean, other)[1])).nonzero().flatten()
    assert changed.tolist() == sorted(set(log.index.tolist()))


@pytest.mark.parametrize("kind", ["dict", "OrderedDict subclass (ModelOutput-like)", "dataclass"])
def test_calibrated_int8_on_mapping_and_dataclass_outputs(kind: str) -> None:
    """Calibrated int8 works on such outputs (it used to fail as 'are the calibrate inputs
    empty?'): the chosen tensor is quantized, the others are not, BitFlip flips bits."""
    clean, emulated, out, log = _run(kind, "int8", fault=qfi.BitFlip(ber=0.05), calibrate=True)
    assert log.flips > 0
    first, ref = outputs.pick(emulated, FIRST[kind])[1], outputs.pick(clean, FIRST[kind])[1]
    int8 = get_format("int8")
    assert torch.equal(first, int8.quantize(ref, int8.choose_qparams(ref))) and not torch.equal(first, ref)
    assert torch.equal(outputs.pick(emulated, OTHER[kind])[1], outputs.pick(clean, OTHER[kind])[1])
    assert not torch.equal(outputs.pick(out, FIRST[kind])[1], first)


def test_missing_output_key_names_module_type_and_keys() -> None:
    """output='nope' fails at calibration, or at the first forward, naming the module, its
    output type and the keys of its floating tensors."""
    model = nn.Sequential(Wrap(PACKS["dict"]))
    x = torch.randn(2, 4)
    msg = r"module '0' \(Wrap\): output key 'nope' names nothing in it: this dict output has floating " \
          r"tensors at \['hidden', 'logits'\]"
    with pytest.raises(qfi.QfiError, match=msg), qfi.activations(model, "int8", names="0", output="nope",
                                                                 calibrate=[x]):
        pass
    with torch.no_grad(), qfi.activations(model, "fp32", names="0", output="nope"):
        with pytest.raises(qfi.QfiError, match=msg):
            model(x)
    assert all(not m._forward_hooks for m in model.modules())


class IdsOnly(nn.Module):
    def forward(self, x: torch.Tensor):
        return {"ids": x.argmax(-1), "mask": None}


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_output_without_floating_tensor_is_an_error_not_a_zero_flip_trial(fmt: str) -> None:
    """A selected module returning no floating tensor is a QfiError naming it and its output
    type: at calibration (int8), else at the first forward (fp32, armed or not)."""
    model = nn.Sequential(nn.Linear(4, 4), IdsOnly())
    x = torch.randn(2, 4)
    msg = r"module '1' \(IdsOnly\) returned a dict with no floating tensor"
    with torch.no_grad():
        if fmt == "int8":
            with pytest.raises(qfi.QfiError, match=msg):
                qfi.activations(model, fmt, names="1", calibrate=[x]).__enter__()
            return
        with qfi.activations(model, fmt, names="1") as act:
            with pytest.raises(qfi.QfiError, match=msg):
                model(x)
            with act.inject(qfi.BitFlip(ber=0.1), seed=0), pytest.raises(qfi.QfiError, match=msg):
                model(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_faults_on_a_model_output_like_output() -> None:
    """On CUDA: the ModelOutput-like output keeps its type, faults land exactly at the logged
    words of the first floating tensor (sites sampled on the CPU)."""
    model = nn.Sequential(Wrap(PACKS["OrderedDict subclass (ModelOutput-like)"])).cuda()
    x = torch.randn(5, 4, device="cuda")
    with torch.no_grad():
        clean = model(x)
        with qfi.activations(model, "fp32", names="0") as act, act.inject(qfi.FlipCount(8), seed=0) as log:
            out = model(x)
    assert type(out) is FakeModelOutput and log.flips == 8
    changed = (bits(out.last_hidden_state) != bits(clean.last_hidden_state)).nonzero().flatten().cpu()
    assert changed.tolist() == sorted(set(log.index.tolist()))
