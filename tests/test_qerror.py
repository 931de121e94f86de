"""The quantization report: per selected tensor, saturation, underflow and error of a format on the
clean model, checked against direct computations (numpy, float64) on a small CNN with BatchNorm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qfi
from qfi.errors import QfiError
from qfi.qerror import REPORT_COLUMNS, quantization_report, quantization_warnings
from quant_schemes import FORMATS, get_format

RUNNING_VAR = [566.0, 100.0, 2.0, 0.5]  # the issue's case: a variance far beyond q3.13's max
RUNNING_MEAN = [0.1, -5.0, 1e-5, 2.0]


@pytest.fixture
def cnn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    m[1].running_var.copy_(torch.tensor(RUNNING_VAR))
    m[1].running_mean.copy_(torch.tensor(RUNNING_MEAN))
    return m.eval()


def _direct(x: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """RMS(q - x) / RMS(x) and max |q - x| in float64."""
    err = q.astype(np.float64) - x.astype(np.float64)
    num, den = (err**2).sum(), (x.astype(np.float64) ** 2).sum()
    return float(np.sqrt(num / den)) if den else 0.0, float(np.abs(err).max())  # 0/0: an all-zero bias


def test_q3_13_saturates_batchnorm_running_var(cnn):
    """q3.13 (range [-4, 3.99988], step 2^-13): 566 and 100 saturate, -5 saturates, 1e-5 underflows;
    every row's error equals a plain integer-maths quantization; BatchNorm statistics are marked."""
    r = quantization_report(cnn, "q3.13", bn_stats=True).set_index("name")
    assert tuple(r.reset_index().columns) == REPORT_COLUMNS
    assert list(r.index) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                             "4.weight", "4.bias"]  # num_batches_tracked is an integer: never selected
    assert tuple(r.loc["1.running_var", ["kind", "batchnorm_stat"]]) == ("buffer", "running_var")
    assert r.loc["1.running_mean", "batchnorm_stat"] == "running_mean"
    assert r.loc["1.weight", "kind"] == "parameter" and r.loc["1.weight", "batchnorm_stat"] == ""
    var = r.loc["1.running_var"]
    assert (var["saturated"], var["saturated_share"], var["underflow"]) == (2, 0.5, 0)
    assert var["absmax"] == 566.0 and var["limit"] == 32767 / 8192
    mean = r.loc["1.running_mean"]
    assert (mean["saturated"], mean["underflow"], mean["underflow_share"]) == (1, 1, 0.25)
    sd = cnn.state_dict()
    for name, row in r.iterrows():
        x = sd[name].numpy().astype(np.float64).ravel()
        code = np.rint(x * 8192)  # numpy rint: round half to even
        q = np.clip(code, -32768, 32767) / 8192
        rel, mx = _direct(x, q)
        assert row["saturated"] == int(((code < -32768) | (code > 32767)).sum()), name
        assert row["underflow"] == int(((x != 0) & (q == 0)).sum()), name
        assert row["numel"] == x.size and row["nonfinite"] == 0
        got = [row["rel_error"], row["max_abs_error"]]
        np.testing.assert_allclose(got, [rel, mx], rtol=1e-9, err_msg=name)
    assert var["rel_error"] > 0.99  # 566 -> 4: the tensor is gone


def test_int8_per_tensor_underflows_small_variances(cnn):
    """int8 per-tensor: scale = 566/127, so the variances 2 and 0.5 become 0 (x / sqrt(eps) later);
    no value saturates (the scale comes from the tensor itself); numbers match numpy."""
    r = quantization_report(cnn, "int8", bn_stats=True).set_index("name")
    sd = cnn.state_dict()
    for name, row in r.iterrows():
        x = sd[name].numpy().astype(np.float64).ravel()
        scale = max(np.abs(x).max() / 127, 2.0**-126)  # the format's floor: an all-zero bias
        q = np.clip(np.rint(x / scale), -127, 127) * scale
        rel, mx = _direct(x, q)
        assert row["saturated"] == 0, name
        assert row["underflow"] == int(((x != 0) & (q == 0)).sum()), name
        got = [row["rel_error"], row["max_abs_error"]]
        np.testing.assert_allclose(got, [rel, mx], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(row["limit"], 127 * scale, rtol=1e-6)
    assert r.loc["1.running_var", "underflow"] == 2 and r.loc["1.running_var", "underflow_share"] == 0.5


def test_warnings_name_the_crushed_tensors(cnn):
    """Warnings flag exactly the tensors over a threshold, one line each, naming tensor, kind and
    shares; fp32 and per-channel int8 (exact on 1-D statistics) flag nothing."""
    w = quantization_warnings(quantization_report(cnn, "q3.13", bn_stats=True))
    assert len(w) == 2
    assert w[0].startswith("q3.13 crushes '1.running_mean' (BatchNorm running_mean, 4 values): 25.0% satur")
    assert w[1].startswith(
        "q3.13 crushes '1.running_var' (BatchNorm running_var, 4 values): 50.0% saturate (|x| up to 566, "
        "limit 3.99988), 0.0% underflow to 0, relative error 0.99"
    )
    w8 = quantization_warnings(quantization_report(cnn, "int8", bn_stats=True))
    assert len(w8) == 1 and "'1.running_var'" in w8[0] and "50.0% underflow to 0" in w8[0]
    assert quantization_warnings(quantization_report(cnn, "fp32", bn_stats=True)) == []
    per_channel = quantization_report(cnn, "int8_per_channel", names="running", bn_stats=True)
    assert quantization_warnings(per_channel) == []
    # fp8_e4m3 (max 448) saturates 566 only; thresholds are arguments
    e4 = quantization_report(cnn, "fp8_e4m3", names="running_var", bn_stats=True)
    assert e4["saturated"].tolist() == [1]
    assert quantization_warnings(e4, max_saturated_share=0.3, max_rel_error=1.0) == []


def test_report_follows_the_name_filter_and_leaves_the_model_alone(cnn):
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    r = quantization_report(cnn, "int8", names="1.", exclude="running_mean", bn_stats=True)
    assert r["name"].tolist() == ["1.weight", "1.bias", "1.running_var"]
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    with pytest.raises(qfi.QfiError, match="matches no weights"):
        quantization_report(cnn, "int8", names="no_such_layer", bn_stats=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_report_agrees_with_the_format_for_every_format(cnn, fmt):
    """For every format the error columns equal those of fmt.quantize(x, fmt.choose_qparams(x)),
    shares lie in [0, 1], and a non-finite value is counted, not propagated or raised."""
    f = get_format(fmt)
    r = quantization_report(cnn, fmt, bn_stats=True).set_index("name")
    for name, t in cnn.state_dict().items():
        if name not in r.index:
            continue
        x = t.float()
        q = f.quantize(x, f.choose_qparams(x))
        err = (q.double() - x.double()).flatten()
        want = (err.norm() / x.double().norm()).item() if x.any() else 0.0
        row = r.loc[name]
        if np.isfinite(want):
            np.testing.assert_allclose(row["rel_error"], want, rtol=1e-9, atol=1e-300)
        else:
            assert row["rel_error"] == np.inf
        assert 0 <= row["saturated_share"] <= 1 and 0 <= row["underflow_share"] <= 1
    with torch.no_grad():
        cnn[0].weight[0, 0, 0, 0] = float("nan")
    row = quantization_report(cnn, fmt, names="0.weight", bn_stats=True).iloc[0]
    assert row["nonfinite"] == 1 and np.isfinite(row["rel_error"])


def test_batchnorm_statistics_are_left_out_unless_asked(cnn):
    """By default the running statistics are no weights (quantized hardware folds them); the
    affine BatchNorm parameters stay; naming a statistic without bn_stats is an error that says why."""
    names = list(quantization_report(cnn, "q3.13")["name"])
    assert "1.running_var" not in names and "1.weight" in names
    with pytest.raises(QfiError, match=r"running_var.*left out unless bn_stats=True \(--bn-stats\)"):
        quantization_report(cnn, "q3.13", names="running_var")
