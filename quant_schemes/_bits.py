"""Small integer helpers shared by the formats (private)."""

from __future__ import annotations

import torch
from torch import Tensor

from quant_schemes.base import FormatError

#: coarse role of a bit, from the prefix of its name in ``bit_names``
ROLE_OF_PREFIX = {
    "sign": "sign",
    "exp": "exponent",
    "man": "mantissa",
    "int": "integer",
    "frac": "fraction",
    "mag": "magnitude",
}


def roles_of(bit_names: tuple[str, ...]) -> tuple[str, ...]:
    """``("man0", "exp0", "sign")`` -> ``("mantissa", "exponent", "sign")``."""
    return tuple(ROLE_OF_PREFIX[name.rstrip("0123456789")] for name in bit_names)


def field_names(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(count))


def signed_codes(qdata: Tensor, bits: int) -> Tensor:
    """Two's complement value of the low ``bits`` bits of ``qdata`` (sign-extended).

    int32 when ``bits < 32`` or ``qdata`` is already int32, else int64.
    """
    mask, sign = (1 << bits) - 1, 1 << (bits - 1)
    if bits == 32 and qdata.dtype == torch.int32:
        return qdata
    if bits == 32:
        return ((qdata.to(torch.int64) & mask) ^ sign) - sign
    low = qdata & mask if qdata.dtype == torch.int32 else (qdata.to(torch.int64) & mask).to(torch.int32)
    return (low ^ sign) - sign


def pack_signed(codes: Tensor, bits: int) -> Tensor:
    """Signed integer codes in range -> ``qdata`` (unsigned pattern, or signed int32 if 32 bits)."""
    codes = codes.to(torch.int32)
    return codes if bits == 32 else codes & ((1 << bits) - 1)


def check_qdata(qdata: object, fmt_name: str) -> Tensor:
    if not isinstance(qdata, Tensor):
        raise FormatError(
            f"{fmt_name}: expected Encoded.qdata to be a torch.Tensor, got {type(qdata).__name__}"
        )
    if qdata.is_floating_point() or qdata.is_complex() or qdata.dtype == torch.bool:
        raise FormatError(
            f"{fmt_name}: expected integer codes (int32) in Encoded.qdata, got dtype {qdata.dtype}"
        )
    return qdata
