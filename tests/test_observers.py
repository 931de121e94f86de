"""Observers (qfi.observers): per-module error against a reference run of the same batches."""

from __future__ import annotations

import csv
import logging
import math

import pytest
import torch
from torch import nn

import qfi
from qfi.observers import COLUMNS, leaf_modules
from qfi.zoo.vit import VisionTransformer


class Tiny(nn.Module):
    """Linear -> ReLU -> Linear, the ReLU called twice (a shared module) on the second layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.act(self.fc1(x))))


class DictOut(nn.Module):
    """A module returning a dict whose first entry is an integer tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.lin(x)
        return {"ids": torch.arange(3), "hidden": h, "logits": h * 2}


class WithDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = DictOut()
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.body(x)
        return {"logits": self.head(out["logits"])}


BATCHES = [torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def run(model: nn.Module, batches=BATCHES) -> None:
    with torch.no_grad():
        for x in batches:
            model(x)


def capture(model: nn.Module, names: list[str], batches=BATCHES) -> dict[str, list[torch.Tensor]]:
    """Every output of each named module, by a plain hook of the test's own (an independent record)."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mods = dict(model.named_modules())
    hs = [
        mods[n].register_forward_hook(lambda _m, _i, o, n=n: got[n].append(o.detach().clone())) for n in names
    ]
    try:
        run(model, batches)
    finally:
        for h in hs:
            h.remove()
    return got


def hook_state(model: nn.Module) -> dict[str, tuple]:
    attrs = (
        "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
        "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    )
    return {n: tuple(dict(getattr(m, a)) for a in attrs) for n, m in model.named_modules()}


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(8, 4, 2, 2, 16, 32, num_classes=3, in_channels=1).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision's zero head would output zeros
    return model


# -- metrics --------------------------------------------------------------------------------------------
def test_metrics_equal_a_direct_computation() -> None:
    """Per module, over every batch and call: rmse, mae, max_abs, changed_share, numel, ref_rms are
    what numpy-style arithmetic on independently captured outputs gives (the shared ReLU's two
    calls per forward are compared call by call)."""
    model = Tiny()
    names = ["fc1", "act", "fc2"]
    clean = capture(model, names)
    obs = qfi.observe(model, reference=lambda: run(model))
    assert obs.names == names
    with torch.no_grad():
        model.fc1.weight[2, 3] += 0.75
        model.fc2.bias[1] -= 0.5
    faulty = capture(model, names)
    _, rows = obs.measure(lambda: run(model), trial=7)
    assert [r["module"] for r in rows] == ["fc1", "act", "fc2"] and [r["depth"] for r in rows] == [0, 1, 2]
    for r in rows:
        a = torch.cat([t.reshape(-1) for t in faulty[r["module"]]]).double()
        b = torch.cat([t.reshape(-1) for t in clean[r["module"]]]).double()
        d = (a - b).abs()
        assert r["trial"] == 7 and r["numel"] == a.numel() and r["nonfinite"] == 0
        assert r["batches"] == len(BATCHES)
        assert r["rmse"] == pytest.approx(math.sqrt(float((d**2).mean())), rel=1e-6)
        assert r["mae"] == pytest.approx(float(d.mean()), rel=1e-6)
        assert r["max_abs"] == pytest.approx(float(d.max()), rel=1e-6)
        assert r["changed_share"] == pytest.approx(float((a != b).double().mean()))
        assert r["ref_rms"] == pytest.approx(math.sqrt(float((b**2).mean())), rel=1e-6)
        assert 0 < r["changed_share"] < 1 if r["module"] == "fc1" else r["rmse"] > 0
    assert rows[1]["numel"] == 3 * 3 * (8 + 5)  # act: two calls per forward, both compared
    assert set(rows[0]) == {"trial", *COLUMNS}


def test_a_fault_free_pass_gives_exact_zeros() -> None:
    """Measuring the very run that was recorded: every metric is exactly 0 on every module (the
    embedded ViT's leaves, in execution order), over every batch."""
    model = tiny_vit()
    xs = [torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with qfi.observe(model, reference=lambda: run(model, xs)) as obs:
        _, rows = obs.measure(lambda: run(model, xs))
        clean_rows = obs.unchanged_rows()  # the rows of a trial known to be clean, not run
    assert len(rows) == len(leaf_modules(model)) == len(obs.names)
    assert [r["depth"] for r in rows] == list(range(len(rows)))
    for r in rows:
        assert (r["rmse"], r["mae"], r["max_abs"], r["changed_share"], r["nonfinite"]) == (0, 0, 0, 0, 0)
        assert r["batches"] == 2 and r["numel"] > 0 and r["ref_rms"] > 0
    assert rows[0]["module"] == "conv_proj" and rows[-1]["module"] == "heads.head"
    assert any(r["module"].endswith("self_attention") for r in rows)  # MultiheadAttention is a leaf
    assert not any(r["module"].endswith("out_proj") for r in rows)
    assert clean_rows == rows
    assert obs.batches_recorded == 0  # the reference is freed on exit


def test_nan_and_inf_are_counted_and_left_out_of_the_errors() -> None:
    """A NaN and an Inf weight: `nonfinite` counts the non-finite outputs, rmse/mae/max_abs come
    from the finite ones only, changed_share counts both."""
    model = Tiny()
    clean = capture(model, ["fc1"])
    obs = qfi.observe(model, "fc1", reference=lambda: run(model))
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
        model.fc1.weight[1, 0] = float("inf")
        model.fc1.bias[2] += 1.0
    faulty = capture(model, ["fc1"])
    (row,) = obs.measure(lambda: run(model))[1]
    a, b = torch.cat(faulty["fc1"]).reshape(-1).double(), torch.cat(clean["fc1"]).reshape(-1).double()
    fin = torch.isfinite(a)
    assert row["nonfinite"] == int((~fin).sum()) == 2 * 9  # columns 0 and 1 of 9 rows
    d = (a - b)[fin].abs()
    assert row["rmse"] == pytest.approx(math.sqrt(float((d**2).mean())), rel=1e-6)
    assert row["max_abs"] == pytest.approx(1.0, rel=1e-6)
    assert row["changed_share"] == pytest.approx(3 / 8)


class NanGate(nn.Module):
    """Square root of a feature: NaN in the reference itself wherever the input is negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


class NanModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = NanGate()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.gate(x).nan_to_num(0.0))


def test_a_reference_with_nan_compares_nan_to_nan_as_equal() -> None:
    """Where the reference is NaN, the same NaN again is no change (a clean pass gives zeros); a
    new NaN where the reference was finite counts in `nonfinite`."""
    model = NanModel()
    xs = [torch.linspace(-1, 1, 18).reshape(3, 6)]
    obs = qfi.observe(model, "gate", reference=lambda: run(model, xs))
    (row,) = obs.measure(lambda: run(model, xs))[1]
    assert (row["rmse"], row["changed_share"], row["nonfinite"]) == (0, 0, 0)
    xs2 = [xs[0].clone()]
    xs2[0][2, 5] = -1.0  # was finite (sqrt(1)), now NaN
    xs2[0][0, 0] = 4.0  # was NaN, now 2: changed, but not counted in the finite errors
    (row,) = obs.measure(lambda: run(model, xs2))[1]
    assert row["nonfinite"] == 1 and row["changed_share"] == pytest.approx(2 / 18)
    assert (row["rmse"], row["max_abs"]) == (0, 0)


# -- hooks, memory, shapes ------------------------------------------------------------------------------
def test_no_hook_is_left_outside_recording_and_measuring() -> None:
    """Hooks exist only while a pass is recorded or measured: before, between passes, after an
    error and after exit every hook dict of every module is as it was."""
    model = tiny_vit()
    before = hook_state(model)
    xs = [torch.randn(2, 1, 8, 8)]
    with qfi.observe(model) as obs:
        assert hook_state(model) == before
        with obs.recording():
            assert hook_state(model) != before  # the test can fail: hooks are there meanwhile
            run(model, xs)
        assert hook_state(model) == before
        with pytest.raises(RuntimeError), obs.measuring():
            model(torch.randn(2, 2, 8, 8))  # two channels: the model itself fails
        assert hook_state(model) == before
        obs.measure(lambda: run(model, xs))
    assert hook_state(model) == before


def test_memory_limit_keeps_the_first_whole_forwards(caplog) -> None:
    """With max_mb below the whole run, the reference keeps the first forwards that fit whole,
    says so in a warning, and later forwards are not measured; max_batches caps the count;
    a limit below one forward is a QfiError naming what one forward needs."""
    model = Tiny()
    per_forward = 3 * (8 + 8 + 5 + 5) * 4  # bytes: fc1, act (two calls), fc2 outputs of 3 samples
    with caplog.at_level(logging.WARNING, logger="qfi"):
        obs = qfi.observe(model, reference=lambda: run(model), max_mb=2.5 * per_forward / 2**20)
    assert obs.batches_recorded == 2 and obs.bytes == 2 * per_forward and obs.forwards_recorded == 3
    assert any("first 2 of 3 forwards" in r.getMessage() for r in caplog.records)
    rows = obs.measure(lambda: run(model))[1]
    assert {r["batches"] for r in rows} == {2}
    assert rows[0]["numel"] == 2 * 3 * 8
    obs = qfi.observe(model, reference=lambda: run(model), max_batches=1)
    assert obs.batches_recorded == 1
    with pytest.raises(qfi.QfiError, match=r"holds no whole forward: .*3 modules\) take 0\.0 MB"):
        qfi.observe(model, reference=lambda: run(model), max_mb=per_forward / 2 / 2**20)
    obs = qfi.observe(model, reference=lambda: run(model), store="cpu")
    assert obs.batches_recorded == 3 and all(r.t.device.type == "cpu" for b in obs._ref for r in b.values())


def test_dict_outputs_observe_the_first_floating_tensor_or_the_named_one() -> None:
    """A module returning {"ids": int, "hidden", "logits"}: the observer reads `hidden` by default
    (the first floating tensor), `logits` with output="logits"."""
    model = WithDict()
    xs = [torch.randn(2, 4)]
    for key, scale in ((None, 1.0), ("logits", 2.0)):
        obs = qfi.observe(model, "body", output=key, reference=lambda: run(model, xs))
        with torch.no_grad():
            model.body.lin.bias[0] += 0.5
        (row,) = obs.measure(lambda: run(model, xs))[1]
        with torch.no_grad():
            model.body.lin.bias[0] -= 0.5
        assert row["module"] == "body" and row["numel"] == 12
        assert row["max_abs"] == pytest.approx(0.5 * scale) and row["changed_share"] == pytest.approx(1 / 6)
    with pytest.raises(qfi.QfiError, match=r"observed module 'body': output key 'nope' names nothing"):
        qfi.observe(model, "body", output="nope", reference=lambda: run(model, xs))


def test_activation_faults_are_seen_whichever_context_is_entered_first() -> None:
    """The observer's hooks run after the activation session's (entered before or inside the
    measured pass), so the faulted module itself shows exactly its flipped elements; the size
    probe of a FlipCount forward is not counted as a batch."""
    model = Tiny()
    site = qfi.FlipSites(sites=(("fc1", 4, 30),))
    for session_first in (True, False):
        obs = qfi.observe(model, "fc1,fc2", reference=lambda: run(model))
        if session_first:
            with qfi.activations(model, names="fc1") as act, act.inject(site), obs.measuring() as rows:
                run(model)
        else:  # the session's hooks are registered after the observer's
            with obs.measuring() as rows, qfi.activations(model, names="fc1") as act, act.inject(site):
                run(model)
        fc1 = rows[0]
        assert fc1["module"] == "fc1" and fc1["changed_share"] == pytest.approx(len(BATCHES) / (3 * 3 * 8))
        obs = qfi.observe(model, "fc1", reference=lambda: run(model))
        with qfi.activations(model, "fp32", names="fc2") as act, act.inject(qfi.FlipCount(count=1), seed=0):
            (row,) = obs.measure(lambda: run(model))[1]
        assert row["batches"] == len(BATCHES) and row["changed_share"] == 0


def test_errors_name_the_bad_value() -> None:
    model = Tiny()
    with pytest.raises(qfi.QfiError, match="no reference yet"), qfi.observe(model).measuring():
        pass
    with pytest.raises(qfi.QfiError, match=r"max_mb=0: expected a positive number"):
        qfi.observe(model, max_mb=0)
    with pytest.raises(qfi.QfiError, match=r"max_batches=0: expected None"):
        qfi.observe(model, max_batches=0)
    with pytest.raises(qfi.QfiError, match=r"store='gpu': allowed 'device', 'cpu'"):
        qfi.observe(model, store="gpu")
    with pytest.raises(qfi.QfiError, match=r"reference=3: expected a callable"):
        qfi.observe(model, reference=3)
    with pytest.raises(qfi.QfiError, match=r"name filter 'fc3' matches no modules"):
        qfi.observe(model, "fc3")
    obs = qfi.observe(model, reference=lambda: run(model))
    with pytest.raises(qfi.QfiError, match=r"columns \['rmse'\] clash"):
        obs.measure(lambda: run(model), rmse=1)
    with pytest.raises(qfi.QfiError, match=r"module 'fc1': output of shape \(2, 8\) in forward 0 .*\(3, 8\)"):
        obs.measure(lambda: run(model, [torch.randn(2, 6)]))
    with pytest.raises(qfi.QfiError, match="already in a measure pass"), obs.measuring(), obs.measuring():
        pass
    with pytest.raises(qfi.QfiError, match="no module to observe"):
        qfi.observe(nn.Linear(2, 2))


def test_names_exclude_and_leaves() -> None:
    """None or "" observes the leaves (MultiheadAttention whole, blocks not); a filter observes what
    select_modules selects, blocks included; exclude applies to both."""
    model = tiny_vit()
    leaves = leaf_modules(model)
    assert qfi.observe(model).names == leaves == qfi.observe(model, "").names
    assert "encoder.layers.encoder_layer_0" not in leaves and "encoder" not in leaves
    assert qfi.observe(model, exclude="ln").names == [n for n in leaves if "ln" not in n]
    block = qfi.observe(model, "encoder_layer_1").names
    assert block[0] == "encoder.layers.encoder_layer_1" and len(block) == 7


def test_rows_accumulate_and_save_as_csv(tmp_path) -> None:
    """Each measured pass adds its rows; save() writes them with the caller's columns first."""
    model = Tiny()
    obs = qfi.observe(model, reference=lambda: run(model))
    for rep in range(2):
        obs.measure(lambda: run(model), condition="clean", rep=rep)
    assert len(obs.rows) == 6 and len(obs.frame()) == 6
    path = obs.save(tmp_path / "observers.csv")
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["condition", "rep", *COLUMNS]
    assert [g["rep"] for g in got] == ["0"] * 3 + ["1"] * 3 and float(got[0]["rmse"]) == 0


def test_errors_near_the_top_of_the_float_range_do_not_overflow() -> None:
    """An exponent-MSB-sized weight (3e37) makes outputs and errors whose squares overflow float32:
    rmse, mae and ref_rms still equal a float64 computation, and nothing is counted non-finite."""
    model = Tiny()
    obs = qfi.observe(model, "fc1", reference=lambda: run(model))
    clean = capture(model, ["fc1"])
    with torch.no_grad():
        model.fc1.weight[3] = 3e37
    faulty = capture(model, ["fc1"])
    (row,) = obs.measure(lambda: run(model))[1]
    a, b = torch.cat(faulty["fc1"]).reshape(-1).double(), torch.cat(clean["fc1"]).reshape(-1).double()
    assert torch.isfinite(a).all() and float((a - b).abs().max()) > 1e37
    assert row["nonfinite"] == 0
    assert row["rmse"] == pytest.approx(math.sqrt(float(((a - b) ** 2).mean())), rel=1e-5)
    assert row["mae"] == pytest.approx(float((a - b).abs().mean()), rel=1e-5)
    huge = qfi.observe(model, "fc1", reference=lambda: run(model))  # a reference of huge values
    (row,) = huge.measure(lambda: run(model))[1]
    assert row["ref_rms"] == pytest.approx(math.sqrt(float((a**2).mean())), rel=1e-5)
    assert (row["rmse"], row["changed_share"]) == (0, 0)


def test_error_propagation_script_writes_its_table(tmp_path, capsys) -> None:
    """scripts/error_propagation.py with one rep on 64 samples: observers.csv holds one row per
    condition and observed module (leaves and blocks), clean before the faulted layer."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "error_propagation.py"
    spec = importlib.util.spec_from_file_location("script_error_propagation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--reps", "1", "--limit", "64", "--no-plots", "--out", str(tmp_path)])
    import pandas as pd

    d = pd.read_csv(tmp_path / "observers.csv")
    assert list(d.columns[:2]) == ["condition", "rep"] and set(COLUMNS) <= set(d.columns)
    assert len(d) == len(mod.CONDITIONS) * 24  # 21 leaves + 3 encoder blocks of the embedded ViT
    mant = d[d["condition"].str.contains("mantissa")].set_index("module")
    assert (mant.loc[mant["depth"] < 11, "rmse"] == 0).all()  # before layer 1's MLP: untouched
    assert "median relative RMSE" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("store", ["device", "cpu"])
def test_cuda_metrics_equal_a_direct_computation(store: str) -> None:
    """On CUDA, with the reference on the GPU or in host memory: the same metrics as a float64
    computation on the captured outputs, and exact zeros for a fault-free pass."""
    model = Tiny().cuda()
    xs = [x.cuda() for x in BATCHES]
    clean = capture(model, ["fc1", "fc2"], xs)
    obs = qfi.observe(model, "fc1,fc2", reference=lambda: run(model, xs), store=store)
    where = "cuda" if store == "device" else "cpu"
    assert all(r.t.device.type == where for b in obs._ref for r in b.values())
    assert {r["rmse"] for r in obs.measure(lambda: run(model, xs))[1]} == {0.0}
    with torch.no_grad():
        model.fc1.weight[1, 2] = 3e37
    faulty = capture(model, ["fc1", "fc2"], xs)
    for r in obs.measure(lambda: run(model, xs))[1]:
        a = torch.cat([t.reshape(-1) for t in faulty[r["module"]]]).double().cpu()
        b = torch.cat([t.reshape(-1) for t in clean[r["module"]]]).double().cpu()
        fin = torch.isfinite(a)
        d = (a - b)[fin].abs()
        assert r["nonfinite"] == int((~fin).sum())
        assert r["rmse"] == pytest.approx(math.sqrt(float((d**2).mean())), rel=1e-5)
        assert r["mae"] == pytest.approx(float(d.mean()), rel=1e-5)
        assert r["changed_share"] == pytest.approx(float((a != b).double().mean()))
