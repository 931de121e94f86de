"""Faults in stored scales and zero points (weight sessions): the fault space of a block or group
format is its element codes plus its scale words (plus zero points), and a flipped scale bit
re-decodes its whole group."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

import qfi
from qfi.faults import resolve_bits, sample_sites
from qfi.space import FaultSpace, split_name
from quant_schemes import BLOCK_FORMATS, FORMATS, get_format, stored_parts

# formats with each kind of stored part: E8M0 and E4M3 block scales, fp16/fp32 group scales,
# zero points, a per-tensor and a per-channel stored scale
STORED = ("mxfp4", "mxfp8_e4m3", "mxint8", "nvfp4", "int4_g128_fp16", "uint4_asym_g32", "int8_fp32",
          "uint8_asym_per_channel")


class Tiny(nn.Module):
    """Linear weights with a last axis of 40 (a partial block), a 1-D bias and LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(40, 24)
        self.ln = nn.LayerNorm(24)
        self.b = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.ln(self.a(x)).relu())


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return Tiny().eval()


def bits_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone().view(torch.int32) for n, t in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def expected_tensors(fmt, clean: dict, log: qfi.FaultLog) -> dict[str, torch.Tensor]:
    """The faulty tensors a log implies, computed with the format's own decode: the log's code,
    scale and zero-point flips applied to the clean Encoded of each tensor."""
    out = {}
    df = log.to_frame()
    words = {
        n: {"codes": e.qdata.clone(), "scales": None if e.scale_codes is None else e.scale_codes.clone(),
            "zero_points": None if e.zero_point is None else e.zero_point.clone()}
        for n, e in clean.items()
    }
    for row in df.itertuples(index=False):
        base, part = split_name(str(row.name))
        w = words[base][part].view(-1)
        w[int(row.index)] ^= torch.tensor(1 << int(row.bit), dtype=torch.int64).to(torch.int32)
    for n, e in clean.items():
        w = words[n]
        out[n] = fmt.decode(e.replace(qdata=w["codes"], scale_codes=w["scales"], zero_point=w["zero_points"]))
    return out


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().view(torch.int32)


@pytest.mark.parametrize("fmt", STORED)
def test_session_state_is_the_log_decoded(model: nn.Module, fmt: str) -> None:
    """After a BER fault over all stored bits, every selected tensor equals fmt.decode of its
    clean words with the log's code, scale and zero-point flips applied (NaN where both are NaN);
    code rows hold the clean codes, scale rows the clean scale words and decoded scales."""
    f = get_format(fmt)
    with qfi.weights(model, fmt) as w:
        clean = {n: w.clean_codes(n) for n in w.names}
        with w.inject(qfi.BitFlip(ber=0.03), seed=3) as log:
            df = log.to_frame()
            parts = {split_name(str(n))[1] for n in df.name}
            assert parts == set(stored_parts(f)), parts  # every part was hit at this rate
            want = expected_tensors(f, clean, log)
            for n in w.names:
                got, exp = w.tensor(n).detach().float(), want[n]
                assert torch.equal(got.isnan(), exp.isnan()), n
                assert torch.equal(raw(got.nan_to_num()), raw(exp.nan_to_num())), n
            for row in df.itertuples(index=False):
                base, part = split_name(str(row.name))
                e = clean[base]
                arr = {"codes": e.qdata, "scales": e.scale_codes, "zero_points": e.zero_point}[part]
                width = f.part_bits(part) if part != "codes" else f.bits
                assert int(arr.reshape(-1)[row.index]) & ((1 << width) - 1) == row.old_code
                if part == "scales":
                    assert row.old_value == float(e.scale.reshape(-1)[row.index])


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4_g32", "uint4_asym_g32"])
def test_whole_groups_per_row_take_the_shift_path(fmt: str) -> None:
    """Rows holding whole power-of-two groups (last axis 64) map elements to scale words by a
    shift; a ragged tensor in the same session (last axis 40) by the full formula: the session
    state is still the log decoded."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 40), nn.Linear(40, 64)).eval()
    f = get_format(fmt)
    with qfi.weights(model, fmt) as w:
        assert w._shift is not None and w._ragged.any() and not w._ragged.all()
        clean = {n: w.clean_codes(n) for n in w.names}
        with w.inject(qfi.BitFlip(ber=0.03), seed=5) as log:
            want = expected_tensors(f, clean, log)
            for n in w.names:
                got = w.tensor(n).detach().float()
                assert torch.equal(got.isnan(), want[n].isnan()), n
                assert torch.equal(raw(got.nan_to_num()), raw(want[n].nan_to_num())), n


@pytest.mark.parametrize("fmt", STORED)
def test_restore_replay_and_double_flip(model: nn.Module, fmt: str) -> None:
    """Undo, exit and an exception restore bit-exactly; replaying a log (also from a CSV file)
    gives the same words; a scale site listed twice changes nothing; BER 0 changes nothing."""
    orig = bits_of(model)
    with qfi.weights(model, fmt) as w:
        quantized = bits_of(model)
        log = w.apply(qfi.FlipCount(40), seed=7)
        assert any(":" in n for n in log.to_frame().name.astype(str))
        faulty = bits_of(model)
        w.undo()
        assert same(bits_of(model), quantized)
        log2 = w.replay(log)
        assert same(bits_of(model), faulty)
        assert all(torch.equal(log.columns[k], log2.columns[k]) for k in log.columns if "value" not in k)
        w.undo()
        name = w.names[0] + ":scale"
        with w.inject(qfi.FlipSites(((name, 0, 3), (name, 0, 3)))) as twice:
            assert twice.flips == 0 and same(bits_of(model), quantized)
        with w.inject(qfi.BitFlip(ber=0.0), seed=1) as none:
            assert none.flips == 0 and same(bits_of(model), quantized)
        with pytest.raises(RuntimeError, match="boom"), w.inject(qfi.FlipCount(30), seed=2):
            raise RuntimeError("boom")
        assert same(bits_of(model), quantized)
        w.apply(qfi.FlipCount(9), seed=4)  # left pending: exit undoes it
    assert same(bits_of(model), orig)


def test_replay_from_csv_with_scale_rows(model: nn.Module, tmp_path) -> None:
    with qfi.weights(model, "nvfp4") as w:
        log = w.apply(qfi.FlipCount(25), seed=11)
        faulty = bits_of(model)
        w.undo()
        log.save(tmp_path / "f.csv")
        back = qfi.FaultLog.load(tmp_path / "f.csv")
        assert sorted(set(back.names)) == sorted(set(log.to_frame().name.astype(str)))
        w.replay(back)
        assert same(bits_of(model), faulty)


def test_a_scale_flip_rescales_its_whole_block(model: nn.Module) -> None:
    """Flipping bit 7 of an E8M0 scale word multiplies every value of its 32-element block by
    2**+-128 and touches nothing else; the partial last block of a row (elements 32..39) has its
    own scale word."""
    with qfi.weights(model, "mxfp4", names="a.weight") as w:
        t = w.tensor("a.weight")
        before = t.detach().clone()
        enc = w.clean_codes("a.weight")
        assert enc.scale_codes.shape == (24, 2)
        code = int(enc.scale_codes[0, 1])
        with w.inject(qfi.FlipSites((("a.weight:scale", 1, 7),))) as log:
            after = t.detach().clone()
            factor = 2.0 ** ((code ^ 0x80) - code)
            changed = (raw(after) != raw(before)).nonzero()
            assert {(int(r), int(c)) for r, c in changed} <= {(0, c) for c in range(32, 40)}
            assert torch.equal(after[0, 32:40], (before[0, 32:40].double() * factor).float())
            row = log.to_frame().iloc[0]
            assert (row["name"], row["index"], row["bit"]) == ("a.weight:scale", 1, 7)
            assert row.old_code == code and row.new_code == code ^ 0x80
            assert float(row.new_value) == float(row.old_value) * factor
        assert torch.equal(raw(t), raw(before))


def test_nan_scale_makes_a_nan_block(model: nn.Module) -> None:
    """An E8M0 scale word turned into 0xFF by stuck-at-1 bits makes its whole block NaN."""
    with qfi.weights(model, "mxfp8_e4m3", names="b.weight") as w:
        sites = tuple(("b.weight:scale", 3, b) for b in range(8))
        with w.inject(qfi.StuckAt(1, sites=sites)):
            t = w.tensor("b.weight").detach()
            assert t[3].isnan().all() and not t[:3].isnan().any() and not t[4:].isnan().any()


def test_zero_point_flip_shifts_its_group(model: nn.Module) -> None:
    """Flipping bit b of a k-bit zero point shifts every value of its group by -+2**b * scale."""
    with qfi.weights(model, "uint4_asym_g32", names="a.weight") as w:
        t = w.tensor("a.weight")
        before = t.detach().clone()
        enc = w.clean_codes("a.weight")
        zp, s = int(enc.zero_point[2, 0]), float(enc.scale[2, 0])
        with w.inject(qfi.FlipSites((("a.weight:zero_point", 4, 2),))):  # row 2, group 0
            shift = ((zp ^ 4) - zp) * s
            assert torch.allclose(t[2, :32] + shift, before[2, :32], rtol=0, atol=1e-6)
            assert torch.equal(t[:2], before[:2]) and torch.equal(t[2, 32:], before[2, 32:])


def test_per_tensor_stored_scale_flip_rescales_the_tensor(model: nn.Module) -> None:
    """int8_fp32 stores one fp32 scale per tensor: flipping its bit 23 (exponent LSB) scales the
    whole tensor by 2 or 1/2."""
    with qfi.weights(model, "int8_fp32", names="b.weight") as w:
        t = w.tensor("b.weight").detach()
        before = t.clone()
        with w.inject(qfi.FlipSites((("b.weight:scale", 0, 23),))):
            ratio = (t[before != 0] / before[before != 0]).unique()
            assert ratio.numel() == 1 and float(ratio) in (2.0, 0.5)


# -- parts -------------------------------------------------------------------------------------------
def test_part_choice(model: nn.Module) -> None:
    """part='codes' never hits a scale, part='scales' only scales (bit names scale.exp<b>), the
    session's part can be overridden per fault; total_bits counts the chosen part."""
    f = get_format("mxfp4")
    with qfi.weights(model, "mxfp4", part="codes") as w:
        codes_bits = w.total_bits
        with w.inject(qfi.FlipCount(60), seed=0) as log:
            assert not log.to_frame().name.astype(str).str.contains(":").any()
        with w.inject(qfi.FlipCount(20, bits=7), seed=0, part="scales") as log:
            df = log.to_frame()
            assert df.name.astype(str).str.endswith(":scale").all() and (df.bit == 7).all()
            assert f.part_bit_names("scales")[7] == "scale.exp7"
    with qfi.weights(model, "mxfp4", part="scales") as w:
        scale_bits = w.total_bits
    with qfi.weights(model, "mxfp4") as w:
        assert w.total_bits == codes_bits + scale_bits and w.part == "all"
        n = sum(p.numel() for p in model.parameters())
        assert codes_bits == 4 * n and scale_bits == 8 * w.space.part_numel["scales"]


def test_part_errors(model: nn.Module) -> None:
    """A per-bit fault over several parts, a part the format does not store and an unknown part
    are QfiErrors naming the allowed values; nothing changes."""
    orig = bits_of(model)
    with pytest.raises(qfi.QfiError, match=r"part='both'; allowed: 'all', 'codes', 'scales', 'zero_points'"):
        qfi.weights(model, "mxfp4", part="both")
    with pytest.raises(qfi.QfiError, match="format 'int8' stores no 'scales'.*int4_g128"):
        with qfi.weights(model, "int8", part="scales"):
            pass
    assert same(bits_of(model), orig)
    with qfi.weights(model, "mxfp4") as w:
        with pytest.raises(qfi.QfiError, match=r"bits=3 names bits of one word.*part='codes', 'scales'"):
            w.apply(qfi.BitFlip(ber=1e-3, bits=3))
        with pytest.raises(qfi.QfiError, match="stores no 'zero_points'"):
            w.apply(qfi.FlipCount(1), part="zero_points")
        with pytest.raises(qfi.QfiError, match=r"bit 8 is outside format 'mxfp4:scale', .* 0\.\.7"):
            w.apply(qfi.FlipCount(1, bits=8), part="scales")
        with pytest.raises(qfi.QfiError, match=r"index 48 is outside 'a.weight:scale' \(48 scale words\)"):
            w.apply(qfi.FlipSites((("a.weight:scale", 48, 0),)))
        assert w._pending is None
    with qfi.weights(model, "int8") as w:  # per-bit faults on a codes-only format need no part
        with w.inject(qfi.BitFlip(ber=1e-2, bits=3), seed=0) as log:
            assert (log.bit == 3).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_codes_only_formats_sample_exactly_as_before(model: nn.Module, fmt: str) -> None:
    """For a format that stores only codes, part='all' samples the same sites from the same
    generator as the single code space always did (results of earlier campaigns stay valid)."""
    shapes = [tuple(p.shape) for p in model.parameters()]
    f = get_format(fmt)
    space = FaultSpace([f"t{i}" for i in range(len(shapes))], shapes, f)
    for fault in (qfi.BitFlip(ber=3e-3), qfi.FlipCount(17), qfi.BitFlip(ber=0.05, bits=1),
                  qfi.StuckAt(1, count=5)):
        got, _ = space.part_sites(fault, torch.Generator().manual_seed(9), "all")
        want = sample_sites(fault, space.numel, resolve_bits(fault.bits, f.bits, f.name),
                            torch.Generator().manual_seed(9))
        assert list(got) == ["codes"]
        assert all(torch.equal(a, b) for a, b in zip(got["codes"], want, strict=True))


def test_flips_over_all_parts_follow_the_binomial_law(model: nn.Module) -> None:
    """300 trials at a BER giving ~20 flips over all stored bits: the counts follow
    Binomial(total_bits, p) (chi-square p > 0.001), and the share of scale flips matches the
    share of scale bits (binomial test p > 0.001)."""
    with qfi.weights(model, "mxfp4") as w:
        p = 20 / w.total_bits
        g = torch.Generator().manual_seed(123)
        counts, scale_flips = [], 0
        for _ in range(300):
            with w.inject(qfi.BitFlip(ber=p), generator=g) as log:
                counts.append(log.flips)
                scale_flips += int(log.to_frame().name.astype(str).str.endswith(":scale").sum())
        law = stats.binom(w.total_bits, p)
        edges = [0, 13, 16, 18, 20, 22, 24, 27, 10**9]
        obs = [sum(a <= c < b for c in counts) for a, b in zip(edges, edges[1:], strict=False)]
        exp = [300 * (law.cdf(b - 1) - law.cdf(a - 1)) for a, b in zip(edges, edges[1:], strict=False)]
        assert stats.chisquare(obs, exp).pvalue > 0.001
        share = 8 * w.space.part_numel["scales"] / w.total_bits
        assert stats.binomtest(scale_flips, sum(counts), share).pvalue > 0.001


def test_seeds_reproduce_over_parts(model: nn.Module) -> None:
    with qfi.weights(model, "uint4_asym_g32") as w:
        logs = []
        for seed in (5, 5, 6):
            with w.inject(qfi.BitFlip(ber=5e-3), seed=seed) as log:
                logs.append({k: v.clone() for k, v in log.columns.items()})
        assert all(torch.equal(logs[0][k], logs[1][k]) for k in logs[0])
        assert not torch.equal(logs[0]["index"], logs[2]["index"])


def test_replay_refuses_a_scale_row_of_other_clean_words(model: nn.Module) -> None:
    with qfi.weights(model, "mxfp4") as w:
        log = w.apply(qfi.FlipSites((("a.weight:scale", 0, 1),)))
        w.undo()
    with torch.no_grad():
        model.a.weight.mul_(8.0)  # another checkpoint: the block's scale word differs
    with qfi.weights(model, "mxfp4") as w:
        clean = bits_of(model)
        with pytest.raises(qfi.QfiError, match=r"'a.weight:scale'\[0\]\): the log's old_code"):
            w.replay(log)
        assert same(bits_of(model), clean) and w._pending is None
        with pytest.raises(qfi.QfiError, match=r"log bit 9 is outside format 'mxfp4:scale'"):
            cols = {k: v.clone() for k, v in log.columns.items()}
            cols["bit"][0] = 9
            w.replay(qfi.FaultLog(log.names, cols))


@pytest.mark.parametrize("fmt", ["mxfp4", "int4_g128_fp16"])
def test_flat_and_in_place_sessions_agree(model: nn.Module, fmt: str) -> None:
    """flat=False walks per-tensor segments: the same fault gives the same words and log."""
    with qfi.weights(model, fmt) as w:
        log = w.apply(qfi.BitFlip(ber=0.02), seed=4)
        flat = bits_of(model)
        w.undo()
    with qfi.weights(model, fmt, flat=False) as w:
        log2 = w.apply(qfi.BitFlip(ber=0.02), seed=4)
        assert same(bits_of(model), flat)
        assert all(torch.equal(log.columns[k], log2.columns[k]) for k in log.columns if "value" not in k)
        w.undo()


def test_every_block_format_in_a_session(model: nn.Module) -> None:
    """Every canonical stored-scale format enters, faults all its parts and restores."""
    orig = bits_of(model)
    for fmt in BLOCK_FORMATS:
        with qfi.weights(model, fmt) as w, w.inject(qfi.FlipCount(50), seed=1) as log:
            assert log.flips == 50 and log.format == fmt
        assert same(bits_of(model), orig), fmt


# -- activations ---------------------------------------------------------------------------------
def taps(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list]:
    """(raw outputs, outputs as the rest of the model sees them, hook handles): register inside
    an entered session, so that the second hook runs after the session's."""
    raw_seen: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []
    hs = [module.register_forward_hook(lambda _m, _i, o: raw_seen.append(o.detach().clone()), prepend=True),
          module.register_forward_hook(lambda _m, _i, o: seen.append(o.detach().clone()))]
    return raw_seen, seen, hs


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4_g32_fp16", "uint8_asym"])
def test_block_activations_quantize_per_forward(model: nn.Module, fmt: str) -> None:
    """Block and group formats quantize every selected output with scales chosen on that output
    (no calibration needed): what the model sees is fmt.quantize(raw output)."""
    f = get_format(fmt)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    with qfi.activations(model, fmt, names="re:^a$"), torch.no_grad():
        raw_seen, seen, hs = taps(model.a)
        model(x)
        model(x * 3)
        for h in hs:
            h.remove()
    assert len(seen) == 2
    for r, s in zip(raw_seen, seen, strict=True):
        assert torch.equal(s, f.quantize(r)) and not torch.equal(s, r)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "uint4_asym_g32"])
@pytest.mark.parametrize("fault", [qfi.BitFlip(ber=0.05), qfi.FlipCount(40)])
def test_block_activation_faults_are_the_log_decoded(model: nn.Module, fmt: str, fault) -> None:
    """An armed forward's output equals fmt.decode of the clean output's words with the log's
    code, scale and zero-point flips applied (per-output BER sampling and a planned FlipCount)."""
    f = get_format(fmt)
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    with qfi.activations(model, fmt, names="re:^a$") as act, torch.no_grad():
        raw_seen, seen, hs = taps(model.a)
        with act.inject(fault, seed=2) as log:
            model(x)
        for h in hs:
            h.remove()
    assert log.flips > 0 and (log.call == 0).all()
    names = set(log.to_frame().name.astype(str))
    assert {"a", "a:scale"} <= names <= {"a", "a:scale", "a:zero_point"}
    clean = f.encode(raw_seen[-1])
    want = expected_tensors(f, {"a": clean}, log)["a"]
    got = seen[-1]
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(raw(got.nan_to_num()), raw(want.nan_to_num()))


def test_activation_part_choice_and_errors(model: nn.Module) -> None:
    x = torch.randn(4, 40)
    with qfi.activations(model, "mxfp4", names="re:^(a|b)$", part="scales") as act, torch.no_grad():
        with act.inject(qfi.FlipCount(6, bits=7), seed=0) as log:
            model(x)
        df = log.to_frame()
        assert df.name.astype(str).str.endswith(":scale").all() and (df.bit == 7).all() and log.flips == 6
        with act.inject(qfi.BitFlip(ber=0.05), seed=0, part="codes") as log:
            model(x)
        assert not log.to_frame().name.astype(str).str.contains(":").any() and log.flips > 0
        with pytest.raises(qfi.QfiError, match="bit 9 is outside format 'mxfp4:scales'"):
            act.arm(qfi.BitFlip(ber=0.1, bits=9))
    with qfi.activations(model, "mxfp4", names="re:^a$") as act:
        with pytest.raises(qfi.QfiError, match="bits=2 names bits of one word"):
            act.arm(qfi.BitFlip(ber=0.1, bits=2))
    with pytest.raises(qfi.QfiError, match="stores no 'scales'"):
        qfi.activations(model, "int8", names="re:^a$", part="scales", dynamic=True).__enter__()


def test_block_activations_let_nan_through(model: nn.Module) -> None:
    """A NaN reaching a selected output (a fault upstream) makes its block NaN; it never raises."""
    x = torch.randn(2, 40)
    x[0, 0] = math.nan
    for fmt in ("mxfp4", "int4_g32", "fp4_e2m1"):
        with qfi.activations(model, fmt, names="re:^a$", dynamic=True), torch.no_grad():
            assert model(x)[0].isnan().all() and not model(x)[1].isnan().any()


@pytest.mark.parametrize("fmt", [f for f in FORMATS + BLOCK_FORMATS if "per_channel" not in f])
def test_activation_quantize_is_the_formats_own(fmt: str) -> None:
    """The hook's quantize is fmt.quantize (one implementation, no per-format branch in the
    session): equal values, and with inplace the float32 output itself is overwritten."""
    f = get_format(fmt)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 3
    scale = f.choose_qparams(x)
    act = qfi.ActivationSession(nn.Identity(), fmt)
    assert torch.equal(act._quantize(x, scale), f.quantize(x, scale))
    y = x.clone()
    out = act._quantize(y, scale, inplace=True)
    assert out is y and torch.equal(y, f.quantize(x, scale))


# -- CUDA ------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "uint4_asym_g32", "int8_fp32"])
@pytest.mark.parametrize("flat", [True, False])
def test_cuda_weight_faults_match_cpu(model: nn.Module, fmt: str, flat: bool) -> None:
    """On CUDA a stored-scale session gives the CPU's log and words for the same seed, and
    restores bit-exactly."""
    import copy

    gpu = copy.deepcopy(model).cuda()
    orig = {k: v.cpu() for k, v in bits_of(gpu).items()}
    with qfi.weights(model, fmt, flat=flat) as wc, qfi.weights(gpu, fmt, flat=flat) as wg:
        a = wc.apply(qfi.BitFlip(ber=0.03), seed=8)
        b = wg.apply(qfi.BitFlip(ber=0.03), seed=8)
        assert all(torch.equal(a.columns[k], b.columns[k]) for k in a.columns if "value" not in k)
        cpu_bits, gpu_bits = bits_of(model), {k: v.cpu() for k, v in bits_of(gpu).items()}
        assert same(cpu_bits, gpu_bits)
    assert same({k: v.cpu() for k, v in bits_of(gpu).items()}, orig)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_block_activation_faults_are_the_log_decoded(model: nn.Module) -> None:
    f = get_format("mxfp4")
    model = model.cuda()
    x = torch.randn(6, 40, device="cuda")
    with qfi.activations(model, "mxfp4", names="re:^a$") as act, torch.no_grad():
        raw_seen, seen, hs = taps(model.a)
        with act.inject(qfi.FlipCount(40), seed=2) as log:
            model(x)
        for h in hs:
            h.remove()
    want = expected_tensors(f, {"a": f.encode(raw_seen[-1].cpu())}, log)["a"]
    got = seen[-1].cpu()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(raw(got.nan_to_num()), raw(want.nan_to_num()))
