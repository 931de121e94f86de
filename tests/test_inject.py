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


# -- review regressions: logs on disk, replay checks, interrupts, nesting, layouts, aliasing -------------
@pytest.mark.parametrize("fmt", ["fp32", "int8", "int8_per_channel", "fp16"])
@pytest.mark.parametrize("ext", [".csv", ".pt"])
def test_saved_log_replays_the_same_corruption(model: nn.Module, fmt: str, ext: str, tmp_path) -> None:
    """save -> load -> replay writes exactly the faulty bits of the original apply, and the loaded
    log has the original rows (bit for bit in .pt; in CSV every NaN reads back as NaN), inf and
    bit-31 codes included; an empty log round-trips too."""
    with qfi.weights(model, fmt) as w:
        log = w.apply(qfi.FlipCount(40, bits=(fmt == "fp32" and (24, 31)) or None), seed=3)
        faulty = bits_of(model)
        w.undo()
        path = tmp_path / f"log{ext}"
        log.save(path)
        back = qfi.FaultLog.load(path)
        a, b = log.to_frame(), back.to_frame()
        assert list(a.name.astype(str)) == list(b.name.astype(str))
        for k, v in log.columns.items():
            got = back.columns[k]
            assert got.dtype == v.dtype
            if k == "name_id":
                continue
            if ext == ".pt" or not v.is_floating_point():
                assert torch.equal(got.view(torch.int32), v.view(torch.int32)) if v.is_floating_point() \
                    else torch.equal(got, v)
            else:
                assert torch.equal(got.isnan(), v.isnan()) and torch.equal(got.nan_to_num(), v.nan_to_num())
        assert back.format == (fmt if ext == ".pt" else "")
        w.replay(back)
        assert same_bits(bits_of(model), faulty)
        w.undo()
        empty = w.apply(qfi.FlipCount(0))
        w.undo()
        empty.save(tmp_path / f"empty{ext}")
        assert qfi.FaultLog.load(tmp_path / f"empty{ext}").flips == 0


def test_replay_refuses_logs_of_another_session(model: nn.Module) -> None:
    """A log of another format, with a bit or index out of range, or made on other clean codes
    raises QfiError naming the problem, and leaves the model unchanged."""
    with qfi.weights(model, "fp32") as w:
        log32 = w.apply(qfi.FlipCount(5, bits=30), seed=1)
        w.undo()
    with qfi.weights(model, "int8") as w:
        clean = bits_of(model)
        with pytest.raises(qfi.QfiError, match="made in format 'fp32'; this session uses 'int8'"):
            w.replay(log32)
        cols = dict(log32.columns)
        with pytest.raises(qfi.QfiError, match=r"log bit 30 is outside format 'int8', whose bits are 0\.\.7"):
            w.replay(qfi.FaultLog(log32.names, cols))
        name = w.names[0]
        bad = {k: v[:1].clone() for k, v in cols.items()}
        bad["name_id"][0], bad["bit"][0], bad["index"][0] = 0, 1, 10**6
        with pytest.raises(qfi.QfiError, match=r"index 1000000 is outside"):
            w.replay(qfi.FaultLog([name], bad))
        log8 = w.apply(qfi.FlipCount(5), seed=2)
        w.undo()
        assert same_bits(bits_of(model), clean)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)  # another checkpoint: other clean codes at the logged sites
    with qfi.weights(model, "int8") as w:
        clean = bits_of(model)
        with pytest.raises(qfi.QfiError, match="old_code .* differs from this session's clean code"):
            w.replay(log8)
        assert same_bits(bits_of(model), clean) and w._pending is None


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_interrupt_mid_apply_restores_bit_exact(model: nn.Module, fmt: str, monkeypatch) -> None:
    """A KeyboardInterrupt after some words were written (second tensor of a flat=False session)
    restores them before propagating; the session stays usable."""
    import qfi.weight_session as inj  # the weight session's own reference to apply_mask

    real, calls = inj.apply_mask, []

    def flaky(codes, mask, value):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(codes, mask, value)

    with qfi.weights(model, fmt, flat=False) as w:
        clean = bits_of(model)
        monkeypatch.setattr(inj, "apply_mask", flaky)
        with pytest.raises(KeyboardInterrupt):
            w.apply(qfi.BitFlip(ber=1e-2), seed=0)
        monkeypatch.setattr(inj, "apply_mask", real)
        assert len(calls) == 2 and w._pending is None and same_bits(bits_of(model), clean)
        with w.inject(qfi.FlipCount(3), seed=1) as log:
            assert log.flips == 3


@pytest.mark.parametrize("fmt", ["fp32", "int8", "mxfp4"])
def test_interrupt_while_the_log_is_made_restores_bit_exact(model: nn.Module, fmt: str, monkeypatch) -> None:
    """A KeyboardInterrupt after every word was written, while the FaultLog is being made, also
    restores them before propagating (no fault left applied, the session usable)."""
    with qfi.weights(model, fmt) as w:
        clean = bits_of(model)

        def interrupted(*_a, **_k):
            raise KeyboardInterrupt

        for attr in ("make_log", "make_parts_log"):
            monkeypatch.setattr(w.space, attr, interrupted)
        with pytest.raises(KeyboardInterrupt):
            w.apply(qfi.BitFlip(ber=1e-2), seed=0)
        monkeypatch.undo()
        assert w._pending is None and same_bits(bits_of(model), clean)
        with w.inject(qfi.FlipCount(3), seed=1) as log:
            assert log.flips == 3


def test_nested_sessions_on_the_same_tensors_raise(model: nn.Module) -> None:
    """A second weight session on tensors of an entered one raises QfiError (it would detach the
    first); disjoint selections may nest; everything restores bit-exact."""
    orig = bits_of(model)
    with qfi.weights(model, "fp32", names="mlp") as outer:
        with pytest.raises(qfi.QfiError, match="already in an entered weight session"):
            with qfi.weights(model, "int8"):
                pass
        with qfi.weights(model, "int8", names="ln_") as inner, inner.inject(qfi.FlipCount(4), seed=0):
            with outer.inject(qfi.FlipCount(4), seed=0) as log:
                assert log.flips == 4
    assert same_bits(bits_of(model), orig)
    with qfi.weights(model, "int8"):  # the marks are gone after exit
        pass


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_non_contiguous_weights_without_flat(fmt: str) -> None:
    """flat=False (and mixed dtypes, which cannot share one flat buffer) accept a non-contiguous
    weight: faults land in the live weight, and its layout and bits come back on exit; a failed
    enter changes nothing."""
    lin = nn.Linear(5, 3)
    lin.weight = nn.Parameter(torch.randn(5, 3).t())
    lin.register_buffer("extra", torch.randn(3, dtype=torch.float64))
    before = {n: t.detach().clone() for n, t in lin.state_dict().items()}
    stride = lin.weight.stride()
    names = "weight,bias" if fmt == "fp32" else "weight,bias,extra"  # fp32 needs float32
    for flat in (False, True):
        with qfi.weights(lin, fmt, names=names, flat=flat) as w:
            clean = lin.weight.detach().clone()
            with w.inject(qfi.FlipSites((("weight", 4, 30 if fmt == "fp32" else 7),))):
                assert not torch.equal(lin.weight.detach(), clean)
        assert lin.weight.stride() == stride
        for n, t in lin.state_dict().items():
            assert torch.equal(t.contiguous().view(torch.int8), before[n].contiguous().view(torch.int8))


def test_fp32_flat_keeps_storage_shared_between_parameters() -> None:
    """Two parameters viewing one storage (as RNN flat weights do) still share it after an fp32
    flat session, with their original bits."""
    base = torch.randn(20)
    m = nn.Module()
    m.a = nn.Parameter(base[:10].view(2, 5))
    m.b = nn.Parameter(base[10:].view(2, 5))
    m.c = nn.Parameter(torch.randn(3))
    ptr = m.a.untyped_storage().data_ptr()
    before = base.clone()
    with qfi.weights(m, "fp32") as w, w.inject(qfi.FlipCount(6), seed=0):
        pass
    assert m.a.untyped_storage().data_ptr() == ptr == m.b.untyped_storage().data_ptr()
    assert torch.equal(torch.cat([m.a.detach().reshape(-1), m.b.detach().reshape(-1)]), before)


def test_activation_quantize_never_overwrites_keyword_inputs_or_attributes() -> None:
    """Outputs aliasing a keyword input (inside a dict) or a plain tensor attribute are not
    quantized in place: the input and the table keep their values."""

    class Pick(nn.Module):
        def forward(self, *, feats: dict) -> torch.Tensor:
            return feats["x"][1:]  # a view of a keyword input

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pe = torch.randn(8, 4) * 10  # not a buffer

        def forward(self, n: int) -> torch.Tensor:
            return self.pe[:n]

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pick, self.table = Pick(), Table()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.pick(feats={"x": x}).sum() + self.table(4).sum()

    m = M()
    x = torch.randn(6) * 10
    pe = m.table.pe.clone()
    with torch.no_grad(), qfi.activations(m, "int8", dynamic=True):
        y = m(x.clone())
    f = get_format("int8")
    want = x + f.quantize(x[1:]).sum() + f.quantize(pe[:4]).sum()
    assert torch.equal(m.table.pe, pe) and torch.equal(y, want)


def test_activation_plans_follow_keyword_input_shapes() -> None:
    """FlipCount sites are planned from the output sizes of the current input shapes, also when
    the shape comes in as a keyword argument."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, *, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    m = M()
    with torch.no_grad(), qfi.activations(m, "fp16") as act, act.inject(qfi.FlipCount(7), seed=0) as log:
        m(x=torch.randn(1, 4))
        m(x=torch.randn(50, 4))
        idx = log.index[log.call == 1]
    assert log.flips == 14 and 4 <= int(idx.max()) < 200 and int(log.index[log.call == 0].max()) < 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["fp32", "int8", "int8_per_channel", "fp16"])
def test_cuda_weight_and_activation_faults(model: nn.Module, fmt: str) -> None:
    """On CUDA (sites sampled on the CPU): logs equal the CPU session's, restore is bit-exact,
    activation faults run with CPU sites and CUDA outputs."""
    with qfi.weights(model, fmt) as w:
        cpu_log = w.apply(qfi.FlipCount(30), seed=4).to_frame()
    model = model.cuda()
    orig = bits_of(model)
    with qfi.weights(model, fmt) as w, w.inject(qfi.FlipCount(30), seed=4) as log:
        assert log.to_frame().drop(columns=["old_value", "new_value"]).equals(
            cpu_log.drop(columns=["old_value", "new_value"]))
    assert same_bits(bits_of(model), orig)
    if fmt == "int8_per_channel":
        return
    x = torch.randn(4, 1, 8, 8, device="cuda")
    with torch.no_grad(), qfi.activations(model, fmt, calibrate=[x]) as act:
        with act.inject(qfi.FlipCount(5), seed=0) as alog:
            model(x)
        with act.inject(qfi.BitFlip(ber=1e-4), seed=0):
            model(x)
    assert alog.flips == 5


# -- issue 12 items 3 and 10: modules never called, modules with children -------------------------------
class SkipsDropout(nn.Module):
    """A block whose forward never calls ``drop`` (as a fused attention path skips its dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_calibration_names_modules_the_forward_never_called() -> None:
    """int8 calibration with a selected module the forward skips names that module and says why;
    empty calibrate inputs are told apart; excluding the module makes the session work."""
    m = nn.Sequential(SkipsDropout())
    x = torch.randn(3, 4)
    never = r"never called \['0\.drop'\] in 2 calibration batch.*fused attention"
    with pytest.raises(qfi.QfiError, match=never):
        qfi.activations(m, "int8", calibrate=[x, x]).__enter__()
    with pytest.raises(qfi.QfiError, match=r"calibrate= holds no inputs"):
        qfi.activations(m, "int8", calibrate=[]).__enter__()
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    with torch.no_grad(), qfi.activations(m, "int8", exclude="0.drop", calibrate=[x]) as act:
        assert act.names == ["0", "0.lin"]
        with act.inject(qfi.FlipCount(3), seed=0) as log:
            m(x)
        assert log.flips == 3


@pytest.mark.parametrize("fault", [qfi.BitFlip(ber=0.5), qfi.FlipCount(2)])
def test_armed_forward_that_never_reaches_the_selection_is_an_error(fault) -> None:
    """Only never-called modules selected: an armed forward raises instead of a 0-flip trial."""
    m = nn.Sequential(SkipsDropout())
    with torch.no_grad(), qfi.activations(m, "fp32", names="0.drop") as act:
        m(torch.randn(2, 4))  # disarmed: nothing to inject, no error
        with act.inject(fault, seed=0), pytest.raises(qfi.QfiError, match=r"no selected module produced"):
            m(torch.randn(2, 4))


class SameConv(nn.Conv2d):
    """'Same' padding through a child module: a Conv2d subclass with children."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3)
        self.pad = nn.ZeroPad2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad(x))


def test_fault_on_a_conv_with_a_padding_child_hits_the_conv_output() -> None:
    """Naming the SameConv selects the conv itself (it used to select its padding child, i.e. its
    input): the model output (the conv's) differs from clean exactly at the logged sites."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Identity(), SameConv(1, 2))
    x = torch.randn(1, 1, 6, 6)
    with torch.no_grad():
        clean = m(x)
        with qfi.activations(m, "fp32", names="1") as act:
            with act.inject(qfi.FlipCount(5, bits=(20, 30)), seed=0) as log:
                out = m(x)
    assert act.names == ["1"] and set(log.to_frame().name) == {"1"}
    changed = (out.reshape(-1).view(torch.int32) != clean.reshape(-1).view(torch.int32)).nonzero().flatten()
    assert changed.tolist() == sorted(set(log.index.tolist())) and int(log.index.max()) < clean.numel()


def test_nested_selected_modules_fault_each_tensor_once() -> None:
    """A selected block returning its selected LayerNorm's output does not quantize or fault that
    tensor again: FlipCount(k) puts all k flips on the inner modules, and int8 outputs equal
    those of a session on the inner modules alone."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.ln = nn.Linear(4, 4), nn.LayerNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ln(self.lin(x) + 1)

    torch.manual_seed(0)
    m = nn.Sequential(Block(), nn.ReLU())
    x = torch.randn(6, 4)
    with torch.no_grad():
        with qfi.activations(m, "fp32", names="0,0.lin,0.ln") as act:
            with act.inject(qfi.FlipCount(40), seed=0) as log:
                m(x)
                m(x)
            with act.inject(qfi.BitFlip(ber=0.2), seed=0) as log2:
                m(x)
        assert log.flips == 80 and "0" not in set(log.to_frame().name)
        assert log2.flips > 0 and "0" not in set(log2.to_frame().name)
        with qfi.activations(m, "int8", names="0,0.lin,0.ln", calibrate=[x]):
            both = m(x)
        with qfi.activations(m, "int8", names="0.lin,0.ln", calibrate=[x]):
            inner = m(x)
        with qfi.activations(m, "int8", names="0", calibrate=[x]):  # the block alone is a fault site
            outer = m(x)
    assert torch.equal(both, inner) and not torch.equal(outer, inner)
