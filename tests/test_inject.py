"""Weight sessions and activation hooks: exact logs, bit-exact restore, the binomial law."""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from torch import nn

import qfi
from qfi.faults import to_int32
from qfi.zoo.vit import vit_digits
from quant_schemes import FORMATS, Encoded, gather_scale, get_format

REQUIRED = ("fp32", "fp16", "bf16", "fp8_e4m3", "q3.13", "int8", "int8_per_channel")
FMTS = tuple(dict.fromkeys(REQUIRED + tuple(FORMATS)))


def bits_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every floating tensor of the model as raw integer bits (NaN-safe comparison)."""
    out = {}
    for n, t in model.state_dict().items():
        t = t.detach().clone()
        out[n] = t.view(torch.int32) if t.dtype == torch.float32 else t
    return out


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return vit_digits().eval()


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.int32)


@pytest.mark.parametrize("fmt", FMTS)
def test_log_is_the_exact_diff(model: nn.Module, fmt: str) -> None:
    """Changed words == logged words; old_code == clean code; the stored value == decode(new_code);
    popcount(old ^ new) of each word == its rows, and those rows are exactly the set bits."""
    f = get_format(fmt)
    with qfi.weights(model, fmt) as w:
        clean = {n: raw(w.tensor(n)).clone() for n in w.names}
        codes = {n: w.clean_codes(n) for n in w.names}
        with w.inject(qfi.BitFlip(ber=80 / w.total_bits), seed=5) as log:
            assert log.flips > 20
            df = log.to_frame()
            changed = set()
            for n in w.names:
                idx = (raw(w.tensor(n)) != clean[n]).nonzero().flatten().tolist()
                changed.update((n, i) for i in idx)
            words = df.groupby(["name", "index"], observed=True)
            assert changed == set(words.groups)
            for (name, index), rows in words:
                old, new = int(rows.old_code.iloc[0]), int(rows.new_code.iloc[0])
                assert bin(old ^ new).count("1") == len(rows)
                assert sorted(rows.bit) == [b for b in range(f.bits) if (old ^ new) >> b & 1]
                enc = codes[name]
                assert int(enc.qdata.reshape(-1)[index]) & ((1 << f.bits) - 1) == old
                scale = gather_scale(enc.scale, enc.qdata.shape, torch.tensor([index]))
                want = f.decode(Encoded(to_int32(torch.tensor([new])), scale))
                got = w.tensor(name).detach().reshape(-1)[index:index + 1].float()
                assert torch.equal(got, want) or (want.isnan().all() and got.isnan().all())
    assert len(log) == log.flips == len(df)


@pytest.mark.parametrize("fmt", FMTS)
def test_restore_is_bit_exact(model: nn.Module, fmt: str) -> None:
    """The original bits come back after exit, after an exception in the body, and undo restores
    the clean-quantized words; BER 0 changes nothing and logs nothing."""
    orig = bits_of(model)
    with qfi.weights(model, fmt) as w:
        quantized = bits_of(model)
        w.apply(qfi.BitFlip(ber=1e-3), seed=1)
        assert not same_bits(bits_of(model), quantized)
        w.undo()
        assert same_bits(bits_of(model), quantized)
        with pytest.raises(RuntimeError, match="boom"), w.inject(qfi.FlipCount(50), seed=2):
            raise RuntimeError("boom")
        assert same_bits(bits_of(model), quantized)
        with w.inject(qfi.BitFlip(ber=0.0), seed=3) as log:
            assert log.flips == 0 and same_bits(bits_of(model), quantized)
        w.apply(qfi.FlipCount(7), seed=4)  # left pending: __exit__ must undo it
    assert same_bits(bits_of(model), orig)
    with pytest.raises(ZeroDivisionError), qfi.weights(model, fmt, flat=False) as w:
        w.apply(qfi.FlipCount(9), seed=4)
        1 / 0  # noqa: B018
    assert same_bits(bits_of(model), orig)


@pytest.mark.parametrize("fmt", FMTS)
def test_replay_and_double_flip(model: nn.Module, fmt: str) -> None:
    """Replaying a log gives the same codes and log; a site listed twice is no change."""
    with qfi.weights(model, fmt) as w:
        clean = bits_of(model)
        log = w.apply(qfi.FlipCount(30), seed=7)
        faulty = bits_of(model)
        w.undo()
        log2 = w.replay(log)
        assert same_bits(bits_of(model), faulty)
        assert all(torch.equal(log.columns[k], log2.columns[k]) for k in log.columns if "value" not in k)
        w.undo()
        name = w.names[3]
        with w.inject(qfi.FlipSites(((name, 2, 1), (name, 2, 1)))) as twice:
            assert twice.flips == 0 and same_bits(bits_of(model), clean)


def test_seeds_reproduce_and_differ(model: nn.Module) -> None:
    """The same seed gives the same sites and log; another seed gives other sites."""
    with qfi.weights(model) as w:
        logs = []
        for seed in (11, 11, 12):
            with w.inject(qfi.BitFlip(ber=1e-3), seed=seed) as log:
                logs.append({k: v.clone() for k, v in log.columns.items()})
        assert all(torch.equal(logs[0][k], logs[1][k]) for k in logs[0])
        a, b = logs[0]["index"], logs[2]["index"]
        assert a.shape != b.shape or not torch.equal(a, b)


def test_flip_counts_follow_the_binomial_law(model: nn.Module) -> None:
    """300 trials at a BER giving ~20 flips: chi-square against Binomial(total_bits, p), p > 0.001;
    a per-bit BER touches only that bit."""
    with qfi.weights(model) as w:
        p = 20 / w.total_bits
        g = torch.Generator().manual_seed(123)
        counts = []
        for _ in range(300):
            with w.inject(qfi.BitFlip(ber=p), generator=g) as log:
                counts.append(log.flips)
        law = stats.binom(w.total_bits, p)
        edges = [0, 13, 16, 18, 20, 22, 24, 27, 10**9]
        obs = [sum(a <= c < b for c in counts) for a, b in zip(edges, edges[1:], strict=False)]
        exp = [300 * (law.cdf(b - 1) - law.cdf(a - 1)) for a, b in zip(edges, edges[1:], strict=False)]
        assert min(exp) > 5
        assert stats.chisquare(obs, exp).pvalue > 0.001
        with w.inject(qfi.BitFlip(ber=0.01, bits=30), seed=1) as log:
            assert log.flips > 0 and set(log.bit.tolist()) == {30}
            assert (log.old_code ^ log.new_code).eq(1 << 30).all()


def test_stuck_at_logs_only_changed_bits(model: nn.Module) -> None:
    """StuckAt(1) rows are bits that were 0 and are now 1; sites counts every site drawn."""
    with qfi.weights(model, "int8") as w, w.inject(qfi.StuckAt(1, count=200), seed=3) as log:
        assert 0 < log.flips < log.sites == 200
        assert ((log.old_code >> log.bit) & 1).eq(0).all() and ((log.new_code >> log.bit) & 1).eq(1).all()


def test_errors(model: nn.Module) -> None:
    """Bits outside the format, double apply, unknown site names, mismatched dtypes raise QfiError."""
    with qfi.weights(model, "int8") as w:
        with pytest.raises(qfi.QfiError, match=r"bit 8 is outside format 'int8', whose bits are 0\.\.7"):
            w.apply(qfi.FlipCount(1, bits=8))
        w.apply(qfi.FlipCount(1), seed=0)
        with pytest.raises(qfi.QfiError, match="already applied"):
            w.apply(qfi.FlipCount(1), seed=0)
        w.undo()
        with pytest.raises(qfi.QfiError, match="'nope'"):
            w.apply(qfi.FlipSites((("nope", 0, 0),)))
    with pytest.raises(qfi.QfiError, match="needs float32"):
        with qfi.weights(model.half(), "fp32"):
            pass
    with pytest.raises(qfi.QfiError, match="'fp99'"):
        qfi.weights(model, "fp99")


# -- activations -----------------------------------------------------------------------------------
def test_activation_faults_reach_attention(model: nn.Module) -> None:
    """Armed faults change MultiheadAttention's (tuple) output; disarmed fp32 is the golden output;
    calls= limits the hit forwards; all hooks are gone after exit."""
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gold = model(x)
        with qfi.activations(model, "fp32", names="self_attention") as act:
            assert torch.equal(model(x), gold)
            with act.inject(qfi.BitFlip(ber=1e-3, bits=30), seed=0, calls=(1,)) as log:
                outs = [model(x) for _ in range(3)]
            assert torch.equal(outs[0], gold) and torch.equal(outs[2], gold)
            assert not torch.equal(outs[1], gold)
            assert log.flips > 0 and set(log.call.tolist()) == {1}
            assert set(log.to_frame().name) <= set(act.names)
            assert torch.equal(model(x), gold)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_activation_flip_count_per_forward(model: nn.Module) -> None:
    """FlipCount(5) flips exactly 5 distinct bits over all selected outputs in each forward."""
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), qfi.activations(model, "fp16", names="mlp.0,mlp.3") as act:
        with act.inject(qfi.FlipCount(5), seed=1) as log:
            model(x)
            model(x)
        assert log.flips == 10 and sorted(log.call.tolist()) == [0] * 5 + [1] * 5


def test_calibrated_int8_scale_is_frozen() -> None:
    """Calibrated int8 outputs saturate at the calibration range; dynamic=True rescales each call."""
    lin = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(16, 4)
    with torch.no_grad():
        amax = lin(x).abs().max()
        with qfi.activations(lin, "int8", calibrate=[x]):
            big = lin(10 * x)
        with qfi.activations(lin, "int8", dynamic=True):
            dyn = lin(10 * x)
        ref = lin(10 * x)
    assert big.abs().max() <= amax * (1 + 1e-6) < ref.abs().max()
    assert torch.allclose(dyn, ref, rtol=0.02, atol=ref.abs().max().item() / 100)
    with pytest.raises(qfi.QfiError, match="calibrate"):
        with qfi.activations(lin, "int8"):
            pass


# -- the science check -------------------------------------------------------------------------------
def test_exponent_msb_destroys_accuracy_mantissa_lsb_does_not() -> None:
    """Trained digits ViT: bit 30 in two weights of every attention/MLP matrix -> < 30% accuracy;
    bit 0 in the same weights -> within 1 point of clean."""
    zoo = pytest.importorskip("qfi.zoo")
    model = zoo.load_model("vit_digits")
    x, y = zoo.load_data("digits", split="test").tensors

    def accuracy() -> float:
        with torch.no_grad():
            return (model(x).argmax(1) == y).float().mean().item()

    clean = accuracy()
    names = qfi.select_weights(model, "in_proj_weight,out_proj.weight,mlp.0.weight,mlp.3.weight")
    g = torch.Generator().manual_seed(0)
    sizes = {n: t.numel() for n, t in model.named_parameters()}
    picks = [(n, int(i)) for n in names for i in torch.randint(0, sizes[n], (2,), generator=g)]
    with qfi.weights(model, names=names) as w:
        with w.inject(qfi.FlipSites(tuple((n, i, 30) for n, i in picks))):
            msb = accuracy()
        with w.inject(qfi.FlipSites(tuple((n, i, 0) for n, i in picks))):
            lsb = accuracy()
    assert clean > 0.9
    assert msb < 0.3
    assert abs(lsb - clean) <= 0.01


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4", "q3.13"])
def test_activation_fast_quantize_matches_format(fmt: str) -> None:
    """The hook's quantize shortcut gives exactly fmt.quantize's values (finite inputs)."""
    f = get_format(fmt)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-8, 3, 4096)
    scale = f.choose_qparams(x[:2048])  # frozen on part of the data: the rest saturates
    act = qfi.ActivationSession(nn.Identity(), fmt)
    assert torch.equal(act._quantize(x, scale), f.quantize(x, scale))
    y = x.clone()
    assert torch.equal(act._quantize(y, scale, inplace=True), f.quantize(x, scale))


def test_activation_quantize_never_overwrites_an_input() -> None:
    """A module that returns its input (nn.Identity) feeds a residual branch: emulating its
    output must not change the tensor the rest of the model still reads."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ident = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.ident(x)  # reads x after the hook ran on ident's output

    m = Residual()
    x = torch.randn(64) * 10
    with torch.no_grad(), qfi.activations(m, "int8", names="ident", calibrate=[x]):
        y = m(x.clone())
    assert torch.equal(y, x + get_format("int8").quantize(x, get_format("int8").choose_qparams(x)))


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_restore_keeps_layout_of_non_contiguous_weights(fmt: str) -> None:
    """A transposed (non-contiguous) weight comes back with its shape, strides and bits, also when
    the flat buffer was used; the Parameter object itself is never replaced."""
    lin = nn.Linear(5, 3)
    lin.weight = nn.Parameter(torch.randn(5, 3).t())  # strides (1, 3)
    param, stride, before = lin.weight, lin.weight.stride(), lin.weight.detach().clone()
    with qfi.weights(lin, fmt) as w, w.inject(qfi.FlipCount(4), seed=0) as log:
        assert log.flips == 4
    assert lin.weight is param and lin.weight.stride() == stride
    assert torch.equal(lin.weight.detach().view(torch.int32), before.view(torch.int32))


def test_failed_enter_changes_nothing() -> None:
    """If quantizing one selected tensor fails mid-way (fp16 weights cannot hold int8 values
    exactly), the tensors already moved are put back and the model is unchanged."""
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).half()
    orig = {n: t.detach().clone() for n, t in m.state_dict().items()}
    with pytest.raises(qfi.QfiError, match="cannot hold"), qfi.weights(m, "int8"):
        pass
    assert all(torch.equal(orig[n].view(torch.int16), t.view(torch.int16)) for n, t in m.state_dict().items())


def test_large_flat_buffer_restores_bit_exact() -> None:
    """Above 4 MB the flat buffer is a huge-page mapping on the CPU: faults land in the live
    weights and restore stays bit-exact (NaN/inf patterns from exponent flips included)."""
    lin = nn.Linear(2000, 1000)
    before = {n: t.detach().clone() for n, t in lin.state_dict().items()}
    with qfi.weights(lin, "fp32") as w, w.inject(qfi.FlipCount(500, bits=30), seed=0) as log:
        assert log.flips == 500
        assert int((lin.weight.detach().view(torch.int32) != before["weight"].view(torch.int32)).sum()) > 400
    for n, t in lin.state_dict().items():
        assert torch.equal(t.view(torch.int32), before[n].view(torch.int32))


def test_activation_quantize_never_overwrites_a_parameter() -> None:
    """A module whose output shares storage with its own weight keeps the weight intact."""

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(32) * 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.w.detach()  # no autograd, same storage as the parameter

    m = nn.Sequential(Table())
    before = m[0].w.detach().clone()
    with torch.no_grad(), qfi.activations(m, "int8", names="0", dynamic=True):
        out = m(torch.zeros(1))
    assert torch.equal(m[0].w.detach(), before)
    assert not torch.equal(out, before)  # the output itself was quantized
