"""Fault-aware training (qfi.training): optimizer updates land on the clean weights, exactly; a seed
reproduces a run; BER 0 in fp32 is plain training; straight-through gradients; draws per step or
per epoch; and the research script runs."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qfi
from qfi.training import draw_seed, straight_through
from quant_schemes import get_format

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
FORMATS = ("fp32", "bf16", "fp16", "q3.13", "int8", "int8_per_channel")


class Block(nn.Module):
    """A module with a child whose output it returns as is (nested activation selections)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class Tiny(nn.Module):
    def __init__(self, dropout: float = 0.0, bn: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.block = Block()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.block(self.drop(torch.relu(self.bn(self.fc1(x)))))))


def tiny(seed: int = 0, **kw) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(**kw).train()


def data(steps: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(steps)]


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers as raw bits (a NaN-safe, -0.0-aware comparison)."""
    out = {}
    for n, t in model.state_dict().items():
        t = t.detach().clone()
        out[n] = t.view(torch.int32) if t.dtype == torch.float32 else t
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def low_bits(fmt: str) -> tuple[int, int]:
    """The lower half of a format's bits: faults there keep every value finite."""
    return (0, get_format(fmt).bits // 2 - 1)


def train(model: nn.Module, fat=None, epochs: int = 2, steps: int = 3, seed: int = 5) -> list:
    """A plain AdamW loop; with ``fat``, each forward + backward runs inside ``fat.step``."""
    torch.manual_seed(seed)  # dropout
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    logs = []
    for epoch in range(epochs):
        for x, y in data(steps):
            opt.zero_grad()
            if fat is None:
                F.cross_entropy(model(x), y).backward()
            else:
                with fat.step(epoch=epoch) as log:
                    F.cross_entropy(model(x), y).backward()
                logs.append(log.to_frame())
            opt.step()
    return logs


def sites(frame: pd.DataFrame) -> set[tuple[str, int, int]]:
    return set(zip(frame["name"].astype(str), frame["index"], frame["bit"], strict=True))


# -- weights: the update lands on the clean weights -------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_step_updates_the_clean_weights_exactly(fmt: str, optim: str) -> None:
    """After each block the weights are bit-identical to before it (faults and quantization
    undone before the optimizer step), and after ``opt.step()`` they are bit-identical to a
    fault-free replica stepped by the same optimizer with the same (faulty-forward) gradients.
    The faults are real: they change the loss and the gradients against a clean forward."""
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    }[optim]
    model, ref = tiny(), tiny()
    opt, opt_ref = make(model.parameters()), make(ref.parameters())
    fat = qfi.fault_aware(model, fmt, qfi.FlipCount(count=40, bits=low_bits(fmt)), names="fc1,fc2", seed=3)
    differs = 0
    for x, y in data(4):
        before = params(model)
        clean = tiny()
        clean.load_state_dict(model.state_dict())
        F.cross_entropy(clean(x), y).backward()
        opt.zero_grad()
        with fat.step() as log:
            assert log.flips == 40
            assert not same(params(model), before)  # the forward runs on faulty weights
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        assert same(params(model), before)  # restored before the optimizer step
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        differs += any(not torch.equal(grads[n], p.grad) for n, p in clean.named_parameters())
        opt.step()
        for n, p in ref.named_parameters():
            p.grad = grads[n].clone()
        opt_ref.step()
        assert same(params(model), params(ref))
    assert differs and fat.steps == 4 and fat.skipped == 0


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_optimizer_step_inside_the_block_is_an_error(fmt: str) -> None:
    """An update made while the faults are in (it would hit the faulty weights and then be
    undone) is refused at the end of the block, naming the weight."""
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fat = qfi.fault_aware(model, fmt, qfi.BitFlip(ber=0.0), names="fc2")
    x, y = data(1)[0]
    with pytest.raises(qfi.QfiError, match=r"changed in place inside fat.step\(\) \('fc2.weight'"):
        with fat.step():
            F.cross_entropy(model(x), y).backward()
            opt.step()


def test_weight_session_is_not_kept_across_steps() -> None:
    """Outside the block the model is the plain model: no selected tensor is held by a session
    (a campaign session can open on it) and its storages are the parameters' own."""
    model = tiny()
    ptrs = [p.data_ptr() for p in model.parameters()]
    fat = qfi.fault_aware(model, "int8", qfi.BitFlip(ber=0.05), names="fc1")
    train(model, fat, epochs=1, steps=2)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    with qfi.weights(model, "int8", names="fc1"):
        pass


# -- BER 0, seeds, draws ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, fault",
    [
        ("weights", qfi.BitFlip(ber=0.0)),
        ("weights", qfi.FlipCount(count=0)),
        ("activations", qfi.BitFlip(ber=0.0)),
        ("activations", qfi.FlipCount(count=0)),  # the session's size probe leaves no trace
    ],
)
def test_ber0_fp32_trains_bit_identically_to_plain_training(target: str, fault) -> None:
    """With no flips, fp32 fault-aware training (dropout and BatchNorm included) is plain training,
    bit for bit: weights, optimizer effects, running statistics, dropout's random stream."""
    plain, faulty = tiny(dropout=0.3, bn=True), tiny(dropout=0.3, bn=True)
    train(plain)
    names = "fc1,block,bn" + (",drop" if target == "activations" else "")
    fat = qfi.fault_aware(faulty, "fp32", fault, target=target, names=names, per="epoch")
    train(faulty, fat)
    assert same(params(faulty), params(plain))
    assert fat.steps == 6 and fat.draws == 2


@pytest.mark.parametrize("target", ["weights", "activations"])
def test_same_seed_same_run_other_seed_other_draws(target: str) -> None:
    """The seed fixes every draw: the same seed gives the same fault sites at every step and a
    bit-identical trained model; another seed gives other sites.  Draw k uses
    ``draw_seed(seed, per, k)``, so a session applying that seed reproduces it."""
    kw = dict(target=target, names="fc1,block", seed=7)
    fault = qfi.BitFlip(ber=0.02)
    a, b, c = tiny(), tiny(), tiny()
    logs_a = train(a, qfi.fault_aware(a, "bf16", fault, **kw))
    logs_b = train(b, qfi.fault_aware(b, "bf16", fault, **kw))
    logs_c = train(c, qfi.fault_aware(c, "bf16", fault, **{**kw, "seed": 8}))
    assert all(len(f) for f in logs_a)
    assert [sites(f) for f in logs_a] == [sites(f) for f in logs_b]
    assert same(params(a), params(b))
    assert [sites(f) for f in logs_a] != [sites(f) for f in logs_c]
    if target == "weights":
        fresh = tiny()
        with qfi.weights(fresh, "bf16", names="fc1,block") as s:
            assert sites(s.apply(fault, seed=draw_seed(7, "step", 0)).to_frame()) == sites(logs_a[0])


@pytest.mark.parametrize("target", ["weights", "activations"])
def test_draws_per_step_and_per_epoch(target: str) -> None:
    """per='step': a new draw for each of the 2 x 3 steps; per='epoch': 2 draws, the same sites in
    every step of an epoch (a permanent fault for the epoch), other sites in the next."""
    fault = qfi.FlipCount(count=6)
    m1, m2 = tiny(), tiny()
    step = qfi.fault_aware(m1, "fp32", qfi.FlipCount(count=6, bits=(0, 10)), target=target, names="fc1")
    per_step = [sites(f) for f in train(m1, step)]
    assert step.draws == 6 and len({frozenset(s) for s in per_step}) == 6
    epoch = qfi.fault_aware(m2, "fp32", fault, target=target, names="fc1", per="epoch", seed=1)
    per_epoch = [sites(f) for f in train(m2, epoch)]
    assert epoch.draws == 2 and epoch.steps == 6
    assert per_epoch[0] == per_epoch[1] == per_epoch[2] != per_epoch[3] == per_epoch[4] == per_epoch[5]


# -- straight-through estimator ---------------------------------------------------------------------------


def test_straight_through_value_is_q_exactly_and_gradient_is_identity() -> None:
    """The forward value is q bit for bit (where ``x + (q - x).detach()`` rounds off, loses -0.0
    and NaN-poisons), and the gradient reaching x is the upstream gradient unchanged."""
    x = torch.tensor([0.3, -2.0, 3.0, float("inf")], requires_grad=True)
    q = torch.tensor([-1.0, -0.0, float("nan"), 1.0])
    naive = (x + (q - x).detach()).detach()
    assert naive[0] == -0.99999994 and naive[1].signbit() == 0 and naive[3].isnan()
    out = straight_through(x, q)
    assert torch.equal(out.detach().view(torch.int32), q.view(torch.int32))
    up = torch.tensor([0.5, -1.0, 2.0, 3.0])
    out.backward(up)
    assert torch.equal(x.grad, up)
    with pytest.raises(qfi.QfiError, match="one shape"):
        straight_through(x, q[:2])


@pytest.mark.parametrize("fmt", ["int8", "bf16", "fp8_e4m3"])
def test_activation_faults_pass_gradients_straight_through(fmt: str) -> None:
    """Faulty, quantized fc2 outputs: the forward value equals the plain activation session's with
    the same seed (bit for bit), and with a loss linear in the output every gradient equals the
    unquantized model's (the quantize + fault has gradient 1); the plain session passes a zero
    gradient (int8) or none that survives quantization."""
    model, plain = tiny(), tiny()
    x, _ = data(1)[0]
    c = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    fault = qfi.BitFlip(ber=0.05)
    fat = qfi.fault_aware(model, fmt, fault, target="activations", names="fc2", dynamic=True, seed=4)
    with fat.step() as log:
        out = model(x)
        (out * c).sum().backward()
    assert log.flips > 0
    with torch.no_grad(), qfi.activations(plain, fmt, names="fc2", dynamic=True) as a:
        with a.inject(fault, seed=draw_seed(4, "step", 0)):
            ref = plain(x)
    assert torch.equal(out.detach(), ref)
    (plain(x) * c).sum().backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n
    if fmt == "int8":
        emulated = tiny()
        with qfi.activations(emulated, fmt, names="fc2", dynamic=True):
            (emulated(x) * c).sum().backward()
        assert not emulated.fc2.weight.grad.any()  # without the estimator: round() has gradient 0


def test_nested_selection_faults_each_value_once_with_gradients() -> None:
    """'block,lin' selects the block and its inner linear layer, whose output the block returns: the
    value is one fault site (the same sites as the plain session with the same seed) and the
    gradient still reaches the inner layer (the unquantized model's, for a loss linear in it)."""

    class Nest(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x)

    torch.manual_seed(0)
    model = Nest()
    plain = Nest()
    plain.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    fault = qfi.BitFlip(ber=0.01, bits=(0, 20))
    fat = qfi.fault_aware(model, "fp32", fault, target="activations", names="block,lin", seed=9)
    with fat.step() as log:
        h = model(x)
        (h * c).sum().backward()
    assert qfi.select_modules(model, "block,lin") == ["block", "block.lin"]
    with torch.no_grad(), qfi.activations(plain, "fp32", names="block,lin") as a:
        with a.inject(fault, seed=draw_seed(9, "step", 0)) as ref_log:
            ref = plain(x)
    assert log.flips == ref_log.flips > 0
    assert sites(log.to_frame()) == sites(ref_log.to_frame())
    assert torch.equal(h.detach(), ref)
    (plain(x) * c).sum().backward()
    assert torch.equal(model.block.lin.weight.grad, plain.block.lin.weight.grad)


def test_calibrated_scales_come_from_an_eval_forward() -> None:
    """calibrate= recalibrates at each step in eval mode: BatchNorm counts only the training
    forward, and the model is back in train mode after the block."""
    model = tiny(bn=True)
    x, y = data(1)[0]
    fat = qfi.fault_aware(model, "int8", qfi.BitFlip(ber=0.01), target="activations", names="fc1",
                          calibrate=[x[:4]])
    with fat.step():
        F.cross_entropy(model(x), y).backward()
    assert int(model.bn.num_batches_tracked) == 1 and model.training and model.bn.training
    assert model.fc1.weight.grad.abs().sum() > 0


# -- non-finite gradients, errors ------------------------------------------------------------------------


def test_nonfinite_gradients_skip_the_step_or_are_kept() -> None:
    """A weight stuck at an all-ones exponent (inf/NaN) makes the gradients non-finite: 'skip'
    drops every gradient, so opt.step() changes nothing, and counts the step; 'keep' keeps them."""
    stuck = qfi.StuckAt(value=1, sites=tuple(("fc1.weight", i, b) for i in range(48) for b in range(23, 31)))
    x, y = data(1)[0]
    for mode in ("skip", "keep"):
        model = tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = params(model)
        fat = qfi.fault_aware(model, "fp32", stuck, names="fc1", nonfinite=mode)
        with fat.step():
            F.cross_entropy(model(x), y).backward()
        if mode == "skip":
            assert fat.skipped == 1 and all(p.grad is None for p in model.parameters())
            opt.step()
            assert same(params(model), before)
        else:
            assert fat.skipped == 0 and not torch.isfinite(model.fc2.weight.grad).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(per="batch"), r"per='batch'; allowed: 'step', 'epoch'"),
        (dict(target="biases"), r"target='biases'; allowed: 'weights', 'activations'"),
        (dict(nonfinite="raise"), r"nonfinite='raise'; allowed: 'skip', 'keep'"),
        (dict(fault="ber=1e-3"), r"not a fault model: 'ber=1e-3'"),
        (dict(names="nothing_like_this"), r"nothing_like_this"),
        (dict(dynamic=True), r"for target='activations'"),
        (dict(fmt="fp99"), r"fp99"),
        (dict(seed=1.5), r"seed=1.5"),
    ],
)
def test_bad_arguments_are_errors(kwargs: dict, match: str) -> None:
    args = dict(fmt="fp32", fault=qfi.BitFlip(ber=0.0))
    args.update(kwargs)
    with pytest.raises(qfi.QfiError, match=match):
        qfi.fault_aware(tiny(), **args)


def test_step_misuse_is_an_error() -> None:
    model = tiny()
    fat = qfi.fault_aware(model, "fp32", qfi.BitFlip(ber=0.0), per="epoch")
    with pytest.raises(qfi.QfiError, match=r"per='epoch' needs step\(epoch=.*got epoch=None"):
        with fat.step():
            pass
    fat = qfi.fault_aware(model, "fp32", qfi.BitFlip(ber=0.0), names="fc1")
    with pytest.raises(qfi.QfiError, match="cannot nest"):
        with fat.step(), fat.step():
            pass
    with fat.step():  # usable again after the error
        pass
    assert fat.steps == 2
    fat = qfi.fault_aware(model, "int8", qfi.BitFlip(ber=0.0), target="activations", names="fc1")
    with pytest.raises(qfi.QfiError, match=r"calibrate=.*dynamic=True"):
        with fat.step():
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8_per_channel"])
def test_cuda_weight_and_activation_steps(fmt: str) -> None:
    """On CUDA: the update lands on the clean weights exactly (as on the CPU), and fp32 activation
    training with FlipCount(0) (the probe forward puts back the CUDA RNG and BatchNorm) and
    BitFlip(0) is plain training, bit for bit."""
    dev = torch.device("cuda")
    model, ref = tiny().to(dev), tiny().to(dev)
    opt, opt_ref = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, ref))
    fat = qfi.fault_aware(model, fmt, qfi.FlipCount(count=40, bits=low_bits(fmt)), names="fc1,fc2", seed=3)
    for x, y in data(3):
        x, y = x.to(dev), y.to(dev)
        before = params(model)
        opt.zero_grad()
        with fat.step() as log:
            F.cross_entropy(model(x), y).backward()
        assert log.flips == 40 and same(params(model), before)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
        assert same(params(model), params(ref))
    for fault in (qfi.FlipCount(count=0), qfi.BitFlip(ber=0.0)):
        plain, faulty = tiny(dropout=0.3, bn=True).to(dev), tiny(dropout=0.3, bn=True).to(dev)
        runs = []
        for m, f in ((plain, None), (faulty, qfi.fault_aware(faulty, "fp32", fault, target="activations",
                                                              names="fc1,block,bn,drop"))):
            torch.cuda.manual_seed(5)
            o = torch.optim.AdamW(m.parameters(), lr=1e-2)
            for x, y in data(3):
                x, y = x.to(dev), y.to(dev)
                o.zero_grad()
                with f.step() if f is not None else contextlib.nullcontext():
                    F.cross_entropy(m(x), y).backward()
                o.step()
            runs.append(params(m))
        assert same(*runs)


# -- the research script ----------------------------------------------------------------------------------


def test_fault_aware_training_script_smoke(tmp_path: Path, capsys) -> None:
    """--smoke trains the three variants briefly and writes the summary (every model, format and
    BER, CIs around the mean, the paired difference to the normal model) and the per-trial
    detail, in which all models of a (format, BER, rep) share one seed; --no-plots: no PNG."""
    spec = importlib.util.spec_from_file_location("script_fat", SCRIPTS / "fault_aware_training.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--smoke", "--no-plots", "--out", str(tmp_path)])
    s = pd.read_csv(tmp_path / "fault_aware_training.csv")
    assert set(s["model"]) == {"normal", "quantization_aware", "fault_aware"}
    assert set(s["format"]) == {"int8", "bf16"}
    assert (s["trials"] == 2).all() and len(s) == 3 * s.groupby(["format", "ber"]).ngroups == 12
    fa = s[s["model"] == "fault_aware"]
    assert (fa["train_ber"] > 0).all() and fa["delta_top1"].notna().all()
    assert s[s["model"] == "normal"]["delta_top1"].isna().all()
    assert (s["top1_ci_low"] <= s["top1_mean"]).all() and (s["top1_mean"] <= s["top1_ci_high"]).all()
    d = pd.read_csv(tmp_path / "fault_aware_training_detail.csv")
    assert len(d) == s["trials"].sum()
    # paired: both models see the same fault sites in each trial
    assert (d.groupby(["format", "ber", "rep"])["seed"].nunique() == 1).all()
    assert not list(tmp_path.glob("*.png"))
    assert "fault_aware_training.csv" in capsys.readouterr().out
