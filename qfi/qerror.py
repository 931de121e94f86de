"""What a format does to the clean model before any fault: per selected tensor, the share of
values that saturate or underflow and the quantization error.

``quantization_report(model, fmt, names, exclude)`` quantizes each selected weight tensor exactly
as a weight session does (``fmt.choose_qparams`` once on the clean float32 tensor, then
``fmt.quantize``) and returns one row per tensor:

=================  ===========================================================================
column             meaning
=================  ===========================================================================
name, kind         fully qualified name; ``parameter`` or ``buffer``
batchnorm_stat     ``running_mean`` / ``running_var`` of a BatchNorm module, else empty
format, numel      format name; number of values
absmax, limit      largest finite ``|x|``; the largest magnitude the format gives this tensor
                   (float and fixed point: the format's max; int: ``qmax * scale``, the
                   largest over channels)
saturated          finite values beyond the format's range: float formats ``|x| > max`` (they
                   become +-inf, or +-448 in fp8_e4m3); fixed point and int codes whose
                   rounded value lies outside the code range before clamping (the clamp code
                   is stored while ``|x|`` exceeds it)
underflow          finite non-zero values that quantize to 0
nonfinite          NaN/inf values (left out of every other column)
rel_error          ``RMS(q - x) / RMS(x)`` over the finite values (0 when both are 0; inf when
                   a value overflows to inf)
max_abs_error      ``max |q - x|`` over the finite values
=================  ===========================================================================

plus ``saturated_share`` and ``underflow_share`` (of ``numel``).  ``quantization_warnings(report)``
gives one line per tensor whose damage is large (thresholds are arguments):

* ``saturated_share > 1e-3``: a thousandth of the values clipped (the clipped ones are the
  largest, usually the most important); no tensor of the shipped models saturates in any
  format but ``q1.7``;
* ``underflow_share > 0.25``: a quarter of the values erased.  Small, peaked tensors lose a few
  per cent harmlessly (shipped ViT: int8 per-tensor up to 6%, fp8_e4m3 up to 10%);
* ``rel_error > 0.1``: an error of a tenth of the tensor's RMS.  On the shipped models int8
  per-tensor gives about 0.01, fp8_e4m3 0.03, fp8_e5m2 0.06; int4 and q1.7 exceed 0.1 on some
  tensors and are flagged.

BatchNorm statistics
--------------------
Weight campaigns select parameters and floating buffers, but the ``running_mean`` and
``running_var`` of BatchNorm layers only with ``bn_stats=True`` (``--bn-stats``;
``num_batches_tracked`` is an integer and never selected).  Excluded by default because:

* hardware that runs a network in int8 or fixed point folds BatchNorm into the preceding
  convolution (``w' = w * gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) * gamma /
  sqrt(var + eps)``); the statistics are never stored as such, so faults in them model no memory;
* their range has nothing to do with the weights': a ``running_var`` of 566 saturates ``q3.13``
  (max 3.99988) and takes the clean top-1 to 0; int8 per-tensor zeroes the small variances of a
  tensor whose largest is 566 (a step of 4.5), and ``x / sqrt(0 + eps)`` blows activations up;
* a BER per stored bit over a set of tensors should not depend on whether the model happens to
  keep its normalisation unfolded.

Opt in to study an unfused fp32 deployment, where the statistics do sit in memory.  The affine
``weight``/``bias`` of BatchNorm are parameters and always selectable.  Folding is the most
faithful model of int8 hardware but rewrites the convolution weights and needs to know which
convolution feeds which BatchNorm (``torch.nn.utils.fusion.fuse_conv_bn_eval`` does one pair); a
user who wants it folds before handing the model to qfi.  Whatever is selected, this report says
when a format crushes it.
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qfi.errors import QfiError
from qfi.select import select_weights, weight_tensors
from quant_schemes import FixedPoint, FloatFormat, FormatError, IntSymmetric, get_format

__all__ = [
    "MAX_REL_ERROR",
    "MAX_SATURATED_SHARE",
    "MAX_UNDERFLOW_SHARE",
    "REPORT_COLUMNS",
    "quantization_report",
    "quantization_warnings",
]

#: thresholds of ``quantization_warnings`` (see the module docstring for why)
MAX_SATURATED_SHARE = 1e-3
MAX_UNDERFLOW_SHARE = 0.25
MAX_REL_ERROR = 0.1

REPORT_COLUMNS = (
    "name",
    "kind",
    "batchnorm_stat",
    "format",
    "numel",
    "absmax",
    "limit",
    "saturated",
    "saturated_share",
    "underflow",
    "underflow_share",
    "nonfinite",
    "rel_error",
    "max_abs_error",
)
BN_STATS = ("running_mean", "running_var")


def _kind(model: nn.Module, name: str) -> tuple[str, str]:
    """(``parameter``/``buffer``, the BatchNorm statistic's name or "") of a weight_tensors name."""
    mname, _, tname = name.rpartition(".")
    mod = model.get_submodule(mname)
    kind = "parameter" if tname in mod._parameters else "buffer"
    return kind, tname if isinstance(mod, _BatchNorm) and tname in BN_STATS else ""


def _saturated(fmt, x: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """Boolean mask of the finite values ``x`` beyond the format's range, and the format's limit."""
    if hasattr(fmt, "saturated"):  # block and group formats know their own ranges
        return fmt.saturated(x, scale)
    if isinstance(fmt, FloatFormat):
        return x.abs() > fmt.max, fmt.max
    if isinstance(fmt, FixedPoint):  # the code encode computes before it clamps
        code = torch.round((x if fmt.bits <= 24 else x.double()) * 2.0**fmt.frac_bits)
        return (code < fmt.code_min) | (code > fmt.code_max), fmt.max
    if isinstance(fmt, IntSymmetric) and scale is not None:
        s = scale.to(device=x.device, dtype=torch.float32)
        code = torch.round(x * torch.reciprocal(s))
        return code.abs() > fmt.qmax, float(s.max()) * fmt.qmax
    top = getattr(fmt, "max", None)  # another Format implementation: its max if it has one
    if isinstance(top, (int, float)):
        return x.abs() > top, float(top)
    return torch.zeros_like(x, dtype=torch.bool), math.nan


def _row(fmt, name: str, t: torch.Tensor) -> dict[str, object]:
    x = t.detach().float()
    finite = torch.isfinite(x)
    x = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    try:
        scale = fmt.choose_qparams(x)
        q = fmt.quantize(x, scale)
    except FormatError as e:
        raise QfiError(f"cannot quantize {name!r} in {fmt.name}: {e}") from e
    sat, limit = _saturated(fmt, x, scale)
    n, nonfinite = x.numel(), int((~finite).sum())
    if nonfinite:
        sat &= finite
        under = finite & (x != 0) & (q == 0)
        err, ref = (q.double() - x.double())[finite], x.double()[finite]
    else:  # the common case: nothing to mask
        under = (x != 0) & (q == 0)
        err, ref = q.double() - x.double(), x
    num = float(torch.sum(err.double() ** 2)) if err.numel() else 0.0
    den = float(torch.sum(ref.double() ** 2)) if ref.numel() else 0.0
    if den > 0:
        rel = math.sqrt(num / den) if math.isfinite(num) else math.inf
    else:
        rel = 0.0 if num == 0 else math.inf
    n_sat, n_under = int(sat.sum()), int(under.sum())
    return {
        "name": name,
        "format": fmt.name,
        "numel": n,
        "absmax": float(ref.abs().max()) if ref.numel() else 0.0,
        "limit": limit,
        "saturated": n_sat,
        "saturated_share": n_sat / n if n else 0.0,
        "underflow": n_under,
        "underflow_share": n_under / n if n else 0.0,
        "nonfinite": nonfinite,
        "rel_error": rel,
        "max_abs_error": float(err.abs().max()) if err.numel() else 0.0,
    }


@torch.no_grad()
def quantization_report(model: nn.Module, fmt: object, names: object = None,
                        exclude: object = None, bn_stats: bool = False) -> pd.DataFrame:
    """One row per selected weight tensor (``select_weights(model, names, exclude)``, in model
    order) with the columns of ``REPORT_COLUMNS``; see the module docstring.  The model is not
    changed."""
    fmt = get_format(fmt)
    tensors = weight_tensors(model, bn_stats)
    rows = []
    for name in select_weights(model, names, exclude, bn_stats):
        kind, bn = _kind(model, name)
        rows.append({**_row(fmt, name, tensors[name]), "kind": kind, "batchnorm_stat": bn})
    return pd.DataFrame(rows, columns=list(REPORT_COLUMNS))


def quantization_warnings(
    report: pd.DataFrame,
    max_saturated_share: float = MAX_SATURATED_SHARE,
    max_underflow_share: float = MAX_UNDERFLOW_SHARE,
    max_rel_error: float = MAX_REL_ERROR,
) -> list[str]:
    """One line per tensor of ``report`` whose saturated share, underflow share or relative error
    exceeds its threshold (strictly), in report order."""
    bad = report[
        (report["saturated_share"] > max_saturated_share)
        | (report["underflow_share"] > max_underflow_share)
        | (report["rel_error"] > max_rel_error)
    ]
    lines = []
    for r in bad.itertuples(index=False):  # one per flagged tensor: few
        what = f"BatchNorm {r.batchnorm_stat}" if r.batchnorm_stat else r.kind
        lines.append(
            f"{r.format} crushes {r.name!r} ({what}, {r.numel:,} values): "
            f"{r.saturated_share:.1%} saturate (|x| up to {r.absmax:.6g}, limit {r.limit:.6g}), "
            f"{r.underflow_share:.1%} underflow to 0, relative error {r.rel_error:.3g}"
        )
    return lines
